"""The job at scale, on the tiny model: units sized by the memory budget, the base put on the mesh
once, evaluation sharded and resumable, `overflow=skip`, the deadline."""

import glob
import json
import os

import jax
import numpy as np
import pytest
from test_engine import EVAL_TASKS, _assert_same_trees, tiny

from arc_jax import run
from arc_jax.data.arrays import pad_tasks
from arc_jax.infer.evaluate import validate_submission
from arc_jax.infer.inference import evaluate_tasks
from arc_jax.train import ttft

EIGHT = ("66e6c45b", "be03b35f", "00576224", "4cd1b7b2", "ca8de6ea", "e633a9e5", "6ea4a07e",
         "2072aba6")


def _setup(path, **overrides):
    config = tiny("n_minus_1", **overrides)
    setup = run.load_setup(config, str(path))
    tasks = run.load_task_list(config.data.eval, "", 0, config.data.task_ids)
    return setup, tasks, pad_tasks(tasks)


def _units(path) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(path / "checkpoints" / "*")))


def test_unit_size_follows_the_memory_budget(tmp_path):
    kw = {"data.task_ids": EIGHT, "train.steps": 2, "data.buckets": (512,)}
    setup, tasks, arrays = _setup(tmp_path / "big", **kw, memory_gb=8.0)
    whole, done = run.train_per_task(setup, tasks, arrays)
    assert done and len(_units(tmp_path / "big")) == 1  # 8 tasks: 2 per device

    setup, tasks, arrays = _setup(tmp_path / "small", **kw, memory_gb=1e-4)
    parts, done = run.train_per_task(setup, tasks, arrays)
    assert done and len(_units(tmp_path / "small")) == 2  # 1 per device
    assert sorted(whole) == sorted(parts) == list(range(8))
    for i in whole:
        _assert_same_trees(whole[i], parts[i], atol=1e-5)

    # Finished tasks are saved: a rerun under another budget trains nothing again.
    setup, tasks, arrays = _setup(tmp_path / "small", **kw, memory_gb=8.0)
    again, done = run.train_per_task(setup, tasks, arrays)
    assert done and len(_units(tmp_path / "small")) == 2
    for i in whole:
        _assert_same_trees(whole[i], again[i], atol=1e-5)


def test_the_base_goes_to_the_devices_once(tmp_path):
    assert jax.device_count() == 4
    setup, tasks, arrays = _setup(tmp_path, **{"train.steps": 3})
    with jax.transfer_guard_device_to_device("disallow"):
        adapters, done = run.train_per_task(setup, tasks, arrays)
    assert done and sorted(adapters) == [0, 1]


def _perturbed(setup, n, seed=0):
    """Per-task adapters with non-zero `b`, so they change the model's output."""
    out = {}
    for i in range(n):
        tree = run.init_lora(jax.random.key(seed + i), setup.params, setup.lora)
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        out[i] = jax.tree.unflatten(treedef, [
            x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])
    return out


def test_evaluation_is_the_same_on_one_and_four_devices(tmp_path):
    setup, tasks, arrays = _setup(tmp_path, **{"data.task_ids": EIGHT[:3]})
    adapters = _perturbed(setup, len(tasks))

    def evaluate(mesh):
        return evaluate_tasks(
            setup.model, setup.params, setup.tokenizer, setup.vocab, setup.pipeline, tasks,
            arrays, adapters, setup.lora, run.eval_settings(setup.config), setup.stream(run.EVAL),
            [run.task_seed(t.task_id) for t in tasks], setup.max_loss_tokens, mesh=mesh)

    one = evaluate(None)
    four = evaluate(ttft.device_mesh(ttft.TASKS))
    assert set(one.candidates) == set(four.candidates)
    assert len(one.candidates) == sum(len(t.test) for t in tasks)
    for group, cands in one.candidates.items():
        assert [c.text for c in cands] == [c.text for c in four.candidates[group]]
        np.testing.assert_allclose([c.mean_logprob for c in cands],
                                   [c.mean_logprob for c in four.candidates[group]], atol=1e-4)
    for task_id, loss in one.val_loss.items():
        assert loss == pytest.approx(four.val_loss[task_id], rel=1e-5)


