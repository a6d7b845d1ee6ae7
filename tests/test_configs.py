"""`configs/*.py` differ from `configs/base.py` only by their experiment, in both variants (the
CPU default and the full-scale `phi3`), and the variant is chosen on the command line."""

import importlib
import os
import subprocess
import sys

import pytest

from arc_jax.workdir import flat_config
from configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRATCH = {f"model.scratch.{k}" for k in (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size")}
EXPERIMENT_KEYS = {
    "baseline": {"name", "mode"},
    "n_minus_1": {"name"},  # ttft mode and leave-one-out are the defaults
    "geometric": {"name", "augment.geometric"},
    "color_swap": {"name", "augment.geometric", "augment.color_swap"},
    "preserve_color": {"name", "augment.geometric", "augment.color_swap",
                       "augment.preserve_color"},  # preserve_color_prob stays 0.5
    "n_minus_2": {"name", "augment.geometric", "augment.color_swap", "augment.n_leave_out"},
    "train_base_model": {"name", "mode", "lora.enabled", "data.train", "data.loss_on",
                         "augment.geometric", "augment.color_swap", "train.steps",
                         "train.batch_size",
                         "train.learning_rate", "train.warmup_steps", "train.weight_decay",
                         "train.heldout_every"} | SCRATCH,
}


def _changed(config, reference) -> set[str]:
    a, b = flat_config(config.to_dict()), flat_config(reference.to_dict())
    assert a.keys() == b.keys()
    return {k for k in a if a[k] != b[k]}


@pytest.mark.parametrize("variant", ["", "phi3"])
@pytest.mark.parametrize("name", sorted(EXPERIMENT_KEYS))
def test_an_experiment_changes_only_its_keys(name, variant):
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    # train_base_model also sets bfloat16 matmuls and 4096-token episodes, as base now does
    assert _changed(config, base.get_config(variant)) == EXPERIMENT_KEYS[name]


def test_the_phi3_variant_is_the_full_scale_setting():
    changed = _changed(base.get_config("phi3"), base.get_config())
    assert {"model.path", "model.dtype", "model.compute_dtype", "memory_gb"} <= changed
    config = base.get_config("phi3")
    assert (config.model.dtype, config.data.max_seq_len) == ("bfloat16", 4096)
    assert max(config.data.buckets) == 4096
    with pytest.raises(ValueError, match="'phi3'"):
        base.get_config("phi4")


def test_the_variant_is_given_after_a_colon_on_the_command_line(tmp_path):
    """The run gets as far as loading `model.path` ("phi3", absent here) and names it."""
    done = subprocess.run(
        [sys.executable, "-m", "arc_jax.main", "--config=configs/color_swap.py:phi3",
         f"--config.model.path={tmp_path / 'no_phi3_here'}", f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "no_phi3_here" in done.stderr
    written = (tmp_path / "run" / "config.json").read_text()
    assert '"compute_dtype": "bfloat16"' in written and '"max_seq_len": 4096' in written
