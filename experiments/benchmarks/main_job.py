"""The main job end to end: wall time and peak RSS per phase, by task count and by bucket.

Each run is `python -m arc_jax.main --config=CONFIG --workdir=DIR ...` in a fresh subprocess
under `/usr/bin/time -v` (whole-run peak RSS). While it runs, the child's `/proc/<pid>/status`
(VmRSS, VmHWM) is sampled every `--sample-every` seconds and its stderr (log lines and the
progress bar) is read line by line with timestamps, to cut the run into phases:

    load      process start (interpreter, imports, model, tokenizer, tasks) to the next phase
    ttft      test-time fine-tuning (per-task units, or joint)
    evaluate  val loss and decoding (and `val_loss` / `decode` inside it, when logged)
    write     results.json, predictions/, submission.json, TensorBoard; then process exit

A phase starts at the log line `phase NAME start` (and ends at `phase NAME done`) when the run
logs them (arc_jax.job.Job.phase); otherwise at the first line of the TTFT log ("per-task
TTFT: ...") or progress bar (a unit's name), the progress bar's "evaluate", and the
appearance of `<workdir>/predictions/`. A phase's seconds are `phase_seconds` from
results.json when the run wrote them, else the span between markers; its peak RSS is the
largest VmRSS sample in its span, raised to the child's VmHWM when the high-water mark rose
within the span (so spikes between samples count).

Steady-state TTFT speed comes from the TensorBoard `train/loss` events: the wall time between a
unit's first metrics fetch (after step 1, i.e. after compiling) and its last one, over the steps
in between. Tokens are counted, not sampled: n-1 rows contain every train pair of a task (one as
the target), so a row's real length L is exact from the grid shapes (the mean over both
orientations when `augment.geometric`, capped at the bucket for truncated tasks), and its loss
tokens ℓ are the mean over the held-out pair of its output grid plus the answer suffix.

Useful FLOPs of one training row (LoRA, frozen base; real tokens only, padding excluded):

    per layer: N_lin = d·(d_q + 2·d_kv) + d_q·d + d·2·f + f·d        (qkv, o, gate_up, down)
               N_lora = r · Σ_targets (in + out)
    forward  = 2·N_lin·L·n_layers  +  2·N_lora·L·n_layers            linear layers
             + 2·L²·d_q·n_layers                                     causal attention: QKᵀ and
                                                                     PV over L²/2 pairs each
             + 2·d·V·ℓ                                               head at the loss positions
    backward = 2·N_lin·L·n_layers                                    frozen weights: input grads
             + 4·N_lora·L·n_layers                                   LoRA: input + weight grads
             + 4·L²·d_q·n_layers                                     attention: 2x its forward
             + 2·d·V·ℓ                                               head: input grads only
    row      = forward + backward   (≈ 4·N_lin·L·n_layers + 6·L²·d_q·n_layers + ...)

(d = hidden, d_q = heads·head_dim, d_kv = kv_heads·head_dim, f = MLP width, V = vocab; the
first layer's input gradient, norms, rope, softmax and the optimizer are not counted.) A step
trains `train.batch_size` rows per task; useful FLOP/s = useful FLOPs of all steps after the
first / their wall time. The matmul peak on the line above the tables is a 2048³ float32
`jnp.dot` timed in the parent (the same shared CPU, so a ceiling, not a constant).

Commands (from the repository root; `nice` on the shared 2-core machine):

    # validation: 4 tasks, 2 steps, 1 view
    nice -n 10 python -m experiments.benchmarks.main_job --tasks 4 --name main_job_smoke \\
        --set train.steps=2 --set eval.n_augmentations=1
    # growth with the task count
    nice -n 10 python -m experiments.benchmarks.main_job --tasks 25,50,100 \\
        --name main_job_tasks --set train.steps=4 --set eval.n_augmentations=1
    # growth with the bucket length: 2 tasks of each bucket per run
    nice -n 10 python -m experiments.benchmarks.main_job --buckets 512,1024,2048,4096,8192 \\
        --per-bucket 2 --name main_job_buckets --set train.steps=6 \\
        --set eval.n_augmentations=1
    # all 400 evaluation tasks (hours on 2 cores)
    python -m experiments.benchmarks.main_job --tasks 400 --name main_job_400

`--shape config` runs the config's own model (the default `model.path`: the shipped
arc_jax/assets/arc_phi3_small) instead of `v64`; `tiny` is an older name for it.
"""

