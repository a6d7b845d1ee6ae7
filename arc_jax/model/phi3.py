"""Phi-3 decoder in Flax linen, numerically matching transformers' `Phi3ForCausalLM`.

Parameters are plain nested dicts mirroring the HF layout, e.g.
`params["model"]["layers_0"]["self_attn"]["qkv_proj"]["kernel"]` of shape `[in, out]`.
A LoRA tree (see `arc_jax.model.lora`) is an optional call argument, so one base serves many
adapters. How the modules compute (dtypes, attention kernel, matmul operands) is one
`ModelOptions` shared by all of them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arc_jax.model.attention import (  # noqa: F401  (attend, attention_mask: re-exported)
    IMPLEMENTATIONS,
    attend,
    attend_cache,
    attend_rows,
    attention_mask,
    causal_attention_heads,
    dot_product_causal,
)
from arc_jax.model.lora import LoraConfig, lora_delta
from arc_jax.model.matmul import mixed_matmul
from arc_jax.model.quantize import dequantize

Array = jax.Array
Cache = dict[str, dict[str, Array]]
# With fewer rows (decoding one row) XLA:CPU's bfloat16 products are up to ~13x slower than float32
# ones (512 x 32064, 1 row: 27.9 vs 2.1 ms; 2 rows: equal; 4 rows: 2.5 vs 7.0 ms), so
# `matmul_dtype` applies from here on.
MIXED_MIN_ROWS = 4
QUANTIZED = ("kernel_int8", "kernel_int4", "scale")


@dataclasses.dataclass(frozen=True)
class Phi3Config:
    """Architecture hyper-parameters; `from_hf`/`to_hf_dict` translate transformers' config."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_type: str = "default"  # "default" | "longrope"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    rope_factor: float | None = None
    rope_attention_factor: float | None = None
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 32000
    pad_token_id: int | None = 32000

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_type == "longrope":
            want = int(self.dim_head * self.partial_rotary_factor) // 2
            for name in ("short_factor", "long_factor"):
                if len(getattr(self, name) or ()) != want:
                    raise ValueError(f"longrope needs {name} of length {want} (rotary_dim / 2)")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | Any, source: str = "config") -> Phi3Config:
        """From a `config.json` dict or a `transformers.Phi3Config`; `source` (e.g. the file's
        path) names it in errors, which also name the key.

        Reads current (`rope_parameters`) and legacy layouts the way transformers normalizes
        them, without importing transformers: `rope_scaling` with `type` "su" or "yarn" (the
        April-2024 Phi-3-128k configs) reads as "longrope"; `rope_theta` and
        `partial_rotary_factor` may sit at top level; `original_max_position_embeddings` comes
        from the top level (where transformers' Phi-3 takes it from, also when the rope dict
        has one).
        """
        d = dict(hf if isinstance(hf, Mapping) else hf.to_dict())
        if d.get("model_type", "phi3") != "phi3":
            raise ValueError(f"{source}: model_type {d['model_type']!r}, expected 'phi3'")
        key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = d.get(key) or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"{source}: {key} must be a dict, got {rope!r}")
        type_key = "rope_type" if "rope_type" in rope else "type"
        raw_type = rope.get(type_key, "default")
        rope_type = "longrope" if raw_type in ("su", "yarn") else raw_type
        if rope_type not in ("default", "longrope"):
            raise ValueError(f"{source}: {key}.{type_key} {raw_type!r} is not supported "
                             "(default or longrope; legacy su / yarn read as longrope)")
        try:
            partial = float(rope.get("partial_rotary_factor",
                                     d.get("partial_rotary_factor", 1.0)))
            factors = {name: None if rope.get(name) is None else
                       tuple(float(x) for x in rope[name])
                       for name in ("short_factor", "long_factor")}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {key} holds a non-number ({err})") from err
        if rope_type == "longrope":
            heads = d.get("num_attention_heads", cls.num_attention_heads)
            head_dim = d.get("head_dim") or d.get("hidden_size", cls.hidden_size) // heads
            want = int(head_dim * partial) // 2
            for name, values in factors.items():
                if values is None or len(values) != want:
                    got = "is missing" if values is None else f"has {len(values)} factors"
                    raise ValueError(
                        f"{source}: {key}.{name} {got}; longrope needs {want} (rotary dim / 2: "
                        f"head_dim {head_dim} x partial_rotary_factor {partial} / 2)")
        eos = d.get("eos_token_id", cls.eos_token_id)
        try:
            return cls(**{
                **{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d},
                "num_key_value_heads": d.get("num_key_value_heads") or d.get(
                    "num_attention_heads", cls.num_attention_heads),
                "rope_type": rope_type,
                "rope_theta": float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                "partial_rotary_factor": partial,
                **factors,
                "rope_factor": rope.get("factor"),
                "rope_attention_factor": rope.get("attention_factor"),
                "eos_token_id": tuple(eos) if isinstance(eos, list | tuple) else eos,
            })
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.Phi3Config` reads back to this config."""
        rope: dict[str, Any] = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "short_factor": self.short_factor and list(self.short_factor),
            "long_factor": self.long_factor and list(self.long_factor),
            "factor": self.rope_factor,
            "attention_factor": self.rope_attention_factor,
        }
        if self.rope_type == "longrope":
            rope["original_max_position_embeddings"] = self.original_max_position_embeddings
        plain = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
                 "max_position_embeddings", "original_max_position_embeddings", "sliding_window",
                 "tie_word_embeddings", "bos_token_id", "pad_token_id")
        out = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
        out.update({name: getattr(self, name) for name in plain})
        eos = self.eos_token_id
        out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        out["rope_parameters"] = {k: v for k, v in rope.items() if v is not None}
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        return out


# --- rotary position embedding -------------------------------------------------------------------

def rope_inv_freq(config: Phi3Config, long: bool = False) -> np.ndarray:
    """Inverse frequencies `[rotary_dim // 2]`, float32 as transformers computes them."""
    dim = int(config.dim_head * config.partial_rotary_factor)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base = np.float32(config.rope_theta) ** exponents
    if config.rope_type == "longrope":
        factors = config.long_factor if long else config.short_factor
        base = np.asarray(factors, np.float32) * base
    return (np.float32(1.0) / base).astype(np.float32)


def rope_attention_scale(config: Phi3Config) -> float:
    """LongRoPE's cos/sin multiplier (1.0 for default RoPE)."""
    if config.rope_type != "longrope":
        return 1.0
    if config.rope_attention_factor is not None:
        return float(config.rope_attention_factor)
    original = config.original_max_position_embeddings
    factor = config.rope_factor or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else float(np.sqrt(1 + np.log(factor) / np.log(original)))


def rope_cos_sin(config: Phi3Config, positions: Array) -> tuple[Array, Array]:
    """cos, sin `[batch, seq, rotary_dim]` in float32 for `positions [batch, seq]`.

    LongRoPE picks the long factors for the whole call when max(positions) + 1 exceeds
    `original_max_position_embeddings`, exactly as transformers does.
    """
    inv_freq = jnp.asarray(rope_inv_freq(config))
    if config.rope_type == "longrope":
        seq_len = jnp.max(positions) + 1
        is_long = seq_len > config.original_max_position_embeddings
        inv_freq = jnp.where(is_long, jnp.asarray(rope_inv_freq(config, long=True)), inv_freq)
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = rope_attention_scale(config)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates the first `rotary_dim` features of heads-major `x [batch, heads, seq, head_dim]`."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, None].astype(x.dtype), sin[:, None].astype(x.dtype)
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


# --- modules -------------------------------------------------------------------------------------

def _sub(tree: Mapping | None, key: str) -> Any:
    return None if tree is None else tree.get(key)


def take_rows(x: Array, rows: Array) -> Array:
    """`x [b, t, ...]` at token indices `rows [b, K]` -> `[b, K, ...]`."""
    return jax.vmap(lambda z, i: z[i])(x, rows)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the decoder computes, shared by every module (see `Phi3` for each field)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "blocked"
    attention_block: int = 128
    fresh_cache: bool = False
    matmul_dtype: Any = None


class Dense(nn.Module):
    """Bias-free linear layer `x @ kernel` plus an optional LoRA update; the kernel may be stored
    quantized (`kernel_int8` or `kernel_int4` + `scale`, see `arc_jax.model.quantize`).
    `options.matmul_dtype`: the product's operand dtype, accumulated in float32
    (`arc_jax.model.matmul`); None: `options.dtype`."""

    features: int
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x: Array, lora: Mapping | None = None,
                 lora_config: LoraConfig | None = None) -> Array:
        opts = self.options
        mixed = opts.matmul_dtype is not None and x.size // x.shape[-1] >= MIXED_MIN_ROWS
        operands = opts.matmul_dtype if mixed else opts.dtype
        quantized = {name: self.get_variable("params", name) for name in QUANTIZED
                     if self.has_variable("params", name)}
        if quantized:  # weight-only int8 / int4 (arc_jax.model.quantize), dequantized here
            kernel = dequantize(quantized, operands)
        else:
            kernel = self.param("kernel", nn.initializers.normal(0.02),
                                (x.shape[-1], self.features), opts.param_dtype)
        x = x.astype(opts.dtype)
        if mixed:
            y = mixed_matmul(x, kernel, operands).astype(opts.dtype)
        else:
            y = x @ kernel.astype(operands)
        if lora is not None:
            if lora_config is None:
                raise ValueError("a lora tree needs its lora_config")
            rng = None
            if lora_config.dropout > 0 and self.has_rng("dropout"):
                rng = self.make_rng("dropout")
            y = y + lora_delta(x, lora, lora_config, rng)
        return y


