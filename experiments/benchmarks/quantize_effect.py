"""Memory and logits effect of the weight-only int8 / int4 frozen base (arc_jax.model.quantize).

    python -m experiments.benchmarks.quantize_effect --size d512 --workdir /tmp/bench

On real evaluation episodes (bucket 1024): bytes of the base, relative RMS error of the logits at
the loss positions against float32, top-1 agreement, and the change in the masked NLL.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp

from arc_jax.model.convert import load_pretrained
from arc_jax.model.quantize import quantize_params, tree_bytes
from experiments.benchmarks import peers
from experiments.benchmarks.common import print_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="d512", choices=sorted(peers.SIZES))
    parser.add_argument("--workdir", default="")
    parser.add_argument("--group", type=int, default=64)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="arc_jax_bench_")
    model_dir = os.path.join(work, f"phi3_{args.size}")
    batch_file = os.path.join(work, "batch_1024_4.npz")
    peers.write_model(model_dir, args.size)
    b = peers.write_batch(batch_file, 1024, 4)
    model, params = load_pretrained(model_dir)
    ids, valid = jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"])
    loss = jnp.asarray(b["loss_mask"]).at[:, 0].set(False)
    forward = jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=valid))

    def evaluate(p):
        logits = forward(p)[:, :-1][loss[:, 1:]]  # [N, vocab] predicting the loss tokens
        labels = ids[:, 1:][loss[:, 1:]]
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
        return logits, float(jnp.mean(nll))

    ref, ref_nll = evaluate(params)
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
    top1 = lambda x: jnp.argmax(x, -1)
    rows = [{"base": "float32", "base MiB": tree_bytes(params) / 2**20,
             "rel. RMS logits error": "0", "top-1 agreement": "1", "NLL": f"{ref_nll:.4f}"}]
    for mode in ("int8", "int4"):
        quant = quantize_params(params, mode, group=args.group)
        logits, nll = evaluate(quant)
        rows.append({"base": f"{mode}" + (f" (group {args.group})" if mode == "int4" else ""),
                     "base MiB": tree_bytes(quant) / 2**20,
                     "rel. RMS logits error": f"{rms(logits - ref) / rms(ref):.4f}",
                     "top-1 agreement": f"{float(jnp.mean(top1(logits) == top1(ref))):.4f}",
                     "NLL": f"{nll:.4f}"})
    print_table(rows)
    print(f"wrote {write_results(f'quantize_effect_{args.size}', rows)}")


if __name__ == "__main__":
    main()
