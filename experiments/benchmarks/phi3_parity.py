"""Logit parity with transformers at Phi-3-mini width, and where the differences come from.

    python -m experiments.benchmarks.phi3_parity

The published Phi-3-mini config (`../shared/fixtures/phi-3-mini-4k-instruct/config.json`: hidden
3072, 32 heads of 96, vocab 32064) with 1 layer and a LongRoPE `rope_scaling` of 48 short and 48
long factors as Phi-3-mini-128k has (max_position_embeddings 131072, original 4096), random fp32
weights N(0, `--std`), norm weights 1 + N(0, 0.2); the same weights in transformers' PyTorch Phi-3
(`sdpa` attention) and in arc_jax. Rows: 64-token sequences starting at positions before and past
4096 (LongRoPE picks the long factors for a whole call once it reaches past 4096, on both sides),
and one 4,160-token sequence. Columns: max |logit diff| between the two; each side's max |error|
against transformers run in float64 on the same weights (`--f64`); arc_jax with transformers'
own inverse frequencies (torch's float32 pow is one ulp off for 10000 ** (40 / 96), the one
formula-level difference); and the float32 GEMM error of each library at the model's shapes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np

from experiments.benchmarks.common import print_table, write_results

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "phi-3-mini-4k-instruct"


def real_width_config(fixture: Path = FIXTURE) -> dict:
    """The fixture's config.json with 1 layer and 128k-style LongRoPE (48 + 48 factors)."""
    config = json.loads((fixture / "config.json").read_text())
    config.pop("auto_map", None)
    config.update(num_hidden_layers=1, max_position_embeddings=131072, sliding_window=262144,
                  rope_scaling={"type": "longrope",
                                "short_factor": [round(1.0 + 0.025 * i, 4) for i in range(48)],
                                "long_factor": [round(1.03 * 1.09 ** i, 4) for i in range(48)]})
    return config


def build_pair(config: dict, std: float, seed: int = 0):
    """(transformers model, arc_jax model, arc_jax params) with the same random weights."""
    import jax.numpy as jnp
    import torch
    import transformers

    from arc_jax.model.convert import _TRANSFORMS, from_hf_name, unflatten
    from arc_jax.model.phi3 import Phi3, Phi3Config

    torch.manual_seed(seed)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config.from_dict(dict(config)))
    hf = hf.float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    flat = {}
    for name, tensor in hf.state_dict().items():
        path, transform = from_hf_name(name)
        flat[path] = jnp.asarray(_TRANSFORMS[transform][0](tensor.numpy()))
    return hf, Phi3(Phi3Config.from_hf(config)), unflatten(flat)


def gemm_errors(threads: int) -> list[dict]:
    """Max |error| / max |result| of float32 products against float64, XLA:CPU vs PyTorch."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in ((128, 3072, 9216), (128, 8192, 3072), (128, 3072, 32064)):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
        exact = a.astype(np.float64) @ b.astype(np.float64)
        scale = np.abs(exact).max()
        xla = np.asarray(jax.jit(jnp.matmul)(a, b))
        pt = (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()
        rows.append({"product": f"[{m}, {k}] @ [{k}, {n}]",
                     "XLA:CPU rel. error": f"{np.abs(xla - exact).max() / scale:.2g}",
                     "PyTorch rel. error": f"{np.abs(pt - exact).max() / scale:.2g}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--std", type=float, default=0.02, help="weights' standard deviation")
    parser.add_argument("--starts", default="0,4064,4100,60000")
    parser.add_argument("--long", type=int, default=4160, help="0: skip the long sequence")
    parser.add_argument("--f64", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import jax
    import torch

    import arc_jax.model.phi3 as phi3

    torch.set_num_threads(args.threads)
    hf, model, params = build_pair(real_width_config(), args.std)
    hf64 = None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    longrope = lambda seq_len: ROPE_INIT_FUNCTIONS["longrope"](
        hf.config, None, seq_len=seq_len)[0].numpy()
    theirs_inv = {False: longrope(None), True: longrope(4097)}
    ours_inv = phi3.rope_inv_freq

    def ours(ids, positions, torch_inv_freq=False):
        phi3.rope_inv_freq = (lambda config, long=False: theirs_inv[long]) if torch_inv_freq \
            else ours_inv
        try:  # a fresh trace, so the patched frequencies are the ones compiled in
            fn = jax.jit(lambda p, i, pos: model.apply({"params": p}, i, positions=pos))
            return np.asarray(fn(params, ids, positions))
        finally:
            phi3.rope_inv_freq = ours_inv

    def theirs(net, ids, positions):
        with torch.no_grad():
            return net(input_ids=torch.from_numpy(ids),
                       position_ids=torch.from_numpy(positions)).logits.double().numpy()

    cases = [(int(s), 64, 2) for s in args.starts.split(",")]
    if args.long:
        cases.append((0, args.long, 1))
    rows = []
    for start, length, batch in cases:
        rng = np.random.default_rng(start + length)
        ids = rng.integers(0, 32064, (batch, length))
        positions = np.broadcast_to(np.arange(start, start + length), (batch, length)).copy()
        ref = theirs(hf, ids, positions)
        got = ours(ids, positions)
        same_rope = ours(ids, positions, torch_inv_freq=True)
        row = {
            "tokens": f"{batch} x {length} from {start}",
            "rope factors": "long" if start + length > 4096 else "short",
            "max |logit|": float(np.abs(ref).max()),
            "max |diff|": float(np.abs(got - ref).max()),
            "max |diff|, torch's inv_freq": float(np.abs(same_rope - ref).max()),
        }
        per_position = np.abs(got - ref).max(axis=(0, 2))
        row["max |diff| at positions < / >= 4096"] = " / ".join(
            f"{part.max():.2g}" if part.size else "-"
            for part in (per_position[positions[0] < 4096], per_position[positions[0] >= 4096]))
        if args.f64:
            hf64 = hf64 or copy.deepcopy(hf).double()
            exact = theirs(hf64, ids, positions)
            row["transformers fp32 vs f64"] = float(np.abs(ref - exact).max())
            row["arc_jax fp32 vs f64"] = float(np.abs(got - exact).max())
        rows.append({k: f"{v:.2g}" if isinstance(v, float) else v for k, v in row.items()})
        print(rows[-1], flush=True)
    print_table(rows)
    gemm = gemm_errors(args.threads)
    print_table(gemm)
    path = write_results("phi3_parity" + ("" if args.std == 0.02 else f"_std{args.std}"), rows,
                         {"std": args.std, "threads": args.threads, "gemm": gemm,
                          "attention": hf.config._attn_implementation})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
