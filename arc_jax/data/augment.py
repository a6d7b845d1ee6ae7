"""Grid augmentations: the 8 dihedral transforms and colour permutations.

Grids are padded int32 arrays `[30, 30]` with a shape `(h, w)` int32 `[2]`; cells outside the
valid `h x w` region are 0 and every function here keeps them 0, so padded arrays stay canonical.
Everything on `jnp` is jittable and vmappable; `*_np` twins act on unpadded numpy grids `[h, w]`
(for inverting augmented predictions on the host before voting).

Dihedral index table (`out` in terms of the input `g` of shape `(h, w)`; numpy equivalent):

    k  transform        out[i, j]             out shape  numpy
    0  identity         g[i, j]               (h, w)     g
    1  rot90 (ccw)      g[j, w-1-i]           (w, h)     np.rot90(g, 1)
    2  rot180           g[h-1-i, w-1-j]       (h, w)     np.rot90(g, 2)
    3  rot270 (cw 90)   g[h-1-j, i]           (w, h)     np.rot90(g, 3)
    4  transpose        g[j, i]               (w, h)     g.T
    5  flip rows (ud)   g[h-1-i, j]           (h, w)     np.flipud(g)
    6  flip cols (lr)   g[i, w-1-j]           (h, w)     np.fliplr(g)
    7  anti-transpose   g[h-1-j, w-1-i]       (w, h)     np.rot90(g, 2).T
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

GRID_SIZE = 30
NUM_COLORS = 10
NUM_DIHEDRAL = 8

# Each transform is "optionally swap axes, then optionally reverse rows / columns of the source".
_SWAP = np.array([0, 1, 0, 1, 1, 0, 0, 1], dtype=bool)
_FLIP_ROWS = np.array([0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
_FLIP_COLS = np.array([0, 1, 1, 0, 0, 0, 1, 1], dtype=bool)

DIHEDRAL_INVERSE = np.array([0, 3, 2, 1, 4, 5, 6, 7], dtype=np.int32)
"""`DIHEDRAL_INVERSE[k]` undoes transform `k` (rot90 <-> rot270, the rest are involutions)."""

DIHEDRAL_SWAPS_AXES = _SWAP
"""`DIHEDRAL_SWAPS_AXES[k]`: transform `k` maps shape `(h, w)` to `(w, h)`."""


class Augmentation(NamedTuple):
    """One augmentation (a pytree): dihedral index int32 `[]` and colour permutation int32 `[10]`.

    Applied as: dihedral transform first, then `colors[grid]` on the valid cells.
    """

    dihedral: jax.Array
    colors: jax.Array


def identity_augmentation() -> Augmentation:
    """The augmentation that changes nothing."""
    return Augmentation(jnp.int32(0), jnp.arange(NUM_COLORS, dtype=jnp.int32))


def valid_mask(shape: jax.Array) -> jax.Array:
    """Boolean `[30, 30]`, True on the top-left `h x w` cells for `shape = (h, w)`."""
    rows = jnp.arange(GRID_SIZE)[:, None] < shape[0]
    cols = jnp.arange(GRID_SIZE)[None, :] < shape[1]
    return rows & cols


def dihedral(grid: jax.Array, shape: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Applies dihedral transform `k` (see the module table) to the valid region of a grid.

    Args:
      grid: int32 `[30, 30]`, padded.
      shape: int32 `[2]`, `(h, w)`.
      k: int32 `[]`, in `0..7`.

    Returns:
      The transformed grid `[30, 30]` (top-left aligned, outside cells 0) and its shape `[2]`.
    """
    shape = jnp.asarray(shape, jnp.int32)
    swap = jnp.asarray(_SWAP)[k]
    h, w = shape[0], shape[1]
    i = jnp.arange(GRID_SIZE)[:, None]
    j = jnp.arange(GRID_SIZE)[None, :]
    a = jnp.where(swap, j, i)
    b = jnp.where(swap, i, j)
    src_r = jnp.where(jnp.asarray(_FLIP_ROWS)[k], h - 1 - a, a)
    src_c = jnp.where(jnp.asarray(_FLIP_COLS)[k], w - 1 - b, b)
    # Out-of-region indices may be negative; clip, then mask them away.
    src_r = jnp.clip(src_r, 0, GRID_SIZE - 1)
    src_c = jnp.clip(src_c, 0, GRID_SIZE - 1)
    out_shape = jnp.where(swap, shape[::-1], shape)
    out = jnp.where(valid_mask(out_shape), grid[src_r, src_c], 0)
    return out.astype(grid.dtype), out_shape


