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


def transformers_inv_freqs(hf) -> dict[bool, np.ndarray]:
    """transformers' own float32 inverse frequencies, short (False) and long (True)."""
    rotary = hf.model.rotary_emb
    rotary(torch.zeros(1, 1, 1, 96), torch.tensor([[4096]]))  # builds long_inv_freq lazily
    return {False: rotary.original_inv_freq.numpy().copy(), True: rotary.long_inv_freq.numpy().copy()}


@pytest.fixture(scope="module")
def pair():
    """(transformers model, our model, our params, transformers' own inverse frequencies) with
    the same random weights: N(0, 0.02) (transformers' initializer_range), norm weights
    1 + N(0, 0.2).

    torch's vectorised float32 pow is a few ulps off the correctly rounded 10000 ** (i / 96), at
    CPU-dependent frequencies (1 of 48 on a Sapphire Rapids, 11 of 48 on an AMD EPYC with AVX-512).
    Times a position of 60,000 one ulp of the first frequency moves the angle by 4e-3 rad, so the
    transformers model gets our frequency tables (checked against its own within a few ulps in
    the RoPE test) and the logits comparisons test everything else exactly."""
    hf, model, params = build_pair(real_width_config(), std=0.02)
    own = transformers_inv_freqs(hf)
    rotary = hf.model.rotary_emb
    with torch.no_grad():
        rotary.original_inv_freq.copy_(torch.from_numpy(rope_inv_freq(model.config, False)))
        rotary.inv_freq.copy_(rotary.original_inv_freq)
        rotary.long_inv_freq = torch.from_numpy(rope_inv_freq(model.config, True))
    return hf, model, params, own


def test_config_reads_like_transformers(pair):
    hf, model, _, _ = pair
    ours = model.config
    rope = hf.config.rope_parameters
    assert (ours.rope_type, ours.original_max_position_embeddings) == (
        rope["rope_type"], rope["original_max_position_embeddings"])
    assert list(ours.short_factor) == rope["short_factor"]
    assert list(ours.long_factor) == rope["long_factor"]


def test_rope_tables_match_transformers_past_the_original_length(pair):
    hf, model, _, own = pair
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(rope_attention_scale(model.config))
    assert rope_attention_scale(model.config) == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    dim = 96
    for long in (False, True):
        ours = rope_inv_freq(model.config, long)
        factors = np.asarray(model.config.long_factor if long else model.config.short_factor,
                             np.float32).astype(np.float64)
        exponents = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
        exact = 1.0 / (factors * 10000.0 ** exponents)
        # The formula on float32 inputs; pow, times the factor and 1 / x each round once.
        np.testing.assert_array_max_ulp(ours, exact.astype(np.float32), maxulp=2)
        np.testing.assert_array_max_ulp(ours, own[long], maxulp=4)
    # transformers' cos/sin from the same frequencies (the fixture pins them) at 4,160 positions,
    # past 4096, so the long factors: equal up to float32 cos/sin rounding.
    positions = np.arange(4160)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, 1, 4160, 96), torch.from_numpy(positions))
    ours_cos, ours_sin = rope_cos_sin(model.config, jnp.asarray(positions))
    np.testing.assert_allclose(ours_cos, cos.numpy(), atol=5e-6, rtol=0)
    np.testing.assert_allclose(ours_sin, sin.numpy(), atol=5e-6, rtol=0)


@pytest.mark.parametrize("start", [0, 4064, 4100, 60000])
def test_logits_match_transformers_at_real_width(pair, start):
    """64 tokens from position `start` (4064: the sequence crosses 4096, so the long factors
    apply to all of it, as in transformers)."""
    hf, model, params, _ = pair
    ids = np.random.default_rng(start).integers(0, 32064, (2, 64))
    positions = np.broadcast_to(np.arange(start, start + 64), (2, 64)).copy()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids),
                 position_ids=torch.from_numpy(positions)).logits.numpy()
    ours = jax.jit(lambda p, i, pos: model.apply({"params": p}, i, positions=pos))(
        params, ids, positions)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
