"""Baseline: the fine-tuned model evaluated as is, no test-time fine-tuning.

    python -m arc_jax.main --config=configs/baseline.py

Research log, Iteration 4, row "baseline": val loss 0.1445, val accuracy 6.50%.
"""

from configs import base


def get_config(variant: str = ""):
    c = base.get_config(variant)
    c.name = "baseline"
    c.mode = "evaluate"
    return c
