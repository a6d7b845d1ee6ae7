"""LoRA adapters as their own plain dict tree over a frozen base.

The tree mirrors the base params down to each targeted layer, which holds `{"a": [in, r],
"b": [r, out]}`; the model adds `scale * (dropout(x) @ a) @ b` to `x @ kernel` without touching the
base. Gradients and optimizer state therefore exist for this tree only
(`jax.grad(loss, argnums=<lora arg>)`), and a stack of adapters with a leading task axis runs over
one shared base with `jax.vmap(..., in_axes=(None, 0))` (base broadcast, adapters mapped).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from arc_jax.model.quantize import KERNELS, kernel_shape

Array = jax.Array
DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoraTargetError(ValueError):
    """A `LoraConfig.targets` entry names no layer of the base that holds a kernel."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha and dropout of an adapter; a static pytree (no leaves), safe to pass to jit."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def kernel_names(base_params: Mapping) -> list[str]:
    """Names (sorted, unique) of the base layers that hold a kernel: what `targets` may name."""
    names = set()

    def walk(tree):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                if any(k in value for k in KERNELS):
                    names.add(key)
                walk(value)

    walk(base_params)
    return sorted(names)


def check_targets(base_params: Mapping, targets: Sequence[str]) -> None:
    """Raises `LoraTargetError` naming every entry of `targets` that matches no kernel layer
    (a typo would otherwise train the other targets only, silently)."""
    known = kernel_names(base_params)
    unknown = [t for t in targets if t not in known]
    if not targets:
        problem = "is empty"
    elif len(unknown) == 1:
        problem = f"{unknown[0]!r} matches no layer"
    elif unknown:
        problem = f"{', '.join(map(repr, unknown))} match no layer"
    else:
        return
    raise LoraTargetError(f"LoRA targets {tuple(targets)}: {problem}; the base's layers with a "
                          f"kernel are {known} (config.lora.targets)")


def lora_sites(base_params: Mapping, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """Paths (sorted) of the base layers named in `targets` that hold a kernel (plain or
    quantized, see `arc_jax.model.quantize`)."""
    found = []

    def walk(tree, path):
        for key, value in tree.items():
            if not isinstance(value, Mapping):
                continue
            if key in targets and any(k in value for k in KERNELS):
                found.append((*path, key))
            else:
                walk(value, (*path, key))

    walk(base_params, ())
    return sorted(found)


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_lora(key: Array, base_params: Mapping, config: LoraConfig,
              dtype: Any = jnp.float32) -> dict:
    """Fresh adapters for every targeted base kernel `[in, out]`.

    `a [in, r]` ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform default), `b [r, out]` zero, so
    the adapted model equals the base at init. Raises `LoraTargetError` for a target that
    matches no layer.
    """
    check_targets(base_params, config.targets)
    sites = lora_sites(base_params, config.targets)
    tree: dict = {}
    for site, k in zip(sites, jax.random.split(key, len(sites)), strict=True):
        fan_in, fan_out = kernel_shape(_get(base_params, site))
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(k, (fan_in, config.rank), dtype, -bound, bound)
        _set(tree, site, {"a": a, "b": jnp.zeros((config.rank, fan_out), dtype)})
    return tree


def init_lora_stack(key: Array, base_params: Mapping, config: LoraConfig, num: int,
                    dtype: Any = jnp.float32) -> dict:
    """`num` independent adapters stacked on a leading task axis."""
    keys = jax.random.split(key, num)
    return jax.vmap(lambda k: init_lora(k, base_params, config, dtype))(keys)


def stack_lora(trees: Sequence[Mapping]) -> dict:
    """Stack adapters on a new leading task axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_lora(stacked: Mapping, index: int) -> dict:
    """The adapter at `index` of a stacked tree."""
    return jax.tree.map(lambda x: x[index], stacked)


def lora_delta(x: Array, site: Mapping, config: LoraConfig, rng: Array | None = None) -> Array:
    """`scale * (dropout(x) @ a) @ b` for `x [..., in]` -> `[..., out]`; no dropout without rng."""
    if rng is not None and config.dropout > 0:
        keep = jax.random.bernoulli(rng, 1.0 - config.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
    a, b = site["a"].astype(x.dtype), site["b"].astype(x.dtype)
    return _low_rank(x, a, b, float(config.scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x: Array, a: Array, b: Array, scale: float) -> Array:
    """`((x @ a) * scale) @ b` for `x [..., in]`, `a [in, r]`, `b [r, out]`.

    Its own VJP because autodiff's backward is slow on XLA:CPU: for the weight gradients, which
    contract over tokens, XLA copies the whole `[tokens, out]` cotangent into transposed layout.
    Here each such product transposes its *small* operand (`[tokens, r]` or `[tokens, in]`).
    LoRA's share of a `[4096, 512] -> 3072` layer's forward + backward on 2 CPU cores: 265 ms
    with autodiff, 61 ms with this rule (base alone: 154 ms).
    """
    return ((x @ a) * scale) @ b


def _low_rank_fwd(x, a, b, scale):
    h = (x @ a) * scale
    return h @ b, (x, a, b, h)


def _low_rank_bwd(scale, res, dy):
    x, a, b, h = res
    flat = lambda z: z.reshape(-1, z.shape[-1])
    db = flat(h).T @ flat(dy)  # [r, out]
    dh = (dy @ b.T) * scale  # [..., r]
    da = flat(x).T @ flat(dh)  # [in, r]
    return dh @ a.T, da, db


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def merge_lora(base_params: Mapping, lora: Mapping, config: LoraConfig) -> dict:
    """Base params with `kernel + scale * a @ b` folded in (computed in float32), for export."""
    merged = jax.tree.map(lambda x: x, dict(base_params))

    def fold(tree, path):
        for key, value in tree.items():
            if "a" in value and "b" in value:
                layer = dict(_get(merged, (*path, key)))
                kernel = layer["kernel"]
                delta = value["a"].astype(jnp.float32) @ value["b"].astype(jnp.float32)
                layer["kernel"] = (kernel.astype(jnp.float32) + config.scale * delta).astype(
                    kernel.dtype)
                _set(merged, (*path, key), layer)
            else:
                fold(value, (*path, key))

    fold(lora, ())
    return merged


def num_params(tree: Any) -> int:
    """Total element count of a tree's leaves."""
    return sum(x.size for x in jax.tree.leaves(tree))
