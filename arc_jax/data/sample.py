"""Episode sampling for test-time fine-tuning: leave-k-out over a task's train pairs.

An episode is a context (demonstration pairs) plus a target pair whose output is the label. In
training (research log "n-1" / "n-2", MIT TTT) k train pairs are held out, one of them becomes the
target and the other n - k pairs are the context. At evaluation the context is every train pair and
the target is a test pair. All functions are jittable and vmappable; `max_pairs` is static.
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
