"""A run's outputs read back for the report: `results.json`, `predictions/` and the tasks.

`load_run(workdir)` reads what `arc_jax.infer.evaluate.write_results` wrote and judges every
attempt against its target. The train pairs and test inputs are not in those files: they come
from the evaluated tasks, passed in or loaded from the run's `data.eval` (as recorded in
`results.json` metadata). A task that cannot be found there is still shown from its predictions,
with a note saying so. Malformed files raise `ReportError`, whose message starts with the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arc_jax.data.tasks import NUM_COLORS, Task, load_tasks

# The one naming rule for prediction files (task ids are URL-quoted into file names).
from arc_jax.infer.evaluate import _file_name as prediction_file_name

Grid = list[list[int]]

# How an attempt slot is marked.
RIGHT = "right"
WRONG = "wrong"
NO_TARGET = "no target"  # the test output is unknown: predicted, not scored
INVALID = "invalid output"  # no candidate of this test input gave a valid grid
NO_SECOND = "no 2nd grid"  # valid candidates all gave attempt 1 (Kaggle gets it twice)

# A task's status.
SOLVED = "solved"  # every scored test input has its target among the two attempts
UNSOLVED = "unsolved"
NOT_SCORED = "not scored"  # no test output is known


class ReportError(ValueError):
    """A run's outputs that cannot be read or are malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One of the two attempt slots of a test input: the grid (None when empty) and its mark."""

    grid: Grid | None
    mark: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class TestView:
    """One test input of one run: its target (None when unknown) and the two attempt slots."""

    target: Grid | None
    attempts: tuple[Attempt, Attempt]
    n_candidates: int
    n_invalid: int

    @property
    def solved(self) -> bool | None:
        """Whether either attempt is right; None when the target is unknown."""
        if self.target is None:
            return None
        return any(a.mark == RIGHT for a in self.attempts)


@dataclasses.dataclass(frozen=True)
class TaskRun:
    """One task as one run saw it: metrics from results.json, tests from its predictions file."""

    task_id: str
    metrics: Mapping[str, Any]
    tests: tuple[TestView, ...]

    @property
    def status(self) -> str:
        scored = [t.solved for t in self.tests if t.solved is not None]
        if not scored:
            return NOT_SCORED
        return SOLVED if all(scored) else UNSOLVED

    @property
    def invalid(self) -> bool:
        """Whether some test input got no valid grid at all (the fallback was submitted)."""
        return any(t.attempts[0].mark == INVALID for t in self.tests)

    @property
    def val_loss(self) -> float | None:
        value = self.metrics.get("val_loss")
        return float(value) if isinstance(value, (int, float)) else None


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's outputs. `source_tasks` holds the evaluated tasks found (possibly none); `notes`
    says what could not be shown and why."""

    workdir: Path
    name: str
    overall: Mapping[str, Any]
    metadata: Mapping[str, Any]
    ttft_seconds: float | None
    tasks: Mapping[str, TaskRun]
    source_tasks: Mapping[str, Task]
    notes: tuple[str, ...] = ()


def read_json(file: Path) -> Any:
    """The JSON in `file`; a missing or unparseable file raises `ReportError` naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ReportError(f"{file}: missing") from e
    except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 decode errors.
        raise ReportError(f"{file}: cannot read JSON: {e}") from e


def _grid(value: Any, file: Path, where: str) -> Grid:
    rows_ok = isinstance(value, list) and value and all(isinstance(r, list) and r for r in value)
    if not rows_ok or len({len(r) for r in value}) != 1:
        raise ReportError(f"{file}: {where}: not a rectangular grid (a list of equal rows)")
    # type() rather than isinstance: bools are ints to isinstance.
    if not all(type(c) is int and 0 <= c < NUM_COLORS for r in value for c in r):
        raise ReportError(f"{file}: {where}: cells must be ints 0..{NUM_COLORS - 1}")
    return value


def _field(record: Mapping, key: str, kind: type, file: Path, where: str) -> Any:
    value = record.get(key) if isinstance(record, Mapping) else None
    if not isinstance(value, kind):
        raise ReportError(f"{file}: {where}{key}: expected a JSON {kind.__name__}")
    return value


