"""Grid-constrained decoding: a token-level automaton that admits exactly the answers
`formats.grid_to_text` can write (plus the answer suffix), in the ids `encode_episode` uses.

    grammar = grid_grammar(vocab, fmt)
    state = start(grammar, (G, B))
    logits = jnp.where(allowed(grammar, state, vocab_size), logits, -jnp.inf)
    state = advance(grammar, state, chosen_tokens)

A weak model spends most of its probability on text that is not a grid (a row that runs on, a
row number out of order). Masking every token the grid format forbids and renormalising over
the rest (as guided-decoding libraries do) makes every finished answer a well-formed grid of
1..30 x 1..30 colours, and makes the format's forced tokens (row numbers, newlines, the
suffix) cost nothing: greedy and sampled decoding and the DFS then choose only among colours,
sizes and where a grid ends.

The automaton, per sequence (all int32 unless said):
    phase   HEAD_H, HEAD_W: reading the `{h}x{w}` header's numbers (shape formats)
            ROW_NUM: the row's `{r} ` prefix (numbered formats), forced
            CELLS: the row's colours, then its newline
            ROW_END: after a row (or before the first): another row, or the answer suffix
            SUFFIX: the rest of the answer suffix, forced; DONE: after it
    number  bool [31]: header numbers still consistent with the tokens read (a number may be
            several tokens, e.g. Phi-3's)
    k       tokens read of the current number / prefix / suffix, or cells of the current row
    rows    rows finished
    h, w    the header's shape; w = 0 until known (no header: the first row's width)
    max_h, max_w   the largest shape allowed (default 30 x 30; e.g. a task's answer cap)

Everything is traced (no static flags), so one program serves every grid format.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arc_jax.data.formats import MAX_SIDE, GridFormat, get_grid_format
from arc_jax.data.tokenizer import PIECES, TokenVocab

Array = jax.Array

HEAD_H, HEAD_W, ROW_NUM, CELLS, ROW_END, SUFFIX, DONE = range(7)
GRAMMARS = ("none", "grid")


class GridGrammar(NamedTuple):
    """The ids the automaton reads (a pytree of arrays; `grid_grammar` builds it).

    digits [10], newline, x, space: as in `TokenVocab`
    numbers [31, L], number_lens [31]: the ids of n = 0..30 at a line start
    suffix [S], suffix_len: the answer suffix (ends with the end id)
    shape_header, row_numbers: bool scalars, the grid format
    """

    digits: Array
    newline: Array
    x: Array
    space: Array
    numbers: Array
    number_lens: Array
    suffix: Array
    suffix_len: Array
    shape_header: Array
    row_numbers: Array


class GrammarState(NamedTuple):
    """Where each sequence is in its answer (fields `[...]`, `number` `[..., 31]`)."""

    phase: Array
    number: Array
    k: Array
    rows: Array
    h: Array
    w: Array
    max_h: Array
    max_w: Array


def grid_grammar(vocab: TokenVocab, fmt: GridFormat | str) -> GridGrammar:
    """The automaton's ids for answers in `fmt`, from the vocab `encode_episode` uses."""
    fmt = get_grid_format(fmt) if isinstance(fmt, str) else fmt
    at = PIECES.index("answer_suffix")
    suffix_len = int(vocab.piece_lens[at])
    return GridGrammar(
        digits=jnp.asarray(vocab.digits, jnp.int32), newline=jnp.int32(vocab.newline),
        x=jnp.int32(vocab.x), space=jnp.int32(vocab.space),
        numbers=jnp.asarray(vocab.numbers, jnp.int32),
        number_lens=jnp.asarray(vocab.number_lens, jnp.int32),
        suffix=jnp.asarray(np.asarray(vocab.pieces[at])[:suffix_len], jnp.int32),
        suffix_len=jnp.int32(suffix_len), shape_header=jnp.bool_(fmt.shape_header),
        row_numbers=jnp.bool_(fmt.row_numbers))


