"""Sample → augment → encode → bucket, in one jitted function per length bucket.

Training rows are leave-k-out episodes of a task's train pairs (one held-out pair is the target)
under a random dihedral/colour augmentation; evaluation rows are all train pairs plus one test
pair under a given augmentation (so predictions can be inverted and voted on).

Lengths are known on the host from grid shapes alone (`episode_length`), so each task gets the
smallest bucket its longest episode fits in; a task longer than the largest bucket is reported and
skipped, or kept in the largest bucket with context pairs dropped, as configured.

Base training on pools (`pool_train_batch`): a row is k context pairs plus a target drawn from
one pool of pairs (`sample.sample_pool_episode`), under the same augmentations. Pool pairs vary in
size, so a task's pool is split on the host into sub-pools of similar pair length, each with one
bucket (`split_pool`); the on-device sampler fills a row with as many context pairs as fit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arc_jax.data import augment, sample
from arc_jax.data.arrays import TaskArrays
from arc_jax.data.encode import EncodedExample, encode_episode
from arc_jax.data.formats import GridFormat, get_grid_format
from arc_jax.data.pools import PoolArrays, pool_grids
from arc_jax.data.tokenizer import PIECES, TokenVocab

OVERFLOW = ("truncate", "skip")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What a training row is made of (the `augment.*` and prompt keys of the configs)."""

    grid_format: str = "shape_numbered"
    loss_on: str = "target"
    n_leave_out: int = 1
    shuffle_pairs: bool = True
    geometric: bool = True
    color: bool = True
    keep_background: bool = True
    preserve_color_prob: float = 0.0
    buckets: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    overflow: str = "truncate"

    def __post_init__(self):
        get_grid_format(self.grid_format)
        if self.overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {OVERFLOW}, got {self.overflow!r}")
        if self.n_leave_out < 1:
            raise ValueError(f"n_leave_out must be >= 1, got {self.n_leave_out}")
        if list(self.buckets) != sorted(set(self.buckets)) or not self.buckets:
            raise ValueError(f"buckets must be increasing, got {self.buckets}")

    @property
    def fmt(self) -> GridFormat:
        return get_grid_format(self.grid_format)


def _encode(vocab, cfg, grids: sample.EpisodeGrids, n_context, seq_len, **kw) -> EncodedExample:
    return encode_episode(
        vocab, cfg.fmt, grids.context, grids.context_shapes, n_context, grids.target,
        grids.target_shape, seq_len=seq_len, truncate=cfg.overflow == "truncate", **kw)


def train_example(
    key: jax.Array, arrays: TaskArrays, task: jax.Array, *, vocab: TokenVocab,
    cfg: PipelineConfig, seq_len: int,
) -> EncodedExample:
    """One training row for task index `task` (scalar) from a PRNG key (unbatched)."""
    k_episode, k_aug = jax.random.split(key)
    episode = sample.sample_episode(
        k_episode, arrays.n_train[task], arrays.train.shape[1], n_leave_out=cfg.n_leave_out,
        shuffle=cfg.shuffle_pairs)
    grids = sample.gather_episode(arrays.train[task], arrays.train_shapes[task], episode)
    aug = augment.sample_augmentation(
        k_aug, geometric=cfg.geometric, color=cfg.color, keep_background=cfg.keep_background,
        preserve_color_prob=cfg.preserve_color_prob)
    grids = sample.augment_episode(aug, grids)
    return _encode(vocab, cfg, grids, episode.n_context, seq_len, loss_on=cfg.loss_on)


def train_batch(
    key: jax.Array, arrays: TaskArrays, tasks: jax.Array, *, vocab: TokenVocab,
    cfg: PipelineConfig, seq_len: int,
) -> EncodedExample:
    """Training rows for task indices `tasks` `[B]`: every field gains a leading `[B]` axis."""
    arrays = jax.tree.map(jnp.asarray, arrays)
    keys = jax.random.split(key, tasks.shape[0])
    one = lambda k, t: train_example(k, arrays, t, vocab=vocab, cfg=cfg, seq_len=seq_len)
    return jax.vmap(one)(keys, tasks)


