"""Tests for arc_jax.infer.evaluate: parse, invert, vote, score, write."""

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arc_jax.atomic import write_json_atomic
from arc_jax.data.augment import Augmentation, apply_augmentation_np
from arc_jax.data.formats import GRID_FORMATS, answer_text, get_grid_format
from arc_jax.data.tasks import Pair, Task, load_tasks
from arc_jax.infer.evaluate import (
    Candidate,
    SubmissionError,
    evaluate,
    make_submission,
    parse_candidate,
    validate_submission,
    vote,
    write_results,
)

FMT = get_grid_format("shape_numbered")
IDENTITY = Augmentation(0, np.arange(10))


def random_augmentation(rng: np.random.Generator) -> Augmentation:
    return Augmentation(int(rng.integers(8)), rng.permutation(10))


def candidate(grid, aug=IDENTITY, logprob=-0.1, fmt=FMT) -> Candidate:
    """A candidate whose text spells `grid` as seen under `aug`."""
    augmented = apply_augmentation_np(aug, np.asarray(grid, np.uint8))
    return Candidate(aug, answer_text(augmented, fmt), logprob)


def make_task(task_id: str, *outputs) -> Task:
    """A task with one train pair and one test input per given output (None = unknown)."""
    one = np.ones((1, 1), np.uint8)
    test = tuple(Pair(one, None if o is None else np.asarray(o, np.uint8)) for o in outputs)
    return Task(task_id, (Pair(one, one),), test, "test")


@settings(max_examples=40, deadline=None)
@given(
    grid=hnp.arrays(np.uint8, st.tuples(st.integers(1, 30), st.integers(1, 30)),
                    elements=st.integers(0, 9)),
    dihedral=st.integers(0, 7),
    colors=st.permutations(range(10)),
    fmt=st.sampled_from(sorted(GRID_FORMATS)),
)
def test_parse_candidate_undoes_augmentation(grid, dihedral, colors, fmt):
    fmt = GRID_FORMATS[fmt]
    pred = parse_candidate(candidate(grid, Augmentation(dihedral, np.array(colors)), fmt=fmt), fmt)
    assert pred.error is None
    np.testing.assert_array_equal(pred.grid, grid)


def test_vote_recovers_true_grid_from_augmented_predictions():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, (5, 7))
    wrong = truth.copy()
    wrong[0, 0] = (wrong[0, 0] + 1) % 10
    cands = [candidate(truth, random_augmentation(rng), -0.5) for _ in range(6)]
    # Fewer, more confident wrong answers, and text that does not parse.
    cands += [candidate(wrong, random_augmentation(rng), -0.01) for _ in range(2)]
    cands += [candidate(truth.T, random_augmentation(rng), -0.01)]
    cands += [
        Candidate(IDENTITY, "3x3\n1 012\n2 3a5\n", -0.2),
        Candidate(random_augmentation(rng), "", -0.3),
    ]
    preds = [parse_candidate(c, FMT) for c in cands]
    ranked = vote(preds)
    np.testing.assert_array_equal(ranked[0].grid, truth)
    assert ranked[0].count == 6 and ranked[0].members == tuple(range(6))
    np.testing.assert_array_equal(ranked[1].grid, wrong)
    assert [v.count for v in ranked] == [6, 2, 1]
    assert [p.error for p in preds[-2:]] == ["row 2: '3a5' is not a row of colours 0..9",
                                             "empty output"]
    assert preds[-2].candidate.text == "3x3\n1 012\n2 3a5\n"


def test_vote_breaks_ties_by_mean_logprob():
    a, b, c = [[1, 2]], [[3], [4]], [[5]]
    preds = [parse_candidate(x, FMT) for x in [
        candidate(a, logprob=-0.1), candidate(a, logprob=-0.5),  # mean -0.30
        candidate(b, logprob=-0.2), candidate(b, logprob=-0.3),  # mean -0.25
        candidate(c, logprob=-5.0), candidate(c, logprob=-5.0), candidate(c, logprob=-5.0),
        candidate([[6]], logprob=math.nan), candidate([[7]], logprob=-9.0),
    ]]
    ranked = vote(preds)
    assert [v.grid.tolist() for v in ranked] == [c, b, a, [[7]], [[6]]]
    assert ranked[1].mean_logprob == pytest.approx(-0.25)


def test_candidate_checks_augmentation():
    with pytest.raises(ValueError, match="dihedral index 8"):
        Candidate(Augmentation(8, np.arange(10)), "", 0.0)
    with pytest.raises(ValueError, match="not a permutation"):
        Candidate(Augmentation(0, np.zeros(10)), "", 0.0)


