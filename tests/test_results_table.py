"""Tests for arc_jax.results_table."""

import json

import numpy as np

from arc_jax.data.augment import Augmentation
from arc_jax.data.formats import answer_text, get_grid_format
from arc_jax.data.tasks import Pair, Task
from arc_jax.infer.evaluate import Candidate, evaluate, write_results
from arc_jax.results_table import main, results_table


def fake_workdir(root, folder, results):
    path = root / folder
    path.mkdir()
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_table_from_two_workdirs(tmp_path):
    base = fake_workdir(tmp_path, "wd_base", {
        "name": "baseline",
        "overall": {"val_loss": 0.1445, "accuracy": 0.065, "pass_2": 0.0725},
    })
    swap = fake_workdir(tmp_path, "wd_swap", {
        "metadata": {"name": "color_swap"},
        "ttft_seconds": 3 * 3600 + 5 * 60 + 7,
        "overall": {"val_loss": 0.099, "accuracy": 0.168, "pass_2": None},
    })
    text = results_table([base, swap])
    assert text.splitlines() == [
        "experiment  val loss  val accuracy  pass@2  ttft time",
        "----------  --------  ------------  ------  ---------",
        "baseline    0.1445    6.50%         7.25%   -",
        "color_swap  0.0990    16.80%        -       3:05:07",
    ]
    md = results_table([base, swap], markdown=True).splitlines()
    assert md[0] == "| experiment | val loss | val accuracy | pass@2 | ttft time |"
    assert md[1] == "|------------|----------|--------------|--------|-----------|"
    assert md[3] == "| color_swap | 0.0990   | 16.80%       | -      | 3:05:07   |"


def test_missing_and_unreadable_results_do_not_crash(tmp_path, capsys):
    good = fake_workdir(tmp_path, "good", {"overall": {"val_loss": 0.5, "accuracy": 0.25}})
    (tmp_path / "empty").mkdir()
    broken = fake_workdir(tmp_path, "broken", {})
    (broken / "results.json").write_text("{not json")
    odd = fake_workdir(tmp_path, "odd", [1, 2])
    main([str(good / "results.json"), str(tmp_path / "empty"), str(broken), str(odd)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["experiment", "val", "loss", "val", "accuracy", "pass@2", "note"]
    assert lines[2].split() == ["good", "0.5000", "25.00%", "-"]
    assert lines[3].split() == ["empty", "-", "-", "-", "no", "results.json"]
    assert lines[4].startswith("broken") and "unreadable results.json" in lines[4]
    assert lines[5].endswith("results.json is not a JSON object")


def test_reads_what_evaluate_writes(tmp_path):
    grid = np.array([[1, 2]], np.uint8)
    task = Task("t", (Pair(grid, grid),), (Pair(grid, grid),), "test")
    fmt = get_grid_format("minimal")
    cands = {("t", 0): [Candidate(Augmentation(0, np.arange(10)), answer_text(grid, fmt), -0.1)]}
    ev = evaluate({"t": task}, cands, fmt, val_loss={"t": 0.25})
    write_results(tmp_path / "run", ev, {"t": task}, name="n_minus_1", ttft_seconds=59.6,
                  metadata={"wall_seconds": 3725.0})
    lines = results_table([tmp_path / "run"]).splitlines()
    assert lines[0].split("  ")[:1] == ["experiment"] and "solved (pass@2)" in lines[0]
    assert lines[2].split() == [
        "n_minus_1", "0.2500", "100.00%", "100.00%", "1/1", "100.00%", "100.00%", "100.00%",
        "0:01:00", "1:02:05"]
