"""The research log's TTFT timing table (iteration 4): time of 10 LoRA steps at seq_len 1024 and
4096, extrapolated to 1000 steps, for arc_jax and transformers + PEFT.

    python -m experiments.benchmarks.timing_table --size d512 --seq-lens 1024,4096 \
        --variants default,bf16_matmul
    python -m experiments.benchmarks.timing_table --size phi3-mini --seq-lens 1024 \
        --bases int4,bf16 --probe-layers 2,4 --budget-min 6 --peer-layers 4

One row per step (batch 1): an n-1 episode of a real evaluation task from that length bucket.
d512 / d1024: the two implementations alternate step by step in one process (`train_step --side
interleaved`), 10 timed steps each after a warm-up step. `--variants`: arc_jax rows, as in
`train_step`.

phi3-mini: the published Phi-3-mini config (`../shared/fixtures/phi-3-mini-4k-instruct`: 32
layers, hidden 3072, MLP 8192, 32 heads, vocab 32064), random weights N(0, 0.02), the base stored
int4 (weight-only, groups of 64; embedding and norms bf16) or bf16, float32 activations
(`--compute`), layer activations recomputed in the backward pass (`--remat`), LoRA r=32 /
alpha 64 on qkv/o/gate_up/down of every layer, AdamW, the row encoded with the published
tokenizer. Each base runs in a fresh process. Up to `--full-max-seq` tokens all 32 layers are
timed (where memory allows); beyond, models of `--probe-layers` layers (real width) are built in
one process, compiled, warmed up, and stepped in turn (`--steps` each, or until `--budget-min`
minutes), and time and XLA's memory (base + optimizer state + temporaries of the compiled step)
are extrapolated linearly in the layer count to 32. The PyTorch peer (transformers + PEFT, same
LoRA and row) does not fit in float32 at 32 layers (15 GB of weights), so the ratio is measured
at `--peer-layers` layers of the real width, float32 on both sides (`train_step --side
interleaved`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.benchmarks import peers, train_step
from experiments.benchmarks.common import print_table, write_results

MODULE = "experiments.benchmarks.timing_table"
PHI3_MINI = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "phi-3-mini-4k-instruct"
SIZES = sorted(peers.SIZES) + ["phi3-mini"]
# The research log's rows (Phi-3-mini on Kaggle GPUs): minutes for 10 LoRA steps.
LOG_MINUTES = {1024: "16 (Phi-3)", 4096: "34 (int4)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", default="parent", choices=("parent", "phi3"))
    parser.add_argument("--size", default="d512", choices=SIZES)
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default="")
    parser.add_argument("--variants", default="default", help="arc_jax rows (train_step's)")
    phi3 = parser.add_argument_group("phi3-mini")
    phi3.add_argument("--bases", default="int4,bf16", help="how the frozen base is stored")
    phi3.add_argument("--compute", default="float32", help="activation dtype")
    phi3.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
    phi3.add_argument("--budget-min", type=float, default=6.0,
                      help="timed minutes per process, after compilation and the warm-up steps")
    phi3.add_argument("--full-max-seq", type=int, default=0,
                      help="up to this seq_len, time all 32 layers (where memory allows); "
                           "longer: time --probe-layers and extrapolate to 32")
    phi3.add_argument("--probe-layers", default="2,4")
    phi3.add_argument("--alternate", action=argparse.BooleanOptionalAction, default=True,
                      help="step the probe models in turn in one process (else one each)")
    phi3.add_argument("--peer-layers", type=int, default=4, help="0: no PyTorch peer")
    phi3.add_argument("--peer-steps", type=int, default=2)
    # --side phi3: one measurement
    phi3.add_argument("--base", default="int4")
    phi3.add_argument("--seq-len", type=int, default=1024)
    phi3.add_argument("--layers", default="32", help="layer counts, comma-separated")
    phi3.add_argument("--batch-file", default="")
    phi3.add_argument("--compile-only", action="store_true")
    args = parser.parse_args()
    if args.side == "phi3":
        peers.emit(phi3_side(args))
    elif args.size == "phi3-mini":
        phi3_mini_table(args)
    else:
        small_table(args)


def small_table(args) -> None:
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


# --- phi3-mini ------------------------------------------------------------------------------------

def phi3_mini_hf_config(layers: int | None = None) -> dict:
    """The published Phi-3-mini config.json, optionally with fewer layers."""
    config = json.loads((PHI3_MINI / "config.json").read_text())
    config.pop("auto_map", None)
    if layers:
        config["num_hidden_layers"] = layers
    return config


def write_phi3_batch(path: str, seq_len: int) -> dict:
    """One n-1 episode (batch 1) of the first evaluation task of bucket `seq_len`, encoded with
    the published Phi-3 tokenizer, as `peers.write_batch` writes it."""
    import jax
    import jax.numpy as jnp

    from arc_jax.data.arrays import pad_tasks
    from arc_jax.data.encode import check_device_encoding
    from arc_jax.data.pipeline import PipelineConfig, assign_buckets, max_train_length, train_batch
    from arc_jax.data.tasks import load_tasks
    from arc_jax.data.tokenizer import load_tokenizer

    if os.path.exists(path):
        return peers.load_batch(path)
    tasks = list(load_tasks("kaggle2024/evaluation").values())
    cfg = PipelineConfig()
    vocab = check_device_encoding(load_tokenizer(PHI3_MINI), cfg.fmt)
    lengths = [max_train_length(vocab, cfg.fmt, np.asarray(
        [[p.input.shape, p.output.shape] for p in t.train])) for t in tasks]
    members = np.asarray(assign_buckets([t.task_id for t in tasks], lengths, cfg)[seq_len][:1])
    out = train_batch(jax.random.key(0), pad_tasks(tasks), jnp.asarray(members, jnp.int32),
                      vocab=vocab, cfg=cfg, seq_len=seq_len)
    fields = ("tokens", "loss_mask", "attention_mask", "positions", "length", "prompt_length")
    arrays = {k: np.asarray(getattr(out, k)) for k in fields}
    np.savez(path, **arrays, task_ids=np.asarray([tasks[i].task_id for i in members]))
    return arrays


def random_base(model, base: str, seed: int = 0) -> dict:
    """Random params of `model` as stored for `base` ("int4": kernels quantized, the rest bf16;
    "bf16"; "float32"), made one tensor at a time so the peak stays near the stored size."""
    import jax
    import jax.numpy as jnp

    from arc_jax.model.convert import flatten, unflatten
    from arc_jax.model.phi3 import abstract_params
    from arc_jax.model.quantize import quantize_params

    dtype = jnp.float32 if base == "float32" else jnp.bfloat16
    make = jax.jit(lambda key, shape: (0.02 * jax.random.normal(key, shape)).astype(dtype),
                   static_argnums=1)
    quantize = jax.jit(lambda w: quantize_params({"w": {"kernel": w}}, "int4")["w"])
    flat = {}
    for i, (path, leaf) in enumerate(flatten(abstract_params(model)).items()):
        if path.endswith("weight"):  # RMSNorm
            flat[path] = jnp.ones(leaf.shape, dtype)
            continue
        key = jax.random.fold_in(jax.random.key(seed), i)
        if base == "int4" and path.endswith("kernel"):
            value = make(key, leaf.shape)
            for name, q in quantize(value).items():
                flat[path[: -len("kernel")] + name] = q
            del value
        else:
            flat[path] = make(key, leaf.shape)
        jax.block_until_ready(list(flat.values())[-1])
    return unflatten(flat)


def phi3_side(args) -> dict:
    """arc_jax measurements in this process, one model per layer count in `--layers`: compile
    each, one warm-up step each, then one timed step of each in turn (so a busy shared machine
    slows them alike) until `--steps` each or the `--budget-min` minutes; or only the compiled
    steps' memory with --compile-only."""
    import functools

    import jax
    import jax.numpy as jnp

    from arc_jax.data.encode import EncodedExample
    from arc_jax.model.lora import LoraConfig, init_lora
    from arc_jax.model.phi3 import Phi3, Phi3Config, abstract_params
    from arc_jax.model.quantize import quantize_params
    from arc_jax.train.step import OptimConfig, StepFns, init_state, make_optimizer, train_step

    lora_cfg = LoraConfig(rank=peers.LORA["r"], alpha=peers.LORA["alpha"],
                          targets=peers.LORA["targets"])
    b = peers.load_batch(args.batch_file)
    n = len(b["length"])
    batch = EncodedExample(
        jnp.asarray(b["tokens"]), jnp.asarray(b["loss_mask"]), jnp.asarray(b["positions"]),
        jnp.asarray(b["attention_mask"]), jnp.asarray(b["length"]), jnp.zeros(n), jnp.zeros(n),
        jnp.ones(n, bool))
    k = -(-int(b["loss_mask"].sum(1).max()) // 64) * 64
    optimizer = make_optimizer(OptimConfig(steps=1000, warmup_steps=0, schedule="constant"))
    key = jax.random.key(1)

    def build(layers: int):
        config = Phi3Config.from_hf(phi3_mini_hf_config(layers))
        model = Phi3(config, dtype=jnp.dtype(args.compute), remat=args.remat,
                     param_dtype=jnp.float32 if args.base == "float32" else jnp.bfloat16)
        fns = StepFns(model, lora_cfg, lambda key, data: data, max_loss_tokens=k)
        step = jax.jit(functools.partial(train_step, fns, optimizer), donate_argnums=(0,))
        if args.compile_only:  # shapes only: XLA's memory analysis, nothing allocated
            params = abstract_params(model)
            if args.base == "int4":
                params = jax.eval_shape(lambda p: quantize_params(p, "int4"), params)
            state = jax.eval_shape(
                lambda: init_state(init_lora(jax.random.key(0), params, lora_cfg), optimizer))
        else:
            params = random_base(model, args.base)
            state = init_state(init_lora(jax.random.key(0), params, lora_cfg), optimizer)
        start = time.perf_counter()
        compiled = step.lower(state, params, batch, key, key).compile()
        mem = compiled.memory_analysis()
        info = {
            "layers": layers, "base": args.base, "seq_len": args.seq_len,
            "real_tokens": int(b["length"].sum()), "loss_tokens": int(b["loss_mask"].sum()),
            "k": k, "compile_s": time.perf_counter() - start,
            "base_mib": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20,
            "xla_temp_mib": mem.temp_size_in_bytes / 2**20,
            "xla_argument_mib": mem.argument_size_in_bytes / 2**20,
            "xla_output_mib": mem.output_size_in_bytes / 2**20,
        }
        holder = [state]

        def run():
            holder[0], metrics = compiled(holder[0], params, batch, key, key)
            jax.block_until_ready(metrics)

        return run, info

    built = [build(int(layers)) for layers in args.layers.split(",")]
    infos = [info for _, info in built]
    if args.compile_only:
        return {"runs": infos}
    for run, info in built:
        start = time.perf_counter()
        run()
        info["first_step_s"] = time.perf_counter() - start
        info["times"] = []
    while any(len(info["times"]) < args.steps for info in infos):
        spent = sum(sum(info["times"]) for info in infos)
        if infos[0]["times"] and spent + sum(
                np.median(info["times"]) for info in infos) > args.budget_min * 60:
            break
        for run, info in built:
            info["times"] += peers.timed(run, 1, warmup=0)
            print(f"{info['layers']} layers, step {len(info['times'])}: "
                  f"{info['times'][-1]:.1f} s", flush=True)
    return {"runs": infos, "peak_rss_mib": peers.peak_rss_mib()}


def write_peer_model(path: str, layers: int, seed: int = 0) -> None:
    """A random float32 transformers Phi-3 of the published config with `layers` layers."""
    import torch
    import transformers

    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(seed)
    config = transformers.Phi3Config.from_dict(phi3_mini_hf_config(layers))
    transformers.Phi3ForCausalLM(config).float().save_pretrained(path)


def _linear_in_layers(probes: list[dict], value, layers: int = 32) -> float:
    """`value(probe)` at `layers` layers, on the line through the two probes."""
    (l0, v0), (l1, v1) = [(p["layers"], value(p)) for p in probes]
    return v0 + (v1 - v0) / (l1 - l0) * (layers - l0)


def phi3_mini_table(args) -> None:
    work = args.workdir or tempfile.mkdtemp(prefix="arc_jax_bench_")
    os.makedirs(work, exist_ok=True)
    side = lambda extra: peers.run_side(MODULE, [
        "--side", "phi3", "--threads", str(args.threads), "--compute", args.compute,
        "--steps", str(args.steps), "--budget-min", str(args.budget_min),
        "--remat" if args.remat else "--no-remat", *extra], args.threads)
    xla_gib = lambda r: (r["xla_argument_mib"] + r["xla_temp_mib"]) / 1024
    rows, raw = [], []
    seq_lens = list(map(int, args.seq_lens.split(",")))
    for seq_len in seq_lens:
        batch_file = os.path.join(work, f"phi3_batch_{seq_len}.npz")
        real = int(write_phi3_batch(batch_file, seq_len)["length"].sum())
        for base in [b for b in args.bases.split(",") if b]:  # --bases "": the peer only
            common = ["--base", base, "--seq-len", str(seq_len), "--batch-file", batch_file]
            if seq_len <= args.full_max_seq:  # the whole model, where memory allows
                out = side([*common, "--layers", "32"])
                raw.append(out)
                r = out["runs"][0]
                per_step, memory = float(np.median(r["times"])), xla_gib(r)
                how = f"32 layers, {len(r['times'])} timed steps" + (
                    "" if len(r["times"]) >= 10 else ", extrapolated to 10")
                peak = round(out["peak_rss_mib"] / 1024, 1)
            else:
                if args.alternate:
                    outs = [side([*common, "--layers", args.probe_layers])]
                else:  # one process per layer count: the peak memory of one probe only
                    outs = [side([*common, "--layers", n]) for n in args.probe_layers.split(",")]
                raw += outs
                probes = [run for out in outs for run in out["runs"]]
                per_step = _linear_in_layers(probes, lambda p: float(np.median(p["times"])))
                memory = _linear_in_layers(probes, xla_gib)
                how = ("extrapolated linearly in layers from " + " and ".join(
                    f"{p['layers']} layers ({len(p['times'])} timed steps, median "
                    f"{np.median(p['times']):.1f} s)" for p in probes)
                    + (", alternating" if args.alternate else ", one process each"))
                peak = "-"
            rows.append({
                "impl": f"arc_jax {base} base", "layers": 32, "seq_len": seq_len,
                "real tokens": real, "s/step": round(per_step, 1),
                "10 steps (min)": round(10 * per_step / 60, 1),
                "log: 10 steps (min, Kaggle GPUs)": LOG_MINUTES.get(seq_len, "-"),
                "XLA: base + state + temp (GiB)": round(memory, 1), "peak RSS (GiB)": peak,
                "how": how,
            })
            print(rows[-1], flush=True)
    if args.peer_layers:
        seq_len = seq_lens[0]
        model_dir = os.path.join(work, f"phi3_mini_{args.peer_layers}_layers")
        write_peer_model(model_dir, args.peer_layers)
        batch_file = os.path.join(work, f"phi3_batch_{seq_len}.npz")
        real = int(write_phi3_batch(batch_file, seq_len)["length"].sum())
        times = peers.run_side(train_step.MODULE, [
            "--side", "interleaved", "--variants", "default", "--repeats", str(args.peer_steps),
            "--model", model_dir, "--batch-file", batch_file, "--threads", str(args.threads)],
            args.threads)
        raw.append({"peer_layers": args.peer_layers, "times": times})
        torch_s = float(np.median(times["torch"]))
        for name, label in (("torch", "transformers+PEFT"), ("jax:default", "arc_jax")):
            s = float(np.median(times[name]))
            rows.append({
                "impl": f"{label}, fp32 base", "layers": args.peer_layers, "seq_len": seq_len,
                "real tokens": real, "s/step": round(s, 1),
                "10 steps (min)": round(10 * s / 60, 1), "log: 10 steps (min, Kaggle GPUs)": "-",
                "XLA: base + state + temp (GiB)": "-", "peak RSS (GiB)": "-",
                "how": f"{len(times[name])} timed steps, alternating in one process; "
                       f"vs PEFT {torch_s / s:.2f}x",
            })
    print_table(rows)
    name = f"timing_table_phi3-mini_{'_'.join(map(str, seq_lens))}"
    path = write_results(name + ("" if args.bases else "_peer"), rows, {
        "threads": args.threads, "compute": args.compute, "remat": args.remat,
        "budget_min": args.budget_min, "raw": raw})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