def _sizes(most: Array) -> Array:
    """bool [..., 31]: the header numbers 1..`most` (`most [...]`)."""
    n = jnp.arange(MAX_SIDE + 1)
    return (n >= 1) & (n <= jnp.asarray(most)[..., None])


def start(grammar: GridGrammar, shape: tuple[int, ...],
          max_shape: Array | None = None) -> GrammarState:
    """The state before an answer's first token, for sequences of batch `shape`; `max_shape`
    `[*shape, 2]` bounds each one's (h, w) (None: 30 x 30)."""
    zeros = jnp.zeros(shape, jnp.int32)
    if max_shape is None:
        max_h = max_w = zeros + MAX_SIDE
    else:
        bounds = jnp.clip(jnp.asarray(max_shape, jnp.int32), 1, MAX_SIDE)
        max_h, max_w = bounds[..., 0] + zeros, bounds[..., 1] + zeros
    phase = jnp.where(grammar.shape_header, HEAD_H, ROW_END) + zeros
    return GrammarState(phase, _sizes(max_h), zeros, zeros, zeros, zeros, max_h, max_w)


def _one_allowed(g: GridGrammar, s: GrammarState, vocab_size: int) -> Array:
    """bool [V]: the tokens one sequence in state `s` may produce next."""
    def mark(mask, ids, ok):  # mask[ids] |= ok; ids of -1 (padding) are dropped
        ids = jnp.where(ids < 0, vocab_size, ids)
        return mask.at[ids].max(jnp.broadcast_to(ok, ids.shape), mode="drop")

    mask = jnp.zeros((vocab_size,), bool)
    lens = g.number_lens
    k_at = jnp.clip(s.k, 0, g.numbers.shape[1] - 1)
    # header numbers: any next token of a still-possible number, or the terminator after one
    head = (s.phase == HEAD_H) | (s.phase == HEAD_W)
    mask = mark(mask, g.numbers[:, k_at], head & s.number & (s.k < lens))
    complete = jnp.any(s.number & (lens == s.k)) & (s.k > 0)
    mask = mark(mask, jnp.where(s.phase == HEAD_H, g.x, g.newline), head & complete)
    # a row's number prefix: its tokens, then the space
    r = jnp.clip(s.rows + 1, 0, MAX_SIDE)
    in_number = s.k < lens[r]
    mask = mark(mask, g.numbers[r, k_at], (s.phase == ROW_NUM) & in_number)
    mask = mark(mask, g.space, (s.phase == ROW_NUM) & ~in_number)
    # cells: exactly w colours (up to 30 while the first row of a headerless grid sets w)
    known = s.w > 0
    cells = s.phase == CELLS
    mask = mark(mask, g.digits, cells & jnp.where(known, s.k < s.w, s.k < s.max_w))
    mask = mark(mask, g.newline, cells & jnp.where(known, s.k == s.w, s.k >= 1))
    # between rows: the next row's first token, or the end of the grid
    between = s.phase == ROW_END
    more = jnp.where(g.shape_header, s.rows < s.h, s.rows < s.max_h)
    can_end = jnp.where(g.shape_header, s.rows == s.h, s.rows >= 1)
    mask = mark(mask, g.numbers[r, 0], between & more & g.row_numbers)
    mask = mark(mask, g.digits, between & more & ~g.row_numbers)
    mask = mark(mask, g.suffix[0], between & can_end)
    # the rest of the suffix
    k_suffix = jnp.clip(s.k, 0, g.suffix.shape[0] - 1)
    return mark(mask, g.suffix[k_suffix], (s.phase == SUFFIX) & (s.k < g.suffix_len))