from __future__ import annotations

import argparse
import ast
import functools
import glob
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from experiments.benchmarks.common import RESULTS_DIR, print_table, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # name -> Phi3Config kwargs; "v64": the small-vocabulary shape of issue 13
    "v64": dict(vocab_size=64, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=4),
}
PHASES = ("load", "ttft", "evaluate", "val_loss", "decode", "write")
NESTED = {"val_loss": "evaluate", "decode": "evaluate"}


# ---------------------------------------------------------------------------------------------
# Set-up: the model directory, the config, per-task token counts.


def build_model(directory: str, shape: str, seed: int = 0) -> str:
    """A random Phi-3 of `SHAPES[shape]` with the shipped ARC tokenizer in `directory` (kept)."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    import jax
    import jax.numpy as jnp

    from arc_jax.data.tokenizer import load_tokenizer
    from arc_jax.model.convert import save_pretrained
    from arc_jax.model.phi3 import Phi3, Phi3Config

    tokenizer = load_tokenizer()
    config = Phi3Config(max_position_embeddings=16384, original_max_position_embeddings=16384,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0, **SHAPES[shape])
    assert len(tokenizer) <= config.vocab_size
    model = Phi3(config)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(tmp, model, params)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def load_config(path: str, overrides: dict[str, str]):
    """The experiment config at `path` with `overrides` ("a.b" -> literal text) applied."""
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, text in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        try:
            node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[leaf] = text
    return config


def task_table(config) -> list[dict]:
    """Every evaluation task of the config (before max_tasks / task_ids): id, bucket, real
    tokens per training row L and loss tokens per row ℓ (see the module docstring)."""
    from arc_jax import settings

    return [dict(r) for r in _task_table(config.data.eval, config.data.eval_solutions,
                                         settings.pipeline_config(config))]


@functools.lru_cache(maxsize=4)
def _task_table(source: str, solutions: str, pipeline) -> tuple[dict, ...]:
    from arc_jax.data.pipeline import (
        _piece_len,
        assign_buckets,
        grid_length,
        max_train_length,
    )
    from arc_jax.data.tasks import load_tasks
    from arc_jax.data.tokenizer import load_tokenizer, token_vocab

    fmt = pipeline.fmt
    vocab = token_vocab(load_tokenizer())
    pl = lambda name: _piece_len(vocab, name)
    suffix = pl("answer_suffix")
    tasks = list(load_tasks(source, solutions or None).values())
    rows = []
    for t in tasks:
        shapes = np.asarray([[p.input.shape, p.output.shape] for p in t.train])  # [n, 2, 2]
        fixed = pl("bos") + pl("prefix") + pl("query_suffix") + suffix
        fixed += (pl("input_label") + pl("output_label")) * len(shapes) - pl("output_label")
        views = [shapes, shapes[:, :, ::-1]] if pipeline.geometric else [shapes]
        lengths = [fixed + sum(grid_length(vocab, fmt, s) for s in v.reshape(-1, 2))
                   for v in views]
        loss = [np.mean([grid_length(vocab, fmt, s) + suffix for s in v[:, 1]]) for v in views]
        rows.append({"task_id": t.task_id, "length": max_train_length(vocab, fmt, shapes),
                     "row_tokens": float(np.mean(lengths)), "loss_tokens": float(np.mean(loss))})
    groups = assign_buckets([r["task_id"] for r in rows], [r["length"] for r in rows], pipeline)
    for bucket, members in groups.items():
        for i in members:
            rows[i]["bucket"] = bucket
            rows[i]["row_tokens"] = min(rows[i]["row_tokens"], bucket)  # truncated: <= bucket
    return tuple(r for r in rows if "bucket" in r)


def row_flops(model: dict, lora_rank: int, targets, length: float, loss_tokens: float) -> float:
    """Useful FLOPs (forward + backward) of one LoRA training row (module docstring)."""
    d, f, layers, vocab = (model["hidden_size"], model["intermediate_size"],
                           model["num_hidden_layers"], model["vocab_size"])
    head_dim = model.get("head_dim") or d // model["num_attention_heads"]
    dq = model["num_attention_heads"] * head_dim
    dkv = model["num_key_value_heads"] * head_dim
    shapes = {"qkv_proj": (d, dq + 2 * dkv), "o_proj": (dq, d), "gate_up_proj": (d, 2 * f),
              "down_proj": (f, d)}
    n_lin = sum(i * o for i, o in shapes.values())
    n_lora = lora_rank * sum(sum(shapes[t]) for t in targets if t in shapes)
    forward = (2 * n_lin * length + 2 * n_lora * length + 2 * length**2 * dq) * layers
    forward += 2 * d * vocab * loss_tokens
    backward = (2 * n_lin * length + 4 * n_lora * length + 4 * length**2 * dq) * layers
    backward += 2 * d * vocab * loss_tokens
    return forward + backward


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of an n³ `jnp.dot` on the default device (best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------------------------
# One run: the child process, its stderr markers and memory samples.


def _status_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of `pid` in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))
    try:
        return get("VmRSS"), get("VmHWM")
    except AttributeError:  # a zombie has no Vm* lines
        return None


def _child_pid(pid: int, timeout: float = 30.0) -> int:
    """The python process that /usr/bin/time (pid) started."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            break
        time.sleep(0.05)
    return pid