def color_permutation(key: jax.Array, keep_background: bool) -> jax.Array:
    """Random colour permutation int32 `[10]`: of 1..9 with 0 fixed, or of all 10 colours."""
    if keep_background:
        rest = jax.random.permutation(key, jnp.arange(1, NUM_COLORS, dtype=jnp.int32))
        return jnp.concatenate([jnp.zeros(1, jnp.int32), rest])
    return jax.random.permutation(key, jnp.arange(NUM_COLORS, dtype=jnp.int32))


def invert_permutation(perm: jax.Array) -> jax.Array:
    """Inverse of a permutation `[n]`: `inv[perm[c]] == c`."""
    return jnp.argsort(perm).astype(perm.dtype)


def apply_colors(perm: jax.Array, grid: jax.Array, shape: jax.Array) -> jax.Array:
    """Maps each valid cell `c` to `perm[c]`; cells outside `shape` stay 0. Grid `[30, 30]`."""
    return jnp.where(valid_mask(shape), perm[grid], 0).astype(grid.dtype)


def sample_augmentation(
    key: jax.Array,
    *,
    geometric: bool,
    color: bool,
    keep_background: bool = True,
    preserve_color_prob: float = 0.0,
) -> Augmentation:
    """Samples one augmentation.

    Args:
      key: PRNG key.
      geometric: draw the dihedral index uniformly from 0..7; else 0 (identity).
      color: draw a colour permutation; else the identity permutation.
      keep_background: the colour permutation fixes 0 (permutes 1..9 only).
      preserve_color_prob: with colour on, the probability that this sample keeps the task's
        original colours (identity permutation). This is our reading of the research log's
        "preserve original colour when using colour swap": a fraction of the training samples
        stay in the original palette, so the model still sees the colours the test uses.
    """
    k_dihedral, k_color, k_keep = jax.random.split(key, 3)
    ident = jnp.arange(NUM_COLORS, dtype=jnp.int32)
    if geometric:
        k = jax.random.randint(k_dihedral, (), 0, NUM_DIHEDRAL, dtype=jnp.int32)
    else:
        k = jnp.int32(0)
    if color:
        perm = color_permutation(k_color, keep_background)
        keep = jax.random.bernoulli(k_keep, preserve_color_prob)
        perm = jnp.where(keep, ident, perm)
    else:
        perm = ident
    return Augmentation(k, perm)


def apply_augmentation(
    aug: Augmentation, grid: jax.Array, shape: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Applies `aug` to one padded grid `[30, 30]` with shape `[2]`; returns (grid, shape)."""
    grid, shape = dihedral(grid, shape, aug.dihedral)
    return apply_colors(aug.colors, grid, shape), shape


def invert_augmentation(
    aug: Augmentation, grid: jax.Array, shape: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Undoes `aug` on one padded grid `[30, 30]` with shape `[2]`; returns (grid, shape)."""
    grid = apply_colors(invert_permutation(aug.colors), grid, shape)
    return dihedral(grid, shape, jnp.asarray(DIHEDRAL_INVERSE)[aug.dihedral])


def augment_pairs(
    aug: Augmentation, grids: jax.Array, shapes: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Applies one augmentation to every grid of a set of pairs.

    Args:
      aug: the augmentation (unbatched).
      grids: int32 `[P, 2, 30, 30]` (pair, input/output).
      shapes: int32 `[P, 2, 2]`. Padding pairs of shape (0, 0) stay all 0.

    Returns:
      Augmented `grids [P, 2, 30, 30]` and `shapes [P, 2, 2]`.
    """
    one = lambda g, s: apply_augmentation(aug, g, s)
    return jax.vmap(jax.vmap(one))(grids, shapes)


def _dihedral_np(grid: np.ndarray, k: int) -> np.ndarray:
    if k < 4:
        return np.rot90(grid, k)
    return (grid.T, np.flipud(grid), np.fliplr(grid), np.rot90(grid, 2).T)[k - 4]


def apply_augmentation_np(aug: Augmentation, grid: np.ndarray) -> np.ndarray:
    """Numpy twin of `apply_augmentation` on an unpadded grid `[h, w]`; returns `[h', w']`."""
    grid = np.asarray(grid)
    out = np.asarray(aug.colors)[_dihedral_np(grid, int(aug.dihedral))]
    return np.ascontiguousarray(out.astype(grid.dtype))


def invert_augmentation_np(aug: Augmentation, grid: np.ndarray) -> np.ndarray:
    """Numpy twin of `invert_augmentation` on an unpadded grid `[h, w]`; returns `[h', w']`."""
    grid = np.asarray(grid)
    out = np.argsort(np.asarray(aug.colors))[grid].astype(grid.dtype)
    return np.ascontiguousarray(_dihedral_np(out, int(DIHEDRAL_INVERSE[int(aug.dihedral)])))
