"""What the backward keeps of a quantized base: XLA's temporaries for the gradient of a stack of
Phi-3-mini MLP blocks (int4 kernels dequantized to float32 inside), unrolled or as one
`lax.scan` over the layers, with and without `jax.checkpoint`.

    python -m experiments.benchmarks.remat_memory

Compile only (nothing runs): per extra layer, an unrolled stack keeps one float32 copy of every
layer's kernels from the forward to the backward, checkpoint or not (XLA merges the recomputed
dequantization with the forward's); a scanned, checkpointed stack keeps one layer's.
Gradients w.r.t. a small adapter only, as in LoRA training.
"""

from __future__ import annotations

import argparse

from experiments.benchmarks.common import print_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="2,4")
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from arc_jax.model.quantize import dequantize, quantize_params

    d, f, r = 3072, 8192, 32
    one = {"up": {"kernel": jax.ShapeDtypeStruct((d, f), jnp.bfloat16)},
           "down": {"kernel": jax.ShapeDtypeStruct((f, d), jnp.bfloat16)}}
    one = jax.eval_shape(lambda p: quantize_params(p, "int4"), one)
    x = jax.ShapeDtypeStruct((args.tokens, d), jnp.float32)
    adapter = jax.ShapeDtypeStruct((d, r), jnp.float32)

    def layer(p, h, a):
        up = h @ dequantize(p["up"], jnp.float32)
        return h + jax.nn.silu(up) @ dequantize(p["down"], jnp.float32) + (h @ a) @ a.T

    def unrolled(remat):
        def loss(a, ps, h):
            for p in ps:
                h = (jax.checkpoint(layer) if remat else layer)(p, h, a)
            return jnp.sum(h)
        return loss

    def scanned(remat):
        def loss(a, ps, h):
            body = lambda h, p: (layer(p, h, a), None)
            h, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, h, ps)
            return jnp.sum(h)
        return loss

    kernels_mib = (d * f * 2 * 4) / 2**20
    rows = []
    for name, make, stacked in (("unrolled", unrolled, False), ("scan", scanned, True)):
        for remat in (False, True):
            temps = []
            for n in map(int, args.layers.split(",")):
                ps = (jax.tree.map(lambda s, n=n: jax.ShapeDtypeStruct((n, *s.shape), s.dtype),
                                   one) if stacked else [one] * n)
                compiled = jax.jit(jax.grad(make(remat))).lower(adapter, ps, x).compile()
                temps.append((n, compiled.memory_analysis().temp_size_in_bytes / 2**20))
            (n0, t0), (n1, t1) = temps[0], temps[-1]
            rows.append({"layers": name, "checkpoint": remat,
                         **{f"temp MiB, {n} layers": round(t) for n, t in temps},
                         "MiB per extra layer": round((t1 - t0) / (n1 - n0)),
                         "float32 kernels of a layer (MiB)": round(kernels_mib)})
            print(rows[-1], flush=True)
    print_table(rows)
    print(f"wrote {write_results('remat_memory', rows, {'tokens': args.tokens})}")


if __name__ == "__main__":
    main()