def test_metrics_by_hand():
    t0 = [[1, 2], [3, 4]]
    t1 = [[5, 5], [5, 6]]
    tasks = {
        "a": make_task("a", t0, t1),
        "b": make_task("b", [[7]]),
        "c": make_task("c", None),
        "d": make_task("d", [[1]]),  # no candidates at all
    }
    near = [[5, 5], [5, 5]]  # 3 of 4 pixels of t1
    cands = {
        ("a", 0): [candidate(t0), candidate(t0), candidate(near)],
        ("a", 1): [candidate(near), candidate(near), candidate(t1), Candidate(IDENTITY, "x", -1)],
        ("b", 0): [candidate([[7, 7]]), Candidate(IDENTITY, "", -1)],
        ("c", 0): [candidate([[3]])],
    }
    ev = evaluate(tasks, cands, FMT, val_loss={"a": 0.2, "b": 0.4, "c": 0.1, "d": 0.3})
    a = ev.per_task["a"]
    assert (a["accuracy"], a["pass_2"], a["correct_size"]) == (0.5, 1.0, 1.0)
    assert a["correct_pixels"] == pytest.approx((1 + 0.75) / 2)
    assert (a["n_candidates"], a["n_invalid"], a["n_fallback"]) == (7, 1, 0)
    b = ev.per_task["b"]
    assert [b[k] for k in ("accuracy", "pass_2", "correct_size", "correct_pixels")] == [0] * 4
    assert ev.per_task["c"]["accuracy"] is None and ev.per_task["c"]["pass_2"] is None
    assert ev.tests["c"][0].attempts[0].tolist() == [[3]]
    assert ev.per_task["d"]["accuracy"] == 0.0 and ev.per_task["d"]["n_fallback"] == 1
    o = ev.overall
    assert o["accuracy"] == pytest.approx(0.5 / 3)  # a, b, d scored; c unknown
    assert o["pass_2"] == pytest.approx(1 / 3)
    assert o["correct_size"] == pytest.approx(1 / 3)
    assert o["correct_pixels"] == pytest.approx(0.875 / 3)
    assert o["val_loss"] == pytest.approx(0.25)
    assert (o["n_tasks"], o["n_scored_tasks"], o["n_test"]) == (4, 3, 5)
    assert (o["solved_top1"], o["solved_pass_2"]) == (0.5, 1.0)  # task a: 1 of 2, 2 of 2
    assert o["coverage"] == pytest.approx(1 / 3)
    assert (o["n_candidates"], o["n_invalid"], o["n_fallback"]) == (10, 2, 1)

    weighted = evaluate(tasks, cands, FMT, val_loss={"a": 0.2, "b": 0.4, "c": 0.1},
                        val_tokens={"a": 10, "b": 30, "c": 60, "d": 5})
    assert weighted.overall["val_loss"] == pytest.approx((2 + 12 + 6) / 100)
    assert weighted.per_task["b"]["val_tokens"] == 30 and "val_loss" not in weighted.per_task["d"]


def test_coverage_counts_a_target_ranked_below_the_attempts():
    target = [[1, 2]]
    tasks = {"t": make_task("t", target)}
    cands = {("t", 0): [candidate([[3]]), candidate([[3]]), candidate([[4]]), candidate([[4]]),
                        candidate(target)]}
    ev = evaluate(tasks, cands, FMT)
    m = ev.per_task["t"]
    assert (m["pass_2"], m["coverage"]) == (0.0, 1.0)
    assert evaluate(tasks, {("t", 0): cands[("t", 0)][:4]}, FMT).per_task["t"]["coverage"] == 0



def test_evaluate_rejects_unknown_keys():
    tasks = {"a": make_task("a", [[1]])}
    with pytest.raises(ValueError, match=r"\('a', 1\)"):
        evaluate(tasks, {("a", 1): []}, FMT)
    with pytest.raises(ValueError, match="'zz'"):
        evaluate(tasks, {}, FMT, val_loss={"zz": 1.0})
    with pytest.raises(ValueError, match="val_tokens lacks"):
        evaluate(tasks, {}, FMT, val_loss={"a": 1.0}, val_tokens={})


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


