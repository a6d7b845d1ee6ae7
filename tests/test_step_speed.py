"""The speed options of a train step keep its result: loss-position projection, blockwise attention,
remat and an int8 base; and a jitted step makes no host transfers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.data.encode import EncodedExample
from arc_jax.model.lora import LoraConfig, init_lora
from arc_jax.model.phi3 import Phi3, Phi3Config
from arc_jax.model.quantize import quantize_params
from arc_jax.train.step import OptimConfig, StepFns, init_state, make_optimizer, train_step

CONFIG = Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
B, T = 2, 40
LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def setup():
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, CONFIG.vocab_size)
    lengths = jnp.asarray([T, 29])
    index = jnp.arange(T)[None]
    valid = index < lengths[:, None]
    batch = EncodedExample(tokens, valid & (index >= 20), jnp.where(valid, index, 0), valid,
                           lengths, jnp.full((B,), 20), jnp.zeros((B,), jnp.int32),
                           jnp.ones((B,), bool))
    params = Phi3(CONFIG).init(jax.random.key(1), tokens)["params"]
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(jax.random.key(2), params, LORA))
    return params, lora, batch


def _step(model, k):
    optimizer = make_optimizer(OptimConfig(steps=10, warmup_steps=0, schedule="constant"))
    fns = StepFns(model, LORA, lambda key, data: data, max_loss_tokens=k)
    return optimizer, jax.jit(functools.partial(train_step, fns, optimizer))


@pytest.mark.parametrize("model,k", [
    (Phi3(CONFIG, attention="xla"), 20),  # loss positions only vs all positions (k = T - 1)
    (Phi3(CONFIG, attention_block=8), T - 1),  # blockwise attention
    (Phi3(CONFIG, remat=True, attention_block=8), 20),
])
def test_speed_options_keep_the_step(setup, model, k):
    params, lora, batch = setup
    key = jax.random.key(3)
    ref_opt, ref = _step(Phi3(CONFIG, attention="xla"), T - 1)
    opt, fast = _step(model, k)
    want, want_m = ref(init_state(lora, ref_opt), params, batch, key, key)
    got, got_m = fast(init_state(lora, opt), params, batch, key, key)
    np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(got_m["grad_norm"], want_m["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(want.trainable), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_no_host_transfers_in_a_step(setup):
    params, lora, batch = setup
    params = quantize_params(params, "int8")
    optimizer, step = _step(Phi3(CONFIG, attention_block=8), 24)
    state, key = init_state(lora, optimizer), jax.random.key(4)
    args = jax.device_put((state, params, batch, key, key))
    step(*args)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        new_state, metrics = step(*args)
        new_state, metrics = step(new_state, *args[1:])
    assert np.isfinite(float(metrics["loss"]))
