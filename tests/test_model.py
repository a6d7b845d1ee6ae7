"""Phi-3 parity with transformers: logits, padding, save/load round trip, cached greedy decoding."""
import functools
from collections.abc import Callable
from typing import NamedTuple

import hf_phi3
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from arc_jax.infer.generate import generate as _generate
from arc_jax.model.convert import load_pretrained, save_pretrained
from arc_jax.model.phi3 import Phi3, Phi3Config, project_logits

TOL = 1e-4


def generate(model, params, prompts, lengths, max_new_tokens, eos_token_id=None):
    """Greedy tokens `[batch, max_new_tokens]`, padded with the config's pad id after eos."""
    return _generate(model, params, prompts, lengths, max_new_tokens=max_new_tokens,
                     eos_token_id=eos_token_id, pad_token_id=model.config.pad_token_id).tokens


class Pair(NamedTuple):
    hf: transformers.Phi3ForCausalLM
    model: Phi3
    params: dict
    apply: Callable  # (params, ids, mask) -> logits, jitted
    path: str


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> Pair: a tiny transformers model saved with `save_pretrained`, loaded by arc_jax."""
    root = tmp_path_factory.mktemp("hf")

    @functools.cache
    def make(name: str) -> Pair:
        hf = hf_phi3.tiny_model(name)
        path = str(root / name)
        hf.save_pretrained(path)
        model, params = load_pretrained(path)
        apply = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask))
        return Pair(hf, model, params, apply, path)

    return make


def _ids(seed: int, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 128, size=(batch, length))


@pytest.mark.parametrize("name,length", [
    ("plain", 12),
    ("gqa_longrope", 10),  # short factors
    ("gqa_longrope", 24),  # longer than original_max_position_embeddings: long factors
    ("tied", 12),
    ("sliding", 12),
])
def test_logits_match_transformers(pair, name, length):
    hf, model, params, apply, _ = pair(name)
    ids = _ids(length, 2, length)
    ours = apply(params, ids, None)
    np.testing.assert_allclose(ours, hf_phi3.logits(hf, ids), atol=TOL, rtol=0)
    assert "lm_head" not in params if name == "tied" else "lm_head" in params


@pytest.mark.parametrize("name", ["plain", "gqa_longrope"])
def test_right_padded_batch(pair, name):
    hf, model, params, apply, _ = pair(name)
    ids = _ids(1, 3, 20)
    lengths = np.array([20, 13, 6])
    mask = (np.arange(20)[None] < lengths[:, None]).astype(np.int32)
    ours = np.asarray(apply(params, ids * mask, mask))
    ref = hf_phi3.logits(hf, ids * mask, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=TOL, rtol=0)


def test_hidden_then_project(pair):
    _, model, params, apply, _ = pair("tied")
    ids = _ids(2, 2, 8)
    hidden_then_project = jax.jit(lambda p, ids: project_logits(
        model, p, model.apply({"params": p}, ids, return_hidden=True)))
    np.testing.assert_allclose(hidden_then_project(params, ids), apply(params, ids, None),
                               atol=1e-5)


@pytest.mark.parametrize("name", ["gqa_longrope", "tied"])
def test_save_pretrained_round_trip(pair, tmp_path, name):
    _, model, params, apply, _ = pair(name)
    save_pretrained(tmp_path / "out", model, params)
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ids = _ids(3, 2, 24)
    np.testing.assert_allclose(hf_phi3.logits(hf, ids), apply(params, ids, None), atol=TOL, rtol=0)
    model2, params2 = load_pretrained(tmp_path / "out")
    assert model2.config == model.config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_config_round_trip(pair):
    hf, model, _, _, _ = pair("gqa_longrope")
    config = model.config
    assert Phi3Config.from_hf(hf.config) == config
    assert Phi3Config.from_hf(config.to_hf_dict()) == config
    assert config.short_factor == (1.0, 1.3, 1.7, 2.5) and config.num_key_value_heads == 2


def test_legacy_config_layout():
    """Old Phi-3 config.json layout (rope_scaling, "type", top-level rope_theta) parses like HF."""
    legacy = dict(hf_phi3.BASE, model_type="phi3", rope_theta=500000.0, partial_rotary_factor=0.5,
                  original_max_position_embeddings=16, num_key_value_heads=None,
                  rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3],
                                "long_factor": [2.0, 2.1, 2.2, 2.3]})
    ours = Phi3Config.from_hf(legacy)
    assert ours == Phi3Config.from_hf(transformers.Phi3Config.from_dict(dict(legacy)))
    assert (ours.rope_type, ours.rope_theta, ours.num_key_value_heads) == ("longrope", 5e5, 4)


@pytest.mark.parametrize("name,prompt_len,new", [
    ("plain", 7, 10),
    ("gqa_longrope", 10, 12),  # crosses original_max_position_embeddings=16 while decoding
    ("sliding", 6, 10),
])
def test_greedy_matches_generate(pair, name, prompt_len, new):
    hf, model, params, _, _ = pair(name)
    prompts = _ids(4, 3, prompt_len)
    ours = generate(model, params, prompts, jnp.full((3,), prompt_len), max_new_tokens=new,
               eos_token_id=model.config.eos_token_id)
    np.testing.assert_array_equal(ours, hf_phi3.generate(hf, prompts, new))


def test_greedy_right_padded_prompts(pair):
    hf, model, params, _, _ = pair("plain")
    lengths = np.array([9, 4, 6])
    prompts = _ids(5, 3, 9) * (np.arange(9)[None] < lengths[:, None])
    ours = generate(model, params, prompts, lengths, max_new_tokens=6)
    for row, n in enumerate(lengths):
        ref = hf_phi3.generate(hf, prompts[row:row + 1, :n], 6)
        np.testing.assert_array_equal(ours[row], ref[0])


def test_bf16_params_and_compute(pair):
    _, _, params, apply, path = pair("plain")
    model16, params16 = load_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    ids = _ids(6, 2, 12)
    out = jax.jit(model16.apply)({"params": params16}, ids)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, apply(params, ids, None), atol=0.15, rtol=0)
