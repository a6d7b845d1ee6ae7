"""On-device encoding: padded grids → token ids of a prompt, inside jit.

An episode (context pairs + a target pair, all padded `[30, 30]` grids with shapes) is spelled as
fixed-size token blocks with validity masks, in prompt order:

    bos prefix | (input_label grid output_label grid) × P | input_label grid query_suffix | grid
    answer_suffix

then compacted (cumsum of the validity mask → position, scatter) into one row of a length bucket.
Context pairs that do not fit are dropped from the end when `truncate`; `fits` says whether the
whole episode fit, so a caller can skip instead.
"""

from __future__ import annotations

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

    def pair_block(grids, shapes, valid):
        return _concat(
            _piece(vocab, "input_label", valid),
            grid_block(vocab, fmt, grids[0], shapes[0], valid),
            _piece(vocab, "output_label", valid),
            grid_block(vocab, fmt, grids[1], shapes[1], valid, loss=all_outputs),
        )

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
    pairs = jax.vmap(pair_block)(context, context_shapes, pair_valid)  # each [P, n]
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


def check_device_encoding(
    tokenizer, fmt: GridFormat, template: PromptTemplate = PromptTemplate()
) -> TokenVocab:
    """Derives the vocab and proves that on-device encoding equals the tokenizer's own encoding
    of a sample prompt (every digit, row number 1..30, both header numbers); raises
    `TokenizerError` when it does not hold."""
    vocab = token_vocab(tokenizer, template)
    rng = np.random.default_rng(0)
    grids = [
        rng.integers(0, 10, (30, 29)), rng.integers(0, 10, (3, 12)),
        rng.integers(0, 10, (11, 1)), np.arange(10).reshape(1, 10),
    ]
    context = [(grids[0], grids[1])]
    query, answer = grids[2], grids[3]
    expected = encode_text(tokenizer, *episode_text(context, query, answer, fmt, template))

    def padded(g):
        out = np.zeros((MAX_SIDE, MAX_SIDE), np.int32)
        out[: g.shape[0], : g.shape[1]] = g
        return out

    got = encode_episode(
        vocab, fmt,
        context=jnp.asarray(np.stack([np.stack([padded(grids[0]), padded(grids[1])])])),
        context_shapes=jnp.asarray([[grids[0].shape, grids[1].shape]]),
        n_context=jnp.int32(1),
        target=jnp.asarray(np.stack([padded(query), padded(answer)])),
        target_shapes=jnp.asarray([query.shape, answer.shape]),
        seq_len=len(expected) + 8,
    )
    got_ids = np.asarray(got.tokens[: int(got.length)]).tolist()
    if got_ids != expected:
        first = next(
            (i for i, (a, b) in enumerate(zip(got_ids, expected, strict=False)) if a != b),
            min(len(got_ids), len(expected)),
        )
        raise TokenizerError(
            f"on-device encoding differs from the tokenizer's at token {first} "
            f"(device {got_ids[first:first + 5]} vs tokenizer {expected[first:first + 5]}); "
            "this tokenizer does not spell grids token by token"
        )
    return vocab
