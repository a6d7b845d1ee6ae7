"""LoRA: PEFT parity and round trip, merging, vmapped adapter stacks, grads w.r.t. LoRA only."""
import hf_phi3
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest

from arc_jax.model.convert import load_pretrained
from arc_jax.model.lora import (
    LoraConfig,
    init_lora,
    init_lora_stack,
    merge_lora,
    num_params,
    stack_lora,
    unstack_lora,
)
from arc_jax.model.peft_io import load_peft, save_peft

TOL = 1e-4
NAME = "gqa_longrope"
IDS = np.random.default_rng(0).integers(3, 128, size=(2, 20))  # > 16: long RoPE factors too


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / NAME
    hf_phi3.tiny_model(NAME).save_pretrained(path)
    model, params = load_pretrained(path)
    forward = jax.jit(lambda p, lora, cfg, ids: model.apply(
        {"params": p}, ids, lora=lora, lora_config=cfg))
    return model, params, forward


def _random_lora(key, params, config):
    """An adapter with non-zero `b`, so it changes the outputs."""
    lora = init_lora(key, params, config)
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])


def test_init_leaves_outputs_unchanged(base):
    model, params, forward = base
    config = LoraConfig(rank=4, alpha=8.0)
    lora = init_lora(jax.random.key(0), params, config)
    site = lora["model"]["layers_1"]["mlp"]["gate_up_proj"]
    assert site["a"].shape == (64, 4) and site["b"].shape == (4, 192)
    assert not np.any(site["b"]) and np.any(site["a"])
    assert len(jax.tree.leaves(lora)) == 2 * 4 * model.config.num_hidden_layers
    np.testing.assert_allclose(forward(params, lora, config, IDS),
                               forward(params, None, None, IDS), atol=1e-6)


@pytest.mark.parametrize("config", [
    LoraConfig(rank=4, alpha=8.0),
    LoraConfig(rank=2, alpha=3.0, targets=("qkv_proj", "down_proj"), use_rslora=True),
])
def test_peft_export_matches_and_imports_back(base, tmp_path, config):
    model, params, forward = base
    lora = _random_lora(jax.random.key(1), params, config)
    save_peft(tmp_path / "adapter", lora, config)

    hf = peft.PeftModel.from_pretrained(hf_phi3.tiny_model(NAME), tmp_path / "adapter").eval()
    ref = hf_phi3.logits(hf, IDS)
    ours = forward(params, lora, config, IDS)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert not np.allclose(ours, forward(params, None, None, IDS), atol=1e-2)

    lora2, config2 = load_peft(tmp_path / "adapter")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, lora2, lora)


def test_grads_match_peft(base, tmp_path):
    """LoRA's own VJP (`lora._low_rank`) against torch autograd through PEFT, with non-zero a, b."""
    import torch
    from safetensors.numpy import load_file

    model, params, _ = base
    config = LoraConfig(rank=4, alpha=8.0)
    lora = _random_lora(jax.random.key(5), params, config)
    weights = np.cos(np.arange(model.config.vocab_size, dtype=np.float32))

    def loss(lora):
        logits = model.apply({"params": params}, IDS, lora=lora, lora_config=config)
        return jnp.sum(jnp.tanh(logits) * weights)

    grads = jax.jit(jax.grad(loss))(lora)
    save_peft(tmp_path / "adapter", lora, config)
    save_peft(tmp_path / "grads", grads, config)  # same names and layout as the adapter
    hf = peft.PeftModel.from_pretrained(hf_phi3.tiny_model(NAME), tmp_path / "adapter",
                                        is_trainable=True)
    logits = hf(input_ids=torch.from_numpy(IDS)).logits
    (torch.tanh(logits) * torch.from_numpy(weights)).sum().backward()
    want = load_file(tmp_path / "grads" / "adapter_model.safetensors")
    got = {name: p.grad.numpy() for name, p in hf.named_parameters() if p.requires_grad}
    assert len(want) == len(got) == 2 * 4 * model.config.num_hidden_layers
    for name, grad in want.items():
        torch_name = name.replace(".weight", ".default.weight")
        scale = np.abs(grad).max()
        np.testing.assert_allclose(got[torch_name], grad, atol=1e-4 * scale, rtol=0, err_msg=name)


def test_merged_params_match(base):
    model, params, forward = base
    config = LoraConfig(rank=4, alpha=8.0)
    lora = _random_lora(jax.random.key(2), params, config)
    merged = merge_lora(params, lora, config)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_allclose(forward(merged, None, None, IDS), forward(params, lora, config, IDS),
                               atol=TOL, rtol=0)
    np.testing.assert_array_equal(merged["model"]["norm"]["weight"],
                                  params["model"]["norm"]["weight"])


def test_vmapped_stack_equals_separate_runs(base):
    model, params, forward = base
    config = LoraConfig(rank=4, alpha=8.0)
    loras = [_random_lora(jax.random.key(10 + i), params, config) for i in range(4)]
    stacked = stack_lora(loras)
    many = jax.jit(jax.vmap(lambda p, lora: model.apply(
        {"params": p}, IDS, lora=lora, lora_config=config), in_axes=(None, 0)))
    out = many(params, stacked)
    assert out.shape == (4, *IDS.shape, model.config.vocab_size)
    for i, lora in enumerate(loras):
        np.testing.assert_allclose(out[i], forward(params, lora, config, IDS), atol=TOL, rtol=0)
        jax.tree.map(np.testing.assert_array_equal, unstack_lora(stacked, i), lora)
    fresh = init_lora_stack(jax.random.key(0), params, config, 3)
    assert fresh["model"]["layers_0"]["self_attn"]["o_proj"]["a"].shape == (3, 64, 4)


def test_grads_and_optimizer_state_for_lora_only(base):
    model, params, _ = base
    config = LoraConfig(rank=4, alpha=8.0)
    lora = init_lora(jax.random.key(3), params, config)

    def loss(lora, params, ids):
        logits = model.apply({"params": params}, ids[:, :-1], lora=lora, lora_config=config)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(lora, params, IDS)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    site = grads["model"]["layers_0"]["self_attn"]["qkv_proj"]
    assert np.any(site["b"]) and not np.any(site["a"])  # b = 0 at init blocks grads to a
    opt = optax.adam(1e-2)
    state = opt.init(lora)
    assert num_params(state) == 2 * num_params(lora) + 1  # mu, nu, count
    updates, _ = opt.update(grads, state)
    assert value_and_grad(optax.apply_updates(lora, updates), params, IDS)[0] < value


def test_dropout_needs_an_rng(base):
    model, params, forward = base
    config = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    lora = _random_lora(jax.random.key(4), params, config)
    run = jax.jit(lambda key: model.apply({"params": params}, IDS, lora=lora, lora_config=config,
                                          rngs={"dropout": key}))
    no_rng = forward(params, lora, config, IDS)
    np.testing.assert_array_equal(run(jax.random.key(0)), run(jax.random.key(0)))
    assert not np.allclose(run(jax.random.key(0)), no_rng, atol=1e-3)
    assert not np.allclose(run(jax.random.key(0)), run(jax.random.key(1)), atol=1e-3)
