"""Builds `report.html` for one run, and the comparison page for two runs.

A task is *solved* when every test input with a known output has it among its two attempts
(pass@2 = 1). Comparing run A with run B, B *fixed* the tasks it solves and A does not, and
*broke* those A solves and it does not; tasks in only one run, or scored in neither, are in
neither list.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arc_jax.atomic import atomic_write
from arc_jax.data.tasks import Task
from arc_jax.report.page import render_page
from arc_jax.report.runs import SOLVED, UNSOLVED, Run, TaskRun, load_run

REPORT_FILE = "report.html"

# Overall metrics shown, in this order (whatever results.json has of them).
OVERALL_KEYS = ("val_loss", "accuracy", "pass_2", "correct_size", "correct_pixels", "coverage",
                "n_tasks", "n_scored_tasks", "n_test", "n_candidates", "n_invalid", "n_fallback")
# Config keys (dotted) shown in the run table.
CONFIG_KEYS = ("mode", "data.eval", "model.path", "ttft.mode", "train.steps",
               "eval.n_augmentations")


def comparison_path(workdir_a: str | os.PathLike, workdir_b: str | os.PathLike) -> Path:
    """Where a comparison goes by default: `WORKDIR_B/compare_<name of A's folder>.html`, next
    to B's own report (B is the run being judged against A)."""
    return Path(workdir_b) / f"compare_{Path(workdir_a).resolve().name}.html"


def changes(a: Run, b: Run) -> tuple[list[str], list[str]]:
    """(fixed, broken): task ids B solves and A does not, and those A solves and B does not."""
    common = sorted(set(a.tasks) & set(b.tasks))
    status = lambda run, t: run.tasks[t].status
    fixed = [t for t in common if status(b, t) == SOLVED and status(a, t) == UNSOLVED]
    broken = [t for t in common if status(a, t) == SOLVED and status(b, t) == UNSOLVED]
    return fixed, broken


def _shown(value: Any) -> Any:
    """A value for the page's JSON: NaN and infinities (which JSON cannot spell) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dotted(tree: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _run_data(run: Run, label: str) -> dict[str, Any]:
    overall = {k: _shown(run.overall.get(k)) for k in OVERALL_KEYS}
    overall["solved_tasks"] = sum(t.status == SOLVED for t in run.tasks.values())
    overall["ttft_seconds"] = _shown(run.ttft_seconds)
    info: dict[str, Any] = {"name": run.name, "workdir": str(run.workdir)}
    info.update({k: _dotted(run.metadata, k) for k in CONFIG_KEYS})
    phases = run.metadata.get("phase_seconds")
    if isinstance(phases, Mapping):
        info.update({f"{phase} seconds": s for phase, s in phases.items()})
    return {"label": label, "overall": overall,
            "info": {k: _shown(v) for k, v in info.items() if v is not None},
            "notes": list(run.notes)}


def _task_run_data(view: TaskRun | None) -> dict[str, Any] | None:
    if view is None:
        return None
    scored = [t.solved for t in view.tests if t.solved is not None]
    return {
        "status": view.status,
        "invalid": view.invalid,
        "val_loss": _shown(view.val_loss),
        "tests_solved": f"{sum(scored)}/{len(scored)}",
        "tests": [{"attempts": [{"grid": a.grid, "mark": a.mark, "note": a.note}
                                for a in t.attempts],
                   "n_candidates": t.n_candidates, "n_invalid": t.n_invalid}
                  for t in view.tests],
    }


def _task_data(task_id: str, runs: Sequence[Run], change: str) -> dict[str, Any]:
    views = [run.tasks.get(task_id) for run in runs]
    # The later run's copy of the task wins (in a comparison both normally hold the same one).
    source: Task | None = next(
        (run.source_tasks[task_id] for run in reversed(runs) if task_id in run.source_tasks), None)
    n_tests = max([len(v.tests) for v in views if v] + [len(source.test) if source else 0])
    targets = []
    for q in range(n_tests):
        known = [v.tests[q].target for v in views if v and q < len(v.tests)]
        target = next((t for t in known if t is not None), None)
        if target is None and source is not None and q < len(source.test):
            output = source.test[q].output
            target = None if output is None else output.tolist()
        targets.append(target)
    inputs = [source.test[q].input.tolist() if source and q < len(source.test) else None
              for q in range(n_tests)]
    return {
        "id": task_id,
        "train": [[p.input.tolist(), p.output.tolist()] for p in source.train] if source else None,
        "inputs": inputs,
        "targets": targets,
        "runs": [_task_run_data(v) for v in views],
        "change": change,
        "note": None if source else "task not found in the task source: train pairs and test "
                                    "inputs are not shown",
    }


def page_data(runs: Sequence[Run]) -> dict[str, Any]:
    """What the page shows, as JSON-ready data: one run (a report) or two (A, B: a comparison)."""
    if len(runs) not in (1, 2):
        raise ValueError(f"a report shows one or two runs, not {len(runs)}")
    fixed, broken = changes(*runs) if len(runs) == 2 else ([], [])
    change = {**{t: "fixed" for t in fixed}, **{t: "broken" for t in broken}}
    labels = ["A", "B"] if len(runs) == 2 else [""]
    task_ids = sorted(set().union(*(run.tasks for run in runs)))
    return {
        "runs": [_run_data(run, f"{label} {run.name}".strip())
                 for run, label in zip(runs, labels, strict=True)],
        "tasks": [_task_data(t, runs, change.get(t, "")) for t in task_ids],
        "fixed": fixed,
        "broken": broken,
    }


def _write_page(out: Path, data: dict[str, Any], title: str) -> Path:
    text = render_page(data, title)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(out, write)
    return out


def build_report(workdir: str | os.PathLike, out: str | os.PathLike | None = None,
                 tasks: Mapping[str, Task] | None = None) -> Path:
    """Writes the run's report (default `WORKDIR/report.html`) and returns its path.

    `tasks` (by id) supplies the train pairs and test inputs; by default they are loaded from
    the run's `data.eval`. Raises `ReportError` naming a missing or malformed file.
    """
    run = load_run(workdir, tasks)
    out = Path(out) if out is not None else Path(workdir) / REPORT_FILE
    return _write_page(out, page_data([run]), f"arc_jax report: {run.name}")


def build_comparison(workdir_a: str | os.PathLike, workdir_b: str | os.PathLike,
                     out: str | os.PathLike | None = None,
                     tasks: Mapping[str, Task] | None = None) -> Path:
    """Writes the side-by-side page of runs A and B (default `comparison_path(A, B)`): both
    runs' attempts per task, and the tasks B fixed and broke. Returns its path."""
    a, b = load_run(workdir_a, tasks), load_run(workdir_b, tasks)
    out = Path(out) if out is not None else comparison_path(workdir_a, workdir_b)
    return _write_page(out, page_data([a, b]), f"arc_jax comparison: A {a.name} vs B {b.name}")
