"""The research log's TTFT timing table (iteration 4): time of 10 LoRA steps at seq_len 1024 and
4096, extrapolated to 1000 steps, for arc_jax and transformers + PEFT.

    python -m experiments.benchmarks.timing_table --size d512 --seq-lens 1024,4096 \
        --variants default,bf16_matmul

One row per step (batch 1): an n-1 episode of a real evaluation task from that length bucket.
The two implementations alternate step by step in one process (`train_step --side interleaved`),
10 timed steps each after a warm-up step. `--variants`: arc_jax rows, as in `train_step`.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from experiments.benchmarks import peers, train_step
from experiments.benchmarks.common import print_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="d512", choices=sorted(peers.SIZES))
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default="")
    parser.add_argument("--variants", default="default", help="arc_jax rows (train_step's)")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="arc_jax_bench_")
    model_dir = os.path.join(work, f"phi3_{args.size}")
    peers.write_model(model_dir, args.size)
    rows = []
    for seq_len in map(int, args.seq_lens.split(",")):
        batch_file = os.path.join(work, f"batch_{seq_len}_1.npz")
        real = int(peers.write_batch(batch_file, seq_len, 1)["length"].sum())
        times = peers.run_side(train_step.MODULE, [
            "--side", "interleaved", "--variants", args.variants, "--repeats", str(args.steps),
            "--model", model_dir, "--batch-file", batch_file, "--threads", str(args.threads)],
            args.threads)
        torch_total = sum(times["torch"])
        for name in times:
            label = "transformers+PEFT" if name == "torch" else "arc_jax" + (
                "" if name == "jax:default" else f" {name[4:]}")
            total = sum(times[name])
            rows.append({
                "impl": label, "size": args.size, "seq_len": seq_len, "real tokens": real,
                f"{args.steps} steps (min)": round(total / 60, 2),
                "1000 steps (hours)": round(total / args.steps * 1000 / 3600, 2),
                "vs PEFT": round(torch_total / total, 2),
            })
        print(rows[-len(times):], flush=True)
    print_table(rows)
    path = write_results(f"timing_table_{args.size}", rows, {"threads": args.threads})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