class Monitor:
    """Runs `command`, timestamps its stderr segments (split at \\r and \\n) and samples the
    memory of its python process."""

    def __init__(self, command: list[str], workdir: str, sample_every: float, log_path: str,
                 env: dict[str, str]):
        self.workdir = workdir
        self.lines: list[tuple[float, str]] = []
        self.samples: list[tuple[float, int, int]] = []  # (time, VmRSS KiB, VmHWM KiB)
        self.marks: dict[str, float] = {}  # fallback markers seen by the sampler
        self.start = time.time()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.log = open(log_path, "wb")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pid = _child_pid(self.proc.pid)
        self._sampler = threading.Thread(target=self._sample, args=(sample_every,), daemon=True)
        self._sampler.start()

    def _read(self) -> None:
        """Segments are stamped with the arrival of their first byte: the progress bar writes
        `\\r<text>`, so its text ends only when the next update begins."""
        pending, pending_t = b"", 0.0
        fd = self.proc.stderr.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.log.write(chunk)
            self.log.flush()
            now = time.time()
            first, *rest = re.split(rb"[\r\n]", chunk)
            if not pending:
                pending_t = now
            pending += first
            if rest:
                self._add(pending_t, pending)
                *done, pending = rest
                for s in done:
                    self._add(now, s)
                pending_t = now
        self._add(pending_t, pending)

    def _add(self, t: float, segment: bytes) -> None:
        if segment.strip():
            self.lines.append((t, segment.decode(errors="replace")))

    def _sample(self, every: float) -> None:
        predictions = os.path.join(self.workdir, "predictions")
        while self.proc.poll() is None:
            status = _status_kib(self.pid)
            now = time.time()
            if status is not None:
                self.samples.append((now, *status))
            if "write" not in self.marks and os.path.isdir(predictions):
                self.marks["write"] = now
            time.sleep(every)

    def wait(self) -> int:
        rc = self.proc.wait()
        self.end = time.time()
        self._reader.join()
        self._sampler.join()
        self.log.close()
        return rc

    def text(self) -> str:
        return "\n".join(s for _, s in self.lines)


_FALLBACK = (
    ("ttft", re.compile(r"per-task TTFT:|^(bucket\d+_\S+|joint): ")),
    ("evaluate", re.compile(r"^evaluate: ")),
)
_START = re.compile(r"phase (\w+) start")
_DONE = re.compile(r"phase (\w+) done")


