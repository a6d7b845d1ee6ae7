"""Workdir safety and faults, as a user meets them: a second run in a busy workdir, a resume under
a changed config, a corrupt latest checkpoint, a truncated model.safetensors, a LoRA target
that matches no layer. Each is refused (or recovered from) with a message naming the culprit."""

import glob
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax import run, workdir
from arc_jax.atomic import write_json_atomic
from arc_jax.model.convert import CheckpointError, load_pretrained
from arc_jax.model.lora import LoraConfig, LoraTargetError, init_lora
from arc_jax.model.tiny import TINY_MODEL_DIR, ensure_tiny_model
from arc_jax.train import checkpoint
from configs.base import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """The base config shrunk to 2 small tasks and 3 steps; `overrides` by dotted key."""
    config = get_config()
    config.model.path = TINY_MODEL_DIR  # the random tiny model: tests stay fast
    config.model.matmul_dtype = "compute"  # float32 products, as the engine tests
    config.data.task_ids = ("66e6c45b", "be03b35f")
    config.data.buckets = (256, 512)
    config.train.steps = 3
    config.train.batch_size = 2
    config.train.checkpoint_every = 1
    config.lora.rank = 4
    config.eval.n_augmentations = 1
    config.eval.max_new_tokens = 8
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# --- one run per workdir ----------------------------------------------------------------------

def test_second_run_in_a_locked_workdir_is_refused(tmp_path):
    with workdir.lock(tmp_path) as path:
        assert path == str(tmp_path / ".lock")
        message = (f"workdir {tmp_path} is in use by another run (pid {os.getpid()} on host "
                   f"{socket.gethostname()}, since ")
        with pytest.raises(workdir.WorkdirBusyError, match=re.escape(message)):
            run.train_and_evaluate(tiny_config(), str(tmp_path))
        with pytest.raises(workdir.WorkdirBusyError, match="another --workdir"):
            with workdir.lock(tmp_path):
                pass
    with workdir.lock(tmp_path):  # released at the end of the block
        pass
    assert os.listdir(tmp_path) == [".lock"]  # the refused run wrote nothing


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from arc_jax.workdir import lock\n"
         "with lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirBusyError, match=f"pid {holder.pid} on host"):
            with workdir.lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()  # the stale file is left, and does not block
    with workdir.lock(tmp_path):
        pass


# --- resume only under the same config --------------------------------------------------------

def _trained_workdir(path, config):
    """A workdir as a run stopped after one step leaves it: config.json and a checkpoint."""
    write_json_atomic(os.path.join(path, "config.json"), config.to_dict(), indent=2,
                      sort_keys=True)
    mngr = checkpoint.manager(os.path.join(path, "checkpoints", "bucket256_part0"), 2, 1)
    checkpoint.save(mngr, 1, {"w": jnp.zeros(4)})
    mngr.wait_until_finished()
    mngr.close()


def test_resume_under_a_changed_config_is_refused_naming_the_keys(tmp_path):
    _trained_workdir(tmp_path, tiny_config())
    changed = tiny_config(**{"train.steps": 6, "train.learning_rate": 3e-4, "lora.rank": 8,
                             "data.task_ids": ("66e6c45b",)})
    with pytest.raises(workdir.ResumeConfigError) as err:
        run.train_and_evaluate(changed, str(tmp_path))
    message = str(err.value)
    assert f"workdir {tmp_path} holds checkpoints" in message
    for line in ("data.task_ids: ['66e6c45b', 'be03b35f'] -> ['66e6c45b']",
                 "lora.rank: 4 -> 8", "train.learning_rate: 0.001 -> 0.0003",
                 "train.steps: 3 -> 6"):
        assert line in message
    assert "another --workdir" in message
    assert set(workdir.changed_keys(tiny_config().to_dict(), changed.to_dict())) == {
        "data.task_ids", "lora.rank", "train.learning_rate", "train.steps"}
    # the refused run wrote nothing: the old config is kept
    workdir.check_resume(tiny_config(), tmp_path)


def test_resume_may_change_what_does_not_change_results(tmp_path):
    _trained_workdir(tmp_path, tiny_config())
    config = tiny_config(**{
        "name": "other", "workdir": "elsewhere", "train.stop_after_steps": 1,
        "train.log_every": 1, "train.checkpoint_every": 5, "train.keep_checkpoints": 4,
        "ttft.tasks_per_device": 2, "eval.n_augmentations": 8, "eval.temperature": 0.5,
        "distributed.initialize": True})
    config.memory_gb = 4  # keys a newer config has and config.json lacks
    config.train.stop_after_minutes = 30
    workdir.check_resume(config, tmp_path)


def test_a_key_added_since_resumes_at_its_default_only(tmp_path):
    old = tiny_config().to_dict()
    del old["data"]["subset"]  # a config.json written before arc_jax had this key
    defaults = get_config().to_dict()
    assert workdir.changed_keys(old, tiny_config().to_dict(), defaults) == {}
    changed = tiny_config(**{"data.subset": "every:4"}).to_dict()
    assert workdir.changed_keys(old, changed, defaults) == {
        "data.subset": ("(absent)", "every:4")}
    assert "data.subset" in workdir.changed_keys(old, tiny_config().to_dict())  # no defaults


def test_a_workdir_without_checkpoints_takes_any_config(tmp_path):
    write_json_atomic(tmp_path / "config.json", tiny_config().to_dict())
    workdir.check_resume(tiny_config(**{"train.steps": 9}), tmp_path)


def test_an_unreadable_config_json_is_named(tmp_path):
    _trained_workdir(tmp_path, tiny_config())
    (tmp_path / "config.json").write_text('{"seed": ')
    with pytest.raises(workdir.ResumeConfigError, match=re.escape(str(tmp_path / "config.json"))):
        workdir.check_resume(tiny_config(), tmp_path)


