"""Weight-only int8 / int4 quantization of the frozen base for LoRA training and decoding.

`quantize_params(params, "int8" | "int4")` replaces each linear layer's `{"kernel": [in, out]}`
(the decoder's projections and `lm_head`; not the embedding or norms) with

    int8: {"kernel_int8": int8 [in, out], "scale": f32 [1, out]}           per output channel
    int4: {"kernel_int4": uint8 [in/2, out], "scale": f32 [in/group, out]}  per group of `group`
          input rows; two signed 4-bit values per byte (row 2i in the low nibble, 2i+1 high)

with symmetric scales (`max|w| / 127`, `/ 7`). `model.Dense` recognises these entries and
dequantizes the kernel to its compute dtype inside the jitted program, so the stored base shrinks
~4x (int8) or ~7x (int4) while LoRA adapters and activations keep full precision. Build LoRA
adapters (`lora.init_lora`) before or after quantizing: `kernel_shape` gives the `[in, out]`
either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
MODES = ("int8", "int4")
SKIP = ("embed_tokens",)


def quantize_int8(w: Array) -> dict[str, Array]:
    """`w [in, out]` -> int8 kernel and per-column scale `[1, out]`; error <= scale / 2."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return {"kernel_int8": q, "scale": scale}


def quantize_int4(w: Array, group: int = 64) -> dict[str, Array]:
    """`w [in, out]` (in divisible by `group`, group even) -> packed uint8 `[in/2, out]` and
    scales `[in/group, out]`; error <= scale / 2 within each group."""
    w = jnp.asarray(w, jnp.float32)
    n_in, n_out = w.shape
    if n_in % group or group % 2:
        raise ValueError(f"int4 needs an even group dividing the input size {n_in}, got {group}")
    grouped = w.reshape(n_in // group, group, n_out)
    scale = jnp.max(jnp.abs(grouped), axis=1) / 7.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(grouped / scale[:, None]), -8, 7).astype(jnp.int8).reshape(n_in, n_out)
    nibbles = (q & 0xF).astype(jnp.uint8)
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return {"kernel_int4": packed, "scale": scale}


def _unpack_int4(packed: Array) -> Array:
    """uint8 `[in/2, out]` -> int8 `[in, out]` in [-8, 7]."""
    low = (packed & 0xF).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    signed = lambda x: (x ^ 8) - 8
    both = jnp.stack([signed(low), signed(high)], axis=1)  # [in/2, 2, out]
    return both.reshape(-1, packed.shape[-1])


def dequantize(layer: Mapping[str, Array], dtype: Any = jnp.float32) -> Array:
    """The `[in, out]` kernel of a quantized (or plain) layer entry, in `dtype`."""
    if "kernel" in layer:
        return jnp.asarray(layer["kernel"]).astype(dtype)
    scale = layer["scale"]
    if "kernel_int8" in layer:
        return (layer["kernel_int8"].astype(jnp.float32) * scale).astype(dtype)
    q = _unpack_int4(layer["kernel_int4"])
    n_groups, n_out = scale.shape
    grouped = q.reshape(n_groups, -1, n_out).astype(jnp.float32) * scale[:, None]
    return grouped.reshape(-1, n_out).astype(dtype)


KERNELS = ("kernel", "kernel_int8", "kernel_int4")


def kernel_shape(layer: Mapping[str, Any]) -> tuple[int, int]:
    """`(in, out)` of a plain or quantized layer entry."""
    if "kernel_int4" in layer:
        packed = layer["kernel_int4"].shape
        return 2 * packed[0], packed[1]
    return tuple(layer["kernel_int8" if "kernel_int8" in layer else "kernel"].shape)


def quantize_params(params: Mapping, mode: str, group: int = 64,
                    skip: tuple[str, ...] = SKIP) -> dict:
    """A copy of `params` with every `kernel` outside `skip` quantized to `mode`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    quantize = quantize_int8 if mode == "int8" else lambda w: quantize_int4(w, group)

    def walk(tree):
        out = {}
        for key, value in tree.items():
            if not isinstance(value, Mapping) or key in skip:
                out[key] = value
            elif "kernel" in value:
                out[key] = {**{k: v for k, v in value.items() if k != "kernel"},
                            **quantize(value["kernel"])}
            else:
                out[key] = walk(value)
        return out

    return walk(params)


def dequantize_params(params: Mapping, dtype: Any = jnp.float32) -> dict:
    """Plain `{"kernel": ...}` params back from `quantize_params` output."""
    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        if "kernel_int8" in tree or "kernel_int4" in tree:
            return {"kernel": dequantize(tree, dtype)}
        return {key: walk(value) for key, value in tree.items()}

    return walk(params)


def tree_bytes(tree: Any) -> int:
    """Bytes held by a tree's array leaves."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
