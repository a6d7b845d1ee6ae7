"""Host side of evaluation: parse decoded candidates, undo their augmentations, vote, score, write.

Decoding hands over, per `(task_id, test_index)`, a list of `Candidate`s: the augmentation the
prompt was made with, the generated assistant text and the mean log-probability of its tokens.

    candidate text --parse_answer--> augmented grid --invert_augmentation_np--> grid   (Prediction)
    predictions of one test input --rank--> ranked distinct grids; the top 2 are the attempts

Candidates are deduplicated in the task's own frame (after their augmentation is undone), then
ranked by `scoring` (`SCORINGS`): `vote` (times found, then mean log-probability), `count_logprob`
(times found plus the mean over its findings of the candidate's log-probability), or `poe`
(product of experts: the sum over augmented views of the grid's teacher-forced log-probability,
computed on device by `arc_jax.infer.scoring` and passed in).

Metrics follow the research log's table: `val_loss` (teacher-forced NLL per output token, computed
elsewhere and passed in), `accuracy` (top-1 exact), `pass_2` (either attempt exact), `correct_size`
and `correct_pixels` (pixel accuracy of the top-1, 0 when its size is wrong), and `coverage` (the
target among the distinct candidates, ranked or not: what a better scoring could reach). A task
with several test inputs scores the mean over its test inputs; overall numbers are means over
tasks, plus `solved_top1` and `solved_pass_2`, the sums over tasks (solved-task counts, a task of
two test inputs with one right counting 0.5, as Kaggle scores it). A test input without a valid
prediction scores 0; tasks whose test outputs are unknown are predicted but not scored.

`write_results(workdir, ...)` writes, each file atomically:
    results.json               {"name", "metadata", "overall", "tasks": {task_id: metrics}}
    predictions/<task_id>.json every candidate (augmentation, text, grid or error, logprob) + votes
    submission.json            Kaggle format {task_id: [{"attempt_1": grid, "attempt_2": grid}]}
"""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arc_jax.atomic import write_json_atomic
from arc_jax.data.augment import NUM_DIHEDRAL, Augmentation, invert_augmentation_np
from arc_jax.data.formats import GridFormat, PromptTemplate, parse_answer
from arc_jax.data.tasks import MAX_SIDE, NUM_COLORS, Task

FALLBACK_GRID = ((0,),)
"""Submitted when a test input has no valid prediction (Kaggle needs both attempts everywhere)."""

SCORES = ("accuracy", "pass_2", "correct_size", "correct_pixels", "coverage")
SCORINGS = ("vote", "poe", "count_logprob")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One decoded answer. `augmentation` is normalized to (int, int32 numpy `[10]`).
    `mean_logprob`: per token; `logprob`: of the whole text (None: not known)."""

    augmentation: Augmentation
    text: str
    mean_logprob: float
    logprob: float | None = None

    def __post_init__(self):
        k = int(np.asarray(self.augmentation.dihedral))
        colors = np.asarray(self.augmentation.colors, dtype=np.int32)
        if not 0 <= k < NUM_DIHEDRAL:
            raise ValueError(f"dihedral index {k} outside 0..{NUM_DIHEDRAL - 1}")
        if colors.shape != (NUM_COLORS,) or set(colors.tolist()) != set(range(NUM_COLORS)):
            raise ValueError(f"colors {colors.tolist()} is not a permutation of 0..9")
        object.__setattr__(self, "augmentation", Augmentation(k, colors))
        object.__setattr__(self, "mean_logprob", float(self.mean_logprob))
        if self.logprob is not None:
            object.__setattr__(self, "logprob", float(self.logprob))


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A parsed candidate: `grid` uint8 `[h, w]` in the task's own frame, or None with `error`."""

    candidate: Candidate
    grid: np.ndarray | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class VotedGrid:
    """A distinct predicted grid `[h, w]`: `members` index the predictions that gave it."""

    grid: np.ndarray
    members: tuple[int, ...]
    mean_logprob: float  # mean over the members of their mean_logprob
    score: float | None = None  # what `rank` sorted by (None: `vote`'s count, mean_logprob)

    @property
    def count(self) -> int:
        return len(self.members)


@dataclasses.dataclass(frozen=True)
class TestResult:
    """One test input: its predictions, their vote, and its scores (None when output unknown)."""

    predictions: tuple[Prediction, ...]
    ranked: tuple[VotedGrid, ...]
    scores: Mapping[str, float] | None

    @property
    def attempts(self) -> list[np.ndarray]:
        """The top (at most) 2 grids `[h, w]`, best first."""
        return [v.grid for v in self.ranked[:2]]

    @property
    def n_invalid(self) -> int:
        return sum(p.grid is None for p in self.predictions)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """`tests[task_id][i]`: test input i; `per_task[task_id]`: its metrics; `overall`: totals."""

    tests: Mapping[str, tuple[TestResult, ...]]
    per_task: Mapping[str, Mapping[str, Any]]
    overall: Mapping[str, Any]


