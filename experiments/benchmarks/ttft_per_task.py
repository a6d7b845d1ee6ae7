"""Per-task TTFT of G tasks x S steps: arc_jax per-task mode vs a sequential PEFT loop over tasks.

    python -m experiments.benchmarks.ttft_per_task --size d512 --tasks 8 --steps 4 --rows 1 \
        --jax-matmuls compute,bfloat16

arc_jax: `ttft.per_task_step` (shard_map over the `tasks` mesh — one CPU device here — and vmap of
the G adapters over one shared base), each task's rows sampled, augmented and encoded on device
every step. PEFT: for each task in turn a fresh adapter and AdamW, S steps on exactly the same
rows (the parent draws them with the per-task keys `ttft` uses and hands them to both sides).
Both sides: same Phi-3, LoRA r=32 on all linear targets, same threads. Time excludes compilation
(arc_jax runs one warm-up step on throw-away states first; PEFT one warm-up step).
`--jax-matmuls compute,bfloat16` adds an arc_jax row per `model.matmul_dtype` (bfloat16: the
linear layers' products in bfloat16 with float32 accumulation, `arc_jax.model.matmul`).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from experiments.benchmarks import peers
from experiments.benchmarks.common import print_table, write_results

MODULE = "experiments.benchmarks.ttft_per_task"


def _setup(seq_len: int, n_tasks: int):
    from arc_jax.data.arrays import pad_tasks
    from arc_jax.data.encode import check_device_encoding
    from arc_jax.data.pipeline import PipelineConfig, assign_buckets, max_train_length
    from arc_jax.data.tasks import load_tasks
    from arc_jax.data.tokenizer import load_tokenizer
    from arc_jax.train.ttft import select_tasks

    tasks = list(load_tasks("kaggle2024/evaluation").values())
    cfg = PipelineConfig()
    vocab = check_device_encoding(load_tokenizer(), cfg.fmt)
    lengths = [max_train_length(vocab, cfg.fmt, np.asarray(
        [[p.input.shape, p.output.shape] for p in t.train])) for t in tasks]
    members = assign_buckets([t.task_id for t in tasks], lengths, cfg)[seq_len][:n_tasks]
    return vocab, cfg, select_tasks(pad_tasks(tasks), members), np.asarray(members, np.int32)


def write_rows(path: str, args) -> None:
    """The rows every task trains on, `[S, G, B, T]`, drawn with the keys `ttft` derives."""
    import jax

    from arc_jax.train.ttft import _one_task_batch

    vocab, cfg, data, ids = _setup(args.seq_len, args.tasks)
    make = jax.jit(lambda key, d: _one_task_batch(key, d, vocab=vocab, cfg=cfg,
                                                  seq_len=args.seq_len, batch_size=args.rows))
    key = jax.random.key(args.seed)
    out = {k: [] for k in ("tokens", "attention_mask", "loss_mask", "length")}
    for s in range(args.steps):
        per_task = []
        for g in range(len(ids)):
            task_key = jax.random.fold_in(jax.random.fold_in(key, int(ids[g])), s)
            one = jax.tree.map(lambda x, g=g: x[g], data)
            per_task.append(make(jax.random.fold_in(task_key, 0), one))
        for k in out:
            out[k].append(np.stack([np.asarray(getattr(b, k)) for b in per_task]))
    np.savez(path, **{k: np.stack(v) for k, v in out.items()})


def jax_side(args) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from arc_jax.model.convert import load_pretrained
    from arc_jax.model.lora import LoraConfig, init_lora
    from arc_jax.train.step import OptimConfig, StepFns, make_optimizer
    from arc_jax.train.ttft import (
        TASKS,
        device_mesh,
        init_per_task_states,
        per_task_fns,
        per_task_step,
    )

    model, params = load_pretrained(args.model)
    if args.matmul != "compute":
        model = model.clone(matmul_dtype=jnp.dtype(args.matmul))
    vocab, cfg, data, ids = _setup(args.seq_len, args.tasks)
    rows = peers.load_batch(args.batch_file)
    loss_tokens = int(rows["loss_mask"].sum(-1).max())
    lora_cfg = LoraConfig(rank=peers.LORA["r"], alpha=peers.LORA["alpha"],
                          targets=peers.LORA["targets"])
    optimizer = make_optimizer(OptimConfig(steps=1000, warmup_steps=0, schedule="constant"))
    base = StepFns(model, lora_cfg, None, max_loss_tokens=-(-loss_tokens // 64) * 64)
    fns = per_task_fns(base, vocab=vocab, cfg=cfg, seq_len=args.seq_len, batch_size=args.rows)
    mesh = device_mesh(TASKS)
    step = per_task_step(fns, optimizer, mesh)
    init = functools.partial(init_per_task_states, lambda k: init_lora(k, params, lora_cfg),
                             optimizer, ids, jax.random.key(0), mesh)
    data, ids_dev = jax.device_put((data, jnp.asarray(ids)))
    key = jax.random.key(args.seed)
    jax.block_until_ready(step(init(), data, ids_dev, params, jnp.int32(0), key, key))

    def run():
        states = init()
        for s in range(args.steps):
            states, metrics = step(states, data, ids_dev, params, jnp.int32(s), key, key)
        jax.block_until_ready((states, metrics))

    return {"times": peers.timed(run, args.repeats, warmup=0)}


def torch_side(args) -> dict:
    import peft
    import torch

    rows = peers.load_batch(args.batch_file)
    model, trainable = peers.peft_train_model(args.model, args.threads)
    n_steps, n_tasks = rows["tokens"].shape[:2]
    batch = lambda s, g: {
        "input_ids": torch.from_numpy(rows["tokens"][s, g].astype(np.int64)),
        "attention_mask": torch.from_numpy(rows["attention_mask"][s, g].astype(np.int64)),
        "labels": torch.from_numpy(peers.torch_labels(
            {"tokens": rows["tokens"][s, g], "loss_mask": rows["loss_mask"][s, g]})),
    }

    def train_task(g: int, steps: int) -> None:
        for module in model.modules():  # a fresh adapter per task
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.reset_lora_parameters("default", True)
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
        for s in range(steps):
            model(**batch(s, g)).loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    train_task(0, 1)  # warm-up
    run = lambda: [train_task(g, n_steps) for g in range(n_tasks)]
    return {"times": peers.timed(run, args.repeats, warmup=0)}


def parent(args) -> None:
    work = args.workdir or tempfile.mkdtemp(prefix="arc_jax_bench_")
    model_dir = os.path.join(work, f"phi3_{args.size}")
    rows_file = os.path.join(
        work, f"ttft_{args.seq_len}_{args.tasks}x{args.steps}x{args.rows}_{args.seed}.npz")
    peers.write_model(model_dir, args.size)
    write_rows(rows_file, args)
    real = int(peers.load_batch(rows_file)["length"].sum())
    common = ["--model", model_dir, "--batch-file", rows_file, "--repeats", str(args.repeats),
              "--threads", str(args.threads), "--tasks", str(args.tasks), "--steps",
              str(args.steps), "--rows", str(args.rows), "--seq-len", str(args.seq_len),
              "--seed", str(args.seed)]
    matmuls = args.jax_matmuls.split(",")
    times: dict[str, list[float]] = {"torch": [], **{f"jax:{m}": [] for m in matmuls}}
    for _ in range(args.rounds):
        for side in times:
            name, _, matmul = side.partition(":")
            out = peers.run_side(MODULE, ["--side", name, "--matmul", matmul or "compute",
                                          *common], args.threads)
            times[side] += out["times"]
            print(f"{side}: median {peers.median(out['times']):.2f} s", flush=True)
    torch_s = peers.median(times["torch"])
    rows = []
    labels = {"torch": "PEFT, tasks in sequence", "jax:compute": "arc_jax per_task"}
    for side in times:
        label = labels.get(side, f"arc_jax per_task, {side[4:]} matmuls")
        s = peers.median(times[side])
        rows.append({"impl": label, "size": args.size, "bucket": args.seq_len,
                     "tasks x steps x rows": f"{args.tasks} x {args.steps} x {args.rows}",
                     "total s": round(s, 2), "tokens/s": real / s,
                     "vs PEFT loop": round(torch_s / s, 2), "runs": len(times[side])})
    print_table(rows)
    path = write_results(f"ttft_per_task_{args.size}", rows, {"threads": args.threads,
                                                              "real_tokens": real})
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", default="parent", choices=("parent", "jax", "torch"))
    parser.add_argument("--size", default="d512", choices=sorted(peers.SIZES))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--jax-matmuls", default="compute", help="arc_jax rows: model.matmul_dtype")
    parser.add_argument("--matmul", default="compute", help="(one arc_jax side)")
    peers.add_side_args(parser)
    peers.dispatch(parser.parse_args(), parent, {"jax": jax_side, "torch": torch_side})


if __name__ == "__main__":
    main()
