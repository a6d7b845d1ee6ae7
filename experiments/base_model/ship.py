"""Ships a finished base-model run (`configs/train_base_model.py`) as the project's default model:
copies the exported transformers directory into `arc_jax/assets/<name>/` and writes its model card
(README.md), the training and held-out loss curves (training_curves.png) and the card's figures
(training_summary.json).

    python -m experiments.base_model.ship --workdir ~/arc_runs/base_model \
        --out arc_jax/assets/arc_phi3_small

"Tokens seen" is counted, not estimated: the run's batches are replayed from its data key and
bucket schedule (`arc_jax.train.finetune.tokens_seen`), without training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def replay(workdir: str, steps: int | None) -> tuple[dict, int, str | None]:
    """Rebuilds the run's training data and counts the tokens of its first `steps` batches
    (None: up to its latest checkpoint, whose weights are then exported to
    `<workdir>/checkpoint_<N>/model`). Returns (counts, steps, exported model dir or None)."""
    from arc_jax import run
    from arc_jax.train import checkpoint, finetune

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.compilation_cache = ""
    scratch_dir = os.path.join(workdir, "ship_replay")
    setup = run.load_setup(config, scratch_dir)
    eval_tasks = run.load_task_list(config.data.eval, config.data.eval_solutions,
                                    config.data.max_tasks, config.data.task_ids,
                                    config.data.get("subset", ""))
    data = finetune.load_training_data(config, setup.vocab, setup.pipeline.fmt, eval_tasks)
    exported = None
    if steps is None:  # the latest checkpoint, laid out as the run saved it
        state, _ = finetune.make_training(
            setup, data, init_key=setup.stream(run.INIT), data_key=setup.stream(run.DATA),
            dropout_key=setup.stream(run.DROPOUT))
        state = {**state, "data_key": np.asarray(jax.random.key_data(setup.stream(run.DATA)))}
        mngr = checkpoint.manager(os.path.join(workdir, "checkpoints", "finetune"),
                                  config.train.keep_checkpoints, config.train.checkpoint_every)
        steps, state = checkpoint.restore_latest(mngr, state)
        root = os.path.join(workdir, f"checkpoint_{steps}")
        run.export_model(setup, jax.device_get(state["train"].trainable), root)
        exported = os.path.join(root, "model")
    counts = finetune.tokens_seen(setup, data, setup.stream(run.DATA), steps)
    setup.writer.close()
    shutil.rmtree(scratch_dir, ignore_errors=True)
    return counts, steps, exported


def plot_curves(train: list, heldout: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([s for s, _, _ in train], [v for _, _, v in train], lw=1, label="training loss "
            "(batch mean NLL per supervised token, augmented)")
    ax.plot([c["step"] for c in heldout], [c["val_loss"] for c in heldout], "o-", lw=2,
            label="held-out val loss (test outputs of the held-out training tasks)")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL per token (nats)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def write_card(out: str, summary: dict) -> None:
    c, m, d, t = summary["config"], summary["model"], summary["data"], summary["training"]
    heldout = summary["heldout"]
    sources = "\n".join(
        f"- `{name}`: {s['used_tasks']} tasks, {s['used_pairs']:,} pairs used "
        f"({100 * s['episode_share']:.0f}% of the episodes); {len(s['excluded_ids'].get('holdout', []))}"
        f" held-out task ids and {len(s['excluded_ids'].get('evaluation_duplicate', []))} "
        f"duplicate(s) of evaluation tasks excluded, {sum(s['excluded_pairs'].values()) if s['excluded_pairs'] else 0} "
        f"pairs equal to an evaluation or held-out pair excluded, {s['pairs_too_long']} pairs "
        f"longer than the largest bucket dropped"
        for name, s in d["sources"].items())
    curve = "\n".join(f"| {p['step']} | {p['val_loss']:.4f} | {p['task_mean_val_loss']:.4f} |"
                      for p in heldout["curve"])
    text = f"""# {summary['name']}: a small Phi-3 trained from scratch on ARC

