"""Attention kernels in jnp: the reference, a blockwise causal one with a flash-style backward, and
`jax.nn.dot_product_attention` (cuDNN on GPU).

`causal_attention` runs a prompt (no KV cache) in query blocks of `block` rows: block i attends to
keys `[0, (i+1)·block)` only, so the masked upper triangle is never computed, and no `[T, T]` score
matrix exists — each block's `[block, (i+1)·block]` scores live only inside it. Its custom VJP
saves the block's output and log-sum-exp (not the probabilities) and recomputes the scores in the
backward pass, as FlashAttention does. Blocks run one after the other, so memory grows with
rows x length, not length squared. Timings: experiments/benchmarks/README.md.
"""

from __future__ import annotations

import functools

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


# --- blockwise attention with a flash-style backward ------------------------------------------
#
# Query rows run in blocks ("spans"); block i sees keys [0, k_stop_i) only, so the causal upper
# triangle is never computed. Each block's [rows, k_stop] scores live only inside it: the blocks
# are chained through optimisation barriers, forward and backward, because XLA otherwise
# schedules independent blocks side by side and keeps all their scores alive at once (memory
# quadratic in the length). The backward recomputes the scores from the saved log-sum-exp, as
# FlashAttention does; no mask or probability matrix is saved.

Span = tuple[int, int, int]  # (query start, query stop, key stop)


def _block_mask(q_index, k_stop, k_segment, q_segment, window):
    """Boolean `[b, rows, k_stop]`: key j visible to a query at token index i when j <= i,
    i - j < window, key j is real (segment > 0) and, when packing, in the query's segment."""
    k_index = jnp.arange(k_stop)[None, None, :]
    diff = q_index[:, :, None] - k_index
    mask = (diff >= 0) & (k_segment[:, None, :k_stop] > 0)
    if window is not None:
        mask &= diff < window
    if q_segment is not None:
        mask &= q_segment[:, :, None] == k_segment[:, None, :k_stop]
    return mask


def _after(x: Array, previous: Array | None) -> Array:
    """`x`, made to depend on `previous` (the last block's result), so that XLA runs the blocks
    one after the other: XLA:CPU drops optimisation barriers before it schedules."""
    if previous is None:
        return x
    zero = jnp.sum(previous.reshape(-1)[:1]).astype(x.dtype) * 0
    return x + zero


def _block_scores(q, k, mask):
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=F32)
    return jnp.where(mask[:, None, None], s, NEG)


def _spans_fwd(q, k, v, q_index, k_segment, q_segment, window, spans):
    outs, lses = [], []
    out = None
    for start, stop, k_stop in spans:
        q_blk, k_blk, v_blk = q[:, :, :, start:stop], k[:, :, :k_stop], v[:, :, :k_stop]
        q_blk = _after(q_blk, out)
        q_seg = None if q_segment is None else q_segment[:, start:stop]
        mask = _block_mask(q_index[:, start:stop], k_stop, k_segment, q_seg, window)
        s = _block_scores(q_blk, k_blk, mask)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        norm = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v_blk, preferred_element_type=F32)
        out = (o / norm).astype(q.dtype)
        outs.append(out)
        lses.append((m + jnp.log(norm))[..., 0])
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _span_attention(q, k, v, q_index, k_segment, q_segment, window, spans):
    return _spans_fwd(q, k, v, q_index, k_segment, q_segment, window, spans)[0]


def _span_attention_fwd(q, k, v, q_index, k_segment, q_segment, window, spans):
    o, lse = _spans_fwd(q, k, v, q_index, k_segment, q_segment, window, spans)
    return o, (q, k, v, q_index, k_segment, q_segment, o, lse)