def eval_example(
    arrays: TaskArrays, task: jax.Array, test: jax.Array, aug: augment.Augmentation, *,
    vocab: TokenVocab, cfg: PipelineConfig, seq_len: int, with_answer: bool = True,
) -> EncodedExample:
    """All train pairs (in order) + test pair `test` of task `task` under `aug` (unbatched)."""
    episode = sample.eval_episode(arrays.n_train[task], arrays.train.shape[1], test)
    grids = sample.gather_episode(
        arrays.train[task], arrays.train_shapes[task], episode,
        targets=(arrays.test[task], arrays.test_shapes[task]))
    grids = sample.augment_episode(aug, grids)
    return _encode(vocab, cfg, grids, episode.n_context, seq_len, with_answer=with_answer)


def eval_batch(
    arrays: TaskArrays, tasks: jax.Array, tests: jax.Array, augs: augment.Augmentation, *,
    vocab: TokenVocab, cfg: PipelineConfig, seq_len: int, with_answer: bool = True,
) -> EncodedExample:
    """Evaluation rows for `tasks [B]`, `tests [B]` under augmentations `augs` (batched `[B]`)."""
    arrays = jax.tree.map(jnp.asarray, arrays)
    one = lambda t, q, a: eval_example(
        arrays, t, q, a, vocab=vocab, cfg=cfg, seq_len=seq_len, with_answer=with_answer)
    return jax.vmap(one)(tasks, tests, augs)


# ---------------------------------------------------------------------------------------------
# Host-side lengths and buckets.


def grid_length(vocab: TokenVocab, fmt: GridFormat, shape: Sequence[int]) -> int:
    """Tokens of one grid of shape (h, w) in format `fmt`; 0 for the (0, 0) padding shape."""
    h, w = int(shape[0]), int(shape[1])
    if h == 0:
        return 0
    n = h * (w + 1)
    if fmt.row_numbers:
        n += int(np.sum(vocab.number_lens[1: h + 1])) + h
    if fmt.shape_header:
        n += int(vocab.number_lens[h] + vocab.number_lens[w]) + 2
    return n


def _piece_len(vocab: TokenVocab, name: str) -> int:
    return int(vocab.piece_lens[PIECES.index(name)])


def episode_length(
    vocab: TokenVocab, fmt: GridFormat, context_shapes: Sequence, query_shape: Sequence[int],
    answer_shape: Sequence[int] | None,
) -> int:
    """Exact token count of an episode: context pair shapes `[(in_hw, out_hw), ...]`, the query
    input's shape and the answer's (None: prompt only)."""
    pl = lambda name: _piece_len(vocab, name)
    n = pl("bos") + pl("prefix")
    for shape_in, shape_out in context_shapes:
        n += pl("input_label") + grid_length(vocab, fmt, shape_in)
        n += pl("output_label") + grid_length(vocab, fmt, shape_out)
    n += pl("input_label") + grid_length(vocab, fmt, query_shape) + pl("query_suffix")
    if answer_shape is not None:
        n += grid_length(vocab, fmt, answer_shape) + pl("answer_suffix")
    return n


def max_train_length(vocab: TokenVocab, fmt: GridFormat, train_shapes: np.ndarray) -> int:
    """Longest leave-k-out training episode of a task with `train_shapes [n, 2, 2]`, over both
    orientations (a transposing augmentation changes the count of row tokens): exact for k = 1
    (every pair present, one of them as the target), an upper bound for k > 1."""
    pl = lambda name: _piece_len(vocab, name)
    fixed = pl("bos") + pl("prefix") + pl("query_suffix") + pl("answer_suffix")
    fixed += (pl("input_label") + pl("output_label")) * len(train_shapes) - pl("output_label")
    shapes = np.asarray(train_shapes).reshape(-1, 2)
    return fixed + max(
        sum(grid_length(vocab, fmt, s) for s in shapes),
        sum(grid_length(vocab, fmt, s[::-1]) for s in shapes),
    )


