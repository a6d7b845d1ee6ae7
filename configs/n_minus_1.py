"""TTFT on leave-one-out samples of each evaluation task's train pairs (no augmentation).

    python -m arc_jax.main --config=configs/n_minus_1.py
    python -m arc_jax.main --config=configs/n_minus_1.py --config.data.max_tasks=4 \
        --config.train.steps=20          # a quick run

Research log, Iteration 4, row "train with n-1 samples": val loss 0.1398, val accuracy 7.20%.
"""

from configs import base


def get_config(variant: str = ""):
    c = base.get_config(variant)
    c.name = "n_minus_1"
    c.mode = "ttft"
    c.augment.n_leave_out = 1
    return c
