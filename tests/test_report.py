"""Tests for arc_jax.report: the page is self-contained, shows every task and marks it right,
compares two runs, names bad files; and, in a real headless Chromium, draws every cell.

The workdirs are written by the real `write_results` from made-up tasks and candidates.
"""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from arc_jax.data.augment import Augmentation
from arc_jax.data.formats import answer_text, get_grid_format
from arc_jax.data.tasks import Pair, Task
from arc_jax.infer.evaluate import Candidate, evaluate, write_results
from arc_jax.report import (
    ReportError,
    build_comparison,
    build_report,
    changes,
    comparison_path,
    load_run,
)
from arc_jax.report.__main__ import main as report_main

FMT = get_grid_format("shape_numbered")
IDENTITY = Augmentation(0, np.arange(10))


def grid(rows) -> np.ndarray:
    return np.asarray(rows, np.uint8)


# Made-up tasks: test outputs and the attempts each run is given, chosen so that A solves
# "a_solved" and "d_two_tests"'s first test only, and B fixes "b_wrong" and breaks "a_solved".
TASKS = {
    "a_solved": Task("a_solved",
                     (Pair(grid([[1, 0], [0, 1]]), grid([[2, 0], [0, 2]])),
                      Pair(grid([[1, 1, 0]]), grid([[2, 2, 0]]))),
                     (Pair(grid([[0, 1], [1, 1]]), grid([[0, 2], [2, 2]])),), "test"),
    "b_wrong": Task("b_wrong", (Pair(grid([[3]]), grid([[4, 4]])),),
                    (Pair(grid([[5]]), grid([[6, 6]])),), "test"),
    "c_invalid": Task("c_invalid", (Pair(grid([[7, 8]]), grid([[8, 7]])),),
                      (Pair(grid([[9, 1]]), grid([[1, 9]])),), "test"),
    "d_two_tests": Task("d_two_tests", (Pair(grid([[1]]), grid([[1, 1], [1, 1]])),),
                        (Pair(grid([[2]]), grid([[2, 2], [2, 2]])),
                         Pair(grid([[3]]), grid([[3, 3], [3, 3]]))), "test"),
}
WRONG = grid([[5, 5, 5]])


def candidates(answers: dict[tuple[str, int], list]) -> dict:
    """Candidates whose texts spell the given grids; a str is an unparseable text."""
    return {key: [Candidate(IDENTITY, g if isinstance(g, str) else answer_text(g, FMT), -0.1 * i)
                  for i, g in enumerate(grids)]
            for key, grids in answers.items()}


ANSWERS_A = {
    ("a_solved", 0): [TASKS["a_solved"].test[0].output] * 2 + [WRONG],
    ("b_wrong", 0): [WRONG, WRONG],
    ("c_invalid", 0): ["not a grid", "3x3\n1 0"],
    ("d_two_tests", 0): [WRONG, TASKS["d_two_tests"].test[0].output],
    ("d_two_tests", 1): [WRONG],
}
ANSWERS_B = {**ANSWERS_A, ("a_solved", 0): [WRONG], ("b_wrong", 0): [grid([[6, 6]])]}


def write_tasks_dir(path, tasks) -> None:
    """The tasks as ARC task files `<id>.json`: the run's data.eval."""
    path.mkdir(parents=True, exist_ok=True)
    for task in tasks.values():
        pairs = lambda ps: [{"input": p.input.tolist(), "output": p.output.tolist()} for p in ps]
        (path / f"{task.task_id}.json").write_text(
            json.dumps({"train": pairs(task.train), "test": pairs(task.test)}))


def write_run(workdir, answers, name, tasks_dir) -> None:
    val_loss = {t: 0.1 * (i + 1) for i, t in enumerate(sorted(TASKS))}
    evaluation = evaluate(TASKS, candidates(answers), FMT, val_loss=val_loss)
    write_results(workdir, evaluation, TASKS, name=name,
                  metadata={"mode": "ttft", "data": {"eval": str(tasks_dir), "eval_solutions": ""},
                            "phase_seconds": {"ttft": 1.5, "evaluate": 0.5}},
                  ttft_seconds=1.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_tasks_dir(root / "tasks", TASKS)
    write_run(root / "run_a", ANSWERS_A, "baseline", root / "tasks")
    write_run(root / "run_b", ANSWERS_B, "n_minus_1", root / "tasks")
    return root


def embedded_data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                      re.S)
    assert found, "no embedded report data"
    return json.loads(found.group(1))


def grids_shown(data: dict) -> list[list[list[int]]]:
    """Every grid the page draws, from its data: train pairs, test inputs, targets, attempts."""
    out = []
    for task in data["tasks"]:
        out += [g for pair in task["train"] or [] for g in pair]
        out += [g for g in task["inputs"] + task["targets"] if g is not None]
        for run in task["runs"]:
            out += [a["grid"] for t in run["tests"] for a in t["attempts"] if a["grid"]]
    return out


