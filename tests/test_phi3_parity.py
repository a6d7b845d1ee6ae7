"""Parity with transformers at Phi-3-mini width: the published config (hidden 3072, 32 heads of
96, vocab 32064) with one layer and a LongRoPE `rope_scaling` of 48 short and 48 long factors as
Phi-3-mini-128k has, random fp32 weights, at positions before and past
original_max_position_embeddings (4096). The long-sequence figures (4,160 tokens, float64
references) are `experiments/benchmarks/phi3_parity.py`'s."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from arc_jax.model.phi3 import (
    rope_attention_scale,
    rope_cos_sin,
    rope_inv_freq,
)
from experiments.benchmarks.phi3_parity import build_pair

FIXTURE = Path(__file__).parents[2] / "shared" / "fixtures" / "phi-3-mini-4k-instruct"
pytestmark = pytest.mark.skipif(
    not (FIXTURE / "config.json").is_file(),
    reason=f"the published Phi-3 config is not at {FIXTURE} (the shared fixtures, "
           "../shared/fixtures relative to the repository)")
TOL = 1e-4


def real_width_config() -> dict:
    """The fixture's config.json with 1 layer and 128k-style LongRoPE (48 + 48 factors)."""
    config = json.loads((FIXTURE / "config.json").read_text())
    config.pop("auto_map")
    config.update(num_hidden_layers=1, max_position_embeddings=131072, sliding_window=262144,
                  rope_scaling={"type": "longrope",
                                "short_factor": [round(1.0 + 0.025 * i, 4) for i in range(48)],
                                "long_factor": [round(1.03 * 1.09 ** i, 4) for i in range(48)]})
    return config


@pytest.fixture(scope="module")
def pair():
    """(transformers model, our model, our params) with the same random weights: N(0, 0.02)
    (transformers' initializer_range), norm weights 1 + N(0, 0.2)."""
    return build_pair(real_width_config(), std=0.02)


def test_config_reads_like_transformers(pair):
    hf, model, _ = pair
    ours = model.config
    rope = hf.config.rope_parameters
    assert (ours.rope_type, ours.original_max_position_embeddings) == (
        rope["rope_type"], rope["original_max_position_embeddings"])
    assert list(ours.short_factor) == rope["short_factor"]
    assert list(ours.long_factor) == rope["long_factor"]


def test_rope_tables_match_transformers_past_the_original_length(pair):
    hf, model, _ = pair
    rotary = hf.model.rotary_emb
    positions = np.arange(4160)[None]  # > 4096: the long factors, for the whole sequence
    cos, sin = rotary(torch.zeros(1, 1, 4160, 96), torch.from_numpy(positions))
    ours_cos, ours_sin = rope_cos_sin(model.config, jnp.asarray(positions))
    assert rotary.attention_scaling == pytest.approx(rope_attention_scale(model.config))
    assert rotary.attention_scaling == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    # The same formula in float32; torch's float32 pow is one ulp off the correctly rounded
    # 10000 ** (40 / 96) (numpy's), so one of the 48 frequencies can differ (by up to two ulps
    # after the factor and 1 / x).
    exponents = np.arange(0, 96, 2, dtype=np.float32) / np.float32(96)
    torch_pow = (10000.0 ** torch.from_numpy(exponents)).numpy()
    assert np.flatnonzero(torch_pow != np.float32(10000.0) ** exponents).tolist() == [20]
    for long, theirs in ((False, rotary.original_inv_freq), (True, rotary.long_inv_freq)):
        ours = rope_inv_freq(model.config, long)
        np.testing.assert_array_max_ulp(ours, theirs.numpy(), maxulp=2)
        assert np.sum(ours != theirs.numpy()) <= 1
    # Times positions up to 4160, that moves one angle by a few float32 ulps (3.3e-6 measured).
    np.testing.assert_allclose(ours_cos, cos.numpy(), atol=5e-6, rtol=0)
    np.testing.assert_allclose(ours_sin, sin.numpy(), atol=5e-6, rtol=0)


@pytest.mark.parametrize("start", [0, 4064, 4100, 60000])
def test_logits_match_transformers_at_real_width(pair, start):
    """64 tokens from position `start` (4064: the sequence crosses 4096, so the long factors
    apply to all of it, as in transformers)."""
    hf, model, params = pair
    ids = np.random.default_rng(start).integers(0, 32064, (2, 64))
    positions = np.broadcast_to(np.arange(start, start + 64), (2, 64)).copy()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids),
                 position_ids=torch.from_numpy(positions)).logits.numpy()
    ours = jax.jit(lambda p, i, pos: model.apply({"params": p}, i, positions=pos))(
        params, ids, positions)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
