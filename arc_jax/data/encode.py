"""On-device encoding: padded grids → token ids of a prompt, inside jit.

An episode (context pairs + a target pair, all padded `[30, 30]` grids with shapes) is spelled as
fixed-size token blocks with validity masks, in prompt order:

    bos prefix | (input_label grid output_label grid) × P | input_label grid query_suffix | grid
    answer_suffix

then compacted (cumsum of the validity mask → position, scatter) into one row of a length bucket.
The first input_label (context pair 0's, or the query's when no pair is kept) is written as
`first_input_label`: what the tokenizer writes right after the prefix (see
`arc_jax.data.tokenizer`). Context pairs that do not fit are dropped from the end when
`truncate`; `fits` says whether the whole episode fit, so a caller can skip instead.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arc_jax.data.formats import (
    LOSS_ON,
    MAX_SIDE,
    GridFormat,
    PromptTemplate,
    answer_text,
    prompt_text,
)
from arc_jax.data.tokenizer import PIECES, TokenizerError, TokenVocab, encode_text, token_vocab


class EncodedExample(NamedTuple):
    """One encoded episode in a bucket of length T (a leading batch axis when vmapped).

    tokens: [T] int32           prompt + answer ids, `pad` after `length`
    loss_mask: [T] bool         tokens to be predicted (from position t-1): the answer grid and
                                its end marker, plus context output grids with loss_on=all_outputs
    positions: [T] int32        0..length-1, 0 on padding
    attention_mask: [T] bool    True on the `length` real tokens
    length: int32               tokens written (clipped to T)
    prompt_length: int32        tokens before the answer (where decoding starts)
    n_context: int32            context pairs kept
    fits: bool                  the whole episode (all context pairs) fit in T
    """

    tokens: jax.Array
    loss_mask: jax.Array
    positions: jax.Array
    attention_mask: jax.Array
    length: jax.Array
    prompt_length: jax.Array
    n_context: jax.Array
    fits: jax.Array


class _Block(NamedTuple):
    tokens: jax.Array  # [n] int32
    valid: jax.Array  # [n] bool
    loss: jax.Array  # [n] bool


def _concat(*blocks: _Block) -> _Block:
    return _Block(*(jnp.concatenate(parts) for parts in zip(*blocks, strict=True)))


def _piece(vocab: TokenVocab, name: str, valid, loss=False) -> _Block:
    i = PIECES.index(name)
    ids = jnp.asarray(vocab.pieces[i])
    mask = (jnp.arange(ids.shape[0]) < vocab.piece_lens[i]) & valid
    return _Block(ids, mask, mask & loss)


def _first_label(vocab: TokenVocab, block: _Block, first) -> _Block:
    """`block` (which starts with an input_label piece) with `first_input_label`'s ids there
    when the traced scalar `first` is True (both pieces have the same length)."""
    width = vocab.pieces.shape[1]
    alt = jnp.asarray(vocab.pieces[PIECES.index("first_input_label")])
    return block._replace(
        tokens=block.tokens.at[:width].set(jnp.where(first, alt, block.tokens[:width])))


def grid_block(vocab: TokenVocab, fmt: GridFormat, grid, shape, valid, loss=False) -> _Block:
    """Token block of one grid `[30, 30]` with shape `[2]` (h, w); `valid`, `loss` scalars.

    Size: 8 (header) + 30 rows × (3 row-number + 1 space + 30 cells + 1 newline) at most.
    """
    h, w = shape[0], shape[1]
    rows = jnp.arange(MAX_SIDE)
    row_valid = (rows < h) & valid
    cells = jnp.asarray(vocab.digits)[jnp.clip(grid, 0, 9)]  # [30, 30]
    cell_valid = (jnp.arange(MAX_SIDE)[None, :] < w) & row_valid[:, None]
    newline = jnp.full((MAX_SIDE, 1), vocab.newline, jnp.int32)
    parts_tokens = [cells, newline]
    parts_valid = [cell_valid, row_valid[:, None]]
    if fmt.row_numbers:
        numbers = jnp.asarray(vocab.numbers)[rows + 1]  # [30, 3]
        number_valid = jnp.arange(numbers.shape[1])[None, :] < jnp.asarray(vocab.number_lens)[
            rows + 1, None]
        space = jnp.full((MAX_SIDE, 1), vocab.space, jnp.int32)
        parts_tokens = [numbers, space] + parts_tokens
        parts_valid = [number_valid & row_valid[:, None], row_valid[:, None]] + parts_valid
    tokens = jnp.concatenate(parts_tokens, axis=1).reshape(-1)
    mask = jnp.concatenate(parts_valid, axis=1).reshape(-1)
    block = _Block(tokens, mask, mask & loss)
    if fmt.shape_header:
        numbers = jnp.asarray(vocab.numbers)
        lens = jnp.asarray(vocab.number_lens)
        width = numbers.shape[1]
        header_tokens = jnp.concatenate([
            numbers[h], jnp.asarray([vocab.x]), numbers[w], jnp.asarray([vocab.newline])])
        header_valid = jnp.concatenate([
            jnp.arange(width) < lens[h], jnp.ones(1, bool), jnp.arange(width) < lens[w],
            jnp.ones(1, bool)]) & valid
        block = _concat(_Block(header_tokens, header_valid, header_valid & loss), block)
    return block


def _length(block: _Block) -> jax.Array:
    return jnp.sum(block.valid, dtype=jnp.int32)


def encode_episode(
    vocab: TokenVocab,
    fmt: GridFormat,
    context: jax.Array,
    context_shapes: jax.Array,
    n_context: jax.Array,
    target: jax.Array,
    target_shapes: jax.Array,
    *,
    seq_len: int,
    loss_on: str = "target",
    with_answer: bool = True,
    truncate: bool = True,
) -> EncodedExample:
    """Encodes one episode into a bucket of `seq_len` tokens (jittable, vmappable).

    context: [P, 2, 30, 30] (pair, input/output) with context_shapes [P, 2, 2]; the first
    `n_context` pairs are used. target: [2, 30, 30] with target_shapes [2, 2]; its output is the
    answer (left out when `with_answer` is False, e.g. for decoding).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    n_pairs = context.shape[0]
    all_outputs = loss_on == "all_outputs"
    true = jnp.asarray(True)

    def pair_block(grids, shapes, valid, first):
        return _first_label(vocab, _concat(
            _piece(vocab, "input_label", valid),
            grid_block(vocab, fmt, grids[0], shapes[0], valid),
            _piece(vocab, "output_label", valid),
            grid_block(vocab, fmt, grids[1], shapes[1], valid, loss=all_outputs),
        ), first)

    head = _concat(_piece(vocab, "bos", true), _piece(vocab, "prefix", true))
    query = _concat(
        _piece(vocab, "input_label", true),
        grid_block(vocab, fmt, target[0], target_shapes[0], true),
        _piece(vocab, "query_suffix", true),
    )
    answer_valid = jnp.asarray(with_answer)
    answer = _concat(
        grid_block(vocab, fmt, target[1], target_shapes[1], answer_valid, loss=True),
        _piece(vocab, "answer_suffix", answer_valid, loss=True),
    )
    pair_valid = jnp.arange(n_pairs) < n_context
    pairs = jax.vmap(pair_block)(context, context_shapes, pair_valid,
                                 jnp.arange(n_pairs) == 0)  # each [P, n]
    pair_lens = jnp.sum(pairs.valid, axis=1, dtype=jnp.int32)
    fixed = _length(head) + _length(query) + _length(answer)
    total = fixed + jnp.sum(pair_lens)
    if truncate:
        fits_with = (fixed + jnp.cumsum(pair_lens) <= seq_len) & pair_valid
        kept = jnp.sum(fits_with, dtype=jnp.int32)
        keep = jnp.arange(n_pairs) < kept
        pairs = _Block(pairs.tokens, pairs.valid & keep[:, None], pairs.loss & keep[:, None])
    else:
        kept = jnp.minimum(n_context, n_pairs).astype(jnp.int32)
    query = _first_label(vocab, query, kept == 0)
    pairs = _Block(*(x.reshape(-1) for x in pairs))
    prompt_length = _length(head) + _length(pairs) + _length(query)
    full = _concat(head, pairs, query, answer)

    position = jnp.cumsum(full.valid) - 1
    index = jnp.where(full.valid, position, seq_len)  # invalid → out of range → dropped
    tokens = jnp.full((seq_len,), vocab.pad, jnp.int32).at[index].set(full.tokens, mode="drop")
    loss_mask = jnp.zeros((seq_len,), bool).at[index].set(full.loss, mode="drop")
    length = jnp.minimum(_length(full), seq_len)
    attention_mask = jnp.arange(seq_len) < length
    positions = jnp.where(attention_mask, jnp.arange(seq_len), 0).astype(jnp.int32)
    return EncodedExample(
        tokens=tokens, loss_mask=loss_mask, positions=positions, attention_mask=attention_mask,
        length=length, prompt_length=jnp.minimum(prompt_length, seq_len), n_context=kept,
        fits=total <= seq_len,
    )