def test_overflow_skip_end_to_end(tmp_path):
    long_task = "05a7bcf2"  # 8196 tokens, far over the 512-token bucket
    config = tiny("baseline", **{"data.task_ids": (*EVAL_TASKS, long_task),
                                 "data.buckets": (512,), "data.overflow": "skip"})
    overall = run.train_and_evaluate(config, str(tmp_path))
    assert overall is not None and np.isfinite(overall["val_loss"])
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["metadata"]["not_decoded"] == [long_task]
    with open(tmp_path / "submission.json") as f:
        submission = json.load(f)
    tasks = run.load_task_list(config.data.eval, "", 0, config.data.task_ids)
    validate_submission(submission, {t.task_id: t for t in tasks})
    assert set(submission) == {*EVAL_TASKS, long_task}


def test_per_task_evaluation_of_a_skipped_task_runs_the_base(tmp_path):
    long_task = "05a7bcf2"
    config = tiny("n_minus_1", **{"data.task_ids": (*EVAL_TASKS, long_task),
                                  "data.buckets": (256, 512), "data.overflow": "skip"})
    config.data.max_seq_len = 512
    overall = run.train_and_evaluate(config, str(tmp_path))
    assert overall is not None and overall["n_tasks"] == 3


def test_the_deadline_writes_a_complete_submission(tmp_path):
    config = tiny("n_minus_1", **{"train.steps": 1000, "deadline_minutes": 0.02,
                                  "eval.reserve_minutes": 0.019})
    overall = run.train_and_evaluate(config, str(tmp_path))
    assert overall is not None
    with open(tmp_path / "submission.json") as f:
        submission = json.load(f)
    tasks = run.load_task_list(config.data.eval, "", 0, config.data.task_ids)
    validate_submission(submission, {t.task_id: t for t in tasks})
    assert set(submission) == set(EVAL_TASKS)
    assert not glob.glob(str(tmp_path / "checkpoints" / "*" / "1000"))


def test_evaluation_resumes_after_a_kill(tmp_path, monkeypatch):
    # The smallest budget: one (task, test) group per device per call, so several calls.
    config = tiny("baseline", **{"data.task_ids": EIGHT[:6], "memory_gb": 1e-4})
    whole = run.train_and_evaluate(config, str(tmp_path / "whole"))

    from arc_jax.infer import inference

    calls = {"n": 0}
    real = inference.generate_per_task

    def dies_on_the_second_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "generate_per_task", dies_on_the_second_call)
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(config, str(tmp_path / "parts"))
    kept = glob.glob(str(tmp_path / "parts" / "eval" / "decode_*.json"))
    assert kept
    monkeypatch.setattr(inference, "generate_per_task", real)
    calls["n"] = 0
    resumed = run.train_and_evaluate(config, str(tmp_path / "parts"))
    assert resumed["accuracy"] == whole["accuracy"]
    with open(tmp_path / "whole" / "submission.json") as f, \
            open(tmp_path / "parts" / "submission.json") as g:
        assert json.load(f) == json.load(g)
    # The time of both processes is in results.json: the killed one's evaluation included.
    with open(tmp_path / "parts" / "job_seconds.json") as f:
        ledger = json.load(f)
    with open(tmp_path / "parts" / "results.json") as f, \
            open(tmp_path / "whole" / "results.json") as g:
        parts, single = json.load(f)["metadata"], json.load(g)["metadata"]
    assert parts["processes"] == 2 and single["processes"] == 1
    assert parts["phase_seconds"]["evaluate"] == pytest.approx(
        ledger["phase_seconds"]["evaluate"], rel=0.05)
    assert parts["wall_seconds"] > parts["phase_seconds"]["evaluate"] > 0
