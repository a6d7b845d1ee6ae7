"""How much memory a compiled program really takes on this backend, against XLA's estimate.

    python -m experiments.benchmarks.xla_memory_factor --groups 1,4,8 --matmul bfloat16

Compiles evaluation's val-loss program (`arc_jax.infer.inference._val_nll`, bucket `--seq-len`,
the shipped model, no adapter) for m groups, runs it once and samples the process's VmRSS
every 20 ms. Prints per m: XLA's `memory_analysis()` (temporaries + arguments + outputs -
aliases, before `CPU_RUNTIME_FACTOR`) and the RSS rise over the run. Their ratio is what
`arc_jax.train.ttft.CPU_RUNTIME_FACTOR` accounts for. The test inputs are the first bucket
`--seq-len` evaluation tasks.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time

import jax
import jax.numpy as jnp


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", default="1,4,8")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--matmul", default="bfloat16", help="model.matmul_dtype")
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()

    from arc_jax import run
    from arc_jax.data.arrays import pad_tasks
    from arc_jax.data.pipeline import assign_buckets
    from arc_jax.infer import inference
    from configs import baseline

    peak = [0]

    def sample():
        while True:
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    cfg = baseline.get_config()
    cfg.compilation_cache = ""
    cfg.model.matmul_dtype = args.matmul
    setup = run.load_setup(cfg, "/tmp/xla_memory_factor")
    every = run.load_task_list(cfg.data.eval, "", 0)
    lengths = [inference.test_length(setup.vocab, setup.pipeline.fmt, t, 0, answer=True)
               for t in every]
    members = assign_buckets([t.task_id for t in every], lengths, setup.pipeline)[args.seq_len]
    tasks = [every[m] for m in members[: args.tasks]]
    arrays = jax.tree.map(jnp.asarray, pad_tasks(tasks))
    program = jax.jit(functools.partial(
        inference._val_nll, model=setup.model, lora_config=None, vocab=setup.vocab,
        cfg=setup.pipeline, seq_len=args.seq_len, max_loss_tokens=setup.max_loss_tokens))
    print("| groups | XLA estimate MiB | RSS rise MiB | ratio |\n|---|---|---|---|")
    for m in map(int, args.groups.split(",")):
        idx, tests = jnp.arange(m) % len(tasks), jnp.zeros(m, jnp.int32)
        compiled = program.lower(setup.params, None, arrays, idx, tests).compile()
        mem = compiled.memory_analysis()
        estimate = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                    + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20
        before = _rss_mib()
        peak[0] = before
        jax.block_until_ready(compiled(setup.params, None, arrays, idx, tests))
        time.sleep(0.1)
        rise = peak[0] - before
        print(f"| {m} | {estimate:.0f} | {rise} | {rise / estimate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
