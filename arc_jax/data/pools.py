"""Training pools: tasks with a pool of (input, output) pairs, kept clear of evaluation data.

A training source is a set of tasks, each with a pool of pairs:

  * an ARC source (a bundle, a directory of ARC task files, a challenges file): a task's pool is
    its train pairs plus its test pairs with known outputs, a handful each;
  * a RE-ARC directory (`tasks/<task_id>.json`, each a JSON list of `{"input", "output"}`):
    hundreds of generated pairs per task. `load_tasks` reads it (a pool becomes a task whose train
    pairs are the pool); bad pairs and files are reported by name and skipped.

`data.train` names one source or several with weights (`parse_sources`); episodes are drawn from
the sources in proportion to their weights, from a source's tasks uniformly.

Kept out of training (`Exclusion`): every task whose id is an evaluation id or a held-out id, and
every pair equal to an evaluation or held-out pair (train or test) under one of the 8 dihedral
transforms applied to input and output alike. Only the pair counts: a pair whose input alone, or
output alone, matches an evaluation grid stays. A task all of whose pairs are excluded so is a
copy of an evaluation task under another id (`Exclusion.duplicates`); its id is then excluded
too, in every source (its RE-ARC pool would teach the evaluation task).

Held-out training tasks (`holdout_ids`) leave base training entirely, RE-ARC pools included, so
hyperparameters can be tuned on them. The default rule `every:8` holds out every 8th id of the
sorted kaggle2024/training ids, starting with the first: 50 tasks, `007bbfb7`, `06df4c85`,
`0dfd9992`, ..., `f8ff0b80`.

Storage (`PoolArrays`): every grid's cells in one flat uint8 array, row-major at its own offset,
so a pool costs about one byte per cell (RE-ARC's 75,677 pairs: 42 MB of cells, where padded
`[pairs, 2, 30, 30]` uint8 grids would take 136 MB). `pool_grids` gathers padded int32 grids on
device inside jit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arc_jax.data.tasks import BUNDLES, MAX_SIDE, Pair, Task, load_tasks

EVALUATION = "kaggle2024/evaluation"
"""Always excluded from training, whatever `data.eval` is."""

HOLDOUT_SOURCE = "kaggle2024/training"
"""The ids a holdout rule `every:N[:K]` counts over."""

DEFAULT_HOLDOUT = "every:8"


# ---------------------------------------------------------------------------------------------
# Sources and weights.


def parse_sources(value) -> tuple[tuple[str, float], ...]:
    """`data.train` -> ((source, weight), ...).

    Accepts one source name (weight 1), or a sequence whose items are a source name or a
    `(source, weight)` pair; weights are positive finite numbers. Raises ValueError saying what is
    wrong (without the config key: the caller names it).
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{value!r}: expected a source name or a non-empty list of "
                         "(source, weight) pairs")
    sources = []
    for item in items:
        name, weight = (item, 1.0) if isinstance(item, str) else _pair_item(item)
        if not name:
            raise ValueError(f"{value!r}: empty source name")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and weight > 0):
            raise ValueError(f"{item!r}: the weight must be a positive number")
        sources.append((name, float(weight)))
    names = [n for n, _ in sources]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"source(s) listed twice: {duplicated}")
    return tuple(sources)


def _pair_item(item) -> tuple[str, object]:
    if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1]
    raise ValueError(f"{item!r}: each source is a name or a (name, weight) pair")


def check_source_exists(name: str) -> None:
    """Raises ValueError unless `name` is a bundle or an existing path."""
    if name not in BUNDLES and not os.path.exists(name):
        hint = ""
        if "re_arc" in name.lower() or "re-arc" in name.lower():
            hint = " (generate RE-ARC data and point at its tasks/ directory; see the README)"
        raise ValueError(f"source {name!r} is neither a bundle nor an existing path{hint}")


# ---------------------------------------------------------------------------------------------
# Held-out training tasks.


def check_holdout(rule: str) -> None:
    """Raises ValueError unless `rule` is "", "none", "every:N", "every:N:K" (0 <= K < N) or a
    comma-separated list of task ids."""
    _parse_holdout(rule)