# --- a corrupt latest checkpoint --------------------------------------------------------------

def _truncate_a_data_file(step_dir):
    """Cuts the largest array data file of an orbax step directory to half its size."""
    files = [f for f in glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    return largest


def _state(step):
    """A small state whose data does not compress away: `w [4096]`, `data_key [2]`."""
    w = jax.random.normal(jax.random.key(step), (4096,))
    return {"train": {"w": w}, "data_key": np.arange(2, dtype=np.uint32)}


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    directory = str(tmp_path / "unit")
    mngr = checkpoint.manager(directory, 3, 1)
    for step in (1, 2, 3):
        checkpoint.save(mngr, step, _state(step))
    mngr.wait_until_finished()
    mngr.close()
    _truncate_a_data_file(os.path.join(directory, "3"))

    mngr = checkpoint.manager(directory, 3, 1)
    with caplog.at_level(logging.WARNING, logger="arc_jax.train.checkpoint"):
        step, state = checkpoint.restore_latest(mngr, _state(0))
    assert step == 2
    np.testing.assert_array_equal(state["train"]["w"], _state(2)["train"]["w"])
    warning = caplog.text
    assert f"checkpoint {directory}/3 does not restore" in warning
    assert f"moved it to {directory}.corrupt/3" in warning
    assert f"resuming from the previous checkpoint {directory}/2" in warning
    assert os.path.isdir(f"{directory}.corrupt/3")  # kept for inspection, out of orbax's way
    # the resumed run saves step 3 again
    assert checkpoint.save(mngr, 3, _state(3))
    mngr.wait_until_finished()
    step, state = checkpoint.restore_latest(mngr, _state(0))
    assert step == 3
    np.testing.assert_array_equal(state["train"]["w"], _state(3)["train"]["w"])
    mngr.close()


def test_no_restorable_checkpoint_names_the_directory_and_moves_nothing(tmp_path):
    directory = str(tmp_path / "unit")
    mngr = checkpoint.manager(directory, 2, 1)
    for step in (1, 2):
        checkpoint.save(mngr, step, _state(step))
    mngr.wait_until_finished()
    mngr.close()
    for step in (1, 2):
        _truncate_a_data_file(os.path.join(directory, str(step)))
    mngr = checkpoint.manager(directory, 2, 1)
    with pytest.raises(checkpoint.CheckpointRestoreError) as err:
        checkpoint.restore_latest(mngr, _state(0))
    mngr.close()
    message = str(err.value)
    assert f"no checkpoint in {directory} restores" in message
    assert "step 2: " in message and "step 1: " in message
    assert sorted(os.listdir(directory)) == ["1", "2"]
    assert not os.path.exists(f"{directory}.corrupt")


def test_training_resumes_past_a_corrupt_checkpoint_to_the_same_end(tmp_path, caplog):
    setup = run.load_setup(tiny_config(**{"train.steps": 4, "train.keep_checkpoints": 2}),
                           str(tmp_path))

    def step_fn(state, step):
        metrics = {"loss": np.float32(1), "tokens": np.int32(1), "grad_norm": np.float32(1)}
        return {**state, "train": {"w": state["train"]["w"] + step + 1}}, metrics

    start = {"train": {"w": jnp.zeros(3)}}
    whole, done = run._run_steps(setup, "unit", start, step_fn, 4)
    assert done
    unit = str(tmp_path / "checkpoints" / "unit")
    _truncate_a_data_file(os.path.join(unit, "4"))
    with caplog.at_level(logging.WARNING, logger="arc_jax.train.checkpoint"):
        resumed, done = run._run_steps(setup, "unit", start, step_fn, 4)
    assert done and f"checkpoint {unit}/4 does not restore" in caplog.text
    np.testing.assert_array_equal(resumed["train"]["w"], whole["train"]["w"])
    setup.writer.close()


# --- a truncated model.safetensors ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir():
    ensure_tiny_model(TINY_MODEL_DIR)
    return TINY_MODEL_DIR


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_safetensors_names_the_file(tiny_model_dir, tmp_path, keep):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(int(size * keep) if isinstance(keep, float) else keep)
    with pytest.raises(CheckpointError, match=re.escape(f"{weights} is not a readable "
                                                        "safetensors file")) as err:
        load_pretrained(model)
    assert "truncated or corrupt" in str(err.value)


def test_truncated_model_config_names_the_file(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{model / 'config.json'} is not valid")):
        load_pretrained(model)


# --- a LoRA target that matches no layer ------------------------------------------------------

def test_lora_target_matching_no_layer_is_named(tiny_model_dir):
    _, params = load_pretrained(tiny_model_dir)
    config = LoraConfig(rank=2, targets=("qkv_proj", "o_prj"))
    with pytest.raises(LoraTargetError, match=re.escape("'o_prj' matches no layer")) as err:
        init_lora(jax.random.key(0), params, config)
    assert ("['down_proj', 'gate_up_proj', 'lm_head', 'o_proj', 'qkv_proj']"
            in str(err.value))
    assert "config.lora.targets" in str(err.value)
    with pytest.raises(LoraTargetError, match="is empty"):
        init_lora(jax.random.key(0), params, LoraConfig(rank=2, targets=()))


@pytest.mark.parametrize("mode", ["per_task", "joint"])
def test_run_with_a_bad_lora_target_is_refused(tmp_path, mode):
    config = tiny_config(**{"lora.targets": ("qkv_proj", "o_prj"), "ttft.mode": mode})
    with pytest.raises(LoraTargetError, match="'o_prj'"):
        run.train_and_evaluate(config, str(tmp_path))
    assert not glob.glob(str(tmp_path / "checkpoints" / "*" / "[0-9]*"))