def expected_cells(tasks, workdirs) -> int:
    """Cells the report must draw, counted from the tasks and the prediction files."""
    cells = 0
    for task in tasks.values():
        cells += sum(p.input.size + p.output.size for p in task.train)
        cells += sum(p.input.size + p.output.size for p in task.test)
        for workdir in workdirs:
            record = json.loads((workdir / "predictions" / f"{task.task_id}.json").read_text())
            cells += sum(np.asarray(a).size for t in record["tests"] for a in t["attempts"])
    return cells


def test_report_is_self_contained_and_shows_every_task(runs):
    out = build_report(runs / "run_a")
    assert out == runs / "run_a" / "report.html"
    page = out.read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script[^>]*\bsrc\s*=", page)
    assert not re.search(r"<link\b|<img\b|<iframe\b|@import|url\(", page)
    data = embedded_data(page)
    assert [t["id"] for t in data["tasks"]] == sorted(TASKS)
    for task_id in TASKS:
        assert task_id in page
    assert data["runs"][0]["overall"]["n_tasks"] == 4
    assert data["runs"][0]["overall"]["solved_tasks"] == 1
    shown = sum(np.asarray(g).size for g in grids_shown(data))
    assert shown == expected_cells(TASKS, [runs / "run_a"])


def test_report_marks_attempts_and_tasks(runs):
    run = load_run(runs / "run_a")
    status = {t: v.status for t, v in run.tasks.items()}
    assert status == {"a_solved": "solved", "b_wrong": "unsolved", "c_invalid": "unsolved",
                      "d_two_tests": "unsolved"}
    assert [t for t, v in run.tasks.items() if v.invalid] == ["c_invalid"]
    marks = lambda t, q=0: [a.mark for a in run.tasks[t].tests[q].attempts]
    assert marks("a_solved") == ["right", "wrong"]
    assert marks("b_wrong") == ["wrong", "no 2nd grid"]  # both candidates gave the same grid
    assert marks("c_invalid") == ["invalid output", "invalid output"]
    assert "none of 2 candidates gave a grid" in run.tasks["c_invalid"].tests[0].attempts[0].note
    assert marks("d_two_tests", 0) == ["wrong", "right"] and marks("d_two_tests", 1)[0] == "wrong"
    assert run.tasks["b_wrong"].val_loss == pytest.approx(0.2)
    assert run.source_tasks.keys() == TASKS.keys() and not run.notes


def test_comparison_lists_fixed_and_broken_tasks(runs):
    a, b = load_run(runs / "run_a"), load_run(runs / "run_b")
    assert changes(a, b) == (["b_wrong"], ["a_solved"])
    assert changes(b, a) == (["a_solved"], ["b_wrong"])
    out = build_comparison(runs / "run_a", runs / "run_b")
    assert out == comparison_path(runs / "run_a", runs / "run_b")
    assert out == runs / "run_b" / "compare_run_a.html"
    data = embedded_data(out.read_text())
    assert (data["fixed"], data["broken"]) == (["b_wrong"], ["a_solved"])
    assert [r["label"] for r in data["runs"]] == ["A baseline", "B n_minus_1"]
    change = {t["id"]: t["change"] for t in data["tasks"]}
    assert change == {"a_solved": "broken", "b_wrong": "fixed", "c_invalid": "",
                      "d_two_tests": ""}


def test_task_missing_from_the_source_is_shown_from_its_predictions(runs, tmp_path):
    partial = {t: TASKS[t] for t in ("a_solved", "b_wrong")}
    write_tasks_dir(tmp_path / "tasks", partial)
    shutil.copytree(runs / "run_a", tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    results["metadata"]["data"]["eval"] = str(tmp_path / "tasks")
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    data = embedded_data(build_report(tmp_path / "run").read_text())
    by_id = {t["id"]: t for t in data["tasks"]}
    assert by_id["c_invalid"]["train"] is None and "not found" in by_id["c_invalid"]["note"]
    assert by_id["c_invalid"]["targets"] == [[[1, 9]]]  # the target is in the predictions
    assert "2 task(s) not found" in data["runs"][0]["notes"][0]
    results["metadata"]["data"]["eval"] = str(tmp_path / "gone")
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    data = embedded_data(build_report(tmp_path / "run").read_text())
    assert "could not be read" in data["runs"][0]["notes"][0]
    assert len(data["tasks"]) == 4


def test_non_finite_numbers_are_shown_as_missing(runs, tmp_path):
    shutil.copytree(runs / "run_a", tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    results["overall"]["val_loss"] = float("nan")
    results["tasks"]["a_solved"]["val_loss"] = float("inf")
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))  # writes NaN, Infinity
    data = embedded_data(build_report(tmp_path / "run").read_text())
    assert data["runs"][0]["overall"]["val_loss"] is None
    assert data["tasks"][0]["runs"][0]["val_loss"] is None


