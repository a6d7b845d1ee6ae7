"""Depth-first search over the KV cache: every completion whose probability is at least
`min_prob`, per prompt, in one jitted loop (the ARChitects' / NVARC's candidate generation).

    found = dfs_per_task(model, params, lora_stack, prompts, lengths, min_prob=0.1,
                         max_candidates=8, max_new_tokens=N, eos_token_id=int(vocab.end),
                         pad_token_id=int(vocab.pad))

A completion is a token sequence ending in an eos id, at most N tokens long; its probability is
the product of the model's next-token probabilities along it. Probabilities only fall along a
path, so the completions at or above the threshold are exactly the eos-ended leaves of the tree
of prefixes whose cumulative probability stays at or above it, and the search visits exactly
that tree.

Each row (prompt) keeps an explicit stack of unexpanded prefixes, each one (last token, depth,
cumulative log-probability), and one KV cache. A step pops the top prefix, feeds its last token
at its position and pushes the children above the threshold, most probable on top; an eos child
is a completion. The cache needs no copies: when a prefix at depth d is popped, its own tokens
at depths < d were written by its ancestors and nothing written since (only inside the subtree
of its parent, at depths >= d) is at a slot it can see, since a query only sees the slots at or
before its position. The prefixes on a stack never contain one another, so their probabilities
sum to at most 1 and the stack never holds more than floor(1 / min_prob) of them.

Rows run in lockstep, one token per row per step (`lax.while_loop`, no host round-trip); a row
stops when its stack is empty, when it has `max_candidates` completions, or after `max_steps`
expansions. Caps make the result a subset of the exact set (`exhausted` says which rows are
exact).

Every row runs as its own batch of one (vmapped), so LongRoPE picks its factors per row, by the
positions of that row's call: the prompt's by its length, each decoded token's by its position,
the keys kept as cached (no recomputation when a row crosses `original_max_position_embeddings`).
For default RoPE, and for LongRoPE sequences within `original_max_position_embeddings`, the
probabilities are exactly the teacher-forced ones.

With a `grammar` (`arc_jax.infer.grammar`), each prefix carries its automaton state and the
next-token distribution is the model's renormalised over the tokens the grid format allows: the
search then returns every well-formed grid whose constrained probability is >= `min_prob`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from arc_jax.infer import grammar as gm
from arc_jax.model.lora import LoraConfig
from arc_jax.model.phi3 import Phi3, init_cache, project_logits

Array = jax.Array


class Found(NamedTuple):
    """What the search found per row (fields `[G, B, ...]` from `dfs_per_task`).

    tokens: [G, B, C, N] int32   completions in the order found, eos included, pad after
    lengths: [G, B, C] int32     tokens of each completion (eos included); 0 for empty slots
    logprobs: [G, B, C] float32  log p(completion | prompt) (sum over its tokens); -inf if empty
    n_found: [G, B] int32        completions found (<= C)
    steps: [G, B] int32          expansions run (one token through the model each)
    exhausted: [G, B] bool       every prefix above the threshold was expanded: no cap cut the
                                 search, so the completions are exactly the set above it
    """

    tokens: Array
    lengths: Array
    logprobs: Array
    n_found: Array
    steps: Array
    exhausted: Array


def stack_size(min_prob: float) -> int:
    """Stack slots a row needs for threshold `min_prob` (prefixes on it are disjoint, each has
    probability >= min_prob): floor(1 / min_prob), plus one for rounding."""
    if not 0.0 < min_prob <= 1.0:
        raise ValueError(f"min_prob must be in (0, 1], got {min_prob}")
    return int(math.floor(1.0 / min_prob + 1e-6)) + 1


def row_apply(model: Phi3, params, lora, lora_config, ids: Array, pos: Array, cache,
              lora_axis, fresh: bool = False):
    """Hidden states `[G, B, s, d]` and the new cache of `ids`, `pos` `[G, B, s]`, each row a
    batch of one (cache leaves `[G, B, 1, ...]`); adapter `lora[g]` (`lora_axis` 0) or one for
    all (None). `fresh`: the cache is empty, attend over the call's own keys (a prefill)."""
    m = model.clone(fresh_cache=True) if fresh else model

    def one(lo, i, p, c):
        return m.apply({"params": params}, i[None], p[None], lora=lo, lora_config=lora_config,
                       cache=c, return_hidden=True)

    def group(lo, i, p, c):
        h, c = jax.vmap(one, in_axes=(None, 0, 0, 0))(lo, i, p, c)
        return h[:, 0], c

    return jax.vmap(group, in_axes=(lora_axis, 0, 0, 0))(lora, ids, pos, cache)


