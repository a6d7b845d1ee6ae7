"""TTFT on leave-two-out samples (two train pairs held out, one is the target), with the
geometric and colour augmentations of the best row.

    python -m arc_jax.main --config=configs/n_minus_2.py

Research log, Iteration 4, row "train with n-2 samples": no better than n-1 (no figures given).
"""

from configs import color_swap


def get_config(variant: str = ""):
    c = color_swap.get_config(variant)
    c.name = "n_minus_2"
    c.augment.n_leave_out = 2
    return c
