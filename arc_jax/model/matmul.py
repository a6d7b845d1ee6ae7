"""`x @ kernel` with bfloat16 operands and float32 accumulation and result (`model.matmul_dtype`).

On a CPU with AMX (Sapphire Rapids) XLA:CPU runs bfloat16 x bfloat16 -> float32 products 2-4x
faster than float32 ones, but only in row-major "NN" layout (`[m, k] @ [k, n]`): given a
transposed operand (`dy @ kernel.T`, `x.T @ dy`) it reads it strided and is slower than float32.
So the backward pass transposes that operand into its own buffer first, a copy the size of the
kernel (or of `x`) per product, small next to the product itself. The kernel's gradient is only
computed when something uses it (XLA removes it for a frozen base under LoRA).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _nn(a: Array, b: Array, dtype) -> Array:
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _own(x: Array) -> Array:
    """`x` in a buffer of its own (XLA would otherwise fold a transpose into the product)."""
    return jax.lax.optimization_barrier(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x: Array, kernel: Array, dtype) -> Array:
    """`x [..., in] @ kernel [in, out]` -> float32 `[..., out]`, both operands cast to `dtype`."""
    return _nn(x, kernel, dtype)


def _fwd(x, kernel, dtype):
    return _nn(x, kernel, dtype), (x.astype(dtype), kernel.astype(dtype), jnp.zeros((), x.dtype),
                                   jnp.zeros((), kernel.dtype))


def _bwd(dtype, res, dy):
    x, kernel, x_like, kernel_like = res
    dx = _nn(dy, _own(kernel.T), dtype)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dkernel = _nn(_own(x2.T), dy2, dtype)
    return dx.astype(x_like.dtype), dkernel.astype(kernel_like.dtype)


mixed_matmul.defvjp(_fwd, _bwd)
