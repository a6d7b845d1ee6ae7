"""The visual report of a run: a self-contained `report.html` (CSS, JavaScript and data inline;
no server, no network) showing the overall metrics and, per task, the train pairs, test input,
target and both attempts in the ARC palette, each attempt marked right or wrong.

    runs    read results.json + predictions/ (+ the tasks) back, judge every attempt
    page    the HTML, CSS and JavaScript (grids drawn as cells, filter, sort, search, pages)
    build   `build_report(workdir)`, `build_comparison(workdir_a, workdir_b)`

    python -m arc_jax.report WORKDIR                      # rebuilds WORKDIR/report.html
    python -m arc_jax.report WORKDIR_A WORKDIR_B          # WORKDIR_B/compare_<A's folder>.html
"""

from arc_jax.report.build import (
    REPORT_FILE,
    build_comparison,
    build_report,
    changes,
    comparison_path,
    page_data,
)
from arc_jax.report.runs import ReportError, load_run

__all__ = ["REPORT_FILE", "ReportError", "build_comparison", "build_report", "changes",
           "comparison_path", "load_run", "page_data"]
