"""Blockwise causal attention and `dot_product_attention` equal the reference, values and grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.model.attention import attend, attention_mask, causal_attention, dot_product_causal
from arc_jax.model.phi3 import Phi3, Phi3Config

B, T, H, KV, D = 2, 40, 4, 2, 8
LENGTHS = np.asarray([40, 23])  # right padding in row 1


def _inputs(seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D))
    k, v = (jax.random.normal(x, (B, T, KV, D)) for x in (kk, kv))
    cot = jax.random.normal(kg, (B, T, H, D))
    valid = jnp.arange(T)[None] < LENGTHS[:, None]
    return q, k, v, cot, valid


def _reference(q, k, v, valid, window):
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return attend(q, k, v, attention_mask(pos, pos, valid, window))


def _value_and_grads(fn, q, k, v, cot, valid):
    """Outputs and grads w.r.t. q, k, v of `sum(fn(...) * cot)` over the real query rows."""
    rows = valid[:, :, None, None]
    loss = lambda q, k, v: jnp.sum(jnp.where(rows, fn(q, k, v) * cot, 0.0))
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("block,window,padded", [
    (8, None, True), (16, 5, True), (64, None, False), (8, 5, False)])
def test_blocked_equals_reference(block, window, padded):
    q, k, v, cot, valid = _inputs()
    valid = valid if padded else jnp.ones_like(valid)
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: _reference(q, k, v, valid, window), q, k, v, cot, valid)
    out, grads = _value_and_grads(
        lambda q, k, v: causal_attention(q, k, v, valid if padded else None, window, block),
        q, k, v, cot, valid)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref_out)[rows], atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4)


@pytest.mark.parametrize("window", [None, 5])
def test_dot_product_equals_reference(window):
    q, k, v, _, valid = _inputs(1)
    out = dot_product_causal(q, k, v, valid, window)
    rows = np.asarray(valid)
    np.testing.assert_allclose(
        np.asarray(out)[rows], np.asarray(_reference(q, k, v, valid, window))[rows], atol=1e-5)


def test_bf16_blocked_close_to_float32():
    q, k, v, _, valid = _inputs(2)
    low = causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), valid, None, 16)
    assert low.dtype == jnp.bfloat16
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(low, np.float32)[rows],
                               np.asarray(_reference(q, k, v, valid, None))[rows], atol=5e-2)


@pytest.mark.parametrize("attention", ["blocked", "dot_product"])
def test_model_paths_equal_reference(attention):
    """Phi-3 logits with each attention implementation equal the reference `xla` path."""
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    ids = jax.random.randint(jax.random.key(3), (B, T), 0, 64)
    valid = jnp.arange(T)[None] < LENGTHS[:, None]
    params = Phi3(config).init(jax.random.key(4), ids)["params"]
    run = lambda impl: Phi3(config, attention=impl, attention_block=16).apply(
        {"params": params}, ids, attention_mask=valid)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(run(attention))[rows], np.asarray(run("xla"))[rows],
                               atol=1e-5)


def test_blocked_prefill_decodes_as_reference():
    """`generate`'s prefill over a fresh cache, blockwise, gives the reference's tokens."""
    from arc_jax.infer.generate import generate

    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    prompts = jax.random.randint(jax.random.key(5), (B, T), 0, 64)
    params = Phi3(config).init(jax.random.key(6), prompts)["params"]
    run = lambda impl: generate(
        Phi3(config, attention=impl, attention_block=8), params, prompts, jnp.asarray(LENGTHS),
        max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    blocked, ref = run("blocked"), run("xla")
    np.testing.assert_array_equal(blocked.tokens, ref.tokens)
    np.testing.assert_allclose(blocked.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
def test_rows_equal_full_output_gathered(window):
    """`rows=` (last layer at some tokens only) equals the full forward gathered there, with grads
    of a LoRA tree; `attend_rows` is exercised with several query blocks."""
    from arc_jax.model.lora import LoraConfig, init_lora

    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window)
    ids = jax.random.randint(jax.random.key(7), (B, T), 0, 64)
    valid = jnp.arange(T)[None] < LENGTHS[:, None]
    model = Phi3(config, attention_block=4)
    params = model.init(jax.random.key(8), ids)["params"]
    lora_cfg = LoraConfig(rank=2, alpha=4.0)
    lora = jax.tree.map(lambda x: x + 0.1, init_lora(jax.random.key(9), params, lora_cfg))
    rows = jnp.asarray([[3, 17, 39, 0, 25, 8, 30, 12, 21, 5, 33],
                        [0, 22, 5, 11, 2, 19, 14, 7, 1, 20, 9]])  # all real tokens
    cot = jax.random.normal(jax.random.key(10), (*rows.shape, config.vocab_size))

    def full(lora):
        out = model.apply({"params": params}, ids, attention_mask=valid, lora=lora,
                          lora_config=lora_cfg)
        return jax.vmap(lambda z, i: z[i])(out, rows)

    def some(lora):
        return model.apply({"params": params}, ids, attention_mask=valid, lora=lora,
                           lora_config=lora_cfg, rows=rows)

    want, want_grad = jax.value_and_grad(lambda lora: jnp.sum(full(lora) * cot))(lora)
    got, got_grad = jax.value_and_grad(lambda lora: jnp.sum(some(lora) * cot))(lora)
    assert some(lora).shape == (*rows.shape, config.vocab_size)
    np.testing.assert_allclose(some(lora), full(lora), atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