def _attempt_slots(attempts: list[Grid], target: Grid | None, candidates: list[Mapping],
                   n_invalid: int) -> tuple[Attempt, Attempt]:
    slots = [Attempt(g, NO_TARGET if target is None else RIGHT if g == target else WRONG)
             for g in attempts[:2]]
    if not slots:
        errors = [str(c["error"]) for c in candidates if c.get("error")]
        if not candidates:
            note = "no candidate decoded (too long for the buckets, or out of time)"
        else:
            note = f"none of {len(candidates)} candidates gave a grid"
            note += f", e.g. {errors[0][:80]}" if errors else ""
        return Attempt(None, INVALID, note), Attempt(None, INVALID, note)
    if len(slots) == 1:
        note = "every valid candidate gave attempt 1"
        note += f"; {n_invalid} of {len(candidates)} candidates gave no grid" if n_invalid else ""
        slots.append(Attempt(None, NO_SECOND, note))
    return slots[0], slots[1]


def read_predictions(file: Path, task_id: str, metrics: Mapping[str, Any]) -> TaskRun:
    """One `predictions/<task>.json`, checked and judged; `ReportError` names what is wrong."""
    record = read_json(file)
    if not isinstance(record, dict):
        raise ReportError(f"{file}: not a JSON object")
    if record.get("task_id") != task_id:
        raise ReportError(f"{file}: task_id is {record.get('task_id')!r}, expected {task_id!r}")
    tests = []
    for i, test in enumerate(_field(record, "tests", list, file, "")):
        where = f"tests[{i}]."
        if not isinstance(test, dict):
            raise ReportError(f"{file}: tests[{i}]: not a JSON object")
        attempts = [_grid(g, file, f"{where}attempts[{j}]")
                    for j, g in enumerate(_field(test, "attempts", list, file, where))]
        target = test.get("target")
        target = None if target is None else _grid(target, file, f"{where}target")
        candidates = test.get("candidates", [])
        if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
            raise ReportError(f"{file}: {where}candidates: expected a list of objects")
        n_invalid = sum(c.get("grid") is None for c in candidates)
        tests.append(TestView(target, _attempt_slots(attempts, target, candidates, n_invalid),
                              len(candidates), n_invalid))
    return TaskRun(task_id, dict(metrics), tuple(tests))


def _source_tasks(metadata: Mapping[str, Any]) -> tuple[Mapping[str, Task], str | None]:
    data = metadata.get("data") if isinstance(metadata.get("data"), Mapping) else {}
    source = data.get("eval")
    not_shown = "train pairs and test inputs are not shown"
    if not source:
        return {}, f"results.json names no task source (metadata data.eval): {not_shown}"
    try:
        return load_tasks(source, data.get("eval_solutions") or None), None
    except (OSError, ValueError) as e:  # TaskError is a ValueError
        return {}, f"task source {source!r} could not be read ({e}): {not_shown}"


def load_run(workdir: str | os.PathLike, tasks: Mapping[str, Task] | None = None) -> Run:
    """Reads a run's `results.json` and `predictions/`.

    Args:
      workdir: the run's folder.
      tasks: the evaluated tasks by id; when None they are loaded from the run's `data.eval`
        (a source that cannot be read leaves them out, with a note).
    """
    workdir = Path(workdir)
    file = workdir / "results.json"
    results = read_json(file)
    if not isinstance(results, dict):
        raise ReportError(f"{file}: not a JSON object")
    per_task = _field(results, "tasks", dict, file, "")
    overall = _field(results, "overall", dict, file, "")
    metadata = results.get("metadata") if isinstance(results.get("metadata"), dict) else {}
    notes = []
    if tasks is None:
        tasks, problem = _source_tasks(metadata)
        if problem:
            notes.append(problem)
    task_runs = {}
    for task_id, metrics in sorted(per_task.items()):
        if not isinstance(metrics, dict):
            raise ReportError(f"{file}: tasks.{task_id}: expected a JSON object of metrics")
        path = workdir / "predictions" / f"{prediction_file_name(task_id)}.json"
        task_runs[task_id] = read_predictions(path, task_id, metrics)
    missing = [t for t in task_runs if t not in tasks]
    if tasks and missing:
        notes.append(f"{len(missing)} task(s) not found among the evaluated tasks "
                     f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
                     "only their predictions are shown")
    ttft = results.get("ttft_seconds")
    return Run(workdir, str(results.get("name", workdir.name)), overall, metadata,
               float(ttft) if isinstance(ttft, (int, float)) else None, task_runs,
               {t: tasks[t] for t in task_runs if t in tasks}, tuple(notes))
