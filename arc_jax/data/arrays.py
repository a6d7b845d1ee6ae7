"""Tasks as fixed-shape padded int32 arrays, built once on the host for the device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from arc_jax.data.tasks import MAX_SIDE, Pair, Task


class TaskArrays(NamedTuple):
    """T tasks with up to P train and Q test pairs; a JAX pytree of int32 numpy arrays.

    Axis 2 of the grids and shapes: 0 = input, 1 = output. Cells outside a grid's (h, w) are 0;
    absent pairs and unknown test outputs are all 0 with shape (0, 0).
    """

    train: np.ndarray  # [T, P, 2, MAX_SIDE, MAX_SIDE]
    train_shapes: np.ndarray  # [T, P, 2, 2] (h, w)
    n_train: np.ndarray  # [T]
    test: np.ndarray  # [T, Q, 2, MAX_SIDE, MAX_SIDE]
    test_shapes: np.ndarray  # [T, Q, 2, 2] (h, w)
    n_test: np.ndarray  # [T]


def _pad_pairs(
    tasks: Sequence[Task], kind: str, max_pairs: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> grids [T, P, 2, MAX_SIDE, MAX_SIDE], shapes [T, P, 2, 2], counts [T] for `kind` pairs."""
    pairs: list[tuple[Pair, ...]] = [getattr(t, kind) for t in tasks]
    counts = np.array([len(p) for p in pairs], dtype=np.int32).reshape(-1)
    n = int(counts.max(initial=0)) if max_pairs is None else max_pairs
    for task, count in zip(tasks, counts, strict=True):
        if count > n:
            raise ValueError(f"task {task.task_id} has {count} {kind} pairs, more than {n}")
    grids = np.zeros((len(tasks), n, 2, MAX_SIDE, MAX_SIDE), np.int32)
    shapes = np.zeros((len(tasks), n, 2, 2), np.int32)
    for t, task_pairs in enumerate(pairs):
        for p, pair in enumerate(task_pairs):
            for k, grid in enumerate((pair.input, pair.output)):
                if grid is not None:
                    h, w = grid.shape
                    grids[t, p, k, :h, :w] = grid
                    shapes[t, p, k] = h, w
    return grids, shapes, counts


def pad_tasks(
    tasks: Sequence[Task], max_train: int | None = None, max_test: int | None = None
) -> TaskArrays:
    """Pads `tasks` to `TaskArrays`; P and Q default to the most pairs of any task in `tasks`.

    Raises ValueError naming the task if one has more pairs than `max_train` / `max_test`.
    """
    tasks = list(tasks)
    return TaskArrays(*_pad_pairs(tasks, "train", max_train), *_pad_pairs(tasks, "test", max_test))


def pad_grid(grid: np.ndarray) -> np.ndarray:
    """`[h, w]` grid -> `[MAX_SIDE, MAX_SIDE]` int32, zero outside the grid."""
    h, w = np.shape(grid)
    if h > MAX_SIDE or w > MAX_SIDE:
        raise ValueError(f"grid of shape {h}x{w} is larger than {MAX_SIDE}x{MAX_SIDE}")
    out = np.zeros((MAX_SIDE, MAX_SIDE), np.int32)
    out[:h, :w] = grid
    return out


def unpad(grid: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Padded grid `[MAX_SIDE, MAX_SIDE]` and its (h, w) `[2]` -> a copy of the `[h, w]` grid."""
    grid = np.asarray(grid)
    h, w = (int(s) for s in np.asarray(shape).reshape(2))
    if not (0 <= h <= grid.shape[0] and 0 <= w <= grid.shape[1]):
        raise ValueError(f"shape {h}x{w} does not fit in a padded grid of {grid.shape}")
    return grid[:h, :w].copy()