def phase_spans(mon: Monitor, phase_seconds: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{phase: (start, end)} on the parent's clock (module docstring)."""
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for t, text in mon.lines:
        if m := _START.search(text):
            starts.setdefault(m.group(1), t)
        elif m := _DONE.search(text):
            ends[m.group(1)] = t
    for name, pattern in _FALLBACK:
        if name not in starts:
            hit = next((t for t, text in mon.lines if pattern.search(text)), None)
            if hit is not None:
                starts[name] = hit
    if "write" not in starts and "write" in mon.marks:
        starts["write"] = mon.marks["write"]
    starts.pop("load", None)  # load: from the process start, always
    top = sorted((t, n) for n, t in starts.items() if n not in NESTED)
    spans = {"load": (mon.start, top[0][0] if top else mon.end)}
    for name, t in starts.items():
        if name in ends:
            end = ends[name]
        elif name in phase_seconds and name != "write":
            end = t + phase_seconds[name]
        else:
            later = [s for s, n in top if s > t and n != name]
            end = min(later) if later else mon.end
        spans[name] = (t, max(t, end))
    if "write" in spans:  # the write phase runs to the process exit
        spans["write"] = (spans["write"][0], mon.end)
    return dict(sorted(spans.items(), key=lambda kv: kv[1][0]))


def span_peak_mib(samples, start: float, end: float) -> float | None:
    """Peak RSS (MiB) of the samples in [start, end], raised to VmHWM when it rose inside."""
    inside = [s for s in samples if start <= s[0] <= end]
    before = [s for s in samples if s[0] < start]
    after = [s for s in samples if s[0] > end]
    peak = max((s[1] for s in inside), default=None)
    hwm_before = before[-1][2] if before else 0
    hwm_after = after[0][2] if after else (inside[-1][2] if inside else None)
    if hwm_after is not None and hwm_after > hwm_before and (
            inside or hwm_after > max((s[2] for s in before), default=0)):
        peak = max(peak or 0, hwm_after)
    return None if peak is None else peak / 1024


def _time_v(text: str, key: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(key)}: (.+)$", text, re.M)
    return m.group(1).strip() if m else None


# ---------------------------------------------------------------------------------------------
# TensorBoard events (tfevents records, read without TensorFlow).


def loss_event_times(workdir: str) -> dict[int, float]:
    """{global step: wall time} of the `train/loss` scalars written by the run."""
    from tensorboardX.proto import event_pb2

    times: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + n]
            pos += 12 + n + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.tag == "train/loss":
                    times[int(event.step)] = event.wall_time
    return times


def ttft_by_bucket(workdir: str, tasks: list[dict], steps: int, trained: int, batch: int,
                   flops_of, ttft_start: float | None) -> list[dict]:
    """Per bucket: units, tasks, tokens, wall time (units' spans, compiles included) and the
    steady-state step time and useful FLOP/s (steps after each unit's first). `steps`: the
    config's (each unit's TensorBoard steps), `trained`: the steps run in this process."""
    by_bucket: dict[int, list[dict]] = {}  # each bucket's tasks in id order, as units take them
    for t in tasks:
        by_bucket.setdefault(t["bucket"], []).append(t)
    order = {t["task_id"]: i for members in by_bucket.values() for i, t in enumerate(members)}
    units = []  # (bucket, first task's position in its bucket, n_real), in training order
    for path in glob.glob(os.path.join(workdir, "checkpoints", "bucket*_*")):
        m = re.fullmatch(r"bucket(\d+)_(.+)_(\d+)", os.path.basename(path))
        if m and m.group(2) in order:
            units.append((int(m.group(1)), order[m.group(2)], int(m.group(3))))
    units.sort()
    times = loss_event_times(workdir)
    rows: dict[int, dict] = {}
    previous_end = ttft_start
    for k, (bucket, first, n_real) in enumerate(units):
        members = by_bucket.get(bucket, [])[first:first + n_real]
        assert len(members) == n_real, (bucket, first, n_real)
        marks = sorted((s, w) for s, w in times.items() if k * steps < s <= (k + 1) * steps)
        row = rows.setdefault(bucket, {
            "bucket": bucket, "units": 0, "tasks": 0, "row_tokens": 0.0, "wall_s": 0.0,
            "steady_steps": 0, "steady_s": 0.0, "steady_tokens": 0.0, "steady_flops": 0.0})
        row["units"] += 1
        row["tasks"] += n_real
        row["row_tokens"] += sum(t["row_tokens"] for t in members)
        if not marks:
            continue
        if previous_end is not None:
            row["wall_s"] += marks[-1][1] - previous_end
        previous_end = marks[-1][1]
        if len(marks) >= 2:
            (s0, w0), (s1, w1) = marks[0], marks[-1]
            row["steady_steps"] += s1 - s0
            row["steady_s"] += w1 - w0
            row["steady_tokens"] += (s1 - s0) * batch * sum(t["row_tokens"] for t in members)
            row["steady_flops"] += (s1 - s0) * batch * sum(flops_of(t) for t in members)
    out = []
    for row in rows.values():
        tokens = row["row_tokens"] * batch * trained
        out.append({
            "bucket": row["bucket"], "tasks": row["tasks"], "units": row["units"],
            "real tokens/row": row["row_tokens"] / max(row["tasks"], 1),
            "TTFT wall s": row["wall_s"],
            "us/real token (wall)": 1e6 * row["wall_s"] / tokens if tokens else None,
            "steady s/step": row["steady_s"] / row["steady_steps"] if row["steady_steps"]
            else None,
            "us/real token (steady)": 1e6 * row["steady_s"] / row["steady_tokens"]
            if row["steady_tokens"] else None,
            "useful GFLOP/s": row["steady_flops"] / row["steady_s"] / 1e9 if row["steady_s"]
            else None,
        })
    return out