def max_target_tokens(vocab: TokenVocab, fmt: GridFormat, output_shapes: np.ndarray,
                      multiple: int = 64) -> int:
    """Loss tokens per training row (loss on the target only) for tasks whose train outputs have
    `output_shapes [n, 2]`: the largest output in either orientation plus the answer suffix,
    rounded up to `multiple` (the `max_loss_tokens` a train step projects, a bound on every
    row's loss mask)."""
    shapes = np.asarray(output_shapes).reshape(-1, 2)
    longest = max(max(grid_length(vocab, fmt, s), grid_length(vocab, fmt, s[::-1]))
                  for s in shapes)
    n = longest + _piece_len(vocab, "answer_suffix")
    return -(-n // multiple) * multiple


def choose_bucket(length: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds `length` tokens, or None."""
    return next((b for b in buckets if length <= b), None)


def assign_buckets(
    task_ids: Sequence[str], lengths: Sequence[int], cfg: PipelineConfig,
) -> dict[int, list[int]]:
    """Groups task indices by bucket. Tasks longer than the largest bucket are reported, then
    skipped (overflow='skip') or put in the largest bucket to be shortened (overflow='truncate')."""
    groups: dict[int, list[int]] = {}
    too_long = []
    for i, (task_id, length) in enumerate(zip(task_ids, lengths, strict=True)):
        bucket = choose_bucket(length, cfg.buckets)
        if bucket is None:
            too_long.append(f"{task_id} ({length} tokens)")
            if cfg.overflow == "skip":
                continue
            bucket = cfg.buckets[-1]
        groups.setdefault(bucket, []).append(i)
    if too_long:
        action = "skipped" if cfg.overflow == "skip" else "shortened by dropping train pairs"
        logging.warning(
            "%d task(s) longer than the largest bucket (%d tokens), %s: %s",
            len(too_long), cfg.buckets[-1], action, ", ".join(too_long))
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------------------------------------
# Pools: episodes of k context pairs + a target from one (sub-)pool of pairs.


def pool_pair_length(vocab: TokenVocab, fmt: GridFormat, input_shape: Sequence[int],
                     output_shape: Sequence[int]) -> int:
    """Tokens one pair adds to an episode (its labels and both grids), the larger of its two
    orientations (a transposing augmentation changes the count of row tokens)."""
    pl = lambda name: _piece_len(vocab, name)
    return pl("input_label") + pl("output_label") + max(
        grid_length(vocab, fmt, input_shape) + grid_length(vocab, fmt, output_shape),
        grid_length(vocab, fmt, input_shape[::-1]) + grid_length(vocab, fmt, output_shape[::-1]))


def pool_fixed_length(vocab: TokenVocab) -> int:
    """Tokens of an episode besides its pairs' `pool_pair_length`s: an episode of pairs with
    lengths l_1..l_n (the last the target) takes at most `pool_fixed_length + sum(l)` tokens."""
    pl = lambda name: _piece_len(vocab, name)
    return pl("bos") + pl("prefix") + pl("query_suffix") + pl("answer_suffix") - pl("output_label")


def split_pool(
    lengths: Sequence[int], fixed: int, buckets: Sequence[int], max_context: int,
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Splits one task's pool into sub-pools of similar pair length, each with its bucket.

    A pair is usable when two pairs of its length fit the largest bucket (a target with at least
    one context pair); the others are returned as dropped. Each usable pair's class is the
    smallest bucket that holds `max_context + 1` pairs of its length (else the largest). Classes
    with fewer than `max_context + 1` pairs merge into the next larger class (the last into the
    one before), so a small pool (an ARC task) stays whole. A sub-pool's bucket is the smallest
    that holds its longest episode (its `max_context + 1` longest pairs), else the largest; any
    two of its pairs fit its bucket.

    Args:
      lengths: `pool_pair_length` of each pair.
      fixed: `pool_fixed_length`.
      buckets: increasing bucket lengths.
      max_context: most context pairs per episode.

    Returns:
      ([(bucket, [pair indices]), ...] by increasing pair length, [dropped pair indices]).
    """
    largest = buckets[-1]
    classes: dict[int, list[int]] = {}
    dropped = []
    for i, n in enumerate(lengths):
        if fixed + 2 * n > largest:
            dropped.append(i)
            continue
        bucket = choose_bucket(fixed + (max_context + 1) * n, buckets) or largest
        classes.setdefault(bucket, []).append(i)
    groups: list[list[int]] = []
    pending: list[int] = []
    for bucket in sorted(classes):
        pending += classes[bucket]
        if len(pending) >= max_context + 1:
            groups.append(pending)
            pending = []
    if pending:
        if groups:
            groups[-1] += pending
        else:
            groups.append(pending)
    out = []
    for members in groups:
        if len(members) < 2:
            dropped += members
            continue
        longest = sorted((lengths[i] for i in members), reverse=True)[: max_context + 1]
        out.append((choose_bucket(fixed + sum(longest), buckets) or largest, members))
    return out, sorted(dropped)


def pool_train_example(
    key: jax.Array, pools: PoolArrays, pool: jax.Array, *, vocab: TokenVocab,
    cfg: PipelineConfig, seq_len: int, max_pool: int, context_pairs: tuple[int, int],
) -> EncodedExample:
    """One training row from (sub-)pool index `pool` (scalar) of `pools`, from a PRNG key.

    `max_pool` (static) is at least every pool's `count`; `context_pairs` = (min, max) context
    pairs. Context pairs that do not fit `seq_len` are never drawn (`encode`'s truncation is a
    safety net only). Loss on the target output (or every output, `cfg.loss_on`).
    """
    k_episode, k_aug = jax.random.split(key)
    pools = jax.tree.map(jnp.asarray, pools)
    start, count = pools.start[pool], pools.count[pool]
    last = pools.lengths.shape[0] - 1
    lengths = pools.lengths[jnp.minimum(start + jnp.arange(max_pool), last)]
    lo, hi = context_pairs
    episode = sample.sample_pool_episode(
        k_episode, count, lengths, seq_len - pool_fixed_length(vocab), min_context=lo,
        max_context=hi, n_candidates=4 * (hi + 1))
    idx = start + jnp.concatenate([episode.context, episode.target[None]])
    grids, shapes = pool_grids(pools, jnp.minimum(idx, last))
    valid = jnp.arange(hi) < episode.n_context
    grids = sample.EpisodeGrids(
        jnp.where(valid[:, None, None, None], grids[:-1], 0),
        jnp.where(valid[:, None, None], shapes[:-1], 0), grids[-1], shapes[-1])
    aug = augment.sample_augmentation(
        k_aug, geometric=cfg.geometric, color=cfg.color, keep_background=cfg.keep_background,
        preserve_color_prob=cfg.preserve_color_prob)
    grids = sample.augment_episode(aug, grids)
    return encode_episode(
        vocab, cfg.fmt, grids.context, grids.context_shapes, episode.n_context, grids.target,
        grids.target_shape, seq_len=seq_len, loss_on=cfg.loss_on, truncate=True)


def pool_train_batch(
    key: jax.Array, pools: PoolArrays, pool_ids: jax.Array, *, vocab: TokenVocab,
    cfg: PipelineConfig, seq_len: int, max_pool: int, context_pairs: tuple[int, int],
) -> EncodedExample:
    """Training rows for (sub-)pool indices `pool_ids` `[B]`: every field gains a `[B]` axis."""
    keys = jax.random.split(key, pool_ids.shape[0])
    one = lambda k, p: pool_train_example(
        k, pools, p, vocab=vocab, cfg=cfg, seq_len=seq_len, max_pool=max_pool,
        context_pairs=context_pairs)
    return jax.vmap(one)(keys, pool_ids)
