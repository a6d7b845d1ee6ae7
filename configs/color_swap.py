"""TTFT on n-1 samples, dihedral transforms and a random colour permutation (0 kept).

    python -m arc_jax.main --config=configs/color_swap.py

Research log, Iteration 4, row "add color swap": val loss 0.099, val accuracy 16.80%.
"""

from configs import geometric


def get_config(variant: str = ""):
    c = geometric.get_config(variant)
    c.name = "color_swap"
    c.augment.color_swap = True
    return c