def test_kaggle2024_submission_is_valid_with_bad_and_missing_predictions(tmp_path):
    tasks = load_tasks("kaggle2024/evaluation")
    assert len(tasks) == 400
    rng = np.random.default_rng(1)
    cands, expected, n = {}, [], 0
    for task_id, task in tasks.items():
        solved = []
        for i, pair in enumerate(task.test):
            kind, n = n % 4, n + 1
            if kind == 0:  # right, from augmented views
                cands[task_id, i] = [candidate(pair.output, random_augmentation(rng))
                                     for _ in range(2)]
            elif kind == 1:  # nothing parses
                cands[task_id, i] = [Candidate(IDENTITY, "1x1\n1 0", -1.0),
                                     Candidate(IDENTITY, "oops", -2.0)]
            elif kind == 3:  # one wrong answer (kind 2: no candidates at all)
                cands[task_id, i] = [candidate(np.full((31 - pair.output.shape[0], 1), 3))]
            solved.append(kind == 0)
        expected.append(np.mean(solved))
    ev = evaluate(tasks, cands, FMT)
    assert ev.overall["accuracy"] == pytest.approx(np.mean(expected))

    submission = write_results(tmp_path, ev, tasks, name="kaggle", metadata={"seed": 0})
    with open(tmp_path / "submission.json") as f:
        written = json.load(f)
    assert written == submission
    validate_submission(written, tasks)
    assert list(written) == list(tasks)
    for task_id, task in tasks.items():
        assert len(written[task_id]) == len(task.test)
    files = all_files(tmp_path)
    assert not [f for f in files if f.endswith(".tmp") or os.path.basename(f).startswith(".")]
    assert len(files) == 402 and "results.json" in files and "predictions/00576224.json" in files

    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["name"] == "kaggle" and results["metadata"] == {"seed": 0}
    assert results["overall"]["accuracy"] == pytest.approx(ev.overall["accuracy"])
    assert set(results["tasks"]) == set(tasks)


def test_submission_fallbacks_and_predictions_file(tmp_path):
    tasks = {"a": make_task("a", [[1]], [[2]]), "b": make_task("b", None)}
    cands = {("a", 0): [candidate([[1]]), candidate([[4]], logprob=-2.0),
                        Candidate(IDENTITY, "bad", -0.5)]}
    ev = evaluate(tasks, cands, FMT)
    sub = make_submission(ev, {**tasks, "c": make_task("c", [[3]])})
    assert sub == {
        "a": [{"attempt_1": [[1]], "attempt_2": [[4]]}, {"attempt_1": [[0]], "attempt_2": [[0]]}],
        "b": [{"attempt_1": [[0]], "attempt_2": [[0]]}],
        "c": [{"attempt_1": [[0]], "attempt_2": [[0]]}],
    }
    write_results(tmp_path, ev, tasks, name="x", ttft_seconds=12.5)
    with open(tmp_path / "predictions" / "a.json") as f:
        record = json.load(f)
    test0 = record["tests"][0]
    assert test0["target"] == [[1]] and test0["scores"]["accuracy"] == 1.0
    assert [(v["grid"], v["count"]) for v in test0["votes"]] == [([[1]], 1), ([[4]], 1)]
    bad = test0["candidates"][2]
    assert bad["text"] == "bad" and bad["grid"] is None and bad["vote_rank"] is None
    assert bad["error"].startswith("bad shape header")
    assert test0["candidates"][1]["vote_rank"] == 1
    assert test0["candidates"][0]["colors"] == list(range(10))
    assert record["tests"][1]["candidates"] == []
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["ttft_seconds"] == 12.5


def _good_submission():
    tasks = {"a": make_task("a", [[1]], [[2]]), "b": make_task("b", [[3]])}
    entry = {"attempt_1": [[1, 2], [3, 4]], "attempt_2": [[0]]}
    return tasks, {"a": [dict(entry), dict(entry)], "b": [dict(entry)]}


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("b"), "task 'b': missing"),
    (lambda s: s.update(z=[]), "task 'z': not an evaluated task"),
    (lambda s: s["a"].pop(), "task 'a': 1 entries, expected 2"),
    (lambda s: s["b"][0].pop("attempt_2"), r"test\[0\]: expected keys attempt_1, attempt_2"),
    (lambda s: s["a"][1].update(attempt_1=[[1, 2], [3]]), r"a' test\[1\].attempt_1: not rect"),
    (lambda s: s["b"][0].update(attempt_2=[[10]]), r"attempt_2: cells must be ints 0..9"),
    (lambda s: s["b"][0].update(attempt_2=[[True]]), r"attempt_2: cells must be ints 0..9"),
    (lambda s: s["b"][0].update(attempt_2=[[1.0]]), r"attempt_2: cells must be ints 0..9"),
    (lambda s: s["b"][0].update(attempt_2=[[0] * 31]), r"shape 1x31"),
    (lambda s: s["b"][0].update(attempt_2=[]), r"not a non-empty list of rows"),
])
def test_validate_submission_names_problems(mutate, message):
    tasks, submission = _good_submission()
    validate_submission(submission, tasks)
    mutate(submission)
    with pytest.raises(SubmissionError, match=message):
        validate_submission(submission, tasks)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"v": 1})
    circular = {"v": 2}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        write_json_atomic(path, circular)
    assert json.loads(path.read_text()) == {"v": 1}
    assert all_files(tmp_path) == ["out.json"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"
