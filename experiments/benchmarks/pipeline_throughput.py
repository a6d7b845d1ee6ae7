"""Throughput of the jitted sample → augment → encode → bucket pipeline on the evaluation set.

    python -m experiments.benchmarks.pipeline_throughput [--batch 32] [--repeats 10]

Rows of every evaluation task (n-1 episodes, dihedral + colour augmentation, shape header and
numbered rows) are generated bucket by bucket, as TTFT will; tokens/s counts real (non-padding)
tokens, padded tokens/s counts every slot of the bucket.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from arc_jax.data.arrays import pad_tasks
from arc_jax.data.encode import check_device_encoding
from arc_jax.data.pipeline import PipelineConfig, assign_buckets, max_train_length, train_batch
from arc_jax.data.tasks import load_tasks
from arc_jax.data.tokenizer import load_tokenizer
from experiments.benchmarks.common import print_table, time_fn, write_results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--grid-format", default="shape_numbered")
    args = parser.parse_args()

    tasks = list(load_tasks("kaggle2024/evaluation").values())
    cfg = PipelineConfig(grid_format=args.grid_format, n_leave_out=1)
    vocab = check_device_encoding(load_tokenizer(), cfg.fmt)
    arrays = jax.device_put(pad_tasks(tasks))
    lengths = [max_train_length(vocab, cfg.fmt, np.asarray([[p.input.shape, p.output.shape]
                                                            for p in t.train])) for t in tasks]
    groups = assign_buckets([t.task_id for t in tasks], lengths, cfg)
    rows, total_tokens, total_seconds = [], 0.0, 0.0
    for seq_len, members in groups.items():
        fn = jax.jit(functools.partial(train_batch, vocab=vocab, cfg=cfg, seq_len=seq_len))
        members = np.resize(np.asarray(members, np.int32), args.batch)
        task_idx = jnp.asarray(members)
        keys = iter(jax.random.split(jax.random.key(0), args.repeats + 2))
        out = fn(next(keys), arrays, task_idx)
        real = float(jnp.sum(out.length)) / args.batch
        step = lambda fn=fn, keys=keys, task_idx=task_idx: fn(next(keys), arrays, task_idx)
        seconds = time_fn(step, args.repeats)
        rows.append({
            "bucket": seq_len, "tasks": len(groups[seq_len]), "batch": args.batch,
            "ms/batch": seconds * 1e3, "real tokens/row": real,
            "tokens/s": real * args.batch / seconds,
            "padded tokens/s": seq_len * args.batch / seconds,
        })
        total_tokens += real * args.batch * len(groups[seq_len])
        total_seconds += seconds * len(groups[seq_len])
    print_table(rows)
    overall = total_tokens / total_seconds
    print(f"\nweighted over the evaluation set: {overall:,.0f} real tokens/s "
          f"on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    path = write_results("pipeline_throughput", rows, {"weighted_tokens_per_s": overall,
                                                       "grid_format": args.grid_format})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