The project's own model: arc_jax's default `model.path` (`configs/base.py`), which the
README's main command fine-tunes per task at test time.
A Phi-3-architecture causal LM with the shipped ARC tokenizer
({m['vocab_size']} token ids: the 10 colours, digits for sizes and row numbers, grid markers),
trained from random weights on the ARC training tasks and RE-ARC pairs for them, with arc_jax's
own training loop. It is a transformers directory: it loads in arc_jax
(`arc_jax.model.convert.load_pretrained`) and in transformers
(`AutoModelForCausalLM.from_pretrained`). It is small so that per-task test-time fine-tuning of
all 400 evaluation tasks fits the README's main-command budget on 2 CPU cores; expect few solved
tasks.

![training curves](training_curves.png)

## Model

{_table([
    ("architecture", "Phi3ForCausalLM (RoPE, GQA, SwiGLU, RMSNorm, untied head)"),
    ("layers / hidden / MLP", f"{m['num_hidden_layers']} / {m['hidden_size']} / {m['intermediate_size']}"),
    ("heads (query / key-value)", f"{m['num_attention_heads']} / {m['num_key_value_heads']}"),
    ("parameters", f"{m['parameters']:,}"),
    ("weights", f"float32 safetensors, {m['file_mb']:.1f} MB"),
    ("trained context", f"{c['data']['max_seq_len']} tokens (buckets {', '.join(str(b) for b in c['data']['buckets'] if b <= c['data']['max_seq_len'])}); `max_position_embeddings` {m['max_position_embeddings']}"),
])}

## Data

Episodes of 2-4 context pairs and one target pair, all from one task, encoded in the
`{c['data']['grid_format']}` grid format, with the 8 dihedral transforms and colour permutations
(colour 0 kept), loss on every output grid of the episode (`data.loss_on = all_outputs`).

{sources}

Held out for tuning (`data.holdout = "{d['holdout']['rule']}"`, every 8th sorted
kaggle2024/training id; their RE-ARC pools excluded too): {len(d['holdout']['ids'])} tasks,
`{'`, `'.join(d['holdout']['ids'])}`. No evaluation task id, no task duplicating one
({', '.join(d['duplicates_of_protected_tasks']) or 'none'}), and no (input, output) pair equal to an
evaluation pair up to the 8 dihedral transforms enters training (`<workdir>/training_data.json`
lists every exclusion; `tests/test_pools.py` checks the rule).

## Training

{_table([
    ("steps", f"{t['steps']} of a {t['scheduled_steps']}-step schedule (batch {c['train']['batch_size']} rows, one bucket per step)"
     + ("" if t["steps"] == t["scheduled_steps"] else "; the run's latest checkpoint, shipped before it finished")),
    ("tokens seen", f"{t['tokens']:,} real tokens ({t['loss_tokens']:,} supervised) in {t['rows']:,} rows; {100 * (1 - t['tokens'] / t['padded_tokens']):.0f}% of the padded row tokens are padding"),
    ("optimizer", f"AdamW, lr {c['train']['learning_rate']}, {c['train']['schedule']} schedule, {c['train']['warmup_steps']} warmup steps, weight decay {c['train']['weight_decay']}, grad-norm clip {c['train']['max_grad_norm']}"),
    ("precision", f"float32 weights, {c['model']['matmul_dtype']} matmul operands (float32 accumulation)"),
    ("final training loss", f"{t['final_loss']:.4f} (mean of the last {t['final_loss_window']} logged steps)"),
    ("held-out val loss", f"{heldout['curve'][-1]['val_loss']:.4f} at step {heldout['curve'][-1]['step']} ({len(heldout['tasks'])} held-out tasks, {len(heldout['left_out_too_long'])} longer than {max(b for b in c['data']['buckets'] if b <= c['data']['max_seq_len'])} tokens left out)" if heldout["curve"] else "none"),
    ("hardware", f"{summary['hardware']['cpu']}, {summary['hardware']['cores']} cores, {summary['hardware']['memory_gib']:.0f} GiB, no accelerator"),
    ("wall time", f"{t['wall_minutes']:.0f} min from the first to the last logged step (held-out passes and per-bucket compilation included; data loading of about a minute before)"),
])}

