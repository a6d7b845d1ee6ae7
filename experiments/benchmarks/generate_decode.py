"""Greedy decoding with a KV cache: arc_jax `generate` vs transformers `generate`.

    python -m experiments.benchmarks.generate_decode --size d512 --batches 1,8 --new-tokens 64

Prompts are the prompt parts of real evaluation episodes (bucket `--seq-len`, encoded by arc_jax);
arc_jax gets them right-padded, transformers left-padded (its batched-generation layout), the same
ids. No eos: both sides produce exactly `--new-tokens` tokens per row. Each side is timed for N
new tokens and for 1 (the prefill); decode tokens/s = rows x (N - 1) / (t_N - t_1).
`--jax-dtypes float32,bfloat16` adds arc_jax rows with the base and compute (and so the KV cache)
in bfloat16; transformers stays float32. An entry `float32+bf16_matmul` runs the float32 model
with `matmul_dtype=bfloat16` (bf16 operands, f32 accumulation, from `model.MIXED_MIN_ROWS` rows).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from experiments.benchmarks import peers
from experiments.benchmarks.common import print_table, write_results

MODULE = "experiments.benchmarks.generate_decode"


def _prompts(batch_file: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts `[rows, T]` (T = longest, rounded up to 64) and lengths `[rows]`."""
    b = peers.load_batch(batch_file)
    lengths = b["prompt_length"][:rows].astype(np.int32)
    width = -(-int(lengths.max()) // 64) * 64
    prompts = np.full((rows, width), 32000, np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = b["tokens"][i, :n]
    return prompts, lengths


def jax_side(args) -> dict:
    import jax
    import jax.numpy as jnp

    from arc_jax.infer.generate import generate
    from arc_jax.model.convert import load_pretrained

    name, _, matmul = args.dtype.partition("+")
    dtype = jnp.dtype(name)
    model, params = load_pretrained(args.model, dtype=dtype, compute_dtype=dtype)
    if matmul:
        if matmul != "bf16_matmul":
            raise ValueError(f"--dtype {args.dtype!r}: the part after '+' must be bf16_matmul")
        model = model.clone(matmul_dtype=jnp.bfloat16)
    out = {}
    for rows in map(int, args.batches.split(",")):
        prompts, lengths = _prompts(args.batch_file, rows)
        for n in (1, args.new_tokens):
            run = lambda n=n, p=prompts, ln=lengths: jax.block_until_ready(generate(
                model, params, p, ln, max_new_tokens=n, eos_token_id=None,
                pad_token_id=32000).tokens)
            out[f"{rows}_{n}"] = peers.timed(run, args.repeats, warmup=1)
    return out


def torch_side(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.Phi3ForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    out = {}
    for rows in map(int, args.batches.split(",")):
        prompts, lengths = _prompts(args.batch_file, rows)
        width = int(lengths.max())
        ids = np.full((rows, width), 32000, np.int64)
        mask = np.zeros((rows, width), np.int64)
        for i, n in enumerate(lengths):  # left padding
            ids[i, width - n:] = prompts[i, :n]
            mask[i, width - n:] = 1
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        for n in (1, args.new_tokens):
            def run(n=n, ids=ids, mask=mask):
                with torch.no_grad():
                    model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=32000)
            out[f"{rows}_{n}"] = peers.timed(run, args.repeats, warmup=1)
    return out


def parent(args) -> None:
    work = args.workdir or tempfile.mkdtemp(prefix="arc_jax_bench_")
    model_dir = os.path.join(work, f"phi3_{args.size}")
    rows_max = max(map(int, args.batches.split(",")))
    batch_file = os.path.join(work, f"batch_{args.seq_len}_{rows_max}.npz")
    peers.write_model(model_dir, args.size)
    peers.write_batch(batch_file, args.seq_len, rows_max)
    common = ["--model", model_dir, "--batch-file", batch_file, "--repeats", str(args.repeats),
              "--threads", str(args.threads), "--batches", args.batches,
              "--new-tokens", str(args.new_tokens)]
    dtypes = args.jax_dtypes.split(",")
    times: dict[str, dict[str, list[float]]] = {"torch": {}, **{f"jax:{d}": {} for d in dtypes}}
    for _ in range(args.rounds):
        for side in times:
            name, _, dtype = side.partition(":")
            out = peers.run_side(MODULE, ["--side", name, "--dtype", dtype or "float32", *common],
                                 args.threads)
            for key, ts in out.items():
                times[side].setdefault(key, []).extend(ts)
            print(side, {k: round(peers.median(v), 3) for k, v in out.items()}, flush=True)
    n = args.new_tokens
    rows = []
    for batch in map(int, args.batches.split(",")):
        _, lengths = _prompts(batch_file, batch)
        stats = {}
        for side in times:
            t1, tn = (peers.median(times[side][f"{batch}_{k}"]) for k in (1, n))
            stats[side] = (t1, tn, batch * (n - 1) / (tn - t1))
        for side in times:
            t1, tn, decode = stats[side]
            label = "transformers generate" if side == "torch" else \
                f"arc_jax generate {side.partition(':')[2]}"
            rows.append({
                "impl": label, "size": args.size, "batch": batch,
                "prompt tokens": int(lengths.mean()), "new tokens": n, "prefill s": round(t1, 3),
                "total s": round(tn, 3), "decode tokens/s": decode,
                "decode vs HF": round(decode / stats["torch"][2], 2),
                "total vs HF": round(stats["torch"][1] / tn, 2),
            })
    print_table(rows)
    path = write_results(f"generate_decode_{args.size}", rows, {"threads": args.threads})
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", default="parent", choices=("parent", "jax", "torch"))
    parser.add_argument("--size", default="d512", choices=sorted(peers.SIZES))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--jax-dtypes", default="float32", help="arc_jax rows, comma-separated")
    parser.add_argument("--dtype", default="float32", help="(one arc_jax side)")
    peers.add_side_args(parser)
    peers.dispatch(parser.parse_args(), parent, {"jax": jax_side, "torch": torch_side})


if __name__ == "__main__":
    main()
