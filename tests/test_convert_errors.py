"""Checkpoint validation: missing, mis-shaped and unexpected tensors are named before loading."""
import json
import re

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from arc_jax.model.convert import CheckpointError, load_pretrained, save_pretrained
from arc_jax.model.lora import LoraConfig, init_lora
from arc_jax.model.peft_io import load_peft, save_peft
from arc_jax.model.phi3 import Phi3, Phi3Config

CONFIG = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                    original_max_position_embeddings=32, pad_token_id=0, eos_token_id=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = Phi3(CONFIG)
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_pretrained(path, model, params)
    return path, params


def _copy_with(src, dst, edit):
    """Copies a checkpoint dir, editing its tensor dict with `edit`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_save_load_round_trip(saved):
    path, params = saved
    _, loaded = load_pretrained(path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]


def test_missing_tensor(saved, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    bad = _copy_with(saved[0], tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(f"missing tensor {name}")) as err:
        load_pretrained(bad)
    assert "(32, 48)" in str(err.value)


def test_reshaped_tensor(saved, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"

    def reshape(t):
        t[name] = np.zeros((32, 30), np.float32)

    bad = _copy_with(saved[0], tmp_path / "bad", reshape)
    message = f"tensor {name} in model.safetensors has shape (32, 30), expected (32, 32)"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pretrained(bad)


def test_unexpected_tensor(saved, tmp_path):
    def add(t):
        t["model.layers.0.extra.weight"] = np.zeros((3,), np.float32)

    bad = _copy_with(saved[0], tmp_path / "bad", add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.extra\.weight"):
        load_pretrained(bad)


def test_sharded_checkpoint_and_missing_shard(saved, tmp_path):
    path, params = saved
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / file, metadata={"format": "pt"})
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    _, loaded = load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_pretrained(out)


def test_no_safetensors(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved[0] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_pretrained(tmp_path)


def test_peft_unexpected_tensor(saved, tmp_path):
    config = LoraConfig(rank=2, alpha=4.0)
    save_peft(tmp_path, init_lora(jax.random.key(0), saved[1], config), config)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.lora_A.weight"] = np.zeros((2, 32), np.float32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor .*model\.norm\.lora_A"):
        load_peft(tmp_path)