def _span_attention_bwd(window, spans, res, do):
    q, k, v, q_index, k_segment, q_segment, o, lse = res
    dk = jnp.zeros(k.shape, F32)
    dv = jnp.zeros(v.shape, F32)
    dqs = []
    for start, stop, k_stop in spans:
        rows = slice(start, stop)
        q_blk, do_blk, o_blk = q[:, :, :, rows], do[:, :, :, rows], o[:, :, :, rows]
        q_blk = _after(q_blk, dk)
        k_blk, v_blk = k[:, :, :k_stop], v[:, :, :k_stop]
        q_seg = None if q_segment is None else q_segment[:, rows]
        mask = _block_mask(q_index[:, rows], k_stop, k_segment, q_seg, window)
        p = jnp.exp(_block_scores(q_blk, k_blk, mask) - lse[:, :, :, rows, None])
        dv = dv.at[:, :, :k_stop].add(jnp.einsum(
            "bkgts,bkgtd->bksd", p.astype(do.dtype), do_blk, preferred_element_type=F32))
        dp = jnp.einsum("bkgtd,bksd->bkgts", do_blk, v_blk, preferred_element_type=F32)
        delta = jnp.sum(do_blk.astype(F32) * o_blk.astype(F32), axis=-1, keepdims=True)
        ds = (p * (dp - delta)).astype(q.dtype)
        dqs.append(jnp.einsum("bkgts,bksd->bkgtd", ds, k_blk,
                              preferred_element_type=F32).astype(q.dtype))
        dk = dk.at[:, :, :k_stop].add(jnp.einsum(
            "bkgts,bkgtd->bksd", ds, q_blk, preferred_element_type=F32))
    return (jnp.concatenate(dqs, axis=3), dk.astype(k.dtype), dv.astype(v.dtype),
            None, None, None)


_span_attention.defvjp(_span_attention_fwd, _span_attention_bwd)


def _segments(k_valid: Array | None, b: int, t: int) -> Array:
    if k_valid is None:
        return jnp.ones((b, t), jnp.int32)
    return k_valid.astype(jnp.int32)


def causal_attention(q: Array, k: Array, v: Array, k_valid: Array | None,
                     sliding_window: int | None = None, block: int = 256,
                     segments: Array | None = None) -> Array:
    """Causal attention by token index (query i sees keys 0..i), in query blocks.

    q: `[batch, t, heads, d]`; k, v: `[batch, t, kv_heads, d]`; k_valid: `[batch, t]` or None.
    Equals `attend(q, k, v, attention_mask(arange, arange, k_valid, sliding_window))`.
    Returns `[batch, t, heads, d]`. See `causal_attention_heads` (what the model calls).
    """
    heads = lambda x: x.transpose(0, 2, 1, 3)
    return heads(causal_attention_heads(heads(q), heads(k), heads(v), k_valid, sliding_window,
                                        block, segments))


def causal_attention_heads(q: Array, k: Array, v: Array, k_valid: Array | None,
                           sliding_window: int | None = None, block: int = 256,
                           segments: Array | None = None) -> Array:
    """`causal_attention` in heads-major layout: q `[batch, heads, t, d]`, k, v
    `[batch, kv_heads, t, d]`, returns `[batch, heads, t, d]`.

    segments `[batch, t]` (int, 0 = padding), for rows packed with several sequences: a query
    then sees only keys of its own segment (k_valid is ignored). Blocks are `block` rows, or
    `ceil(t / MAX_BLOCKS)` when that is larger. The inputs are materialised once (an
    optimisation barrier): otherwise XLA fuses their producers (RoPE, the layout change) into
    every block's key-prefix slice and recomputes them per block.
    """
    b, h, t, d = q.shape
    kv = k.shape[1]
    block = max(block, -(-t // MAX_BLOCKS))  # bounded program size for long buckets
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, kv, h // kv, t, d)
    q, k, v = jax.lax.optimization_barrier((q, k, v))
    spans = tuple((s, min(s + block, t), min(s + block, t)) for s in range(0, t, block))
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_segment = _segments(k_valid, b, t) if segments is None else segments.astype(jnp.int32)
    q_segment = None if segments is None else k_segment
    out = _span_attention(q, k, v, index, k_segment, q_segment, sliding_window, spans)
    return out.reshape(b, h, t, d)


def attend_rows(q: Array, k: Array, v: Array, rows: Array, k_valid: Array | None,
                sliding_window: int | None = None, block: int = 128,
                segments: Array | None = None) -> Array:
    """Queries at token indices `rows [batch, K]` against all keys, causal by token index,
    `block` rows at a time with the flash-style backward.

    q: `[batch, heads, K, d]`; k, v: `[batch, kv_heads, T, d]`; k_valid / segments as in
    `causal_attention_heads`. Returns `[batch, heads, K, d]`; no more than `[block, T]` scores
    per head exist at once.
    """
    b, h, n, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, kv, h // kv, n, d)
    spans = tuple((s, min(s + block, n), t) for s in range(0, n, block))
    k_segment = _segments(k_valid, b, t) if segments is None else segments.astype(jnp.int32)
    q_segment = None if segments is None else jax.vmap(lambda s, i: s[i])(k_segment, rows)
    out = _span_attention(q, k, v, rows.astype(jnp.int32), k_segment, q_segment,
                          sliding_window, spans)
    return out.reshape(b, h, n, d)


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
