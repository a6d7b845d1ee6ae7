"""Re-evaluation without retraining: a per-task TTFT run (DFS + PoE, adapters exported) is
evaluated again from its saved adapters under another strategy and scoring, in its own workdir."""
import json

import numpy as np
import pytest
from test_engine import EVAL_TASKS, tiny

from arc_jax import run
from arc_jax.infer.evaluate import validate_submission


def test_ttft_export_then_reevaluate_under_another_strategy(tmp_path):
    one = (EVAL_TASKS[0],)
    trained = tiny("n_minus_1", **{"data.task_ids": one, "ttft.export_adapters": True,
                                   "eval.strategy": "dfs", "eval.scoring": "poe",
                                   "eval.score_views": 2, "train.steps": 2})
    first = run.train_and_evaluate(trained, str(tmp_path / "ttft"))
    assert first is not None
    assert (tmp_path / "ttft" / "adapters" / one[0] / "adapter_model.safetensors").exists()
    with open(tmp_path / "ttft" / "results.json") as f:
        trained_results = f.read()

    again = tiny("baseline", **{"data.task_ids": one, "eval.adapters_from": str(tmp_path / "ttft"),
                                "eval.strategy": "vote", "eval.scoring": "count_logprob"})
    second = run.train_and_evaluate(again, str(tmp_path / "again"))
    # the adapters are the ones trained: the same val loss, and they are not the base (b != 0)
    assert second["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    with np.load(tmp_path / "ttft" / "ttft_adapters" / f"{one[0]}.npz") as saved:
        assert any(np.any(saved[k]) for k in saved.files if k.endswith("/b"))
    tasks = run.load_task_list(again.data.eval, "", 0, one)
    # written into its own workdir, under its own strategy
    with open(tmp_path / "again" / "results.json") as f:
        results = json.load(f)
    assert results["metadata"]["eval"]["scoring"] == "count_logprob"
    with open(tmp_path / "again" / "submission.json") as f:
        validate_submission(json.load(f), {t.task_id: t for t in tasks})
    with open(tmp_path / "ttft" / "results.json") as f:
        assert f.read() == trained_results
    assert not (tmp_path / "again" / "ttft_adapters").exists()
