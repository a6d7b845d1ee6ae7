"""The training engine end to end on the tiny model: every experiment config, resume, per-task
TTFT across simulated devices, non-finite loss, config errors."""

import glob
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax import run, settings
from arc_jax.data.arrays import pad_tasks
from arc_jax.infer.evaluate import validate_submission
from arc_jax.model.convert import load_pretrained
from arc_jax.model.tiny import TINY_MODEL_DIR
from arc_jax.train import ttft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest evaluation / training tasks, so every bucket stays at 256-512 tokens.
EVAL_TASKS = ("66e6c45b", "be03b35f")
TRAIN_TASKS = ("6150a2bd", "d631b094")
EXPERIMENTS = ("baseline", "n_minus_1", "geometric", "color_swap", "preserve_color",
               "n_minus_2", "train_base_model")


def tiny(name: str, **overrides):
    """An experiment config shrunk to seconds: 2 tasks, 3 steps, small buckets and decoding."""
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.path = TINY_MODEL_DIR  # the random tiny model: tests stay fast
    config.model.matmul_dtype = "compute"  # float32 products: tests compare with PyTorch
    config.data.task_ids = EVAL_TASKS
    config.data.buckets = (256, 512)
    config.train.steps = 3
    config.train.batch_size = 2
    config.train.checkpoint_every = 1
    config.train.warmup_steps = 1
    config.lora.rank = 4
    config.eval.n_augmentations = 2
    config.eval.max_new_tokens = 16
    if config.mode == "finetune":
        config.data.train = "kaggle2024/training"
        config.data.max_tasks = 2
        config.model.scratch.update(dict(hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=64))
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config_runs_end_to_end(name, tmp_path):
    config = tiny(name)
    overall = run.train_and_evaluate(config, str(tmp_path))
    assert overall is not None and overall["n_tasks"] == 2
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["name"] == name
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert set(results["tasks"]) == set(EVAL_TASKS)
    assert np.isfinite(results["overall"]["val_loss"])
    with open(tmp_path / "submission.json") as f:
        submission = json.load(f)
    validate_submission(submission, {t.task_id: t for t in run.load_task_list(
        config.data.eval, "", 0, EVAL_TASKS)})
    checkpoints = glob.glob(str(tmp_path / "checkpoints" / "*" / "3"))
    if config.mode == "evaluate":
        assert not checkpoints
    else:
        assert checkpoints
    if config.mode == "finetune":
        model, params = load_pretrained(tmp_path / "model")
        assert model.config.num_hidden_layers == 2