def row_log_probs(model: Phi3, params, lora, lora_config, hidden: Array, lora_axis) -> Array:
    """Log-softmax of the logits of `hidden [G, B, ..., d]` -> float32 `[G, B, ..., vocab]`."""
    one = lambda lo, x: project_logits(model, params, x, lo, lora_config)
    return jax.nn.log_softmax(jax.vmap(one, in_axes=(lora_axis, 0))(lora, hidden), axis=-1)


def empty_row_cache(model: Phi3, g: int, b: int, slots: int):
    """An empty cache for `[G, B]` rows of one: leaves `[G, B, 1, ...]`."""
    flat = init_cache(model.config, g * b, slots, model.dtype)
    return jax.tree.map(lambda x: x.reshape(g, b, 1, *x.shape[1:]), flat)


def dfs_per_task(
    model: Phi3, params: Mapping, lora_stack: Mapping | None, prompts: Array, lengths: Array, *,
    min_prob: float, max_candidates: int, max_new_tokens: int,
    eos_token_id: int | Sequence[int], pad_token_id: int, max_steps: int = 0,
    lora_config: LoraConfig | None = None, mesh: Mesh | None = None,
    grammar: gm.GridGrammar | None = None, max_shape: Array | None = None,
) -> Found:
    """Every completion with probability >= `min_prob` after each of `prompts [G, B, T]`
    (right-padded, `lengths [G, B]` >= 1), under adapter `lora_stack[g]` (None: the base).

    At most `max_candidates` per row and `max_new_tokens` tokens each (eos included); with
    `max_steps` > 0, at most that many expansions per row. With a `mesh` of several devices the
    groups are sharded over it (G a multiple of its size). Compiled once per shapes, caps and
    the stack size (from `min_prob`); the threshold itself is traced. `grammar`: search the
    constrained distribution (module docstring), with grids bounded by `max_shape [G, B, 2]`
    (None: 30 x 30).
    """
    options = search_options(min_prob, max_candidates, max_new_tokens, eos_token_id, pad_token_id,
                          max_steps)
    prompts, lengths = jnp.asarray(prompts), jnp.asarray(lengths)
    lora_axis = None if lora_stack is None else 0
    if mesh is not None and mesh.size > 1:
        return _dfs_sharded(model, params, lora_stack, lora_config, prompts, lengths, **options,
                            grammar=grammar, max_shape=max_shape, lora_axis=lora_axis,
                            mesh=mesh)
    return _dfs(model, params, lora_stack, lora_config, prompts, lengths, **options,
                grammar=grammar, max_shape=max_shape, lora_axis=lora_axis)


def search_options(min_prob: float, max_candidates: int, max_new_tokens: int, eos_token_id,
                pad_token_id: int, max_steps: int = 0) -> dict[str, Any]:
    """Validated search options: static sizes, the traced threshold, step cap and eos ids."""
    if max_new_tokens < 1 or max_candidates < 1 or max_steps < 0:
        raise ValueError(f"need max_new_tokens >= 1, max_candidates >= 1, max_steps >= 0; got "
                         f"{max_new_tokens}, {max_candidates}, {max_steps}")
    steps = max_steps or np.iinfo(np.int32).max
    return dict(log_min_prob=jnp.float32(math.log(min_prob)), stack=stack_size(min_prob),
                max_candidates=int(max_candidates), max_new_tokens=int(max_new_tokens),
                eos=jnp.asarray(np.ravel(eos_token_id), jnp.int32), pad=int(pad_token_id),
                max_steps=jnp.int32(steps))


