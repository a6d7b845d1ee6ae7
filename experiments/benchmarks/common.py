"""Shared helpers of the benchmark scripts: machine description, timing, results files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable

import jax

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def machine() -> dict:
    """What the figures were measured on."""
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
    }


def time_fn(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of `fn` (already compiled), blocking on its outputs."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> str:
    """Writes `results/<name>.json` atomically (rows + machine + time) and returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": machine(), "rows": rows, **(extra or {})}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict]) -> None:
    """Prints rows (dicts with the same keys) as a markdown table."""
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(
            f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
