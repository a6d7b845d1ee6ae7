"""TTFT on n-1 samples plus the 8 dihedral transforms.

    python -m arc_jax.main --config=configs/geometric.py

Research log, Iteration 4, row "add geometric augmentations": val loss 0.1107, accuracy not run.
"""

from configs import n_minus_1


def get_config(variant: str = ""):
    c = n_minus_1.get_config(variant)
    c.name = "geometric"
    c.augment.geometric = True
    return c
