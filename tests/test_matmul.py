"""`mixed_matmul` (bfloat16 operands, float32 accumulation) against the math and in the model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.model.lora import LoraConfig, init_lora
from arc_jax.model.matmul import mixed_matmul
from arc_jax.model.phi3 import MIXED_MIN_ROWS, Phi3, Phi3Config

BF16 = jnp.bfloat16
CONFIG = Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    original_max_position_embeddings=64)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_value_and_gradients_are_the_products_of_the_rounded_operands():
    kx, kk, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 40, 24))
    kernel = jax.random.normal(kk, (24, 56))
    dy = jax.random.normal(kd, (3, 40, 56))
    y, vjp = jax.vjp(lambda x, k: mixed_matmul(x, k, BF16), x, kernel)
    assert y.dtype == jnp.float32 and y.shape == (3, 40, 56)
    r = lambda a: a.astype(BF16).astype(jnp.float32)  # what the products see
    np.testing.assert_allclose(y, r(x) @ r(kernel), rtol=1e-5, atol=1e-4)
    dx, dkernel = vjp(dy)
    assert dx.dtype == x.dtype and dkernel.dtype == kernel.dtype
    np.testing.assert_allclose(dx, r(dy) @ r(kernel).T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        dkernel, r(x).reshape(-1, 24).T @ r(dy).reshape(-1, 56), rtol=1e-5, atol=1e-3)
    # and bfloat16 rounding is all that separates them from float32 products
    assert _rel(dx, dy @ kernel.T) < 1e-2 and _rel(dkernel, jnp.einsum("btk,btn->kn", x, dy)) < 1e-2


@pytest.fixture(scope="module")
def tiny():
    ids = jax.random.randint(jax.random.key(1), (2, 32), 0, CONFIG.vocab_size)
    params = Phi3(CONFIG).init(jax.random.key(2), ids)["params"]
    lora_cfg = LoraConfig(rank=4)
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(jax.random.key(3), params, lora_cfg))
    return params, ids, lora, lora_cfg


def test_model_logits_and_lora_gradients_close_to_float32(tiny):
    params, ids, lora, lora_cfg = tiny

    def loss(lora, model):
        logits = model.apply({"params": params}, ids, lora=lora, lora_config=lora_cfg)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, ids[..., None], -1)[..., 0]), logits

    (l32, z32), g32 = jax.value_and_grad(loss, has_aux=True)(lora, Phi3(CONFIG))
    (l16, z16), g16 = jax.value_and_grad(loss, has_aux=True)(lora, Phi3(CONFIG, matmul_dtype=BF16))
    assert z16.dtype == jnp.float32 and 0 < _rel(z16, z32) < 2e-2
    assert abs(float(l16 - l32)) < 1e-2 * abs(float(l32))
    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    assert _rel(flat(g16), flat(g32)) < 5e-2  # single tiny leaves cancel, so not leaf by leaf


def test_full_fine_tuning_gets_kernel_gradients(tiny):
    params, ids, _, _ = tiny
    loss = lambda p, model: jnp.mean(model.apply({"params": p}, ids) ** 2)
    g32 = jax.grad(loss)(params, Phi3(CONFIG))
    g16 = jax.grad(loss)(params, Phi3(CONFIG, matmul_dtype=BF16))
    site = lambda g: g["model"]["layers_1"]["mlp"]["gate_up_proj"]["kernel"]
    assert float(jnp.abs(site(g16)).max()) > 0 and _rel(site(g16), site(g32)) < 5e-2


def test_few_rows_stay_in_the_compute_dtype(tiny):
    """Decoding-sized calls (fewer than MIXED_MIN_ROWS rows) use the float32 product."""
    params, ids, _, _ = tiny
    short = ids[:1, :MIXED_MIN_ROWS - 1]
    run = lambda model: model.apply({"params": params}, short)
    np.testing.assert_array_equal(run(Phi3(CONFIG, matmul_dtype=BF16)), run(Phi3(CONFIG)))