def run_one(label: str, args, overrides: dict[str, str], base: str, model_dir: str | None,
            cache: str) -> tuple[dict, list[dict]]:
    """One end-to-end run; returns (its row, its per-bucket TTFT rows)."""
    workdir = os.path.join(base, label)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    every = dict(overrides)
    if model_dir is not None:
        every["model.path"] = model_dir
    every["compilation_cache"] = cache
    config = load_config(args.config, every)
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "arc_jax.main",
               f"--config={args.config}", f"--workdir={workdir}"]
    command += [f"--config.{k}={v}" for k, v in every.items()]
    print(f"[{label}] {' '.join(command[2:])}", flush=True)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    load_before = os.getloadavg()[0]
    mon = Monitor(command, workdir, args.sample_every, os.path.join(workdir, "stderr.log"), env)
    rc = mon.wait()
    text = mon.text()
    if rc != 0:
        raise RuntimeError(f"[{label}] exit status {rc}:\n{text[-4000:]}")
    results: dict = {}  # none when the run paused (train.stop_after_steps / _minutes)
    if os.path.exists(os.path.join(workdir, "results.json")):
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    phase_seconds = results.get("metadata", {}).get("phase_seconds", {})
    spans = phase_spans(mon, phase_seconds)

    all_tasks = task_table(config)
    if "tasks" in results:
        chosen = set(results["tasks"])
    else:  # as run.load_task_list selects them
        ids = sorted(t["task_id"] for t in all_tasks)
        ids = [i for i in ids if i in set(config.data.task_ids)] if config.data.task_ids else ids
        chosen = set(ids[: config.data.max_tasks] if config.data.max_tasks else ids)
    tasks = [t for t in all_tasks if t["task_id"] in chosen]
    with open(os.path.join(ROOT, config.model.path, "config.json")) as f:
        model = json.load(f)
    steps, batch = config.train.steps, config.train.batch_size
    stop = config.train.get("stop_after_steps", 0)
    trained = min(steps, stop) if stop else steps  # steps each unit trained in this process
    flops_of = lambda t: row_flops(model, config.lora.rank, config.lora.targets,
                                   t["row_tokens"], t["loss_tokens"])
    row: dict[str, Any] = {
        "run": label, "tasks": len(chosen),
        "buckets": "/".join(f"{b}:{sum(t['bucket'] == b for t in tasks)}"
                            for b in sorted({t["bucket"] for t in tasks})),
        "wall s": mon.end - mon.start,
        "peak RSS MiB": int(_time_v(text, "Maximum resident set size (kbytes)") or 0) / 1024,
        "CPU %": _time_v(text, "Percent of CPU this job got"),
        "load avg": f"{load_before:.1f}/{os.getloadavg()[0]:.1f}",  # 1-min, before/after
    }
    for name in PHASES:
        if name in spans:
            start, end = spans[name]
            row[f"{name} s"] = phase_seconds.get(name, end - start) if name != "load" else (
                end - start)
            row[f"{name} MiB"] = span_peak_mib(mon.samples, start, end)
    tokens = trained * batch * sum(t["row_tokens"] for t in tasks)
    if "ttft s" in row and tokens:
        row["TTFT real tokens"] = tokens
        row["TTFT us/real token"] = 1e6 * row["ttft s"] / tokens
        row["TTFT useful GFLOP/s (wall)"] = (
            trained * batch * sum(flops_of(t) for t in tasks) / row["ttft s"] / 1e9)
    buckets = []
    if config.mode == "ttft" and config.ttft.mode == "per_task":
        buckets = ttft_by_bucket(workdir, tasks, steps, trained, batch, flops_of,
                                 spans.get("ttft", (None,))[0])
        for b in buckets:
            b["run"] = label
    row["overall"] = {k: v for k, v in results.get("overall", {}).items()
                      if isinstance(v, (int, float))}
    row["phase_seconds"] = phase_seconds
    row["spans"] = {k: [round(s - mon.start, 2), round(e - mon.start, 2)]
                    for k, (s, e) in spans.items()}
    row["command"] = " ".join(command[2:])
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return row, buckets