class Embed(nn.Module):
    vocab_size: int
    features: int
    options: ModelOptions = ModelOptions()

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                    (self.vocab_size, self.features), self.options.param_dtype)

    def __call__(self, ids: Array) -> Array:
        return self.embedding.astype(self.options.dtype)[ids]

    def attend(self, x: Array) -> Array:
        """Tied output projection `x [..., d]` -> `[..., vocab]`."""
        dtype = self.options.dtype
        return x.astype(dtype) @ self.embedding.astype(dtype).T


class RMSNorm(nn.Module):
    eps: float
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],),
                            self.options.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        dtype = self.options.dtype
        return weight.astype(dtype) * normed.astype(dtype)


class Attention(nn.Module):
    config: Phi3Config
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x, cos, sin, q_pos, k_valid, positions, cache, lora, lora_config,
                 rows=None):
        """rows: None, or token indices `[b, K]` (no cache): queries and output only there."""
        cfg, d = self.config, self.config.dim_head
        h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        dense = lambda n, name: Dense(n, self.options, name=name)
        qkv = dense((h + 2 * kv) * d, "qkv_proj")(x, _sub(lora, "qkv_proj"), lora_config)
        b, t = x.shape[:2]
        # Heads-major [b, heads, t, d] from here on: the layout attention and the cache read.
        q, k, v = jnp.split(qkv, [h * d, (h + kv) * d], axis=-1)
        k, v = (z.reshape(b, t, kv, d).transpose(0, 2, 1, 3) for z in (k, v))
        k = apply_rope(k, cos, sin)
        if rows is not None:
            out, t = self._at_rows(q, k, v, cos, sin, k_valid, rows), rows.shape[1]
        else:
            out, cache = self._at_all(q, k, v, cos, sin, q_pos, k_valid, positions, cache)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, h * d)
        out = dense(cfg.hidden_size, "o_proj")(out, _sub(lora, "o_proj"), lora_config)
        return out, cache

    def _at_all(self, q, k, v, cos, sin, q_pos, k_valid, positions, cache):
        """Queries `q [b, t, h·d]` at every token -> `[b, h, t, d]`, and the updated cache."""
        cfg, d = self.config, self.config.dim_head
        b, t = q.shape[:2]
        q = apply_rope(q.reshape(b, t, cfg.num_attention_heads, d).transpose(0, 2, 1, 3),
                       cos, sin)
        if cache is not None:  # k stored [b, kv, d, slots], v [b, kv, slots, d] (init_cache)
            # A single token (one row, one position) is written twice (same slot, same value):
            # the write then stays a scatter, which XLA:CPU updates in place, where the
            # dynamic-update-slice it becomes otherwise made XLA copy the layer's whole cache
            # about three times per decoding step.
            n = 2 if positions.size == 1 else 1
            again = lambda x, axis: jnp.concatenate([x] * n, axis=axis)
            write_k = jax.vmap(lambda c, new, p: c.at[:, :, again(p, 0)].set(
                again(new, 1).swapaxes(1, 2).astype(c.dtype)))
            write_v = jax.vmap(lambda c, new, p: c.at[:, again(p, 0)].set(
                again(new, 1).astype(c.dtype)))
            cache = {"k": write_k(cache["k"], k, positions),
                     "v": write_v(cache["v"], v, positions)}
        if cache is None or self.options.fresh_cache:  # attend over this call's keys by index
            valid = k_valid if cache is None else positions >= 0
            out = self._causal(q, k, v, valid)
        else:
            k, v = (cache["k"].astype(self.options.dtype),
                    cache["v"].astype(self.options.dtype))
            k_pos = jnp.arange(v.shape[2])[None]
            out = attend_cache(q, k, v, attention_mask(q_pos, k_pos, None, cfg.sliding_window))
        return out, cache

    def _at_rows(self, q, k, v, cos, sin, k_valid, rows):
        """Queries `q [b, t, h·d]` at `rows [b, K]` only, against all keys -> `[b, h, K, d]`."""
        cfg, d = self.config, self.config.dim_head
        b, k_rows = rows.shape
        q = take_rows(q, rows).reshape(b, k_rows, cfg.num_attention_heads, d).transpose(0, 2, 1, 3)
        q = apply_rope(q, take_rows(cos, rows), take_rows(sin, rows))
        return attend_rows(q, k, v, rows, k_valid, cfg.sliding_window,
                           self.options.attention_block)

    def _causal(self, q, k, v, valid):
        """Heads-major q `[b, h, t, d]`, k, v `[b, kv, t, d]` -> `[b, h, t, d]`."""
        window, block = self.config.sliding_window, self.options.attention_block
        if self.options.attention == "blocked" and q.shape[2] > block:
            return causal_attention_heads(q, k, v, valid, window, block)
        tokens_major = lambda x: x.transpose(0, 2, 1, 3)
        q, k, v = tokens_major(q), tokens_major(k), tokens_major(v)
        if self.options.attention == "dot_product":
            return tokens_major(dot_product_causal(q, k, v, valid, window))
        index = jnp.arange(q.shape[1])[None]
        return tokens_major(attend(q, k, v, attention_mask(index, index, valid, window)))


