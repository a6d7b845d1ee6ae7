"""Runs the Iteration 4 rows (see README.md here: the protocol) in resumable chunks, keeps each
finished row's results.json + config.json under `runs/<row>/`, and prints the table.

    python -m experiments.iteration_04.run --minutes 120          # every row not yet kept
    python -m experiments.iteration_04.run --rows baseline,n_minus_1 --minutes 60
    python -m experiments.iteration_04.run --table                # the table only

Each row is one `python -m arc_jax.main` run with its workdir under `--runs` (outside the repo).
A row that is paused by the minute budget (`train.stop_after_minutes`) or killed resumes from its
checkpoints at the next call; its times add up over the chunks (`<workdir>/job_seconds.json`).
Re-evaluation rows (DFS, scoring) evaluate the per-task adapters of another row's workdir, so they
run after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KEPT = os.path.join(HERE, "runs")  # the full-scale variant's rows go to runs_phi3/
EVAL_SUBSET = ("--config.data.subset=every:4",)  # the 100 evaluation tasks of the protocol
SUBSET_TASKS = 100


JOINT = "--config.ttft.mode=joint"


def joint_steps(variant: str = "") -> str:
    """Joint TTFT trains one adapter on the subset's rows: as many steps of `train.batch_size`
    rows as the per-task rows give all 100 tasks together (`train.steps` x 100)."""
    from configs import base

    return f"--config.train.steps={base.get_config(variant).train.steps * SUBSET_TASKS}"
HELDOUT = ("--config.data.eval=kaggle2024/training", "--config.data.subset=every:8")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    config: str  # configs/<config>.py
    flags: tuple[str, ...] = EVAL_SUBSET
    adapters_from: str = ""  # a row whose per-task adapters this row re-evaluates

    def command(self, runs: str, model: str, minutes: float, variant: str = "") -> list[str]:
        config = f"configs/{self.config}.py" + (f":{variant}" if variant else "")
        cmd = [sys.executable, "-m", "arc_jax.main", f"--config={config}",
               f"--workdir={os.path.join(runs, self.name)}", f"--config.name={self.name}",
               *self.flags]
        if JOINT in self.flags:
            cmd.append(joint_steps(variant))
        if model:
            cmd.append(f"--config.model.path={model}")
        if self.adapters_from:
            cmd += ["--config.mode=evaluate",
                    f"--config.eval.adapters_from={os.path.join(runs, self.adapters_from)}"]
        elif minutes > 0:
            cmd.append(f"--config.train.stop_after_minutes={minutes:.1f}")
        return cmd


DFS = ("--config.eval.strategy=dfs",)
ROWS = (
    Row("baseline", "baseline"),
    Row("n_minus_1", "n_minus_1"),
    Row("geometric", "geometric"),
    Row("color_swap", "color_swap"),
    Row("preserve_color", "preserve_color"),
    Row("n_minus_2", "n_minus_2"),
    Row("color_swap_joint", "color_swap", EVAL_SUBSET + (JOINT,)),
    Row("n_minus_1_dfs_poe", "n_minus_1", EVAL_SUBSET + DFS + ("--config.eval.scoring=poe",),
        adapters_from="n_minus_1"),
    Row("n_minus_1_dfs_count_logprob", "n_minus_1",
        EVAL_SUBSET + DFS + ("--config.eval.scoring=count_logprob",), adapters_from="n_minus_1"),
    Row("heldout_baseline", "baseline", HELDOUT),
    Row("heldout_n_minus_1", "n_minus_1", HELDOUT),
    Row("all_400_n_minus_1", "n_minus_1", ()),  # the README's main command
)


def kept_dir(variant: str = "") -> str:
    return KEPT + (f"_{variant}" if variant else "")


def keep(row: Row, runs: str, variant: str = "") -> bool:
    """Copies a finished row's results.json and config.json into runs/<row>/; False if none."""
    workdir = os.path.join(runs, row.name)
    if not os.path.exists(os.path.join(workdir, "results.json")):
        return False
    kept = kept_dir(variant)
    os.makedirs(os.path.join(kept, row.name), exist_ok=True)
    for name in ("results.json", "config.json"):
        shutil.copy2(os.path.join(workdir, name), os.path.join(kept, row.name, name))
    return True


def table(variant: str = "") -> str:
    from arc_jax.results_table import results_table

    where = kept_dir(variant)
    kept = [os.path.join(where, r.name) for r in ROWS if os.path.isdir(os.path.join(where, r.name))]
    return results_table(kept, markdown=True) if kept else "(no row kept yet)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated row names; default: all")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="stop starting or training rows after this long; 0 = no limit")
    parser.add_argument("--runs", default=os.path.expanduser("~/arc_runs/iter4"))
    parser.add_argument("--model", default="", help="model.path; default: the configs' own")
    parser.add_argument("--variant", default="", choices=["", "phi3"],
                        help="phi3: the configs' full-scale variant (a real Phi-3, accelerator)")
    parser.add_argument("--table", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.variant))
        return
    names = [n for n in args.rows.split(",") if n] or [r.name for r in ROWS]
    unknown = sorted(set(names) - {r.name for r in ROWS})
    if unknown:
        sys.exit(f"unknown rows {unknown}; rows: {', '.join(r.name for r in ROWS)}")
    start = time.monotonic()
    for row in (r for r in ROWS if r.name in names):
        if os.path.exists(os.path.join(kept_dir(args.variant), row.name, "results.json")):
            continue
        left = args.minutes - (time.monotonic() - start) / 60 if args.minutes else 0.0
        if args.minutes and left < 2:
            print(f"minute budget spent; rerun to continue from {row.name}")
            break
        cmd = row.command(args.runs, args.model, left, args.variant)
        print(" ".join(cmd), flush=True)
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"{row.name} failed (exit {done.returncode}); its workdir: "
                     f"{os.path.join(args.runs, row.name)}")
        if not keep(row, args.runs, args.variant):
            print(f"{row.name} paused; rerun to resume it")
            break
    print(table(args.variant))


if __name__ == "__main__":
    main()