def pick_by_bucket(config, buckets: list[int], per_bucket: int) -> dict[int, list[str]]:
    """The first `per_bucket` task ids (sorted) of each bucket."""
    tasks = task_table(config)
    return {b: sorted(t["task_id"] for t in tasks if t["bucket"] == b)[:per_bucket]
            for b in buckets}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/n_minus_1.py")
    p.add_argument("--tasks", default="", help="comma-separated task counts (data.max_tasks)")
    p.add_argument("--tasks-bucket", type=int, default=0,
                   help="take the --tasks counts from this bucket's tasks only (data.task_ids)")
    p.add_argument("--buckets", default="", help="comma-separated buckets: one run each")
    p.add_argument("--per-bucket", type=int, default=2, help="tasks per bucket run")
    p.add_argument("--shape", default="v64", help=f"{sorted(SHAPES)} or config (the config's model.path; also: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. train.steps=4 (repeatable)")
    p.add_argument("--workdir", default="", help="runs and the model (default: a temp dir)")
    p.add_argument("--cache", default="cold", choices=("cold", "shared", "config"),
                   help="compilation cache: fresh per run | one per invocation | the config's")
    p.add_argument("--sample-every", type=float, default=0.5)
    p.add_argument("--name", default="main_job")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--append", action="store_true",
                   help="add to the rows of results/<name>.json instead of replacing them")
    p.add_argument("--report", action="store_true",
                   help="print the tables of results/<name>.json and exit")
    args = p.parse_args(argv)
    previous = os.path.join(RESULTS_DIR, f"{args.name}.json")
    if args.report:
        with open(previous) as f:
            old = json.load(f)
        report(old["rows"], old.get("ttft_by_bucket", []))
        return
    overrides = dict(s.split("=", 1) for s in args.set)
    base = args.workdir or tempfile.mkdtemp(prefix="main_job_")
    os.makedirs(base, exist_ok=True)
    model_dir = None
    if args.shape not in ("config", "tiny"):
        model_dir = build_model(os.path.join(base, f"model_{args.shape}"), args.shape)
    config = load_config(args.config, {**overrides, **(
        {"model.path": model_dir} if model_dir else {})})

    runs: list[tuple[str, dict[str, str]]] = []
    for n in [int(x) for x in args.tasks.split(",") if x]:
        if args.tasks_bucket:
            ids = pick_by_bucket(config, [args.tasks_bucket], n)[args.tasks_bucket]
            if len(ids) < n:
                p.error(f"bucket {args.tasks_bucket} has only {len(ids)} tasks")
            runs.append((f"bucket{args.tasks_bucket}_tasks{n}",
                         {**overrides, "data.task_ids": repr(tuple(ids))}))
        else:
            runs.append((f"tasks{n}", {**overrides, "data.max_tasks": str(n)}))
    if args.buckets:
        picked = pick_by_bucket(config, [int(b) for b in args.buckets.split(",")],
                                args.per_bucket)
        for b, ids in picked.items():
            runs.append((f"bucket{b}", {**overrides, "data.task_ids": repr(tuple(ids))}))
    if not runs:
        p.error("give --tasks and/or --buckets")

    save = lambda rows, bucket_rows: write_results(args.name, rows, {
        "shape": args.shape, "model": SHAPES.get(args.shape, "config"), "config": args.config,
        "overrides": overrides, "cache": args.cache, "ttft_by_bucket": bucket_rows})
    peak = matmul_peak()
    print(f"float32 matmul peak (2048^3 jnp.dot, parent process): {peak:.1f} GFLOP/s",
          flush=True)
    rows, bucket_rows = [], []
    if args.append and os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        rows, bucket_rows = old["rows"], old.get("ttft_by_bucket", [])
    for label, run_overrides in runs:
        cache = {"cold": os.path.join(base, f"xla_cache_{label}"),
                 "shared": os.path.join(base, "xla_cache"),
                 "config": config.compilation_cache}[args.cache]
        row, buckets = run_one(label, args, run_overrides, base, model_dir, cache)
        row["matmul peak GFLOP/s"] = peak
        for b in buckets:
            b["matmul peak GFLOP/s"] = peak
        rows.append(row)
        bucket_rows.extend(buckets)
        print_table([{k: v for k, v in row.items()
                      if not isinstance(v, (dict, list)) and k != "command"}])
        save(rows, bucket_rows)
    report(rows, bucket_rows)
    print(f"\nwrote {save(rows, bucket_rows)}")
    if not args.workdir and not args.keep:  # the temp dir: model and compilation caches
        shutil.rmtree(base, ignore_errors=True)


