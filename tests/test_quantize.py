"""Weight-only int8 / int4 base: dequantization error bounds, memory, forward close to float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.model.lora import LoraConfig, init_lora
from arc_jax.model.phi3 import Phi3, Phi3Config
from arc_jax.model.quantize import (
    dequantize,
    dequantize_params,
    quantize_int4,
    quantize_int8,
    quantize_params,
    tree_bytes,
)

W = jax.random.normal(jax.random.key(0), (128, 48)) * 0.05
CONFIG = Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)


def test_int8_error_within_half_a_step():
    layer = quantize_int8(W)
    assert layer["kernel_int8"].dtype == jnp.int8 and layer["scale"].shape == (1, 48)
    err = jnp.abs(dequantize(layer) - W)
    assert bool(jnp.all(err <= layer["scale"] / 2 + 1e-7))


@pytest.mark.parametrize("group", [16, 64])
def test_int4_error_within_half_a_step(group):
    layer = quantize_int4(W, group)
    assert layer["kernel_int4"].shape == (64, 48) and layer["kernel_int4"].dtype == jnp.uint8
    assert layer["scale"].shape == (128 // group, 48)
    err = (jnp.abs(dequantize(layer) - W)).reshape(128 // group, group, 48)
    assert bool(jnp.all(err <= layer["scale"][:, None] / 2 + 1e-7))


def test_int4_round_trips_every_level():
    levels = jnp.resize(jnp.arange(-7, 8, dtype=jnp.float32), (64,))  # max |w| 7: scale 1
    w = jnp.stack([levels, -levels * 0.5], axis=1)  # [64, 2]
    np.testing.assert_array_equal(dequantize(quantize_int4(w, group=64)), w)


@pytest.fixture(scope="module")
def base():
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, CONFIG.vocab_size)
    model = Phi3(CONFIG)
    params = model.init(jax.random.key(2), ids)["params"]
    return model, params, ids


@pytest.mark.parametrize("mode,max_ratio,tol", [("int8", 0.30, 0.02), ("int4", 0.20, 0.25)])
def test_forward_close_to_float32_and_smaller(base, mode, max_ratio, tol):
    model, params, ids = base
    quant = quantize_params(params, mode, group=32)
    linear = lambda tree: {k: v for k, v in tree.items() if k != "model"} | {
        "layers": {k: v for k, v in tree["model"].items() if k.startswith("layers")}}
    assert tree_bytes(linear(quant)) <= max_ratio * tree_bytes(linear(params))
    lora_cfg = LoraConfig(rank=4)
    lora = jax.tree.map(lambda x: x + 0.01, init_lora(jax.random.key(3), params, lora_cfg))
    run = lambda p: model.apply({"params": p}, ids, lora=lora, lora_config=lora_cfg)
    full, low = run(params), run(quant)
    np.testing.assert_allclose(low, run(dequantize_params(quant)), atol=1e-5)
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
    assert rms(low - full) < tol * rms(full)
