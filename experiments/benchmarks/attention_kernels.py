"""Causal attention with right padding, forward and forward + backward: arc_jax's reference
(`attend`, full float32 scores), blockwise (`causal_attention`, flash-style backward),
`jax.nn.dot_product_attention`, and PyTorch's `scaled_dot_product_attention` for context.

    python -m experiments.benchmarks.attention_kernels --shapes 4x1024,1x4096

Shapes are batch x seq with 8 heads of 64; rows are padded to 75%-100% of the sequence.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from arc_jax.model.attention import attend, attention_mask, causal_attention, dot_product_causal
from experiments.benchmarks import peers
from experiments.benchmarks.common import print_table, write_results

HEADS, DIM = 8, 64


def _jax_fns(name, valid):
    b, t = valid.shape
    if name == "reference":
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = attention_mask(pos, pos, valid, None)
        return lambda q, k, v: attend(q, k, v, mask)
    if name == "blocked":
        return lambda q, k, v: causal_attention(q, k, v, valid)
    return lambda q, k, v: dot_product_causal(q, k, v, valid)


def _torch_times(q, k, v, valid, repeats):
    import torch

    torch.set_num_threads(os.cpu_count())
    q, k, v = (torch.from_numpy(np.asarray(x)).transpose(1, 2).requires_grad_() for x in (q, k, v))
    t = q.shape[2]
    mask = torch.from_numpy(np.asarray(attention_mask(
        jnp.arange(t)[None], jnp.arange(t)[None], valid, None)))[:, None]
    fwd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def both():
        fwd().mul(v).sum().backward()

    with torch.no_grad():
        f = peers.median(peers.timed(fwd, repeats))
    return f, peers.median(peers.timed(both, repeats))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="4x1024,1x4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(x, (b, t, HEADS, DIM)) for x in keys)
        lengths = np.linspace(t, 0.75 * t, b).astype(int)
        valid = jnp.arange(t)[None] < jnp.asarray(lengths)[:, None]
        base = None
        for name in ("reference", "blocked", "dot_product"):
            fn = _jax_fns(name, valid)
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * v), (0, 1, 2)))
            f, g = (peers.median(peers.timed(
                lambda c=c, x=(q, k, v): jax.block_until_ready(c(*x)), args.repeats))
                for c in (fwd, grad))
            base = base or (f, g)
            rows.append({"impl": f"arc_jax {name}", "batch x seq": shape, "fwd ms": f * 1e3,
                         "fwd+bwd ms": g * 1e3, "fwd+bwd vs reference": round(base[1] / g, 2)})
        f, g = _torch_times(q, k, v, valid, args.repeats)
        rows.append({"impl": "torch sdpa", "batch x seq": shape, "fwd ms": f * 1e3,
                     "fwd+bwd ms": g * 1e3, "fwd+bwd vs reference": round(base[1] / g, 2)})
        print(rows[-4:], flush=True)
    print_table(rows)
    print(f"wrote {write_results('attention_kernels', rows)}")


if __name__ == "__main__":
    main()
