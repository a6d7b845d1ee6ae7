"""One row per experiment from the `results.json` of workdirs, as in the research log's table.

    python -m arc_jax.results_table workdirs/baseline workdirs/color_swap [--markdown]

A row is named by the results' "name" (the config name), else by the workdir. Columns beyond the
research log's (solved tasks, candidate coverage, correct size and pixels, TTFT and total time)
appear when some results carry them. A workdir without a readable results.json gets a row
that says so. Reads JSON only, so it works on a machine without the model stack.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from typing import Any


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _loss(value: Any) -> str:
    x = _number(value)
    return "-" if x is None else f"{x:.4f}"


def _percent(value: Any) -> str:
    x = _number(value)
    return "-" if x is None else f"{100 * x:.2f}%"


def _duration(value: Any) -> str:
    x = _number(value)
    if x is None or not math.isfinite(x):
        return "-"
    minutes, seconds = divmod(round(x), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _read(workdir: str) -> tuple[dict[str, Any] | None, str]:
    """The results of a workdir (or of a results.json path), or None and what went wrong."""
    path = workdir if os.path.isfile(workdir) else os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None, "no results.json"
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"unreadable results.json: {e}"
    if not isinstance(results, dict):
        return None, "results.json is not a JSON object"
    return results, ""


def _row(workdir: str) -> dict[str, str]:
    base = os.path.basename(os.path.normpath(workdir))
    if base == "results.json":
        base = os.path.basename(os.path.dirname(os.path.abspath(workdir)))
    results, problem = _read(workdir)
    if results is None:
        return {"experiment": base, "note": problem}
    meta = results.get("metadata") if isinstance(results.get("metadata"), dict) else {}
    overall = results.get("overall") if isinstance(results.get("overall"), dict) else {}
    name = results.get("name") or meta.get("name") or base
    ttft = results.get("ttft_seconds", meta.get("ttft_seconds"))
    wall = meta.get("wall_seconds")
    solved, scored = _number(overall.get("solved_pass_2")), _number(overall.get("n_scored_tasks"))
    optional = lambda key, fmt: "" if overall.get(key) is None else fmt(overall.get(key))
    return {
        "experiment": str(name),
        "val loss": _loss(overall.get("val_loss")),
        "val accuracy": _percent(overall.get("accuracy")),
        "pass@2": _percent(overall.get("pass_2")),
        "solved (pass@2)": "" if solved is None or scored is None else f"{solved:g}/{scored:g}",
        "coverage": optional("coverage", _percent),
        "correct size": optional("correct_size", _percent),
        "correct pixels": optional("correct_pixels", _percent),
        "ttft time": "" if ttft is None else _duration(ttft),
        "total time": "" if wall is None else _duration(wall),
        "note": "" if overall else "no overall metrics",
    }


def results_table(workdirs: Sequence[str | os.PathLike], markdown: bool = False) -> str:
    """The table for `workdirs` (folders holding results.json), one row each, as text."""
    rows = [_row(os.fspath(w)) for w in workdirs]
    columns = ["experiment", "val loss", "val accuracy", "pass@2"]
    columns += [c for c in ("solved (pass@2)", "coverage", "correct size", "correct pixels",
                            "ttft time", "total time", "note") if any(r.get(c) for r in rows)]
    cells = [[r.get(c) or ("" if c == "note" else "-") for c in columns] for r in rows]
    widths = [max(len(x) for x in [c, *(row[i] for row in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str], sep: str) -> str:
        text = sep.join(v.ljust(w) for v, w in zip(values, widths, strict=True))
        return f"| {text} |" if markdown else text.rstrip()

    if markdown:
        lines = [line(columns, " | "), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        return "\n".join(lines + [line(row, " | ") for row in cells])
    lines = [line(columns, "  "), line(["-" * w for w in widths], "  ")]
    return "\n".join(lines + [line(row, "  ") for row in cells])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="workdirs (or results.json files)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    print(results_table(args.workdirs, markdown=args.markdown))


if __name__ == "__main__":
    main()
