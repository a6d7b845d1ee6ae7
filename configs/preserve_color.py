"""Colour swap, but half of the samples keep the task's original colours.

    python -m arc_jax.main --config=configs/preserve_color.py

Research log, Iteration 4, row "preserve original color when using color swap": not better than
colour swap (no figures given).
"""

from configs import color_swap


def get_config(variant: str = ""):
    c = color_swap.get_config(variant)
    c.name = "preserve_color"
    c.augment.preserve_color = True
    c.augment.preserve_color_prob = 0.5
    return c