class MLP(nn.Module):
    config: Phi3Config
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x, lora, lora_config):
        cfg = self.config
        act = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "gelu_new": jax.nn.gelu,
               "relu": jax.nn.relu}[cfg.hidden_act]
        gate_up = Dense(2 * cfg.intermediate_size, self.options, name="gate_up_proj")(
            x, _sub(lora, "gate_up_proj"), lora_config)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return Dense(cfg.hidden_size, self.options, name="down_proj")(
            up * act(gate), _sub(lora, "down_proj"), lora_config)


class DecoderLayer(nn.Module):
    config: Phi3Config
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x, cos, sin, q_pos, k_valid, positions, cache, lora, lora_config,
                 rows=None):
        eps, opts = self.config.rms_norm_eps, self.options
        h = RMSNorm(eps, opts, name="input_layernorm")(x)
        h, cache = Attention(self.config, opts, name="self_attn")(
            h, cos, sin, q_pos, k_valid, positions, cache, _sub(lora, "self_attn"), lora_config,
            rows)
        if rows is not None:  # from here on only the rows: [b, K, d]
            x = take_rows(x, rows)
        x = x + h
        h = RMSNorm(eps, opts, name="post_attention_layernorm")(x)
        x = x + MLP(self.config, opts, name="mlp")(h, _sub(lora, "mlp"), lora_config)
        return x, cache