def test_command_line_quick_run_and_bad_keys(tmp_path):
    base = [sys.executable, "-m", "arc_jax.main", "--config=configs/n_minus_1.py",
            f"--workdir={tmp_path}", "--config.data.max_tasks=1",
            "--config.data.buckets=(256,512)", "--config.train.steps=2",
            "--config.eval.n_augmentations=1", "--config.eval.max_new_tokens=8",
            "--config.lora.rank=4", f"--config.model.path={TINY_MODEL_DIR}"]
    done = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results.json").exists() and (tmp_path / "submission.json").exists()

    unknown = subprocess.run(base[:4] + ["--config.train.stepz=2"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode != 0 and "stepz" in unknown.stderr
    ill_typed = subprocess.run(base[:4] + ["--config.train.steps=many"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert ill_typed.returncode != 0 and "train.steps" in ill_typed.stderr


@pytest.mark.parametrize("key, value, message", [
    ("mode", "pretrain", "config.mode"),
    ("ttft.mode", "both", "config.ttft.mode"),
    ("data.grid_format", "fancy", "config.data.grid_format"),
    ("train.steps", 0, "config.train.steps"),
    ("augment.preserve_color_prob", 1.5, "preserve_color_prob"),
    ("data.max_seq_len", 100, "config.data.buckets"),
    ("model.quantize", "int3", "config.model.quantize"),
    ("model.attention", "flash", "config.model.attention"),
    ("model.matmul_dtype", "int8", "config.model.matmul_dtype"),
    ("model.attention_block", 0, "config.model.attention_block"),
])
def test_bad_config_values_name_the_key(key, value, message):
    with pytest.raises(settings.ConfigError, match=message.replace(".", r"\.")):
        settings.check(tiny("n_minus_1", **{key: value}))
    with pytest.raises(settings.ConfigError, match="lora.enabled"):
        settings.check(tiny("train_base_model", **{"model.quantize": "int8"}))


def test_speed_options_from_the_config(tmp_path):
    """int8 base + bfloat16 matmuls + remat + small attention blocks: per-task TTFT, evaluation,
    then the adapter merged into the dequantized base for export."""
    config = tiny("n_minus_1", **{"model.quantize": "int8", "model.remat": True,
                                  "model.attention_block": 64, "model.matmul_dtype": "bfloat16"})
    overall = run.train_and_evaluate(config, str(tmp_path))
    assert overall is not None and np.isfinite(overall["val_loss"])
    setup = run.load_setup(config, str(tmp_path / "again"))
    assert setup.model.remat and setup.model.attention_block == 64
    assert setup.model.matmul_dtype == jnp.bfloat16
    site = setup.params["model"]["layers_0"]["mlp"]["down_proj"]
    assert set(site) == {"kernel_int8", "scale"}
    lora = run.init_lora(jax.random.key(0), setup.params, setup.lora)
    run.export_model(setup, lora, str(tmp_path / "export"))
    model, params = load_pretrained(tmp_path / "export" / "model")
    assert params["model"]["layers_0"]["mlp"]["down_proj"]["kernel"].dtype == np.float32


def test_unknown_task_id_is_named(tmp_path):
    with pytest.raises(settings.ConfigError, match="nonexistent"):
        run.load_task_list("kaggle2024/evaluation", "", 0, ("nonexistent",))


def test_subset_rule_takes_every_nth_sorted_task():
    every = run.load_task_list("kaggle2024/evaluation", "", 0, subset="every:4")
    ids = sorted(t.task_id for t in run.load_task_list("kaggle2024/evaluation", "", 0))
    assert [t.task_id for t in every] == ids[0::4] and len(every) == 100
    few = run.load_task_list("kaggle2024/evaluation", "", 2, subset="every:4:1")
    assert [t.task_id for t in few] == ids[1::4][:2]
    with pytest.raises(settings.ConfigError, match="config.data.subset"):
        run.load_task_list("kaggle2024/evaluation", "", 0, subset="nonexistent")


def _setup(tmp_path, **overrides):
    config = tiny("color_swap", **overrides)
    setup = run.load_setup(config, str(tmp_path))
    tasks = run.load_task_list(config.data.eval, "", 0, config.data.task_ids)
    return setup, tasks, pad_tasks(tasks)


def _assert_same_trees(a, b, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.mark.parametrize("mode", ["per_task", "joint"])
def test_resumed_run_ends_with_the_same_adapters(tmp_path, mode):
    train = run.train_per_task if mode == "per_task" else run.train_joint
    setup, tasks, arrays = _setup(tmp_path / "whole", **{"train.steps": 4})
    whole, done = train(setup, tasks, arrays)
    assert done

    setup, tasks, arrays = _setup(tmp_path / "parts", **{
        "train.steps": 4, "train.stop_after_steps": 2})
    _, done = train(setup, tasks, arrays)
    assert not done
    setup.config.train.stop_after_steps = 0  # the restarted process
    resumed, done = train(setup, tasks, arrays)
    assert done
    _assert_same_trees(whole, resumed)


def test_per_task_adapters_do_not_depend_on_the_device_count(tmp_path):
    assert jax.device_count() == 4
    setup, tasks, arrays = _setup(tmp_path / "one")
    one, _ = run.train_per_task(setup, tasks, arrays, devices=jax.devices()[:1])
    setup, tasks, arrays = _setup(tmp_path / "four")
    four, _ = run.train_per_task(setup, tasks, arrays, devices=jax.devices())
    assert sorted(one) == sorted(four) == [0, 1]
    for i in one:
        _assert_same_trees(one[i], four[i], atol=1e-5)
        assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(one[i]))


def test_eight_tasks_on_four_devices(tmp_path):
    eight = ("66e6c45b", "be03b35f", "00576224", "4cd1b7b2", "ca8de6ea", "e633a9e5",
             "6ea4a07e", "2072aba6")
    setup, tasks, arrays = _setup(tmp_path, **{"data.task_ids": eight, "train.steps": 2,
                                                "data.buckets": (512,)})
    adapters, done = run.train_per_task(setup, tasks, arrays)
    assert done and sorted(adapters) == list(range(8))
    # different tasks, different adapters
    a, b = (jax.tree.leaves(adapters[i]) for i in (0, 1))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def test_units_pad_groups_to_the_device_count():
    units = ttft.plan_units({256: [0, 1, 2], 512: [3, 4, 5, 6, 7]}, n_devices=4,
                            tasks_per_device=1)
    assert [(u.seq_len, u.tasks, u.n_real) for u in units] == [
        (256, (0, 1, 2, 2), 3), (512, (3, 4, 5, 6), 4), (512, (7, 7, 7, 7), 1)]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    setup, _, _ = _setup(tmp_path, **{"train.steps": 5})
    state = {"train": {"w": jax.numpy.zeros(3)}}

    def step_fn(state, step):
        loss = np.nan if step == 2 else 1.0
        metrics = {"loss": np.float32(loss), "tokens": np.int32(1), "grad_norm": np.float32(1)}
        return {**state, "train": {"w": state["train"]["w"] + 1}}, metrics

    with pytest.raises(run.NonFiniteLossError, match="step 2"):
        run._run_steps(setup, "nan_unit", state, step_fn, 5)
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(
        str(tmp_path / "checkpoints" / "nan_unit" / "[0-9]*")))
    assert saved and max(saved) == 2


def test_resume_refuses_checkpoints_of_another_seed(tmp_path):
    setup, _, _ = _setup(tmp_path, **{"train.steps": 2})
    state = {"train": {"w": jax.numpy.zeros(3)}}

    def step_fn(state, step):
        metrics = {"loss": np.float32(1), "tokens": np.int32(1), "grad_norm": np.float32(1)}
        return {**state, "train": {"w": state["train"]["w"] + 1}}, metrics

    run._run_steps(setup, "unit", state, step_fn, 2)
    other, _, _ = _setup(tmp_path, **{"train.steps": 2, "seed": 1})
    with pytest.raises(settings.ConfigError, match="seed"):
        run._run_steps(other, "unit", state, step_fn, 2)