def report(rows: list[dict], bucket_rows: list[dict]) -> None:
    """Prints the README tables: phases per run, then TTFT per bucket."""
    cell = lambda r, name: (
        "-" if r.get(f"{name} s") is None else f"{r[f'{name} s']:,.1f} / "
        + ("-" if r.get(f"{name} MiB") is None else f"{r[f'{name} MiB']:,.0f}"))
    names = [n for n in PHASES if any(f"{n} s" in r for r in rows)]
    print("\nphases: seconds / peak RSS MiB")
    print_table([{"run": r["run"], "tasks": r["tasks"], "wall s": r["wall s"],
                  "peak RSS MiB": f"{r['peak RSS MiB']:,.0f}",
                  **{n: cell(r, n) for n in names},
                  "CPU %": r.get("CPU %", "-"), "load avg": r.get("load avg", "-")}
                 for r in rows])
    if not bucket_rows:
        return
    ref = next((b["useful GFLOP/s"] for b in bucket_rows
                if b["bucket"] == 1024 and b["useful GFLOP/s"]), None)
    fmt = lambda v, f="{:,.1f}": "-" if v is None else f.format(v)
    print("\nTTFT by bucket (steady: the steps after each unit's first)")
    print_table([{
        "run": b["run"], "bucket": b["bucket"], "tasks": b["tasks"], "units": b["units"],
        "real tokens/row": fmt(b["real tokens/row"], "{:,.0f}"),
        "TTFT wall s": fmt(b["TTFT wall s"]),
        "us/real token (wall)": fmt(b["us/real token (wall)"], "{:,.0f}"),
        "steady s/step": fmt(b["steady s/step"]),
        "us/real token (steady)": fmt(b["us/real token (steady)"], "{:,.0f}"),
        "useful GFLOP/s": fmt(b["useful GFLOP/s"]),
        "% of matmul peak": fmt(100 * b["useful GFLOP/s"] / b["matmul peak GFLOP/s"]
                                if b["useful GFLOP/s"] and b.get("matmul peak GFLOP/s")
                                else None, "{:.0f}"),
        "vs 1024": fmt(b["useful GFLOP/s"] / ref if ref and b["useful GFLOP/s"] else None,
                       "{:.2f}"),
    } for b in bucket_rows])


if __name__ == "__main__":
    main()