def parse_candidate(
    candidate: Candidate, fmt: GridFormat, template: PromptTemplate = PromptTemplate()
) -> Prediction:
    """Parses the candidate's text and undoes its augmentation; a bad text keeps its error."""
    parsed = parse_answer(candidate.text, fmt, template)
    if parsed.grid is None:
        return Prediction(candidate, None, parsed.error)
    grid = invert_augmentation_np(candidate.augmentation, parsed.grid.astype(np.uint8))
    return Prediction(candidate, grid)


def _logprob_key(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def vote(predictions: Sequence[Prediction]) -> list[VotedGrid]:
    """Groups identical valid grids; ranks by count, then by mean log-probability, higher first.

    Remaining ties keep the order of first appearance. Invalid predictions take no part.
    """
    groups: dict[tuple[tuple[int, ...], bytes], list[int]] = {}
    for i, p in enumerate(predictions):
        if p.grid is not None:
            groups.setdefault((p.grid.shape, p.grid.astype(np.uint8).tobytes()), []).append(i)
    voted = [
        VotedGrid(
            predictions[m[0]].grid,
            tuple(m),
            float(np.mean([predictions[i].candidate.mean_logprob for i in m])),
        )
        for m in groups.values()
    ]
    return sorted(voted, key=lambda v: (-v.count, -_logprob_key(v.mean_logprob)))


GridKey = tuple[tuple[int, ...], bytes]


def grid_key(grid: np.ndarray) -> GridKey:
    """A hashable key of a grid `[h, w]`: its shape and cells."""
    grid = np.asarray(grid, np.uint8)
    return tuple(grid.shape), grid.tobytes()


def rank(
    predictions: Sequence[Prediction], scoring: str = "vote",
    poe: Mapping[GridKey, float] | None = None,
) -> list[VotedGrid]:
    """The distinct valid grids of `predictions`, best first, by `scoring`:

    vote: `vote`'s order (count, then mean log-probability).
    count_logprob: count + the mean over the grid's predictions of their candidates' whole
      log-probability (`Candidate.logprob`; `mean_logprob` where it is None).
    poe: `poe[grid_key(grid)]`, the sum of the grid's log-probabilities over the scoring views;
      grids without one (not scored in time) come after the scored ones, in `vote`'s order.
    Ties keep `vote`'s order.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    voted = vote(predictions)
    if scoring == "vote":
        return voted
    if scoring == "count_logprob":
        def whole(i: int) -> float:
            c = predictions[i].candidate
            return c.mean_logprob if c.logprob is None else c.logprob

        scored = [dataclasses.replace(v, score=v.count + float(np.mean(
            [_logprob_key(whole(i)) for i in v.members]))) for v in voted]
    else:
        poe = poe or {}
        scored = [dataclasses.replace(v, score=poe.get(grid_key(v.grid))) for v in voted]
    key = lambda v: -math.inf if v.score is None or math.isnan(v.score) else v.score
    return sorted(scored, key=lambda v: -key(v))  # stable: ties keep vote's order


def score(ranked: Sequence[np.ndarray], target: np.ndarray) -> dict[str, float]:
    """Scores the ranked distinct grids `[h, w]` (best first; may be empty; the top 2 are the
    attempts) against the target `[h, w]`."""
    top1 = ranked[0] if ranked else None
    size = top1 is not None and top1.shape == target.shape
    return {
        "accuracy": float(size and np.array_equal(top1, target)),
        "pass_2": float(any(np.array_equal(a, target) for a in ranked[:2])),
        "correct_size": float(size),
        "correct_pixels": float(np.mean(top1 == target)) if size else 0.0,
        "coverage": float(any(np.array_equal(a, target) for a in ranked)),
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _task_metrics(tests: Sequence[TestResult]) -> dict[str, Any]:
    scored = [t.scores for t in tests if t.scores is not None]
    metrics: dict[str, Any] = {k: _mean([s[k] for s in scored]) for k in SCORES}
    metrics["n_test"] = len(tests)
    metrics["n_candidates"] = sum(len(t.predictions) for t in tests)
    metrics["n_invalid"] = sum(t.n_invalid for t in tests)
    metrics["n_fallback"] = sum(not t.ranked for t in tests)
    return metrics


def _check_keys(given: Mapping | None, task_ids: Mapping, what: str) -> None:
    unknown = sorted(set(given or ()) - set(task_ids), key=str)
    if unknown:
        raise ValueError(f"{what} for {len(unknown)} unknown tasks, e.g. {unknown[0]!r}")


def _overall_val_loss(
    val_loss: Mapping[str, float], val_tokens: Mapping[str, int] | None
) -> float | None:
    if not val_loss:
        return None
    if val_tokens is None:
        return float(np.mean(list(val_loss.values())))
    missing = sorted(set(val_loss) - set(val_tokens))
    if missing:
        raise ValueError(f"val_tokens lacks {len(missing)} tasks of val_loss, e.g. {missing[0]!r}")
    total = sum(val_tokens[t] for t in val_loss)
    return float(sum(val_loss[t] * val_tokens[t] for t in val_loss) / total) if total else None


def evaluate(
    tasks: Mapping[str, Task],
    candidates: Mapping[tuple[str, int], Sequence[Candidate]],
    fmt: GridFormat,
    template: PromptTemplate = PromptTemplate(),
    *,
    val_loss: Mapping[str, float] | None = None,
    val_tokens: Mapping[str, int] | None = None,
    scoring: str = "vote",
    poe_scores: Mapping[tuple[str, int], Mapping[GridKey, float]] | None = None,
) -> Evaluation:
    """Parses, ranks (`rank` by `scoring`) and scores every test input of every task.

    Args:
      tasks: the evaluated tasks; test outputs that are None are predicted but not scored.
      candidates: decoded candidates per `(task_id, test_index)`; a missing key means none.
      fmt, template: how the candidates' texts spell grids.
      val_loss: per task, mean NLL per output token of its test outputs (teacher-forced).
      val_tokens: per task, the number of tokens behind its val_loss; makes the overall val_loss
        token-weighted instead of a plain mean over tasks.
      scoring, poe_scores: how the distinct grids of a test input are ranked (`rank`), and for
        `poe` each `(task_id, test_index)`'s scores by `grid_key`.
    """
    bad = [k for k in candidates if k[0] not in tasks or not 0 <= k[1] < len(tasks[k[0]].test)]
    if bad:
        raise ValueError(f"candidates for {len(bad)} unknown (task_id, test_index), e.g. {bad[0]}")
    _check_keys(val_loss, tasks, "val_loss")
    _check_keys(val_tokens, tasks, "val_tokens")
    tests: dict[str, tuple[TestResult, ...]] = {}
    per_task: dict[str, dict[str, Any]] = {}
    for task_id, task in tasks.items():
        results = []
        for i, pair in enumerate(task.test):
            given = candidates.get((task_id, i), ())
            preds = tuple(parse_candidate(c, fmt, template) for c in given)
            ranked = tuple(rank(preds, scoring, (poe_scores or {}).get((task_id, i))))
            scores = None if pair.output is None else score([v.grid for v in ranked], pair.output)
            results.append(TestResult(preds, ranked, scores))
        tests[task_id] = tuple(results)
        per_task[task_id] = _task_metrics(results)
        if val_loss is not None and task_id in val_loss:
            per_task[task_id]["val_loss"] = float(val_loss[task_id])
        if val_tokens is not None and task_id in val_tokens:
            per_task[task_id]["val_tokens"] = int(val_tokens[task_id])
    overall: dict[str, Any] = {"val_loss": _overall_val_loss(val_loss or {}, val_tokens)}
    for k in SCORES:
        overall[k] = _mean([m[k] for m in per_task.values() if m[k] is not None])
    for k, name in (("accuracy", "solved_top1"), ("pass_2", "solved_pass_2")):
        overall[name] = float(sum(m[k] for m in per_task.values() if m[k] is not None))
    overall["n_tasks"] = len(per_task)
    overall["n_scored_tasks"] = sum(m["accuracy"] is not None for m in per_task.values())
    for k in ("n_test", "n_candidates", "n_invalid", "n_fallback"):
        overall[k] = sum(m[k] for m in per_task.values())
    return Evaluation(tests, per_task, overall)


def make_submission(evaluation: Evaluation, tasks: Mapping[str, Task]) -> dict[str, list[dict]]:
    """Kaggle `{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}`, one entry per test input
    of every task in `tasks`; a fallback grid stands in where predictions are missing."""
    submission = {}
    for task_id, task in tasks.items():
        results = evaluation.tests.get(task_id, ())
        entries = []
        for i in range(len(task.test)):
            attempts = [g.tolist() for g in results[i].attempts] if i < len(results) else []
            first = attempts[0] if attempts else [list(row) for row in FALLBACK_GRID]
            second = attempts[1] if len(attempts) > 1 else [list(row) for row in first]
            entries.append({"attempt_1": first, "attempt_2": second})
        submission[task_id] = entries
    return submission


class SubmissionError(ValueError):
    """A submission that does not follow the Kaggle format; the message lists the problems."""


def _grid_problem(grid: Any) -> str | None:
    if not isinstance(grid, list) or not grid or not all(isinstance(r, list) for r in grid):
        return "not a non-empty list of rows"
    widths = sorted({len(r) for r in grid})
    if len(widths) > 1:
        return f"not rectangular: row widths {widths}"
    h, w = len(grid), widths[0]
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        return f"shape {h}x{w}: each side must be 1..{MAX_SIDE}"
    # type() rather than isinstance: bools are ints to isinstance.
    if not all(type(c) is int and 0 <= c < NUM_COLORS for r in grid for c in r):
        return f"cells must be ints 0..{NUM_COLORS - 1}"
    return None


def validate_submission(submission: Any, tasks: Mapping[str, Task]) -> None:
    """Checks the Kaggle submission format for `tasks`; raises `SubmissionError` naming problems."""
    if not isinstance(submission, dict):
        raise SubmissionError("submission is not a JSON object of tasks")
    problems = [f"task {t!r}: missing" for t in tasks if t not in submission]
    problems += [f"task {t!r}: not an evaluated task" for t in submission if t not in tasks]
    for task_id, task in tasks.items():
        entries = submission.get(task_id)
        if task_id not in submission:
            continue
        if not isinstance(entries, list) or len(entries) != len(task.test):
            got = f"{len(entries)} entries" if isinstance(entries, list) else "not a list"
            problems.append(f"task {task_id!r}: {got}, expected {len(task.test)} (one per test)")
            continue
        for i, entry in enumerate(entries):
            where = f"task {task_id!r} test[{i}]"
            if not isinstance(entry, dict) or set(entry) != {"attempt_1", "attempt_2"}:
                keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                problems.append(f"{where}: expected keys attempt_1, attempt_2, got {keys}")
                continue
            for key in ("attempt_1", "attempt_2"):
                problem = _grid_problem(entry[key])
                if problem:
                    problems.append(f"{where}.{key}: {problem}")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SubmissionError(f"{len(problems)} problems in submission:\n  {shown}{more}")



def _file_name(task_id: str) -> str:
    name = urllib.parse.quote(task_id, safe="")
    return name.replace(".", "%2E") if name in (".", "..") else name


def _test_json(test: TestResult, target: np.ndarray | None) -> dict[str, Any]:
    group = {i: rank for rank, v in enumerate(test.ranked) for i in v.members}
    return {
        "attempts": [g.tolist() for g in test.attempts],
        "target": None if target is None else target.tolist(),
        "scores": None if test.scores is None else dict(test.scores),
        "votes": [
            {"grid": v.grid.tolist(), "count": v.count, "mean_logprob": v.mean_logprob,
             "score": v.score, "members": list(v.members)}
            for v in test.ranked
        ],
        "candidates": [
            {
                "dihedral": p.candidate.augmentation.dihedral,
                "colors": np.asarray(p.candidate.augmentation.colors).tolist(),
                "text": p.candidate.text,
                "mean_logprob": p.candidate.mean_logprob,
                "logprob": p.candidate.logprob,
                "grid": None if p.grid is None else p.grid.tolist(),
                "error": p.error,
                "vote_rank": group.get(i),
            }
            for i, p in enumerate(test.predictions)
        ],
    }


def write_results(
    workdir: str | os.PathLike,
    evaluation: Evaluation,
    tasks: Mapping[str, Task],
    *,
    name: str,
    metadata: Mapping[str, Any] | None = None,
    ttft_seconds: float | None = None,
) -> dict[str, list[dict]]:
    """Writes results.json, predictions/<task_id>.json and submission.json into `workdir`.

    `metadata` (e.g. `config.to_dict()`) is stored as is under "metadata"; `ttft_seconds` is the
    fine-tuning time shown by `arc_jax.results_table`. Returns the (validated) submission.
    """
    submission = make_submission(evaluation, tasks)
    validate_submission(submission, tasks)
    for task_id, tests in evaluation.tests.items():
        outputs = [p.output for p in tasks[task_id].test] if task_id in tasks else []
        record = {
            "task_id": task_id,
            "metrics": dict(evaluation.per_task[task_id]),
            "tests": [
                _test_json(t, outputs[i] if i < len(outputs) else None)
                for i, t in enumerate(tests)
            ],
        }
        file = os.path.join(workdir, "predictions", f"{_file_name(task_id)}.json")
        write_json_atomic(file, record)
    write_json_atomic(os.path.join(workdir, "submission.json"), submission)
    results: dict[str, Any] = {"name": name, "metadata": dict(metadata or {})}
    if ttft_seconds is not None:
        results["ttft_seconds"] = float(ttft_seconds)
    results["overall"] = dict(evaluation.overall)
    results["tasks"] = {t: dict(m) for t, m in evaluation.per_task.items()}
    write_json_atomic(os.path.join(workdir, "results.json"), results, indent=1)
    return submission