def _parse_holdout(rule: str) -> tuple[str, int, int] | tuple[str, tuple[str, ...]]:
    if not isinstance(rule, str):
        raise ValueError(f"{rule!r}: must be a string")
    rule = rule.strip()
    if rule in ("", "none"):
        return ("ids", ())
    if rule.startswith("every:"):
        parts = rule.split(":")[1:]
        try:
            n, k = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
        except (ValueError, IndexError):
            n = k = -1
        if len(parts) > 2 or n < 1 or not 0 <= k < n:
            raise ValueError(f"{rule!r}: expected every:N or every:N:K with N >= 1, 0 <= K < N")
        return ("every", n, k)
    ids = tuple(i.strip() for i in rule.split(","))
    if not all(ids):
        raise ValueError(f"{rule!r}: empty task id in the list")
    return ("ids", ids)


def holdout_ids(rule: str, ids: Iterable[str] | None = None) -> tuple[str, ...]:
    """The held-out task ids of `rule` (see `check_holdout`), sorted.

    `every:N:K` takes sorted(ids)[K::N] of `ids`, by default the kaggle2024/training ids; an
    explicit list is returned as given (sorted).
    """
    parsed = _parse_holdout(rule)
    if parsed[0] == "ids":
        return tuple(sorted(parsed[1]))
    _, n, k = parsed
    pool = sorted(ids if ids is not None else load_tasks(HOLDOUT_SOURCE))
    return tuple(pool[k::n])


# ---------------------------------------------------------------------------------------------
# Pools and the exclusion of evaluation data.


def task_pool(task: Task) -> tuple[Pair, ...]:
    """A task's pool: its train pairs, then its test pairs whose outputs are known."""
    return tuple(task.train) + tuple(p for p in task.test if p.output is not None)


def _dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    if k < 4:
        return np.rot90(grid, k)
    return (grid.T, np.flipud(grid), np.fliplr(grid), np.rot90(grid, 2).T)[k - 4]


def pair_key(pair: Pair) -> bytes:
    """Identity of a pair (both grids with their shapes) as bytes."""
    parts = []
    for grid in (pair.input, pair.output):
        g = np.ascontiguousarray(grid, dtype=np.uint8)
        parts.append(bytes(g.shape) + g.tobytes())
    return b"|".join(parts)


def dihedral_keys(pair: Pair) -> set[bytes]:
    """`pair_key` of the pair under each of the 8 dihedral transforms (one transform applied to
    input and output together)."""
    return {pair_key(Pair(_dihedral(pair.input, k), _dihedral(pair.output, k))) for k in range(8)}


class Exclusion:
    """What may not enter training: task ids and pair keys, each with why ("evaluation" or
    "holdout")."""

    def __init__(self, protected: Mapping[str, Iterable[Task]]):
        """`protected`: reason -> tasks; their ids and all their known pairs are excluded."""
        self.ids: dict[str, str] = {}
        self.pairs: dict[bytes, str] = {}
        for reason, tasks in protected.items():
            for task in tasks:
                self.ids.setdefault(task.task_id, reason)
                for pair in task_pool(task):
                    for key in dihedral_keys(pair):
                        self.pairs.setdefault(key, reason)

    def add_ids(self, ids: Iterable[str], reason: str) -> None:
        for task_id in ids:
            self.ids.setdefault(task_id, reason)

    def duplicates(self, tasks: Mapping[str, Task]) -> dict[str, str]:
        """Tasks (by id) every one of whose pairs equals a protected pair: copies of a protected
        task under another id (kaggle2024/training 40853293 is evaluation 070dd51e up to a
        dihedral transform). -> {task id: reason}, reason "<why>_duplicate"."""
        out = {}
        for task_id, task in tasks.items():
            whys = {self.pairs.get(pair_key(p)) for p in task_pool(task)}
            if whys and None not in whys and task_id not in self.ids:
                out[task_id] = f"{sorted(whys)[0]}_duplicate"
        return out

    def apply(self, tasks: Mapping[str, Task]) -> tuple[dict[str, tuple[Pair, ...]], dict]:
        """-> ({task id: pool of allowed pairs}, report) for the tasks of one source.

        A task is dropped for its id, or when no pair of it is left. The report (JSON-ready)
        gives the counts and the ids: `excluded_ids[reason]` (task ids),
        `pairs_of_excluded_ids`, `excluded_pairs[reason]` (pairs equal to a protected pair, in
        the other tasks), `pairs_excluded_per_task`, `emptied` (tasks with every pair excluded).
        """
        pools: dict[str, tuple[Pair, ...]] = {}
        excluded_ids: dict[str, list[str]] = {}
        excluded_pairs: dict[str, int] = {}
        per_task: dict[str, int] = {}
        emptied = []
        n_pairs = in_excluded = 0
        for task_id, task in sorted(tasks.items()):
            pool = task_pool(task)
            n_pairs += len(pool)
            reason = self.ids.get(task_id)
            if reason is not None:
                excluded_ids.setdefault(reason, []).append(task_id)
                in_excluded += len(pool)
                continue
            kept = []
            for pair in pool:
                why = self.pairs.get(pair_key(pair))
                if why is None:
                    kept.append(pair)
                else:
                    excluded_pairs[why] = excluded_pairs.get(why, 0) + 1
            if len(kept) < len(pool):
                per_task[task_id] = len(pool) - len(kept)
            if kept:
                pools[task_id] = tuple(kept)
            else:
                emptied.append(task_id)
        report = {
            "tasks": len(tasks), "pairs": n_pairs,
            "excluded_ids": excluded_ids, "pairs_of_excluded_ids": in_excluded,
            "excluded_pairs": excluded_pairs,
            "pairs_excluded_per_task": per_task, "emptied": emptied,
            "kept_tasks": len(pools), "kept_pairs": sum(len(p) for p in pools.values()),
        }
        return pools, report