def episode_text(
    context: list[tuple[np.ndarray, np.ndarray]],
    query: np.ndarray,
    answer: np.ndarray | None,
    fmt: GridFormat,
    template: PromptTemplate,
) -> tuple[str, str]:
    """Host twin of `encode_episode` as text: (prompt, answer) for unpadded grids `[h, w]`."""
    prompt = prompt_text(context, query, fmt, template)
    return prompt, answer_text(answer, fmt, template) if answer is not None else ""


def device_layout(
    vocab: TokenVocab,
    fmt: GridFormat,
    context: list[tuple[np.ndarray, np.ndarray]],
    query: np.ndarray,
    answer: np.ndarray | None,
) -> list[tuple[str, list[int]]]:
    """Host twin of `encode_episode` for unpadded grids `[h, w]`: the ids it writes, as
    (what, ids) spans in order (a template piece, or one line of a named grid)."""
    def piece(name):
        i = PIECES.index(name)
        return name, vocab.pieces[i, : vocab.piece_lens[i]].tolist()

    def number(n):
        return vocab.numbers[n, : vocab.number_lens[n]].tolist()

    def grid(g, what):
        h, w = g.shape
        spans = []
        if fmt.shape_header:
            spans.append((f"{what} grid, shape header",
                          number(h) + [int(vocab.x)] + number(w) + [int(vocab.newline)]))
        for r in range(h):
            ids = number(r + 1) + [int(vocab.space)] if fmt.row_numbers else []
            ids += [int(vocab.digits[c]) for c in g[r]] + [int(vocab.newline)]
            spans.append((f"{what} grid, row {r + 1}", ids))
        return spans

    spans = [piece("bos"), piece("prefix")]
    for k, (grid_in, grid_out) in enumerate(context):
        spans.append(piece("first_input_label" if k == 0 else "input_label"))
        spans += grid(grid_in, f"context pair {k + 1} input")
        spans.append(piece("output_label"))
        spans += grid(grid_out, f"context pair {k + 1} output")
    spans.append(piece("input_label" if context else "first_input_label"))
    spans += grid(query, "query input")
    spans.append(piece("query_suffix"))
    if answer is not None:
        spans += grid(answer, "answer")
        spans.append(piece("answer_suffix"))
    return spans