def _one_advance(g: GridGrammar, s: GrammarState, tok: Array) -> GrammarState:
    """The state after one sequence in state `s` produced `tok` (an allowed token)."""
    lens = g.number_lens
    k_at = jnp.clip(s.k, 0, g.numbers.shape[1] - 1)
    r = jnp.clip(s.rows + 1, 0, MAX_SIDE)

    # header: the terminator fixes the number, any other token narrows it down
    term = jnp.where(s.phase == HEAD_H, g.x, g.newline)
    ends = tok == term
    value = jnp.argmax(s.number & (lens == s.k)).astype(jnp.int32)
    head = (s.phase == HEAD_H) | (s.phase == HEAD_W)
    head_phase = jnp.where(ends, jnp.where(s.phase == HEAD_H, HEAD_W, ROW_END), s.phase)
    head_number = jnp.where(ends, _sizes(s.max_w), s.number & (g.numbers[:, k_at] == tok))
    head_k = jnp.where(ends, 0, s.k + 1)

    # row number prefix: the space starts the cells
    prefix_done = s.k >= lens[r]
    # cells: the newline ends the row (and fixes w for a headerless grid)
    newline = tok == g.newline
    # between rows: the suffix's first token, or the next row's first token
    to_suffix = tok == g.suffix[0]
    end_phase = jnp.where(to_suffix, jnp.where(g.suffix_len > 1, SUFFIX, DONE),
                          jnp.where(g.row_numbers, ROW_NUM, CELLS))

    phase = jnp.select(
        [head, s.phase == ROW_NUM, s.phase == CELLS, s.phase == ROW_END, s.phase == SUFFIX],
        [head_phase, jnp.where(prefix_done, CELLS, ROW_NUM), jnp.where(newline, ROW_END, CELLS),
         end_phase, jnp.where(s.k + 1 >= g.suffix_len, DONE, SUFFIX)], s.phase)
    k = jnp.select(
        [head, s.phase == ROW_NUM, s.phase == CELLS, s.phase == ROW_END, s.phase == SUFFIX],
        [head_k, jnp.where(prefix_done, 0, s.k + 1), jnp.where(newline, 0, s.k + 1),
         jnp.int32(1), s.k + 1], s.k)
    number = jnp.where(head, head_number, s.number)
    h = jnp.where((s.phase == HEAD_H) & ends, value, s.h)
    w = jnp.where((s.phase == HEAD_W) & ends, value,
                  jnp.where((s.phase == CELLS) & newline & (s.w == 0), s.k, s.w))
    rows = s.rows + ((s.phase == CELLS) & newline)
    return GrammarState(phase.astype(jnp.int32), number, k.astype(jnp.int32),
                        rows.astype(jnp.int32), h.astype(jnp.int32), w.astype(jnp.int32),
                        s.max_h, s.max_w)


def allowed(grammar: GridGrammar, state: GrammarState, vocab_size: int) -> Array:
    """bool `[..., V]`: the tokens each sequence of `state` (batch `[...]`) may produce next.
    A finished sequence (DONE) may produce anything, so masked logits never go all -inf."""
    fn = lambda s: _one_allowed(grammar, s, vocab_size)
    for _ in range(state.phase.ndim):
        fn = jax.vmap(fn)
    mask = fn(state)
    return mask | (state.phase == DONE)[..., None]


def advance(grammar: GridGrammar, state: GrammarState, tokens: Array) -> GrammarState:
    """The states after each sequence of `state` (batch `[...]`) produced `tokens [...]`."""
    fn = lambda s, t: _one_advance(grammar, s, t)
    for _ in range(state.phase.ndim):
        fn = jax.vmap(fn)
    return fn(state, jnp.asarray(tokens, jnp.int32))


def mask_log_probs(log_probs: Array, mask: Array) -> Array:
    """Renormalises `log_probs [..., V]` over the tokens `mask [..., V]` allows (-inf others)."""
    masked = jnp.where(mask, log_probs, -jnp.inf)
    return masked - jax.nn.logsumexp(masked, axis=-1, keepdims=True)
