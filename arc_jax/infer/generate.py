"""Jitted decoding with a KV cache: greedy or sampled, batched over tasks' stacked adapters.

    generated = generate(model, params, prompts, lengths, max_new_tokens=N,
                         eos_token_id=int(vocab.end), pad_token_id=int(vocab.pad))

Prompts are right-padded `[B, T]` (as `pipeline.eval_batch(..., with_answer=False)` writes them,
`lengths = prompt_length`). The prompt is run once (prefill), then one token per step through a
`lax.while_loop` that stops when every row has produced `eos_token_id` or its tokens (`N`, or its
group's cap `max_new_per_group[g] <= N`: `answer_token_cap`). The KV
cache has a slot per position; a row's generated tokens overwrite its padding slots before any
query can see them, so rows of different lengths share one cache without masks.

Decoding is always over a leading group axis `G` (one adapter per group, base broadcast by
`jax.vmap`); `generate` is the `G = 1` case, `generate_per_task` runs `[G, B, T]` prompts with a
`[G, ...]` adapter stack: each group decodes exactly as a separate `generate` call would.

LongRoPE (as transformers, for a padded batch): a group's factors are chosen by its longest row.
Positions up to `original_max_position_embeddings` use the short factors; on the step the longest
row reaches that position the group's cache is recomputed with the long factors (once per group,
a `lax.cond` taken only on that step). Padding is given position -1 in the prefill, so a wide
bucket alone does not switch a group to the long factors.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from arc_jax.data.formats import MAX_SIDE, GridFormat, get_grid_format
from arc_jax.data.pipeline import grid_length
from arc_jax.data.tokenizer import PIECES, TokenVocab
from arc_jax.infer import grammar as gm
from arc_jax.model.lora import LoraConfig
from arc_jax.model.phi3 import Phi3, Phi3Config, init_cache, project_logits

Array = jax.Array


class Generated(NamedTuple):
    """Decoding output (`generate_per_task` adds a leading `[G]` axis to each field).

    tokens: [B, N] int32        generated ids; `pad_token_id` after a row's eos
    logprobs: [B, N] float32    log p(token | prefix) under the model's own distribution
                                (log_softmax of the raw logits: no temperature, no top-k), so
                                greedy and sampled candidates are scored alike; 0 after eos
    lengths: [B] int32          tokens generated, eos included
    finished: [B] bool          the row produced eos (else it ran out of `max_new_tokens` or of
                                its group's cap)
    """

    tokens: Array
    logprobs: Array
    lengths: Array
    finished: Array


def generate(
    model: Phi3, params: Mapping, prompts: Array, lengths: Array, *, max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None, pad_token_id: int, key: Array | None = None,
    temperature: float = 0.0, top_k: int = 0, lora: Mapping | None = None,
    lora_config: LoraConfig | None = None, grammar: gm.GridGrammar | None = None,
) -> Generated:
    """Decodes up to `max_new_tokens` after each of `prompts [B, T]` (right-padded, `lengths [B]`,
    each >= 1).

    Greedy when `temperature == 0`; otherwise samples from `softmax(logits / temperature)`,
    restricted to the `top_k` most likely tokens when `top_k > 0`; token `n` is drawn with
    `fold_in(key, n)`. A row stops at any id in `eos_token_id` (None: never). Compiled once per
    model, shapes, `max_new_tokens`, `pad_token_id` and number of eos ids; temperature, top-k and
    the eos ids are traced, so greedy and sampling share one program. With a `grammar`
    (`grammar.grid_grammar`), each token is chosen among those the grid automaton allows, from
    the model's distribution renormalised over them (`logprobs` are then of that distribution).
    """
    keys = None if key is None else jnp.asarray(key)[None]
    out = _decode(model, params, lora, lora_config, jnp.asarray(prompts)[None],
                  jnp.asarray(lengths)[None], **_options(
                      keys, 1, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k),
                  grammar=grammar, lora_axis=None)
    return jax.tree.map(lambda x: x[0], out)


def generate_per_task(
    model: Phi3, params: Mapping, lora_stack: Mapping | None, prompts: Array, lengths: Array, *,
    max_new_tokens: int, eos_token_id: int | Sequence[int] | None, pad_token_id: int,
    key: Array | None = None, temperature: float = 0.0, top_k: int = 0,
    lora_config: LoraConfig | None = None, group_keys: Array | None = None,
    mesh: Mesh | None = None, max_new_per_group: Array | None = None,
    grammar: gm.GridGrammar | None = None, max_shape: Array | None = None,
) -> Generated:
    """`generate` for G tasks at once: adapter `lora_stack[g]` (leading axis `[G]`) decodes
    `prompts [G, B, T]` with `lengths [G, B]` (e.g. B augmentations of task g's test input).

    Group g equals `generate(..., lora=lora_stack[g], key=jax.random.split(key, G)[g])` on its
    own rows, or `key=group_keys[g]` when `group_keys [G]` is given (keys that follow the group,
    not the batch it is decoded in). Fields of the result are `[G, B, ...]`. `lora_stack=None`
    runs the base for all. With a `mesh` of several devices the groups are sharded over it
    (G a multiple of its size). `max_new_per_group [G]`: group g's rows stop after this many
    tokens (at most `max_new_tokens`, which sets the program's shapes); the loop ends when every
    row is done, so a batch costs the steps of its largest cap, not of `max_new_tokens`.
    `grammar`: constrained decoding, as in `generate`; `max_shape [G, B, 2]` then bounds each
    row's grid (h, w) (None: 30 x 30).
    """
    prompts, lengths = jnp.asarray(prompts), jnp.asarray(lengths)
    keys = group_keys if group_keys is not None else (
        None if key is None else jax.random.split(key, prompts.shape[0]))
    options = _options(keys, prompts.shape[0], max_new_tokens, eos_token_id, pad_token_id,
                       temperature, top_k, max_new_per_group)
    lora_axis = None if lora_stack is None else 0
    if mesh is not None and mesh.size > 1:
        return _decode_sharded(model, params, lora_stack, lora_config, prompts, lengths,
                               **options, grammar=grammar, max_shape=max_shape,
                               lora_axis=lora_axis, mesh=mesh)
    return _decode(model, params, lora_stack, lora_config, prompts, lengths, **options,
                   grammar=grammar, max_shape=max_shape, lora_axis=lora_axis)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "pad", "lora_axis",
                                             "mesh"))
def _decode_sharded(model, params, lora, lora_config, prompts, lengths, *, keys, caps,
                    max_new_tokens, eos, pad, temperature, top_k, lora_axis, mesh,
                    grammar=None, max_shape=None) -> Generated:
    """`_decode` with the group axis sharded over `mesh` (its one axis): each device decodes its
    own groups, with no collectives; G must be a multiple of the mesh size."""
    axis = mesh.axis_names[0]

    def local(params, lora, prompts, lengths, keys, caps, eos, temperature, top_k, grammar,
              max_shape):
        return _decode(model, params, lora, lora_config, prompts, lengths, keys=keys, caps=caps,
                       max_new_tokens=max_new_tokens, eos=eos, pad=pad,
                       temperature=temperature, top_k=top_k, grammar=grammar,
                       max_shape=max_shape, lora_axis=lora_axis)

    group = P(axis)
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(), None if lora is None else group, group, group, group, group, P(), P(),
                  P(), P(), None if max_shape is None else group),
        out_specs=group, check_vma=False,
    )(params, lora, prompts, lengths, keys, caps, eos, temperature, top_k, grammar, max_shape)


def _options(keys, groups, max_new_tokens, eos_token_id, pad_token_id, temperature,
             top_k, max_new_per_group=None) -> dict:
    """Validated decoding options: static ints, traced sampling settings, eos ids `[E]` and
    per-group token caps `[G]` (default: `max_new_tokens` for all)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0:
        raise ValueError(f"need temperature >= 0 and top_k >= 0, got {temperature}, {top_k}")
    if temperature > 0 and keys is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if keys is None:  # unused by greedy decoding, but the program takes keys either way
        keys = jax.random.split(jax.random.key(0), groups)
    eos = [-1] if eos_token_id is None else np.ravel(eos_token_id).tolist()  # -1: never
    if max_new_per_group is None:
        caps = jnp.full((groups,), max_new_tokens, jnp.int32)
    else:
        caps = jnp.clip(jnp.asarray(max_new_per_group, jnp.int32).reshape(groups), 1,
                        max_new_tokens)
    return dict(keys=keys, caps=caps, max_new_tokens=int(max_new_tokens),
                eos=jnp.asarray(eos, jnp.int32),
                pad=int(pad_token_id), temperature=jnp.float32(temperature),
                top_k=jnp.int32(top_k))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "pad", "lora_axis"))
def _decode(model, params, lora, lora_config, prompts, lengths, *, keys, caps, max_new_tokens,
            eos, pad, temperature, top_k, lora_axis, grammar=None, max_shape=None) -> Generated:
    """The loop over `prompts [G, B, T]`, `lengths [G, B]`, `keys [G]`, token caps `caps [G]`,
    eos ids `eos [E]`; `grammar` (None: unconstrained) masks each step's logits, with shape
    bounds `max_shape [G, B, 2]`."""
    cfg = model.config
    prompts, lengths = prompts.astype(jnp.int32), lengths.astype(jnp.int32)
    g, b, t = prompts.shape
    n = max_new_tokens
    # Slots 0..t+n-2 hold positions; the last slot takes the prefill's padding (position -1).
    max_len = t + n
    original = cfg.original_max_position_embeddings
    switch = cfg.rope_type == "longrope" and max_len > original

    def hidden(ids, pos, cache, fresh=False):  # [G, B, s] -> hidden [G, B, s, d], cache
        # fresh: `cache` is empty, so attention runs over the call's own keys (blockwise)
        m = model.clone(fresh_cache=True) if fresh else model
        one = lambda lo, i, p, c: m.apply({"params": params}, i, p, lora=lo,
                                          lora_config=lora_config, cache=c, return_hidden=True)
        return jax.vmap(one, in_axes=(lora_axis, 0, 0, 0))(lora, ids, pos, cache)

    def logits(h):  # [G, B, d] -> [G, B, vocab]
        one = lambda lo, x: project_logits(model, params, x, lo, lora_config)
        return jax.vmap(one, in_axes=(lora_axis, 0))(lora, h)

    def empty_cache():
        flat = init_cache(cfg, g * b, max_len, model.dtype)
        return jax.tree.map(lambda x: x.reshape(g, b, *x.shape[1:]), flat)

    def at(x, pos):  # x [G, B, s, ...] at pos [G, B] -> [G, B, ...]
        return jnp.take_along_axis(x, pos.reshape(g, b, 1, *[1] * (x.ndim - 3)), axis=2)[:, :, 0]

    def top_k_filter(scaled):  # only traced into the top_k > 0 branch: sorting costs
        vocab = scaled.shape[-1]
        kth = jnp.take(jnp.sort(scaled, axis=-1), vocab - jnp.minimum(top_k, vocab), axis=-1)
        return jnp.where(scaled < kth[..., None], -jnp.inf, scaled)

    def sample(step_logits, i):
        scaled = step_logits / jnp.maximum(temperature, 1e-6)
        scaled = jax.lax.cond(top_k > 0, top_k_filter, lambda x: x, scaled)
        draw = lambda key, x: jax.random.categorical(jax.random.fold_in(key, i), x)
        return jax.vmap(draw)(keys, scaled).astype(jnp.int32)

    def choose(step_logits, i, done, state):  # -> tokens [G, B], logprobs [G, B], state
        if grammar is not None:
            step_logits = jnp.where(gm.allowed(grammar, state, step_logits.shape[-1]),
                                    step_logits, -jnp.inf)
        greedy = lambda x, i: jnp.argmax(x, axis=-1).astype(jnp.int32)
        tok = jax.lax.cond(temperature > 0, sample, greedy, step_logits, i)
        logp = jnp.take_along_axis(jax.nn.log_softmax(step_logits), tok[..., None], -1)[..., 0]
        if grammar is not None:
            state = gm.advance(grammar, state, tok)
        return (jnp.where(done, pad, tok).astype(jnp.int32), jnp.where(done, 0.0, logp),
                state)

    def is_eos(tok):
        return jnp.isin(tok, eos)

    index = jnp.arange(t)
    prefill_pos = jnp.where(index < lengths[..., None], index, -1)
    h, cache = hidden(prompts, prefill_pos, empty_cache(), fresh=True)
    state = None if grammar is None else gm.start(grammar, (g, b), max_shape)
    tok, logp, state = choose(logits(at(h, lengths - 1)), 0, jnp.zeros((g, b), bool), state)
    cap = caps[:, None]  # [G, 1]
    done = is_eos(tok) | (cap <= 1)
    rows = (jnp.arange(g)[:, None], jnp.arange(b)[None, :])
    seq = jnp.full((g, b, max_len), pad, jnp.int32).at[:, :, :t].set(prompts)
    seq = seq.at[(*rows, lengths)].set(tok)
    tokens = jnp.full((g, b, n), pad, jnp.int32).at[:, :, 0].set(tok)
    logprobs = jnp.zeros((g, b, n), jnp.float32).at[:, :, 0].set(logp)

    def next_logits(cache, seq, tok, pos):  # feed tok at pos [G, B] -> logits, cache
        h, cache = hidden(tok[..., None], pos[..., None], cache)
        out = (logits(h[:, :, 0]), cache)
        if not switch:
            return out
        cross = jnp.max(pos, axis=1) == original  # [G]: this group's longest row crosses now

        def recompute(out):
            full = jnp.broadcast_to(jnp.arange(max_len), (g, b, max_len))
            h, fresh = hidden(seq, full, empty_cache(), fresh=True)  # all positions: long factors
            pick = lambda x, y: jnp.where(cross.reshape(g, *[1] * (x.ndim - 1)), x, y)
            return jax.tree.map(pick, (logits(at(h, pos)), fresh), out)

        return jax.lax.cond(jnp.any(cross), recompute, lambda out: out, out)

    def cond(carry):
        i, *_, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, seq, tokens, logprobs, tok, done, state = carry
        pos = lengths + i - 1  # where the previous token goes
        step_logits, cache = next_logits(cache, seq, tok, pos)
        tok, logp, state = choose(step_logits, i, done, state)
        seq = seq.at[(*rows, pos + 1)].set(tok)
        tokens = tokens.at[:, :, i].set(tok)
        logprobs = logprobs.at[:, :, i].set(logp)
        return (i + 1, cache, seq, tokens, logprobs, tok, done | is_eos(tok) | (i + 1 >= cap),
                state)

    carry = (jnp.int32(1), cache, seq, tokens, logprobs, tok, done, state)
    *_, tokens, logprobs, _, _, _ = jax.lax.while_loop(cond, body, carry)
    stop = is_eos(tokens)
    finished = jnp.any(stop, axis=-1)
    n_gen = jnp.where(finished, jnp.argmax(stop, axis=-1) + 1,
                      jnp.minimum(cap, n)).astype(jnp.int32)
    return Generated(tokens, logprobs, n_gen, finished)


# --- host helpers --------------------------------------------------------------------------------

def max_answer_tokens(vocab: TokenVocab, fmt: GridFormat | str) -> int:
    """Tokens of the longest possible answer: a 30x30 grid in `fmt` plus the answer suffix (which
    ends with the end marker `vocab.end`): the `max_new_tokens` that never cuts an answer."""
    fmt = get_grid_format(fmt) if isinstance(fmt, str) else fmt
    return answer_tokens(vocab, fmt, (MAX_SIDE, MAX_SIDE))


def answer_tokens(vocab: TokenVocab, fmt: GridFormat, shape: Sequence[int]) -> int:
    """Tokens of an answer grid of `shape` (h, w) in `fmt` plus the answer suffix."""
    return grid_length(vocab, fmt, shape) + int(vocab.piece_lens[PIECES.index("answer_suffix")])


def prompts_that_fit(
    lengths: Sequence[int] | np.ndarray, max_new_tokens: int, config: Phi3Config, *,
    cache_len: int | None = None, ids: Sequence[Any] | None = None,
) -> np.ndarray:
    """Boolean mask `[n]` of prompts (`lengths [n]`) that leave room for `max_new_tokens`: prompt +
    answer within `config.max_position_embeddings` and within `cache_len` cache slots, if given.

    The others are named (by `ids[i]`, e.g. "task_id/test/aug", else by row) in one warning, for
    the caller to skip.
    """
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    limit = config.max_position_embeddings
    if cache_len is not None:
        limit = min(limit, cache_len)
    keep = lengths + max_new_tokens <= limit
    if not keep.all():
        names = [f"{ids[i] if ids is not None else f'row {i}'} ({lengths[i]} tokens)"
                 for i in np.flatnonzero(~keep)]
        logging.warning(
            "%d prompt(s) leave no room for %d new tokens within %d positions, skipped: %s",
            len(names), max_new_tokens, limit, ", ".join(names))
    return keep