def test_bad_input_names_the_file(runs, tmp_path, capsys):
    with pytest.raises(ReportError, match=re.escape(str(tmp_path / "results.json")) + ": missing"):
        build_report(tmp_path)
    assert report_main([str(tmp_path)]) == 1
    assert str(tmp_path / "results.json") in capsys.readouterr().err
    shutil.copytree(runs / "run_a", tmp_path / "run")
    bad = tmp_path / "run" / "predictions" / "b_wrong.json"
    bad.write_text("{not json")
    with pytest.raises(ReportError, match=re.escape(str(bad)) + ": cannot read JSON"):
        build_report(tmp_path / "run")
    record = json.loads((runs / "run_a" / "predictions" / "b_wrong.json").read_text())
    record["tests"][0]["attempts"][0] = [[1, 2], [3]]
    bad.write_text(json.dumps(record))
    with pytest.raises(ReportError, match=re.escape(str(bad)) + r": tests\[0\]\.attempts\[0\]"):
        build_report(tmp_path / "run")
    bad.unlink()
    with pytest.raises(ReportError, match=re.escape(str(bad)) + ": missing"):
        build_comparison(runs / "run_a", tmp_path / "run")
    (tmp_path / "run" / "results.json").write_text("[]")
    with pytest.raises(ReportError, match="results.json: not a JSON object"):
        build_report(tmp_path / "run")


def test_cli_writes_report_and_comparison(runs, tmp_path, capsys):
    assert report_main([str(runs / "run_a"), "--out", str(tmp_path / "a.html")]) == 0
    assert (tmp_path / "a.html").is_file()
    capsys.readouterr()
    assert report_main([str(runs / "run_a"), str(runs / "run_b")]) == 0
    assert capsys.readouterr().out.strip() == str(runs / "run_b" / "compare_run_a.html")


# --- In a real browser -------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed: .ci/run installs it with apt-get "
    "(apt-get install -y chromium); without it the page's JavaScript cannot be run")


def chromium(tmp_path, *args: str) -> str:
    """Runs headless Chromium (as root it needs --no-sandbox) and returns its stdout."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
               *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


CELL = re.compile(r'<i class="c([0-9])"></i>')


def cards(dom: str) -> dict[str, str]:
    """Task id -> the HTML of its card, from a DOM dump."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<section class="task"[^>]*'
                                                            r'data-task="([^"]+)"', dom)]
    ends = [s for s, _ in starts[1:]] + [len(dom)]
    return {task_id: dom[s:e] for (s, task_id), e in zip(starts, ends, strict=True)}


@needs_chromium
def test_browser_draws_every_cell_and_marks_solved(runs, tmp_path):
    page = build_report(runs / "run_a", tmp_path / "report.html")
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert len(CELL.findall(dom)) == expected_cells(TASKS, [runs / "run_a"])
    shown = cards(dom)
    assert list(shown) == sorted(TASKS)
    assert 'data-status="solved"' in shown["a_solved"]
    assert '<span class="badge status solved">solved</span>' in shown["a_solved"]
    assert '<span class="mark right">right</span>' in shown["a_solved"]
    assert '<span class="badge status unsolved">unsolved</span>' in shown["b_wrong"]
    assert '<span class="mark invalid-output"' in shown["c_invalid"]
    # The colours drawn are the data's: the first train input of a_solved, cell by cell.
    first = re.search(r'<div class="grid"[^>]*>(.*?)</div>', shown["a_solved"]).group(1)
    assert [int(c) for c in CELL.findall(first)] == [1, 0, 0, 1]

    # The filter runs in the page: only solved tasks, from the URL fragment.
    dom = chromium(tmp_path, "--dump-dom", page.as_uri() + "#filter=solved")
    assert list(cards(dom)) == ["a_solved"]
    dom = chromium(tmp_path, "--dump-dom", page.as_uri() + "#filter=invalid")
    assert list(cards(dom)) == ["c_invalid"]


@needs_chromium
def test_browser_comparison_shows_both_runs(runs, tmp_path):
    page = build_comparison(runs / "run_a", runs / "run_b", tmp_path / "compare.html")
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert len(CELL.findall(dom)) == expected_cells(TASKS, [runs / "run_a", runs / "run_b"])
    shown = cards(dom)
    assert 'data-change="fixed"' in shown["b_wrong"] and 'data-change="broken"' in shown["a_solved"]
    fixed = re.search(r'<p class="ids" id="fixed">(.*?)</p>', dom).group(1)
    assert re.findall(r"<a>([^<]+)</a>", fixed) == ["b_wrong"]
    dom = chromium(tmp_path, "--dump-dom", page.as_uri() + "#filter=broken")
    assert list(cards(dom)) == ["a_solved"]


@needs_chromium
def test_browser_screenshot_shows_the_arc_palette(runs, tmp_path):
    from PIL import Image

    page = build_report(runs / "run_a", tmp_path / "report.html")
    png = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,900",
             "--hide-scrollbars", page.as_uri())
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (900, 1280, 3)
    colours = {tuple(c) for c in image.reshape(-1, 3)[::3]}
    # blue, red and black cells of the first task, exactly in the palette's colours
    for rgb in [(0, 116, 217), (255, 65, 54), (0, 0, 0)]:
        assert rgb in colours, f"no pixel of colour {rgb} in the screenshot"
