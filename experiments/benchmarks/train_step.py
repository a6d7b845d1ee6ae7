"""LoRA train step: arc_jax vs transformers + PEFT on the same Phi-3, LoRA and ARC batch.

    python -m experiments.benchmarks.train_step --size d512 --seq-len 1024 --batch 4 --memory \
        --variants default,naive_attention,full_logits,remat,bf16,int8,int4

Random fp32 Phi-3 (vocab 32064), LoRA r=32 on qkv/o/gate_up/down, AdamW + global-norm clipping,
one n-1 episode per row of real evaluation tasks in one length bucket. Speed: every
implementation is built in one child process and they step in turn (`--side interleaved`), so a
busy shared machine slows all alike; medians of `--repeats` steps; tokens/s counts real
(non-padding) tokens. `--memory`: each implementation alone in a fresh process, peak RSS above
its RSS before the first step (arc_jax's includes XLA compilation)."""

from __future__ import annotations

import argparse
import os
import tempfile

from experiments.benchmarks import peers
from experiments.benchmarks.common import print_table, write_results

MODULE = "experiments.benchmarks.train_step"
# arc_jax variants: name -> model/step options (see `jax_side`).
VARIANTS = {
    "default": {},
    "full_logits": {"full_logits": True},
    "naive_attention": {"attention": "xla"},
    "remat": {"remat": True},
    "bf16": {"dtype": "bfloat16"},
    "bf16_matmul": {"matmul": "bfloat16"},
    "int8_bf16_matmul": {"quant": "int8", "matmul": "bfloat16"},
    "int8": {"quant": "int8"},
    "int4": {"quant": "int4"},
}


