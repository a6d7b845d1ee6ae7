"""Scoring candidates under augmented views: the teacher-forced log-probability of each distinct
candidate grid in each of K views, in one jitted pass per batch of groups (product of experts:
a candidate's score is the sum over the views, `arc_jax.infer.evaluate.rank`).

    logp = score_answers(model, params, lora_stack, prompts, lengths, answers, answer_lengths,
                         n_answers=C)                              # [G, K, C]

Each view's prompt `[T]` is run once (prefill); the candidates' answers are then fed one after
the other as blocks of A tokens at the positions after the prompt, over that view's one KV cache:
candidate c overwrites candidate c-1's slots, and a query only sees the slots at or before its
position, so no cache is copied. Rows are batches of one, as in `arc_jax.infer.dfs`, so LongRoPE
factors follow each row's own positions.

Host side: `answer_ids` spells a grid as the answer tokens the device encoder writes (the same
ids a decoded candidate has when the model spelled it canonically).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from arc_jax.data.encode import device_layout
from arc_jax.data.formats import GridFormat
from arc_jax.data.tokenizer import TokenVocab
from arc_jax.infer.dfs import empty_row_cache, row_apply, row_log_probs
from arc_jax.model.lora import LoraConfig
from arc_jax.model.phi3 import Phi3

Array = jax.Array


def answer_ids(vocab: TokenVocab, fmt: GridFormat, grid: np.ndarray) -> list[int]:
    """The answer tokens of `grid [h, w]` as `encode_episode` writes them after the prompt:
    the grid in `fmt` and the answer suffix (which ends with `vocab.end`)."""
    spans = device_layout(vocab, fmt, [], np.zeros((1, 1), np.int32), np.asarray(grid))
    start = [what for what, _ in spans].index("query_suffix") + 1
    return [i for _, ids in spans[start:] for i in ids]


def answer_width(longest: int, cap: int) -> int:
    """Block width A for answers of up to `longest` tokens: a power of two from 16, at most
    `cap` (so a few programs serve all batches)."""
    width = 16
    while width < longest:
        width *= 2
    return max(min(width, cap), longest)


def score_answers(
    model: Phi3, params: Mapping, lora_stack: Mapping | None, prompts: Array, lengths: Array,
    answers: Array, answer_lengths: Array, *, n_answers: int | Array,
    lora_config: LoraConfig | None = None, mesh: Mesh | None = None,
) -> Array:
    """Teacher-forced log p(answer | prompt), float32 `[G, K, C]`.

    prompts: `[G, K, T]` right-padded, `lengths [G, K]` >= 1 (view k of group g);
    answers: `[G, K, C, A]` token ids (right-padded), `answer_lengths [G, K, C]` >= 1: candidate
    c as spelled in view k. Only the first `n_answers` candidates are scored (the rest give 0).
    Group g runs under adapter `lora_stack[g]` (None: the base); with a `mesh` of several
    devices the groups are sharded over it.
    """
    args = (jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(answers, jnp.int32), jnp.asarray(answer_lengths, jnp.int32),
            jnp.int32(n_answers))
    lora_axis = None if lora_stack is None else 0
    if mesh is not None and mesh.size > 1:
        return _score_sharded(model, params, lora_stack, lora_config, *args,
                              lora_axis=lora_axis, mesh=mesh)
    return _score(model, params, lora_stack, lora_config, *args, lora_axis=lora_axis)


@functools.partial(jax.jit, static_argnames=("model", "lora_axis", "mesh"))
def _score_sharded(model, params, lora, lora_config, prompts, lengths, answers, answer_lengths,
                   n_answers, *, lora_axis, mesh) -> Array:
    """`_score` with the group axis sharded over `mesh` (its one axis), no collectives."""
    def local(params, lora, prompts, lengths, answers, answer_lengths, n_answers):
        return _score(model, params, lora, lora_config, prompts, lengths, answers,
                      answer_lengths, n_answers, lora_axis=lora_axis)

    group = P(mesh.axis_names[0])
    return jax.shard_map(
        local, mesh=mesh, check_vma=False, out_specs=group,
        in_specs=(P(), None if lora is None else group, group, group, group, group, P()),
    )(params, lora, prompts, lengths, answers, answer_lengths, n_answers)


@functools.partial(jax.jit, static_argnames=("model", "lora_axis"))
def _score(model, params, lora, lora_config, prompts, lengths, answers, answer_lengths,
           n_answers, *, lora_axis) -> Array:
    """The pass over `prompts [G, K, T]` and `answers [G, K, C, A]`."""
    g, k, t = prompts.shape
    c_max, a = answers.shape[2:]
    # Prompt slots 0..t-1, answer tokens at t..t+a-1; the last slot takes the prefill's padding
    # and the answers' padding, which no query sees.
    slots = t + a + 1
    hidden = functools.partial(row_apply, model, params, lora, lora_config, lora_axis=lora_axis)
    log_probs = functools.partial(row_log_probs, model, params, lora, lora_config,
                                  lora_axis=lora_axis)
    index = jnp.arange(t)
    prefill_pos = jnp.where(index < lengths[..., None], index, -1)
    h, cache = hidden(prompts, prefill_pos, empty_row_cache(model, g, k, slots), fresh=True)
    first = log_probs(jnp.take_along_axis(h, (lengths - 1)[..., None, None], axis=2)[:, :, 0])
    steps = jnp.arange(a)

    def one(c, carry):
        cache, out = carry
        ids = answers[:, :, c]  # [G, K, A]
        n = answer_lengths[:, :, c]
        real = steps < n[..., None]
        pos = jnp.where(real, lengths[..., None] + steps, slots - 1)
        h, cache = hidden(jnp.where(real, ids, 0), pos, cache)
        logp = log_probs(h)  # [G, K, A, V]: position j predicts token j + 1
        nxt = jnp.concatenate([ids[..., 1:], ids[..., :1]], axis=-1)
        per = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
        head = jnp.take_along_axis(first, ids[..., :1], axis=-1)[..., 0]
        total = head + jnp.sum(jnp.where(steps[:-1] < n[..., None] - 1, per[..., :-1], 0.0), -1)
        return cache, out.at[:, :, c].set(total)

    _, out = jax.lax.fori_loop(0, jnp.minimum(n_answers, c_max), one,
                               (cache, jnp.zeros((g, k, c_max), jnp.float32)))
    return out
