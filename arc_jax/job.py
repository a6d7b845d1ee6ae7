"""The whole job's clock: one progress bar over TTFT and evaluation, phase times, the deadline.

A job counts its work in tasks: each task is trained (per-task TTFT, or its share of the joint
steps) and then evaluated, so a 400-task `ttft` job has 800 task-phases. The bar shows tasks done
out of the total, the current phase, loss and tokens/s, and tqdm's time left.

A job run in chunks (paused, killed, resumed) adds up its time across processes in the workdir's
`job_seconds.json` ledger, so results.json reports the time a row really took.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator

import jax
import tqdm

from arc_jax.atomic import write_json_atomic


class Job:
    """Progress, phase times (seconds, for results.json) and the deadline of one run.

    deadline_minutes: 0 = none. Training stops when less than `reserve_minutes` are left
    (0 = a quarter of the deadline), so that evaluation can finish within it.
    ledger: a JSON file (`<workdir>/job_seconds.json`) that carries the phase and wall seconds
    of earlier processes of the same run; "" = this process only.
    """

    def __init__(self, deadline_minutes: float = 0.0, reserve_minutes: float = 0.0,
                 ledger: str = ""):
        self.start = time.monotonic()
        self.deadline = self.start + 60.0 * deadline_minutes if deadline_minutes > 0 else None
        self.reserve = 60.0 * (reserve_minutes or deadline_minutes / 4)
        self.ledger = ledger
        earlier = _read_ledger(ledger)
        self.phase_seconds: dict[str, float] = dict(earlier.get("phase_seconds", {}))
        self.earlier_wall = float(earlier.get("wall_seconds", 0.0))
        self.processes = int(earlier.get("processes", 0)) + 1
        self.deadline_hit = False
        self.tokens = 0.0
        self.bar = tqdm.tqdm(total=0, unit="task", disable=jax.process_index() != 0,
                             dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} "
                             "tasks [{elapsed}<{remaining}{postfix}]")

    def add_work(self, tasks: float) -> None:
        self.bar.total += tasks
        self.bar.refresh()

    def advance(self, tasks: float, tokens: float = 0.0, **postfix) -> None:
        self.tokens += tokens
        if tokens:
            postfix["tok_s"] = f"{self.tokens / max(time.monotonic() - self.start, 1e-9):,.0f}"
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(tasks)

    def describe(self, text: str) -> None:
        self.bar.set_description(text, refresh=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the time spent inside to `phase_seconds[name]`."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + (
                time.monotonic() - start)
            self.save()

    def wall_seconds(self) -> float:
        """Wall time of this run: this process so far plus the earlier ones in the ledger."""
        return self.earlier_wall + time.monotonic() - self.start

    def times(self) -> dict:
        """For results.json: phase seconds, wall seconds and processes, all chunks included."""
        return {"phase_seconds": dict(self.phase_seconds), "wall_seconds": self.wall_seconds(),
                "processes": self.processes}

    def save(self) -> None:
        """Writes the ledger (process 0; atomically)."""
        if self.ledger and jax.process_index() == 0:
            write_json_atomic(self.ledger, self.times())

    def seconds_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def training_must_stop(self) -> bool:
        """True (and remembered) once the deadline minus the evaluation reserve has passed."""
        if self.seconds_left() < self.reserve:
            self.deadline_hit = True
        return self.deadline_hit

    def close(self) -> None:
        self.save()
        self.bar.close()


def _read_ledger(path: str) -> dict:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            ledger = json.load(f)
    except (OSError, ValueError):  # a ledger is bookkeeping: never fail a run over it
        return {}
    return ledger if isinstance(ledger, dict) else {}