class Phi3Model(nn.Module):
    """Embedding, decoder stack and final norm (HF `Phi3Model`)."""

    config: Phi3Config
    options: ModelOptions = ModelOptions()

    def setup(self):
        cfg, opts = self.config, self.options
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, opts)
        layer = nn.remat(DecoderLayer) if opts.remat else DecoderLayer
        self.layers = [layer(cfg, opts) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, opts)

    def __call__(self, input_ids, positions, attention_mask, cache, lora, lora_config, rows=None):
        b, t = input_ids.shape
        if rows is not None and cache is not None:
            raise ValueError("rows (hidden states at some tokens only) is for calls without cache")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if cache is None:
            # Mask by token index and padding, as transformers does without a cache.
            q_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
            k_valid = attention_mask
        else:
            # Cache slot == position: a query sees every slot at or before its position.
            q_pos, k_valid = positions, None
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, positions)
        new_cache = None if cache is None else {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            name = f"layers_{i}"
            x, layer_cache = layer(x, cos, sin, q_pos, k_valid, positions, _sub(cache, name),
                                   _sub(lora, name), lora_config, rows if i == last else None)
            if cache is not None:
                new_cache[name] = layer_cache
        return self.norm(x), new_cache


class Phi3(nn.Module):
    """Phi-3 causal LM (HF `Phi3ForCausalLM`).

    `dtype` is the compute dtype; `param_dtype` the dtype `init` creates (loaded params keep
    theirs and are cast to `dtype` on use). Norm statistics and softmax run in float32.
    `remat` recomputes each decoder layer's activations in the backward pass.
    `attention` (for calls without a cache; cached decoding always uses `attend_cache`):
    "blocked" (default) runs sequences longer than `attention_block` in causal query blocks with
    a flash-style backward (`arc_jax.model.attention.causal_attention`); "xla" is the reference with
    full score matrices; "dot_product" is `jax.nn.dot_product_attention` (cuDNN on GPU).
    `fresh_cache=True` declares that a cache passed in holds nothing before this call's tokens
    (a prefill, slot = position, padding at position -1), so the call attends over its own keys
    with `attention` instead of over every cache slot.
    `matmul_dtype` (e.g. bfloat16 with float32 `dtype`): the linear layers' operand dtype, products
    accumulated and returned in float32 (`arc_jax.model.matmul.mixed_matmul`); None: `dtype`.
    """

    config: Phi3Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "blocked"
    attention_block: int = 128
    fresh_cache: bool = False
    matmul_dtype: Any = None

    def __post_init__(self):
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {self.attention!r}")
        super().__post_init__()

    def setup(self):
        options = ModelOptions(self.dtype, self.param_dtype, self.remat, self.attention,
                               self.attention_block, self.fresh_cache, self.matmul_dtype)
        self.model = Phi3Model(self.config, options)
        if not self.config.tie_word_embeddings:
            self.lm_head = Dense(self.config.vocab_size, options)

    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        lora: Mapping | None = None,
        lora_config: LoraConfig | None = None,
        cache: Cache | None = None,
        return_hidden: bool = False,
        rows: Array | None = None,
    ) -> Array | tuple[Array, Cache]:
        """Logits `[batch, seq, vocab]` (float32), or final normed hidden `[batch, seq, d]`.

        input_ids, positions, attention_mask: `[batch, seq]`; positions default to 0..seq-1,
        attention_mask (1 = real token, right padding) only matters without a cache.
        With `cache` (see `init_cache`), K/V are written at slot = position and
        `(output, new_cache)` is returned. LoRA dropout runs only when `rngs={"dropout": key}`.
        `rows [batch, K]` (token indices; no cache) returns the output at those tokens only,
        `[batch, K, ...]`: the last layer then computes its queries, output projection and MLP
        at those K tokens instead of all `seq` (a train step needs only the loss positions).
        """
        hidden, new_cache = self.model(input_ids, positions, attention_mask, cache,
                                       _sub(lora, "model"), lora_config, rows)
        out = hidden if return_hidden else self.logits(hidden, lora, lora_config)
        return out if cache is None else (out, new_cache)

    def logits(self, hidden: Array, lora: Mapping | None = None,
               lora_config: LoraConfig | None = None) -> Array:
        """Vocabulary projection of `hidden [..., d]` -> float32 `[..., vocab]`."""
        if self.config.tie_word_embeddings:
            out = self.model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden, _sub(lora, "lm_head"), lora_config)
        return out.astype(jnp.float32)


def project_logits(model: Phi3, params: Mapping, hidden: Array, lora: Mapping | None = None,
                   lora_config: LoraConfig | None = None) -> Array:
    """`hidden [..., d]` (from `return_hidden=True`) -> float32 logits `[..., vocab]`."""
    return model.apply({"params": params}, hidden, lora, lora_config, method=Phi3.logits)


def abstract_params(model: Phi3) -> Any:
    """Parameter tree of `jax.ShapeDtypeStruct`, built without allocating."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def init_cache(config: Phi3Config, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """Empty KV cache: per layer `k [batch, kv_heads, head_dim, max_len]` and
    `v [batch, kv_heads, max_len, head_dim]`: the layouts in which a decoding step's two attention
    products read them as they are (XLA:CPU otherwise copies the whole K cache into `[d, slots]`
    layout on every step: batch-8 decoding runs 1.9x faster without that copy)."""
    kv, d = config.num_key_value_heads, config.dim_head
    layer = lambda: {"k": jnp.zeros((batch, kv, d, max_len), dtype),
                     "v": jnp.zeros((batch, kv, max_len, d), dtype)}
    return {f"layers_{i}": layer() for i in range(config.num_hidden_layers)}
