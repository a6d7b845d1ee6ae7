"""The whole job's clock: one progress bar over TTFT and evaluation, phase times, the deadline.

A job counts its work in tasks: each task is trained (per-task TTFT, or its share of the joint
steps) and then evaluated, so a 400-task `ttft` job has 800 task-phases. The bar shows tasks done
out of the total, the current phase, loss and tokens/s, and tqdm's time left.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import jax
import tqdm


class Job:
    """Progress, phase times (seconds, for results.json) and the deadline of one run.

    deadline_minutes: 0 = none. Training stops when less than `reserve_minutes` are left
    (0 = a quarter of the deadline), so that evaluation can finish within it.
    """

    def __init__(self, deadline_minutes: float = 0.0, reserve_minutes: float = 0.0):
        self.start = time.monotonic()
        self.deadline = self.start + 60.0 * deadline_minutes if deadline_minutes > 0 else None
        self.reserve = 60.0 * (reserve_minutes or deadline_minutes / 4)
        self.phase_seconds: dict[str, float] = {}
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

    def seconds_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def training_must_stop(self) -> bool:
        """True (and remembered) once the deadline minus the evaluation reserve has passed."""
        if self.seconds_left() < self.reserve:
            self.deadline_hit = True
        return self.deadline_hit

    def close(self) -> None:
        self.bar.close()