# ---------------------------------------------------------------------------------------------
# Compact storage and the on-device gather.


class PoolArrays(NamedTuple):
    """N pairs in S pools (a pytree of numpy or device arrays). Pool s is pairs
    `start[s] .. start[s] + count[s] - 1`.

    cells: uint8 `[C]`, every grid's cells row-major, concatenated.
    offsets: int32 `[N, 2]`, where pair n's input / output starts in `cells`.
    shapes: int32 `[N, 2, 2]`, (h, w) of input / output.
    lengths: int32 `[N]`, tokens the pair takes in a prompt (see `pipeline.pool_pair_length`).
    start: int32 `[S]`.
    count: int32 `[S]`.
    """

    cells: np.ndarray
    offsets: np.ndarray
    shapes: np.ndarray
    lengths: np.ndarray
    start: np.ndarray
    count: np.ndarray


def pack_pools(pools: Sequence[Sequence[Pair]], lengths: Sequence[Sequence[int]]) -> PoolArrays:
    """Packs pools of pairs (each with its pairs' token `lengths`) into `PoolArrays`, in order."""
    pairs = [p for pool in pools for p in pool]
    grids = [g for p in pairs for g in (p.input, p.output)]
    sizes = np.asarray([g.size for g in grids], np.int64)
    ends = np.cumsum(sizes)
    if ends.size and ends[-1] >= 2**31:
        raise ValueError(f"{ends[-1]} cells in the pools: more than int32 offsets can address")
    cells = np.concatenate([np.ravel(g) for g in grids]).astype(np.uint8) if grids else \
        np.zeros(0, np.uint8)
    offsets = (ends - sizes).astype(np.int32).reshape(-1, 2)
    shapes = np.asarray([g.shape for g in grids], np.int32).reshape(-1, 2, 2)
    counts = np.asarray([len(pool) for pool in pools], np.int32)
    flat_lengths = np.asarray([n for ls in lengths for n in ls], np.int32)
    if flat_lengths.shape[0] != len(pairs):
        raise ValueError(f"{flat_lengths.shape[0]} lengths for {len(pairs)} pairs")
    start = (np.cumsum(counts) - counts).astype(np.int32)
    return PoolArrays(cells, offsets, shapes, flat_lengths, start, counts)


def pool_grids(pools: PoolArrays, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Padded grids of pairs `idx` `[n]` (global pair indices), jittable.

    Returns int32 grids `[n, 2, 30, 30]` (input, output; zero outside each grid) and shapes
    `[n, 2, 2]`.
    """
    shapes = jnp.asarray(pools.shapes)[idx]
    offsets = jnp.asarray(pools.offsets)[idx]
    cells = jnp.asarray(pools.cells)
    i = jnp.arange(MAX_SIDE)[:, None]
    j = jnp.arange(MAX_SIDE)[None, :]

    def one(offset, shape):
        valid = (i < shape[0]) & (j < shape[1])
        flat = jnp.where(valid, offset + i * shape[1] + j, 0)
        return jnp.where(valid, cells[flat].astype(jnp.int32), 0)

    return jax.vmap(jax.vmap(one))(offsets, shapes), shapes
