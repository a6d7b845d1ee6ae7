"""A tiny random Phi-3 with the shipped ARC tokenizer: the default `model.path` until the project
ships its own trained model.

    python -m arc_jax.model.tiny [PATH]        # default: arc_jax/assets/tiny_phi3

Written as a transformers directory (config.json, model.safetensors, tokenizer files), so it loads
in transformers as well as in arc_jax.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

from arc_jax.data.tokenizer import load_tokenizer
from arc_jax.model.convert import save_pretrained
from arc_jax.model.phi3 import Phi3, Phi3Config

TINY_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny_phi3")


def tiny_config(vocab_size: int) -> Phi3Config:
    """2 layers, hidden 64, GQA (4 query / 2 key-value heads), a 16k context."""
    return Phi3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
        original_max_position_embeddings=16384, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )


def scratch_config(vocab_size: int, hidden_size: int, num_hidden_layers: int,
                   num_attention_heads: int, num_key_value_heads: int,
                   intermediate_size: int) -> Phi3Config:
    """A Phi-3 of the given size for the ARC tokenizer (its bos / end / pad ids), a 16k context:
    the architecture of a model trained from scratch (`config.model.scratch`)."""
    return dataclasses.replace(
        tiny_config(vocab_size), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size)


def make_tiny_model(path: str = TINY_MODEL_DIR, seed: int = 0) -> str:
    """Writes a tiny random Phi-3 and the ARC tokenizer to `path`; returns `path`."""
    tokenizer = load_tokenizer()
    vocab_size = -(-len(tokenizer) // 16) * 16  # a multiple of 16 above the 47 tokens
    model = Phi3(tiny_config(vocab_size))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    save_pretrained(path, model, params)
    tokenizer.save_pretrained(path)
    return path


def ensure_tiny_model(path: str) -> bool:
    """Creates the tiny model at `path` if `path` is the default location and holds none yet."""
    if os.path.abspath(path) != os.path.abspath(TINY_MODEL_DIR):
        return False
    if os.path.exists(os.path.join(path, "config.json")):
        return False
    make_tiny_model(path)
    return True


if __name__ == "__main__":
    out = make_tiny_model(sys.argv[1] if len(sys.argv) > 1 else TINY_MODEL_DIR)
    print(f"wrote a tiny random Phi-3 to {out}")
