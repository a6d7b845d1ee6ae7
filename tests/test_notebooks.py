"""The notebooks under notebooks/ run headless on CPU in their smoke setting, and are kept in git
without outputs.

`ARC_JAX_NOTEBOOK_SMOKE=1` makes a notebook use the config's default model (the shipped one), 2
tasks, 2 TTFT steps and 2 views, and skip its install, TensorBoard and download cells. The kernel
inherits this process's environment (conftest.py: 4 simulated CPU devices, one compilation cache
for the session, so the second notebook reuses the first one's programs).
"""

import glob
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from arc_jax import load_tasks
from arc_jax.infer.evaluate import validate_submission
from configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
# The tasks the Colab notebook's smoke setting runs: two of the smallest evaluation tasks, the
# second with 2 test inputs. The fake Kaggle input holds the same two, so its programs are cached.
SMOKE_TASKS = ("66e6c45b", "6ea4a07e")
CELL_TIMEOUT_S = 600


def execute(name: str, monkeypatch, **env: str) -> nbformat.NotebookNode:
    """Runs notebooks/<name>.ipynb top to bottom in a fresh kernel in the smoke setting; a failing
    cell raises nbclient's CellExecutionError with the cell's traceback."""
    monkeypatch.setenv("ARC_JAX_NOTEBOOK_SMOKE", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    return notebook


def outputs_of(notebook: nbformat.NotebookNode, mime: str) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if mime in output.get("data", {})]


def test_colab_notebook_runs_ttft_and_plots_the_tasks(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    notebook = execute("colab_tpu_ttft", monkeypatch, ARC_JAX_NOTEBOOK_WORKDIR=str(workdir))
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert sorted(results["tasks"]) == list(SMOKE_TASKS)
    assert results["metadata"]["train"]["steps"] == 2
    assert results["metadata"]["model"]["path"] == base.get_config().model.path  # shipped model
    assert results["metadata"]["phase_seconds"]["ttft"] > 0
    assert sorted(os.listdir(workdir / "predictions")) == [f"{t}.json" for t in SMOKE_TASKS]
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert len(outputs_of(notebook, "image/png")) == len(SMOKE_TASKS)  # one figure per task
    shown = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for output in cell.outputs)
    assert "on 4 devices" in shown


def test_kaggle_notebook_writes_a_complete_submission(tmp_path, monkeypatch):
    evaluation = load_tasks("kaggle2024/evaluation")
    challenges = {
        task_id: {
            "train": [{"input": p.input.tolist(), "output": p.output.tolist()}
                      for p in evaluation[task_id].train],
            "test": [{"input": p.input.tolist()} for p in evaluation[task_id].test],
        }
        for task_id in SMOKE_TASKS
    }
    competition = tmp_path / "input" / "arc-prize-2025"
    competition.mkdir(parents=True)
    with open(competition / "arc-agi_test_challenges.json", "w") as f:
        json.dump(challenges, f)
    working, workdir = tmp_path / "working", tmp_path / "run"
    working.mkdir()

    execute("kaggle_submission", monkeypatch, ARC_JAX_KAGGLE_INPUT=str(tmp_path / "input"),
            ARC_JAX_KAGGLE_WORKING=str(working), ARC_JAX_NOTEBOOK_WORKDIR=str(workdir))

    with open(working / "submission.json") as f:
        submission = json.load(f)
    assert sorted(submission) == list(SMOKE_TASKS)
    for task_id, task in challenges.items():
        assert len(submission[task_id]) == len(task["test"])
        for entry in submission[task_id]:
            assert set(entry) == {"attempt_1", "attempt_2"}
    validate_submission(submission, {t: evaluation[t] for t in SMOKE_TASKS})
    with open(workdir / "results.json") as f:
        metadata = json.load(f)["metadata"]
    assert metadata["data"]["eval"] == str(competition / "arc-agi_test_challenges.json")
    assert metadata["deadline_minutes"] > 0  # the time-budget cell set the deadline
    assert metadata["train"]["steps"] == 2 and metadata["eval"]["n_augmentations"] == 2


@pytest.mark.parametrize("file", sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))),
                         ids=os.path.basename)
def test_notebook_is_stored_without_outputs(file):
    notebook = nbformat.read(file, as_version=4)
    nbformat.validate(notebook)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{file}: cell {i} has outputs"
            assert cell.execution_count is None, f"{file}: cell {i} has an execution_count"


def test_both_notebooks_are_there():
    assert {os.path.basename(f) for f in glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))} >= {
        "colab_tpu_ttft.ipynb", "kaggle_submission.ipynb"}
