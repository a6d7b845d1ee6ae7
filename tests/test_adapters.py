"""Per-task adapters exported as PEFT directories load onto the exported base in transformers +
PEFT and give arc_jax's logits; the config keys of DFS, scoring and adapters are checked."""
import json
import os

import hf_phi3
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from test_engine import EVAL_TASKS, tiny

from arc_jax import run, settings
from arc_jax.data import augment
from arc_jax.data.arrays import pad_tasks
from arc_jax.data.pipeline import eval_batch
from arc_jax.model.lora import init_lora


def _random_adapter(seed, params, config):
    """`a` and `b` non-zero, so the adapter changes the outputs."""
    shapes = jax.eval_shape(lambda: init_lora(jax.random.key(0), params, config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape, np.float32), shapes)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_exported_adapters_load_with_peft_and_give_our_logits(tmp_path, quantize):
    config = tiny("n_minus_1", **{"ttft.export_adapters": True, "model.quantize": quantize})
    setup = run.load_setup(config, str(tmp_path))
    tasks = run.load_task_list(config.data.eval, "", 0, config.data.task_ids)
    adapters = {i: _random_adapter(i, setup.params, setup.lora) for i in range(len(tasks))}
    manifest = run.export_task_adapters(setup, tasks, adapters)

    root = tmp_path / "adapters"
    assert sorted(os.listdir(root)) == sorted(
        [*EVAL_TASKS, "adapters.json", *(["base"] if quantize != "none" else [])])
    with open(root / "adapters.json") as f:
        assert json.load(f) == manifest
    # a plain base is referenced where it is; a quantized one is exported as arc_jax runs it
    want_base = (os.path.abspath(config.model.path) if quantize == "none"
                 else str((root / "base").resolve()))
    assert manifest["base"] == want_base

    ident = augment.Augmentation(jnp.zeros(1, jnp.int32), jnp.arange(10)[None])
    rows = eval_batch(pad_tasks(tasks), jnp.arange(len(tasks)), jnp.zeros(len(tasks), jnp.int32),
                      jax.tree.map(lambda x: jnp.broadcast_to(x, (len(tasks), *x.shape[1:])),
                                   ident), vocab=setup.vocab, cfg=setup.pipeline, seq_len=512)
    forward = jax.jit(lambda lora, ids: setup.model.apply(
        {"params": setup.params}, ids, lora=lora, lora_config=setup.lora))
    for i, task in enumerate(tasks):
        ids = np.asarray(rows.tokens[i : i + 1, : int(rows.length[i])])
        base = transformers.Phi3ForCausalLM.from_pretrained(manifest["base"]).float().eval()
        hf = peft.PeftModel.from_pretrained(base, manifest["tasks"][task.task_id]).eval()
        ref = hf_phi3.logits(hf, ids)
        ours = np.asarray(forward(adapters[i], ids))
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
        assert not np.allclose(ours, np.asarray(forward(None, ids)), atol=1e-2)


@pytest.mark.parametrize("overrides, message", [
    ({"eval.strategy": "beam"}, "eval.strategy"),
    ({"eval.scoring": "max"}, "eval.scoring"),
    ({"eval.answer_cap": "none"}, "eval.answer_cap"),
    ({"eval.grammar": "json"}, "eval.grammar"),
    ({"eval.dfs_min_prob": 0.0}, "eval.dfs_min_prob"),
    ({"eval.dfs_max_candidates": 0}, "eval.dfs_max_candidates"),
    ({"eval.score_views": 0}, "eval.score_views"),
    ({"eval.adapters_from": "/nonexistent"}, "needs mode 'evaluate'"),
    ({"mode": "evaluate", "eval.adapters_from": "/nonexistent"}, "no ttft_adapters"),
    ({"ttft.export_adapters": True, "ttft.mode": "joint"}, "export_adapters"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(settings.ConfigError, match=message):
        settings.check(tiny("n_minus_1", **overrides))
