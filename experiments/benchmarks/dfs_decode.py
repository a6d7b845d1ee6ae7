"""DFS decoding (`arc_jax.infer.dfs`) against greedy decoding on the same prompts.

    python -m experiments.benchmarks.dfs_decode --model arc_jax/assets/tiny_phi3 \
        --seq-len 1024 --groups 2 --views 8 --min-prob 0.1 --repeats 3

Prompts are the prompt parts of real kaggle2024 evaluation test inputs of bucket `--seq-len`
(the first `--groups` of them), each under `--views` augmented views (view 0 the identity), as
evaluation builds them; G groups x B views rows, no adapter. Both decoders get up to
`--new-tokens` tokens per row (default: a 30x30 answer in the format). Reported per run (medians
of `--repeats` timed calls after a compiling one):

    prefill s           the search with min_prob 1 (prompt and first distribution only)
    dfs expansions      prefixes expanded, summed over the rows (one token through the model each)
    dfs tokens/s        expansions / (dfs s - prefill s): the search's decoding rate
    loop steps          iterations of the search loop (the most expansions of any row: rows run
                        in lockstep, a row that is done idles)
    row-steps/s         rows x loop steps / (dfs s - prefill s): the rate to compare with
                        greedy decoding's, per token position
    candidates          completions found, summed over the rows
    candidates/s        candidates / dfs s (the whole call, prefill included)
    greedy tokens/s     generated tokens / (t(N new) - t(1 new)) of `generate_per_task` on the
                        same rows, decoding only, as `generate_decode` counts it

The DFS step does the work of a greedy step plus a top-k and the stack updates, per row.
`--grammar grid` constrains both decoders to well-formed grids (`arc_jax.infer.grammar`).
`--sharpen S` multiplies the output projection by S: a random model's next-token distributions
are nearly uniform (tiny model: 48 tokens, ~0.02 each), so at min_prob 0.1 the search stops at
its first step; sharpening makes it search as a trained model would, so the expansion rate can
be measured before a trained model exists (candidates then depend on where a random model puts
its end marker).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.common import print_table, write_results


def _prompts(model_path: str, seq_len: int, groups: int, views: int):
    """Prompt tokens `[G, B, T]`, lengths `[G, B]`, the vocab and the format."""
    from arc_jax.data.arrays import pad_tasks
    from arc_jax.data.encode import check_device_encoding
    from arc_jax.data.pipeline import PipelineConfig, assign_buckets, eval_batch
    from arc_jax.data.tasks import load_tasks
    from arc_jax.data.tokenizer import load_tokenizer
    from arc_jax.infer.inference import test_length, view_augmentations

    tokenizer = load_tokenizer(model_path if os.path.exists(
        os.path.join(model_path, "tokenizer.json")) else None)
    cfg = PipelineConfig()
    vocab = check_device_encoding(tokenizer, cfg.fmt)
    tasks = list(load_tasks("kaggle2024/evaluation").values())
    pairs = [(i, q) for i, t in enumerate(tasks) for q in range(len(t.test))]
    lengths = [test_length(vocab, cfg.fmt, tasks[i], q, answer=False) for i, q in pairs]
    buckets = assign_buckets([f"{tasks[i].task_id}/{q}" for i, q in pairs], lengths, cfg)
    chosen = [pairs[m] for m in buckets.get(seq_len, [])][:groups]
    if len(chosen) < groups:
        raise SystemExit(f"bucket {seq_len} has {len(chosen)} test inputs, fewer than {groups}")
    keys = jax.random.split(jax.random.key(0), groups)
    augs = jax.vmap(lambda k: view_augmentations(k, 1, views))(keys)
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[3:]), augs)
    rows = eval_batch(pad_tasks(tasks), jnp.repeat(jnp.asarray([i for i, _ in chosen]), views),
                      jnp.repeat(jnp.asarray([q for _, q in chosen]), views), flat, vocab=vocab,
                      cfg=cfg, seq_len=seq_len, with_answer=False)
    ids = [f"{tasks[i].task_id}/test{q}" for i, q in chosen]
    return (rows.tokens.reshape(groups, views, seq_len), rows.length.reshape(groups, views),
            vocab, cfg.fmt, ids)


def _median_time(fn, repeats: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn())  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="arc_jax/assets/tiny_phi3")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--min-prob", default="0.1", help="comma-separated thresholds")
    parser.add_argument("--max-candidates", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=0, help="0: a 30x30 answer")
    parser.add_argument("--sharpen", default="1", help="comma-separated lm_head factors")
    parser.add_argument("--max-steps", type=int, default=0, help="expansions per row; 0: none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grammar", default="none", choices=["none", "grid"],
                        help="grid: both decoders constrained to well-formed grids")
    args = parser.parse_args()

    from arc_jax.infer.dfs import dfs_per_task
    from arc_jax.infer.generate import generate_per_task, max_answer_tokens
    from arc_jax.infer.grammar import grid_grammar
    from arc_jax.model.convert import load_pretrained

    model, params = load_pretrained(args.model)
    prompts, lengths, vocab, fmt, ids = _prompts(args.model, args.seq_len, args.groups,
                                                 args.views)
    new = args.new_tokens or max_answer_tokens(vocab, fmt)
    eos, pad = int(vocab.end), int(vocab.pad)
    name = os.path.basename(os.path.normpath(args.model))
    grammar = grid_grammar(vocab, fmt) if args.grammar == "grid" else None

    def greedy(p, n):
        return generate_per_task(model, p, None, prompts, lengths, max_new_tokens=n,
                                 eos_token_id=eos, pad_token_id=pad, grammar=grammar)

    def search(p, min_prob):
        return dfs_per_task(model, p, None, prompts, lengths, min_prob=min_prob,
                            max_candidates=args.max_candidates, max_new_tokens=new,
                            eos_token_id=eos, pad_token_id=pad, max_steps=args.max_steps,
                            grammar=grammar)

    rows = []
    for sharpen in map(float, args.sharpen.split(",")):
        sharp = dict(params)
        if sharpen != 1.0:
            head = "lm_head" if "lm_head" in params else None
            if head is None:
                raise SystemExit("--sharpen needs an untied lm_head")
            sharp["lm_head"] = {"kernel": params["lm_head"]["kernel"] * sharpen}
        greedy_1, _ = _median_time(lambda p=sharp: greedy(p, 1), args.repeats)
        greedy_s, gen = _median_time(lambda p=sharp: greedy(p, new), args.repeats)
        greedy_tokens = int(jax.device_get(gen.lengths).sum()) - gen.lengths.size
        prefill_s, _ = _median_time(lambda p=sharp: search(p, 1.0), args.repeats)
        for min_prob in map(float, args.min_prob.split(",")):
            dfs_s, found = _median_time(lambda p=sharp, m=min_prob: search(p, m), args.repeats)
            found = jax.device_get(found)
            expansions = int(found.steps.sum())
            rows.append({
                "model": name, "grammar": args.grammar, "sharpen": sharpen,
                "bucket": args.seq_len,
                "rows": int(np.prod(lengths.shape)),
                "prompt tokens": int(np.mean(lengths)), "max new": new, "min_prob": min_prob,
                "prefill s": round(prefill_s, 3), "dfs s": round(dfs_s, 3),
                "dfs expansions": expansions,
                "dfs tokens/s": expansions / max(dfs_s - prefill_s, 1e-9),
                "loop steps": int(found.steps.max()),
                "row-steps/s": found.steps.size * int(found.steps.max())
                / max(dfs_s - prefill_s, 1e-9),
                "candidates": int(found.n_found.sum()),
                "candidates/s": float(found.n_found.sum()) / dfs_s,
                "exhausted rows": int(found.exhausted.sum()),
                "greedy s": round(greedy_s, 3), "greedy tokens": greedy_tokens,
                "greedy tokens/s": greedy_tokens / max(greedy_s - greedy_1, 1e-9),
            })
            print(rows[-1], flush=True)
    print_table(rows)
    suffix = "" if args.grammar == "none" else f"_{args.grammar}"
    path = write_results(f"dfs_decode_{name}{suffix}", rows, {"test_inputs": ids,
                                                      "views": args.views})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
