"""Episode sampling: leave-k-out over a task's train pairs, and k-of-a-pool for base training.

An episode is a context (demonstration pairs) plus a target pair whose output is the label. In
training (research log "n-1" / "n-2", MIT TTT) k train pairs are held out, one of them becomes the
target and the other n - k pairs are the context. At evaluation the context is every train pair and
the target is a test pair. Base training draws episodes from a task's pool of pairs instead
(`sample_pool_episode`): a random target and up to k other pairs of the same pool as context, as
many as fit a token budget. All functions are jittable and vmappable; `max_pairs` is static.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from arc_jax.data.augment import Augmentation, augment_pairs


class Episode(NamedTuple):
    """Which pairs an episode uses (a pytree of int32 arrays).

    context: `[P]` indices into the task's train pairs; the first `n_context` are valid, rest 0.
    n_context: `[]` number of context pairs.
    target: `[]` index of the target pair (a train pair when sampled, a test pair at evaluation).
    """

    context: jax.Array
    n_context: jax.Array
    target: jax.Array


class EpisodeGrids(NamedTuple):
    """The grids of an episode.

    context: int32 `[P, 2, 30, 30]` (pair, input/output); rows from `n_context` on are 0.
    context_shapes: int32 `[P, 2, 2]`; rows from `n_context` on are 0.
    target: int32 `[2, 30, 30]` (input, output).
    target_shape: int32 `[2, 2]`.
    """

    context: jax.Array
    context_shapes: jax.Array
    target: jax.Array
    target_shape: jax.Array


def sample_episode(
    key: jax.Array, n_train: jax.Array, max_pairs: int, *, n_leave_out: int, shuffle: bool
) -> Episode:
    """Samples a leave-k-out training episode from a task's train pairs.

    k = max(1, min(n_leave_out, n_train - 1)) pairs are held out at random, so at least one pair
    stays in the context whenever n_train >= 2. The first held-out pair is the target; the other
    held-out pairs are unused. A task with a single train pair gives that pair as the target with an
    empty context (n_context == 0): the caller decides whether such episodes are worth training on.

    Args:
      key: PRNG key.
      n_train: int32 `[]`, the task's number of train pairs, 1 <= n_train <= max_pairs.
      max_pairs: static P, length of the context index array.
      n_leave_out: k >= 1 requested (1 for "n-1", 2 for "n-2").
      shuffle: context pairs in random order; else in original (increasing) order.

    Returns:
      An `Episode` with `n_context == n_train - k`.
    """
    if n_leave_out < 1:
        raise ValueError(f"n_leave_out must be >= 1, got {n_leave_out}")
    n_train = jnp.asarray(n_train, jnp.int32)
    k = jnp.maximum(1, jnp.minimum(n_leave_out, n_train - 1))
    n_context = jnp.maximum(n_train - k, 0)
    pos = jnp.arange(max_pairs, dtype=jnp.int32)

    perm = jax.random.permutation(key, pos)
    # The valid indices, in random order, first: order[:k] held out, order[k:n_train] context.
    order = perm[jnp.argsort(perm >= n_train, stable=True)]
    if shuffle:
        context = order[jnp.minimum(pos + k, max_pairs - 1)]
    else:
        rank = jnp.argsort(order)
        in_context = (rank >= k) & (pos < n_train)
        context = jnp.argsort(~in_context, stable=True).astype(jnp.int32)
    context = jnp.where(pos < n_context, context, 0)
    return Episode(context, n_context, order[0])


def eval_episode(n_train: jax.Array, max_pairs: int, target: jax.Array | int = 0) -> Episode:
    """The evaluation episode: context = all train pairs in order; `target` indexes the test pairs.

    The caller picks the test pair (default 0) and passes the test arrays to `gather_episode`.
    """
    n_train = jnp.asarray(n_train, jnp.int32)
    pos = jnp.arange(max_pairs, dtype=jnp.int32)
    context = jnp.where(pos < n_train, pos, 0)
    return Episode(context, n_train, jnp.asarray(target, jnp.int32))


def gather_episode(
    train: jax.Array,
    train_shapes: jax.Array,
    episode: Episode,
    targets: tuple[jax.Array, jax.Array] | None = None,
) -> EpisodeGrids:
    """Gathers an episode's grids from the task's padded arrays.

    Args:
      train: int32 `[P_task, 2, 30, 30]` train pairs (input, output).
      train_shapes: int32 `[P_task, 2, 2]`.
      episode: from `sample_episode` or `eval_episode`.
      targets: `(grids [Q, 2, 30, 30], shapes [Q, 2, 2])` to take the target from (the test pairs,
        for `eval_episode`); default: the train pairs.

    Returns:
      `EpisodeGrids` with context rows past `n_context` zeroed.
    """
    valid = jnp.arange(episode.context.shape[0]) < episode.n_context
    context = jnp.where(valid[:, None, None, None], train[episode.context], 0)
    context_shapes = jnp.where(valid[:, None, None], train_shapes[episode.context], 0)
    target_grids, target_shapes = (train, train_shapes) if targets is None else targets
    return EpisodeGrids(
        context, context_shapes, target_grids[episode.target], target_shapes[episode.target]
    )


def augment_episode(aug: Augmentation, grids: EpisodeGrids) -> EpisodeGrids:
    """Applies one augmentation to every grid of an episode (inputs and outputs alike)."""
    context, context_shapes = augment_pairs(aug, grids.context, grids.context_shapes)
    target, target_shape = augment_pairs(aug, grids.target[None], grids.target_shape[None])
    return EpisodeGrids(context, context_shapes, target[0], target_shape[0])


def sample_pool_episode(
    key: jax.Array, count: jax.Array, lengths: jax.Array, budget: int, *,
    min_context: int, max_context: int, n_candidates: int,
) -> Episode:
    """Samples an episode from a pool: one target and up to k context pairs, all distinct.

    k is drawn uniformly from `min_context..max_context` and capped at `count - 1`. The target is
    a random pair of the pool; the context is filled greedily from further random pairs (the first
    `n_candidates - 1` of a random order), taking a pair when its tokens still fit `budget`
    together with the target's and those taken, until k are taken. Context order is random.

    Args:
      key: PRNG key.
      count: int32 `[]`, pairs in the pool, 1 <= count <= M.
      lengths: int32 `[M]` tokens of each pair of the pool (rows from `count` on are ignored).
      budget: static, tokens all pairs together may take (bucket minus the fixed prompt parts).
      min_context, max_context: static, 1 <= min_context <= max_context.
      n_candidates: static, pairs looked at (capped at M).

    Returns:
      An `Episode` of pool-local indices: `context [max_context]`, `n_context`, `target`.
    """
    if not 1 <= min_context <= max_context:
        raise ValueError(f"need 1 <= min_context <= max_context, got {min_context}, "
                         f"{max_context}")
    max_pool = lengths.shape[0]
    n_cand = max(2, min(n_candidates, max_pool))
    k_order, k_count = jax.random.split(key)
    count = jnp.asarray(count, jnp.int32)
    pos = jnp.arange(max_pool, dtype=jnp.int32)
    # Valid pairs get scores in [0, 1), padding -1: the top n_cand are a random order of distinct
    # pairs with the valid ones first.
    score = jnp.where(pos < count, jax.random.uniform(k_order, (max_pool,)), -1.0)
    _, cand = jax.lax.top_k(score, min(n_cand, max_pool))
    cand = cand.astype(jnp.int32)
    if cand.shape[0] < n_cand:
        cand = jnp.concatenate([cand, jnp.full((n_cand - cand.shape[0],), max_pool, jnp.int32)])
    cand_valid = cand < count
    cand_len = lengths[jnp.minimum(cand, max_pool - 1)]
    k = jax.random.randint(k_count, (), min_context, max_context + 1, dtype=jnp.int32)
    k = jnp.minimum(k, count - 1)

    def take_if_fits(carry, x):
        used, taken = carry
        length, valid = x
        take = valid & (taken < k) & (used + length <= budget)
        return (used + jnp.where(take, length, 0), taken + take.astype(jnp.int32)), take

    (_, n_context), take = jax.lax.scan(
        take_if_fits, (cand_len[0], jnp.int32(0)), (cand_len[1:], cand_valid[1:]))
    rest = cand[1:]
    if rest.shape[0] < max_context:
        pad = max_context - rest.shape[0]
        rest = jnp.concatenate([rest, jnp.zeros((pad,), jnp.int32)])
        take = jnp.concatenate([take, jnp.zeros((pad,), bool)])
    slots = jnp.argsort(~take, stable=True)[:max_context]
    context = jnp.where(jnp.arange(max_context) < n_context, rest[slots], 0)
    return Episode(context.astype(jnp.int32), n_context, cand[0])