def _sample_episodes() -> list[tuple[list, np.ndarray, np.ndarray]]:
    """(context, query, answer) prompts that use every digit, row numbers 1..30, two-digit
    header numbers, both places of the first input label, and several context pairs."""
    rng = np.random.default_rng(0)
    grid = lambda h, w: rng.integers(0, 10, (h, w))
    return [
        ([(grid(30, 29), grid(3, 12)), (grid(2, 2), grid(1, 1))], grid(11, 1),
         np.arange(10).reshape(1, 10)),
        ([], grid(5, 7), grid(4, 30)),
    ]


def _padded_grid(g: np.ndarray) -> np.ndarray:
    out = np.zeros((MAX_SIDE, MAX_SIDE), np.int32)
    out[: g.shape[0], : g.shape[1]] = g
    return out


def _describe(template: PromptTemplate, what: str) -> str:
    texts = template.pieces()
    texts["first_input_label"] = texts["input_label"]
    if what == "bos":
        return "the tokenizer's special prefix (bos)"
    return f"{what} {texts[what]!r}" if what in texts else what


def check_device_encoding(
    tokenizer, fmt: GridFormat, template: PromptTemplate = PromptTemplate()
) -> TokenVocab:
    """Derives the vocab and proves that on-device encoding equals the tokenizer's own encoding
    of sample prompts (every digit, row numbers 1..30, header numbers, with and without context
    pairs); raises `TokenizerError` naming the first piece where it does not hold."""
    vocab = token_vocab(tokenizer, template)
    samples = _sample_episodes()
    expected = [encode_text(tokenizer, *episode_text(c, q, a, fmt, template))
                for c, q, a in samples]
    n_pairs = max(len(c) for c, _, _ in samples)
    blank = np.zeros((2, MAX_SIDE, MAX_SIDE), np.int32)
    context = np.stack([np.stack(
        [np.stack([_padded_grid(g) for g in pair]) for pair in c]
        + [blank] * (n_pairs - len(c))) for c, _, _ in samples])
    context_shapes = np.asarray([[[g.shape for g in pair] for pair in c]
                                 + [[(0, 0), (0, 0)]] * (n_pairs - len(c))
                                 for c, _, _ in samples])
    encode = jax.jit(jax.vmap(functools.partial(
        encode_episode, vocab, fmt, seq_len=max(map(len, expected)) + 8)))
    got = jax.device_get(encode(
        context, context_shapes, np.asarray([len(c) for c, _, _ in samples], np.int32),
        np.stack([np.stack([_padded_grid(q), _padded_grid(a)]) for _, q, a in samples]),
        np.asarray([[q.shape, a.shape] for _, q, a in samples])))
    for i, ((c, q, a), want) in enumerate(zip(samples, expected, strict=True)):
        ids = got.tokens[i, : got.length[i]].tolist()
        if ids == want:
            continue
        first = next((k for k, (u, v) in enumerate(zip(ids, want, strict=False)) if u != v),
                     min(len(ids), len(want)))
        spans = device_layout(vocab, fmt, c, q, a)
        owners = [what for what, span in spans for _ in span]
        where = _describe(template, owners[first]) if first < len(owners) else "the end"
        raise TokenizerError(
            f"on-device encoding differs from the tokenizer's at token {first}, in {where} "
            f"(device {ids[first:first + 5]} vs tokenizer {want[first:first + 5]}); "
            "this tokenizer does not spell grids token by token")
    return vocab