Held-out val loss (NLL per answer token of each held-out task's test output, given all its train
pairs, no augmentation; overall = token-weighted, task mean = mean of per-task losses):

| step | val loss | task-mean val loss |
|---|---|---|
{curve}

## Re-train

    python -m arc_jax.main --config=configs/train_base_model.py \\
        --workdir=$HOME/arc_runs/base_model --config.train.stop_after_minutes=100
    # the same command resumes a paused or killed run from its last checkpoint
    python -m experiments.base_model.ship --workdir $HOME/arc_runs/base_model \\
        --out arc_jax/assets/{summary['name']}

`--config.data.train` points at other sources (a directory of RE-ARC pools you generated, with a
weight: `"((\\"kaggle2024/training\\",1),(\\"/path/to/re_arc/tasks\\",3))"`); the README's
"Training data" section says how.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.expanduser("~/arc_runs/base_model"))
    parser.add_argument("--out", default=os.path.join(ROOT, "arc_jax/assets/arc_phi3_small"))
    parser.add_argument("--checkpoint", action="store_true",
                        help="ship the latest checkpoint of an unfinished run (the card says so)")
    args = parser.parse_args(argv)

    from arc_jax.model.convert import load_pretrained
    from arc_jax.train.tensorboard import read_scalars

    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    model_dir = os.path.join(workdir, "model")
    if not args.checkpoint and not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        sys.exit(f"{model_dir}: no exported model (has the run finished? else --checkpoint)")
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(workdir, "training_data.json")) as f:
        data = json.load(f)
    with open(os.path.join(workdir, "heldout.json")) as f:
        heldout = json.load(f)
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    scheduled = config["train"]["steps"]
    counts, steps, exported = replay(workdir, None if args.checkpoint else scheduled)
    model_dir = exported or model_dir
    train = [x for x in scalars["train/loss"] if x[0] <= steps]
    # a run stopped right after its last step may not have flushed that step's event
    if train[-1][0] < steps - config["train"]["log_every"]:
        sys.exit(f"{workdir}: training logged up to step {train[-1][0]}, not {steps}")
    heldout["curve"] = [c for c in heldout["curve"] if c["step"] <= steps]

    os.makedirs(args.out, exist_ok=True)
    for name in MODEL_FILES:
        if os.path.exists(os.path.join(model_dir, name)):
            shutil.copy2(os.path.join(model_dir, name), os.path.join(args.out, name))
    model, params = load_pretrained(args.out)
    window = min(10, len(train))
    summary = {
        "name": os.path.basename(os.path.normpath(args.out)),
        "config": config,
        "model": {
            **{k: getattr(model.config, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
            "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "file_mb": os.path.getsize(os.path.join(args.out, "model.safetensors")) / 1e6,
        },
        "data": data,
        "training": {
            **counts,
            "scheduled_steps": scheduled,
            "final_loss": float(np.mean([v for _, _, v in train[-window:]])),
            "final_loss_window": window,
            "wall_minutes": (train[-1][1] - train[0][1]) / 60,
            "loss_curve": [(s, v) for s, _, v in train],
        },
        "heldout": heldout,
        "hardware": {"cpu": _cpu(), "cores": os.cpu_count(), "memory_gib": _memory_gib()},
        "arc_jax_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                         capture_output=True, text=True).stdout.strip(),
    }
    plot_curves(train, heldout["curve"], os.path.join(args.out, "training_curves.png"))
    with open(os.path.join(args.out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_card(args.out, summary)
    print(f"shipped {model_dir} -> {args.out}: {summary['model']['parameters']:,} parameters, "
          f"{summary['training']['tokens']:,} tokens seen")


if __name__ == "__main__":
    main()