_STATIC = ("model", "stack", "max_candidates", "max_new_tokens", "pad", "lora_axis")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "mesh"))
def _dfs_sharded(model, params, lora, lora_config, prompts, lengths, *, log_min_prob, stack,
                 max_candidates, max_new_tokens, eos, pad, max_steps, lora_axis, mesh,
                 grammar=None, max_shape=None) -> Found:
    """`_dfs` with the group axis sharded over `mesh` (its one axis), no collectives."""
    def local(params, lora, prompts, lengths, log_min_prob, eos, max_steps, grammar, max_shape):
        return _dfs(model, params, lora, lora_config, prompts, lengths,
                    log_min_prob=log_min_prob, stack=stack, max_candidates=max_candidates,
                    max_new_tokens=max_new_tokens, eos=eos, pad=pad, max_steps=max_steps,
                    grammar=grammar, max_shape=max_shape, lora_axis=lora_axis)

    group = P(mesh.axis_names[0])
    return jax.shard_map(
        local, mesh=mesh, check_vma=False, out_specs=group,
        in_specs=(P(), None if lora is None else group, group, group, P(), P(), P(), P(),
                  None if max_shape is None else group),
    )(params, lora, prompts, lengths, log_min_prob, eos, max_steps, grammar, max_shape)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _dfs(model, params, lora, lora_config, prompts, lengths, *, log_min_prob, stack,
         max_candidates, max_new_tokens, eos, pad, max_steps, lora_axis, grammar=None,
         max_shape=None) -> Found:
    """The search over `prompts [G, B, T]`, `lengths [G, B]`; `stack` slots per row; prefixes
    carry their `grammar` state (`state["stack_gram"]`, leaves `[G, B, S, ...]`) if given."""
    prompts, lengths = prompts.astype(jnp.int32), lengths.astype(jnp.int32)
    g, b, t = prompts.shape
    n, c_max, s_max = max_new_tokens, max_candidates, stack
    # Prompt slots 0..t-1, generated tokens at t..t+n-2 (a token at depth n-1 is never fed);
    # the last slot takes what no query sees: the prefill's padding and idle rows' tokens.
    slots = t + n
    idle_pos = slots - 1
    branch = min(s_max, model.config.vocab_size)  # children above the threshold: < s_max
    depth_ax = jnp.arange(n)

    hidden = functools.partial(row_apply, model, params, lora, lora_config, lora_axis=lora_axis)
    log_probs = functools.partial(row_log_probs, model, params, lora, lora_config,
                                  lora_axis=lora_axis)

    def expand(state, logp, cum, depth, active, gram):
        """Children of the prefixes (cum, depth `[G, B]`, next-token `logp [G, B, V]`, grammar
        states `gram`) of the `active` rows: eos children become completions, the others are
        pushed."""
        if grammar is not None:
            logp = gm.mask_log_probs(logp, gm.allowed(grammar, gram, logp.shape[-1]))
        top_lp, top_tok = jax.lax.top_k(logp, branch)  # [G, B, K], most probable first
        child = cum[..., None] + top_lp
        keep = active[..., None] & (child >= log_min_prob)
        is_eos = jnp.isin(top_tok, eos)
        child_depth = depth + 1  # [G, B]
        finish = keep & is_eos
        # a child at depth d holds d + 1 tokens and needs an eos after it: d + 2 <= n
        push = keep & ~is_eos & (child_depth[..., None] + 2 <= n)

        gi, bi = jnp.arange(g)[:, None, None], jnp.arange(b)[None, :, None]

        def record(found):  # the eos children as completions: path + eos, in slots n_found..
            tokens, lens, lps = found
            rank = jnp.cumsum(finish, axis=-1) - 1
            slot = jnp.where(finish, state["n_found"][..., None] + rank, c_max)  # c_max: drop
            row = jnp.where(depth_ax <= depth[..., None, None], state["path"][:, :, None], pad)
            row = jnp.where(depth_ax == child_depth[..., None, None], top_tok[..., None], row)
            return (tokens.at[gi, bi, slot].set(row, mode="drop"),
                    lens.at[gi, bi, slot].set(
                        jnp.broadcast_to(child_depth[..., None] + 1, slot.shape), mode="drop"),
                    lps.at[gi, bi, slot].set(child, mode="drop"))

        found = (state["found_tok"], state["found_len"], state["found_lp"])
        # rare (a completion every many steps), and O(N) per row: only on steps that find one
        found_tok, found_len, found_lp = jax.lax.cond(jnp.any(finish), record, lambda f: f,
                                                      found)
        n_found = jnp.minimum(state["n_found"] + jnp.sum(finish, -1), c_max)
        # completions past the cap, or prefixes past the stack: the result is no longer exact
        cut = state["cut"] | (state["n_found"] + jnp.sum(finish, -1) > c_max)

        n_push = jnp.sum(push, axis=-1)
        order = jnp.cumsum(push, axis=-1) - 1  # 0 = most probable pushed child: on top
        at = jnp.where(push, state["sp"][..., None] + n_push[..., None] - 1 - order, s_max)
        stack_tok = state["stack_tok"].at[gi, bi, at].set(top_tok, mode="drop")
        stack_lp = state["stack_lp"].at[gi, bi, at].set(child, mode="drop")
        stack_depth = state["stack_depth"].at[gi, bi, at].set(
            jnp.broadcast_to(child_depth[..., None], at.shape), mode="drop")
        cut = cut | (state["sp"] + n_push > s_max)
        if grammar is not None:
            widen = lambda x: jnp.broadcast_to(x[:, :, None], (g, b, branch, *x.shape[2:]))
            children = gm.advance(grammar, jax.tree.map(widen, gram), top_tok)
            state = {**state, "stack_gram": jax.tree.map(
                lambda slots, child: slots.at[gi, bi, at].set(child, mode="drop"),
                state["stack_gram"], children)}
        return {**state, "found_tok": found_tok, "found_len": found_len, "found_lp": found_lp,
                "n_found": n_found, "stack_tok": stack_tok, "stack_lp": stack_lp,
                "stack_depth": stack_depth, "sp": jnp.minimum(state["sp"] + n_push, s_max),
                "cut": cut}

    def is_active(state):
        return (state["sp"] > 0) & (state["n_found"] < c_max) & (state["steps"] < max_steps)

    index = jnp.arange(t)
    prefill_pos = jnp.where(index < lengths[..., None], index, -1)
    h, cache = hidden(prompts, prefill_pos,
                      empty_row_cache(model, g, b, slots), fresh=True)
    last = jnp.take_along_axis(h, (lengths - 1)[..., None, None], axis=2)[:, :, 0]
    zeros = lambda dtype, *shape: jnp.zeros((g, b, *shape), dtype)
    state = {
        "cache": cache, "path": jnp.full((g, b, n), pad, jnp.int32),
        "stack_tok": zeros(jnp.int32, s_max), "stack_depth": zeros(jnp.int32, s_max),
        "stack_lp": zeros(jnp.float32, s_max), "sp": zeros(jnp.int32),
        "found_tok": jnp.full((g, b, c_max, n), pad, jnp.int32),
        "found_len": zeros(jnp.int32, c_max),
        "found_lp": jnp.full((g, b, c_max), -jnp.inf, jnp.float32),
        "n_found": zeros(jnp.int32), "steps": zeros(jnp.int32), "cut": zeros(bool),
    }
    root = None
    if grammar is not None:
        root = gm.start(grammar, (g, b), max_shape)
        state["stack_gram"] = jax.tree.map(
            lambda x: jnp.broadcast_to(x[:, :, None], (g, b, s_max, *x.shape[2:])), root)
    state = expand(state, log_probs(last), zeros(jnp.float32), jnp.full((g, b), -1, jnp.int32),
                   jnp.ones((g, b), bool), root)

    def body(state):
        active = is_active(state)
        top = jnp.maximum(state["sp"] - 1, 0)[..., None]
        pick = lambda x: jnp.take_along_axis(x, top, axis=-1)[..., 0]
        tok, depth, cum = (pick(state[k]) for k in ("stack_tok", "stack_depth", "stack_lp"))
        gram = None
        if grammar is not None:
            gram = jax.tree.map(lambda x: jnp.take_along_axis(
                x, top.reshape(g, b, 1, *[1] * (x.ndim - 3)), axis=2)[:, :, 0],
                state["stack_gram"])
        sp = state["sp"] - active
        gi, bi = jnp.arange(g)[:, None], jnp.arange(b)[None, :]
        path = state["path"].at[gi, bi, jnp.where(active, depth, n)].set(tok, mode="drop")
        pos = jnp.where(active, lengths + depth, idle_pos)
        feed = jnp.where(active, tok, pad)
        h, cache = hidden(feed[..., None], pos[..., None], state["cache"])
        state = {**state, "cache": cache, "path": path, "sp": sp,
                 "steps": state["steps"] + active}
        return expand(state, log_probs(h[:, :, 0]), cum, depth, active, gram)

    state = jax.lax.while_loop(lambda s: jnp.any(is_active(s)), body, state)
    exhausted = (state["sp"] == 0) & ~state["cut"]
    return Found(state["found_tok"], state["found_len"], state["found_lp"], state["n_found"],
                 state["steps"], exhausted)
