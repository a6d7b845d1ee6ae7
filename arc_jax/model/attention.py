"""Attention kernels in jnp: the reference, a blockwise causal one with a flash-style backward, and
`jax.nn.dot_product_attention` (cuDNN on GPU).

`causal_attention` runs a prompt (no KV cache) in query blocks of `block` rows: block i attends to
keys `[0, (i+1)·block)` only, so the masked upper triangle is never computed, and no `[T, T]` score
matrix exists — each block's `[block, (i+1)·block]` scores live only inside it. Its custom VJP
saves the block's output and log-sum-exp (not the probabilities) and recomputes the scores in the
backward pass, as FlashAttention does. On a 2-core CPU it is 2.9x (T=1024) to 5.4x (T=4096) faster
than `attend` (forward + backward); see experiments/benchmarks/README.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32
NEG = jnp.finfo(F32).min
IMPLEMENTATIONS = ("blocked", "xla", "dot_product")
MAX_BLOCKS = 16


def attention_mask(q_pos: Array, k_pos: Array, k_valid: Array | None,
                   sliding_window: int | None) -> Array:
    """Boolean `[batch, q, k]`: causal (and windowed) by index, padded keys excluded.

    q_pos: `[batch, q]`; k_pos: `[batch | 1, k]`; k_valid: `[batch, k]` or None.
    """
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    if k_valid is not None:
        mask &= k_valid[:, None, :].astype(bool)
    return mask


def attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Reference grouped-query attention; softmax in float32, full `[q, k]` scores.

    q: `[batch, q, heads, d]`; k, v: `[batch, k, kv_heads, d]`; mask: `[batch, q, k]`.
    Returns `[batch, q, heads, d]`.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32)
    logits = jnp.where(mask[:, None, None], logits * d**-0.5, NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def attend_cache(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """`attend` in the layouts of the KV cache, so neither product transposes the cache.

    q: `[batch, heads, q, d]`; k: `[batch, kv_heads, d, slots]`; v: `[batch, kv_heads, slots, d]`;
    mask: `[batch, q, slots]`. Returns `[batch, heads, q, d]`.
    """
    b, h, t, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b, kv, h // kv, t, d)
    logits = jnp.einsum("bkgtd,bkds->bkgts", q, k, preferred_element_type=F32)
    logits = jnp.where(mask[:, None, None], logits * d**-0.5, NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v).reshape(b, h, t, d)


# --- one query block: q [b, kv, g, tq, d] (pre-scaled), k, v [b, kv, s, d], mask [b, tq, s] ------

def _scores(q: Array, k: Array, mask: Array) -> Array:
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=F32)
    return jnp.where(mask[:, None, None], s, NEG)


def _block_fwd(q, k, v, mask):
    s = _scores(q, k, mask)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    norm = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v, preferred_element_type=F32)
    o = (o / norm).astype(q.dtype)
    return o, (q, k, v, mask, o, (m + jnp.log(norm))[..., 0])


def _block_bwd(res, do):
    q, k, v, mask, o, lse = res
    p = jnp.exp(_scores(q, k, mask) - lse[..., None])
    dv = jnp.einsum("bkgts,bkgtd->bksd", p.astype(do.dtype), do, preferred_element_type=F32)
    dp = jnp.einsum("bkgtd,bksd->bkgts", do, v, preferred_element_type=F32)
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=True)
    ds = (p * (dp - delta)).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, k, preferred_element_type=F32)
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds, q, preferred_element_type=F32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@jax.custom_vjp
def _block_attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    return _block_fwd(q, k, v, mask)[0]


_block_attend.defvjp(_block_fwd, _block_bwd)


def causal_attention(q: Array, k: Array, v: Array, k_valid: Array | None,
                     sliding_window: int | None = None, block: int = 256) -> Array:
    """Causal attention by token index (query i sees keys 0..i), in query blocks.

    q: `[batch, t, heads, d]`; k, v: `[batch, t, kv_heads, d]`; k_valid: `[batch, t]` or None.
    Equals `attend(q, k, v, attention_mask(arange, arange, k_valid, sliding_window))`.
    Returns `[batch, t, heads, d]`. See `causal_attention_heads` (what the model calls).
    """
    heads = lambda x: x.transpose(0, 2, 1, 3)
    return heads(causal_attention_heads(heads(q), heads(k), heads(v), k_valid, sliding_window,
                                        block))


def causal_attention_heads(q: Array, k: Array, v: Array, k_valid: Array | None,
                           sliding_window: int | None = None, block: int = 256) -> Array:
    """`causal_attention` in heads-major layout: q `[batch, heads, t, d]`, k, v
    `[batch, kv_heads, t, d]`, returns `[batch, heads, t, d]`.

    Blocks are `block` rows, or `ceil(t / MAX_BLOCKS)` when that is larger. The inputs are
    materialised once (an optimisation barrier): otherwise XLA fuses their producers (RoPE, the
    layout change) into every block's key-prefix slice and recomputes them per block.
    """
    b, h, t, d = q.shape
    kv = k.shape[1]
    block = max(block, -(-t // MAX_BLOCKS))  # bounded program size for long buckets
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, kv, h // kv, t, d)
    q, k, v = jax.lax.optimization_barrier((q, k, v))
    pos = jnp.arange(t)[None]
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        valid = None if k_valid is None else k_valid[:, :stop]
        mask = attention_mask(pos[:, start:stop], pos[:, :stop], valid, sliding_window)
        mask = jnp.broadcast_to(mask, (b, stop - start, stop))
        outs.append(_block_attend(q[:, :, :, start:stop], k[:, :, :stop], v[:, :, :stop], mask))
    return jnp.concatenate(outs, axis=3).reshape(b, h, t, d)


def attend_rows(q: Array, k: Array, v: Array, mask: Array, block: int = 128) -> Array:
    """Some query rows against all keys, `block` rows at a time with the flash-style backward.

    q: `[batch, heads, K, d]`; k, v: `[batch, kv_heads, T, d]`; mask: `[batch, K, T]`.
    Returns `[batch, heads, K, d]`; no more than `[block, T]` scores per head exist at once.
    """
    b, h, n, d = q.shape
    kv = k.shape[1]
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, kv, h // kv, n, d)
    outs = [_block_attend(q[:, :, :, i:i + block], k, v, mask[:, i:i + block])
            for i in range(0, n, block)]
    return jnp.concatenate(outs, axis=3).reshape(b, h, n, d)


def dot_product_causal(q: Array, k: Array, v: Array, k_valid: Array | None,
                       sliding_window: int | None = None) -> Array:
    """`jax.nn.dot_product_attention`, causal, right-padded keys given by `k_valid [batch, t]`.

    On GPU it picks cuDNN's fused kernel when it can; on CPU it is the XLA (materialising) path.
    Shapes as `causal_attention`.
    """
    lengths = None if k_valid is None else jnp.sum(k_valid, axis=-1).astype(jnp.int32)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, key_value_seq_lengths=lengths, local_window_size=window)
