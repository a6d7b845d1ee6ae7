"""`python -m arc_jax.report WORKDIR [WORKDIR_B] [--out FILE] [--tasks SOURCE]`.

With one workdir, rebuilds `WORKDIR/report.html` from its results.json and predictions/. With
two, writes the side-by-side comparison of A and B (default `WORKDIR_B/compare_<A's folder>.html`):
which tasks B fixed and which it broke.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from arc_jax.data.tasks import load_tasks
from arc_jax.report.build import build_comparison, build_report
from arc_jax.report.runs import ReportError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arc_jax.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                        help="one run's workdir, or two (A then B) to compare")
    parser.add_argument("--out", help="the page to write (default: see above)")
    parser.add_argument("--tasks", help="task source for train pairs and test inputs (bundle, "
                        "dir or challenges file; default: each run's data.eval)")
    parser.add_argument("--solutions", help="Kaggle solutions file for a challenges --tasks")
    args = parser.parse_args(argv)
    if len(args.workdirs) > 2:
        parser.error("give one workdir (a report) or two (a comparison)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        tasks = load_tasks(args.tasks, args.solutions) if args.tasks else None
        if len(args.workdirs) == 1:
            out = build_report(args.workdirs[0], args.out, tasks)
        else:
            out = build_comparison(*args.workdirs, out=args.out, tasks=tasks)
    except (ReportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