def build_jax(args, variant: str):
    """A no-argument function running one arc_jax step, and facts about it."""
    import functools

    import jax
    import jax.numpy as jnp

    from arc_jax.data.encode import EncodedExample
    from arc_jax.model.convert import load_pretrained
    from arc_jax.model.lora import LoraConfig, init_lora
    from arc_jax.model.phi3 import Phi3
    from arc_jax.train.step import OptimConfig, StepFns, init_state, make_optimizer, train_step

    opts = VARIANTS[variant]
    dtype = jnp.dtype(opts.get("dtype", "float32"))
    model, params = load_pretrained(args.model)
    matmul = jnp.dtype(opts["matmul"]) if "matmul" in opts else None
    model = Phi3(model.config, dtype=dtype, remat=opts.get("remat", False), matmul_dtype=matmul,
                 **({"attention": opts["attention"]} if "attention" in opts else {}))
    if dtype != jnp.float32:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    lora_cfg = LoraConfig(rank=peers.LORA["r"], alpha=peers.LORA["alpha"],
                          targets=peers.LORA["targets"])
    lora = init_lora(jax.random.key(0), params, lora_cfg)
    if "quant" in opts:
        from arc_jax.model.quantize import quantize_params
        params = quantize_params(params, opts["quant"])
    b = peers.load_batch(args.batch_file)
    seq_len = b["tokens"].shape[1]
    batch = EncodedExample(
        jnp.asarray(b["tokens"]), jnp.asarray(b["loss_mask"]), jnp.asarray(b["positions"]),
        jnp.asarray(b["attention_mask"]), jnp.asarray(b["length"]), jnp.zeros(len(b["length"])),
        jnp.zeros(len(b["length"])), jnp.ones(len(b["length"]), bool))
    loss_tokens = int(b["loss_mask"].sum(1).max())
    k = seq_len - 1 if opts.get("full_logits") else -(-loss_tokens // 64) * 64
    optimizer = make_optimizer(OptimConfig(steps=1000, warmup_steps=0, schedule="constant"))
    fns = StepFns(model, lora_cfg, lambda key, data: data, max_loss_tokens=k)
    step = jax.jit(functools.partial(train_step, fns, optimizer), donate_argnums=(0,))
    state = [init_state(lora, optimizer)]
    key = jax.random.key(1)
    jax.block_until_ready((params, batch, state))
    rss0 = peers.rss_mib()
    compiled = step.lower(state[0], params, batch, key, key).compile()
    mem = compiled.memory_analysis()

    def run():
        state[0], metrics = compiled(state[0], params, batch, key, key)
        jax.block_until_ready(metrics)

    from arc_jax.model.quantize import tree_bytes
    return run, {"rss0": rss0, "k": k, "base_mib": tree_bytes(params) / 2**20,
                 "xla_temp_mib": getattr(mem, "temp_size_in_bytes", 0) / 2**20}


def build_torch(args):


    import torch

    b = peers.load_batch(args.batch_file)
    model, trainable = peers.peft_train_model(args.model, args.threads)
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(b["tokens"].astype("int64"))
    mask = torch.from_numpy(b["attention_mask"].astype("int64"))
    labels = torch.from_numpy(peers.torch_labels(b))
    rss0 = peers.rss_mib()

    def run():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run, {"rss0": rss0, "attn": model.config._attn_implementation}


def side(args) -> dict:
    """One implementation alone in this process: step times and peak RSS over its set-up."""
    run, info = build_torch(args) if args.side == "torch" else build_jax(args, args.variant)
    times = peers.timed(run, args.repeats, warmup=1)
    return {**info, "times": times, "peak_mib": peers.peak_rss_mib() - info["rss0"]}


def interleaved(args, variants: list[str]) -> dict[str, list[float]]:
    """Every implementation in this process, one step each in turn for `repeats` rounds, so a
    busy shared machine slows all of them alike."""
    runs = {"torch": build_torch(args)[0]}
    runs.update({f"jax:{v}": build_jax(args, v)[0] for v in variants})
    for run in runs.values():
        run()  # warm-up (and compilation)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name] += peers.timed(run, 1, warmup=0)
    return times


def parent(args) -> None:
    work = args.workdir or tempfile.mkdtemp(prefix="arc_jax_bench_")
    model_dir = os.path.join(work, f"phi3_{args.size}")
    batch_file = os.path.join(work, f"batch_{args.seq_len}_{args.batch}.npz")
    peers.write_model(model_dir, args.size)
    batch = peers.write_batch(batch_file, args.seq_len, args.batch)
    real = int(batch["length"].sum())
    common = ["--model", model_dir, "--batch-file", batch_file, "--threads", str(args.threads)]
    variants = args.variants.split(",")
    times = peers.run_side(MODULE, ["--side", "interleaved", "--variants", args.variants,
                                    "--repeats", str(args.repeats), *common], args.threads)
    print({name: round(peers.median(ts), 3) for name, ts in times.items()}, flush=True)
    memory = {}
    for name in ["torch"] + [f"jax:{v}" for v in variants] if args.memory else []:
        side, _, variant = name.partition(":")
        memory[name] = peers.run_side(MODULE, ["--side", side, "--variant", variant or "default",
                                               "--repeats", "1", *common], args.threads)
    torch_s = peers.median(times["torch"])
    rows = []
    for name, ts in times.items():
        s = peers.median(ts)
        mem = memory.get(name, {})
        rows.append({
            "impl": "transformers+PEFT" if name == "torch" else f"arc_jax {name[4:]}",
            "size": args.size, "seq_len": args.seq_len, "batch": args.batch,
            "s/step": round(s, 3), "tokens/s": real / s, "vs PEFT": round(torch_s / s, 2),
            "peak MiB": round(mem["peak_mib"]) if mem else "-",
            "base MiB": round(mem.get("base_mib", 0)) or "-", "steps timed": len(ts),
        })
    print_table(rows)
    path = write_results(f"train_step_{args.size}_{args.seq_len}", rows, {
        "threads": args.threads, "real_tokens": real, "padded_tokens": batch["tokens"].size,
        "loss_tokens": int(batch["loss_mask"].sum()), "times": times, "memory": memory})
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", default="parent",
                        choices=("parent", "interleaved", "jax", "torch"))
    parser.add_argument("--size", default="d512", choices=sorted(peers.SIZES))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also peak RSS, side by side")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--variant", default="default")
    peers.add_side_args(parser)
    peers.dispatch(parser.parse_args(), parent, {
        "interleaved": lambda args: interleaved(args, args.variants.split(",")),
        "jax": side, "torch": side})


if __name__ == "__main__":
    main()
