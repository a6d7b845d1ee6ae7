"""Tests for arc_jax.data.augment and arc_jax.data.sample."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arc_jax.data.augment import (
    DIHEDRAL_INVERSE,
    DIHEDRAL_SWAPS_AXES,
    Augmentation,
    apply_augmentation,
    apply_augmentation_np,
    augment_pairs,
    color_permutation,
    dihedral,
    identity_augmentation,
    invert_augmentation,
    invert_augmentation_np,
    sample_augmentation,
)
from arc_jax.data.sample import augment_episode, eval_episode, gather_episode, sample_episode

SETTINGS = settings(max_examples=40, deadline=None)
MAX_PAIRS = 10

# Jitted once here so hypothesis examples reuse the compiled programs.
_apply = jax.jit(apply_augmentation)
_invert = jax.jit(invert_augmentation)
_dihedral = jax.jit(dihedral)


@functools.cache
def _sampler(n_leave_out: int, shuffle: bool):
    return jax.jit(
        lambda key, n: sample_episode(key, n, MAX_PAIRS, n_leave_out=n_leave_out, shuffle=shuffle)
    )


def _pad(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    padded = np.zeros((30, 30), np.int32)
    padded[: grid.shape[0], : grid.shape[1]] = grid
    return padded, np.array(grid.shape, np.int32)


@st.composite
def grids(draw, max_side: int = 30) -> np.ndarray:
    """An unpadded int32 grid [h, w], 1 <= h, w <= max_side, colours 0..9."""
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 10, (h, w)).astype(np.int32)


def _aug(k: int, perm) -> Augmentation:
    return Augmentation(np.int32(k), np.asarray(perm, np.int32))


@SETTINGS
@given(grid=grids(), perm=st.permutations(range(10)))
def test_apply_invert_all_dihedrals(grid, perm):
    padded, shape = _pad(grid)
    h, w = grid.shape
    for k in range(8):
        aug = _aug(k, perm)
        out, out_shape = map(np.asarray, _apply(aug, padded, shape))
        expected_shape = (w, h) if DIHEDRAL_SWAPS_AXES[k] else (h, w)
        assert tuple(out_shape) == expected_shape
        oh, ow = expected_shape
        assert not out[oh:].any() and not out[:, ow:].any()
        # Colour multiset maps under the permutation.
        in_counts = np.bincount(grid.ravel(), minlength=10)
        out_counts = np.bincount(out[:oh, :ow].ravel(), minlength=10)
        np.testing.assert_array_equal(out_counts[np.asarray(perm)], in_counts)
        # Numpy twins agree with jnp, and both round-trip exactly.
        out_np = apply_augmentation_np(aug, grid)
        np.testing.assert_array_equal(out_np, out[:oh, :ow])
        back, back_shape = map(np.asarray, _invert(aug, out, out_shape))
        np.testing.assert_array_equal(back, padded)
        np.testing.assert_array_equal(back_shape, shape)
        np.testing.assert_array_equal(invert_augmentation_np(aug, out_np), grid)


@SETTINGS
@given(grid=grids(), k=st.integers(0, 7))
def test_dihedral_inverse_table(grid, k):
    padded, shape = _pad(grid)
    out, out_shape = _dihedral(padded, shape, np.int32(k))
    back, back_shape = _dihedral(out, out_shape, DIHEDRAL_INVERSE[k])
    np.testing.assert_array_equal(back, padded)
    np.testing.assert_array_equal(back_shape, shape)


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_dihedral_distinct_and_group(h, w):
    grid = np.arange(h * w, dtype=np.int32).reshape(h, w)
    padded, shape = _pad(grid)
    ident = np.arange(h * w)  # "colours" 0..h*w-1 make every cell distinct
    outs = [np.asarray(_dihedral(padded, shape, np.int32(k))[0]) for k in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    np.testing.assert_array_equal(outs[0], padded)
    # Closure: composing any two transforms gives exactly one of the eight.
    twins = [apply_augmentation_np(_aug(k, ident), grid) for k in range(8)]
    for a in range(8):
        for b in range(8):
            composed = apply_augmentation_np(_aug(b, ident), twins[a])
            matches = [c for c in range(8) if np.array_equal(composed, twins[c])]
            assert len(matches) == 1
    # DIHEDRAL_INVERSE is an inverse table, and one that is its own inverse permutation.
    assert sorted(DIHEDRAL_INVERSE) == list(range(8))
    np.testing.assert_array_equal(DIHEDRAL_INVERSE[DIHEDRAL_INVERSE], np.arange(8))


def test_augment_pairs_keeps_padding_pairs_zero():
    rng = np.random.default_rng(0)
    grids_ = np.zeros((3, 2, 30, 30), np.int32)
    shapes = np.zeros((3, 2, 2), np.int32)
    for p in range(2):
        for io in range(2):
            g = rng.integers(0, 10, (p + 2, p + 4)).astype(np.int32)
            grids_[p, io], shapes[p, io] = _pad(g)
    aug = _aug(1, rng.permutation(10))
    out, out_shapes = jax.jit(augment_pairs)(aug, grids_, shapes)
    for p in range(2):
        for io in range(2):
            g, s = _apply(aug, grids_[p, io], shapes[p, io])
            np.testing.assert_array_equal(out[p, io], g)
            np.testing.assert_array_equal(out_shapes[p, io], s)
    assert not np.asarray(out[2]).any() and not np.asarray(out_shapes[2]).any()


@pytest.mark.parametrize("keep", [True, False])
def test_color_permutation(keep):
    keys = jax.random.split(jax.random.key(0), 200)
    perms = np.asarray(jax.jit(jax.vmap(lambda k: color_permutation(k, keep)))(keys))
    np.testing.assert_array_equal(np.sort(perms, axis=1), np.tile(np.arange(10), (200, 1)))
    if keep:
        assert (perms[:, 0] == 0).all()
    else:
        assert (perms[:, 0] != 0).any()
    assert len({p.tobytes() for p in perms}) > 150


def _sample_augs(n: int, **kwargs) -> Augmentation:
    keys = jax.random.split(jax.random.key(1), n)
    return jax.jit(jax.vmap(lambda k: sample_augmentation(k, **kwargs)))(keys)


def test_sample_augmentation_disabled_is_identity():
    augs = _sample_augs(50, geometric=False, color=False)
    ident = identity_augmentation()
    assert (np.asarray(augs.dihedral) == ident.dihedral).all()
    assert (np.asarray(augs.colors) == np.asarray(ident.colors)).all()


def test_sample_augmentation_enabled():
    augs = _sample_augs(400, geometric=True, color=True, keep_background=True)
    assert augs.dihedral.shape == (400,) and augs.colors.shape == (400, 10)
    assert augs.dihedral.dtype == jnp.int32 and augs.colors.dtype == jnp.int32
    assert set(np.asarray(augs.dihedral).tolist()) == set(range(8))
    assert (np.asarray(augs.colors)[:, 0] == 0).all()
    is_ident = (np.asarray(augs.colors) == np.arange(10)).all(axis=1)
    assert is_ident.sum() < 5


@jax.jit
def _sample_preserving(keys, prob):
    sample = lambda k: sample_augmentation(k, geometric=True, color=True, preserve_color_prob=prob)
    return jax.vmap(sample)(keys)


@pytest.mark.parametrize("prob,low,high", [(1.0, 1.0, 1.0), (0.5, 0.4, 0.6)])
def test_preserve_color_prob(prob, low, high):
    keys = jax.random.split(jax.random.key(1), 400)
    augs = _sample_preserving(keys, np.float32(prob))
    frac = (np.asarray(augs.colors) == np.arange(10)).all(axis=1).mean()
    assert low <= frac <= high


@SETTINGS
@given(
    n_train=st.integers(1, MAX_PAIRS),
    n_leave_out=st.integers(1, 3),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sample_episode_properties(n_train, n_leave_out, shuffle, seed):
    key = jax.random.key(seed)
    ep = _sampler(n_leave_out, shuffle)(key, np.int32(n_train))
    again = _sampler(n_leave_out, shuffle)(key, np.int32(n_train))
    for a, b in zip(ep, again, strict=True):
        np.testing.assert_array_equal(a, b)
    k = max(1, min(n_leave_out, n_train - 1))
    n_ctx = int(ep.n_context)
    assert n_ctx == n_train - k
    assert ep.context.shape == (MAX_PAIRS,) and ep.context.dtype == jnp.int32
    context = np.asarray(ep.context[:n_ctx]).tolist()
    target = int(ep.target)
    assert len(set(context)) == n_ctx
    assert set(context) <= set(range(n_train))
    assert 0 <= target < n_train and target not in context
    assert not np.asarray(ep.context[n_ctx:]).any()
    if not shuffle:
        assert context == sorted(context)


@pytest.mark.parametrize("shuffle", [False, True])
def test_sample_episode_varies_with_key(shuffle):
    n_train = 6
    keys = jax.random.split(jax.random.key(2), 100)
    sample = jax.jit(
        jax.vmap(lambda k: sample_episode(k, n_train, MAX_PAIRS, n_leave_out=2, shuffle=shuffle))
    )
    eps = jax.tree.map(np.asarray, sample(keys))
    assert (eps.n_context == 4).all()
    assert set(eps.target.tolist()) == set(range(n_train))
    assert len({(c.tobytes(), t) for c, t in zip(eps.context, eps.target, strict=True)}) > 10
    unsorted = [(np.diff(c[:4]) < 0).any() for c in eps.context]
    assert any(unsorted) == shuffle


def test_vmap_over_keys_and_tasks_under_jit():
    keys = jax.random.split(jax.random.key(3), 8)
    n_train = jnp.array([1, 2, 3, 4, 5, 6, 7, 10], jnp.int32)

    @jax.jit
    def sample(keys, n_train):
        eps = jax.vmap(lambda k, n: sample_episode(k, n, MAX_PAIRS, n_leave_out=1, shuffle=True))(
            keys, n_train
        )
        augs = jax.vmap(
            lambda k: sample_augmentation(k, geometric=True, color=True, keep_background=False)
        )(keys)
        return eps, augs

    eps, augs = sample(keys, n_train)
    np.testing.assert_array_equal(eps.n_context, n_train - 1)
    assert eps.context.shape == (8, MAX_PAIRS) and augs.colors.shape == (8, 10)
    assert int(eps.target[0]) == 0  # a single pair is the target, with an empty context


def _random_task(rng, n_pairs: int, max_pairs: int):
    grids_ = np.zeros((max_pairs, 2, 30, 30), np.int32)
    shapes = np.zeros((max_pairs, 2, 2), np.int32)
    for p in range(n_pairs):
        for io in range(2):
            g = rng.integers(0, 10, rng.integers(1, 31, 2)).astype(np.int32)
            grids_[p, io], shapes[p, io] = _pad(g)
    return grids_, shapes


def test_gather_and_augment_episode():
    rng = np.random.default_rng(4)
    train, train_shapes = _random_task(rng, 5, MAX_PAIRS)
    key_ep, key_aug = jax.random.split(jax.random.key(4))
    ep = sample_episode(key_ep, 5, MAX_PAIRS, n_leave_out=2, shuffle=True)
    got = jax.jit(gather_episode)(train, train_shapes, ep)
    n_ctx = int(ep.n_context)
    for p in range(MAX_PAIRS):
        src = int(ep.context[p])
        want = (train[src], train_shapes[src]) if p < n_ctx else (0, 0)
        np.testing.assert_array_equal(got.context[p], np.broadcast_to(want[0], (2, 30, 30)))
        np.testing.assert_array_equal(got.context_shapes[p], np.broadcast_to(want[1], (2, 2)))
    np.testing.assert_array_equal(got.target, train[int(ep.target)])
    np.testing.assert_array_equal(got.target_shape, train_shapes[int(ep.target)])

    aug = sample_augmentation(key_aug, geometric=True, color=True, keep_background=False)
    out = jax.jit(augment_episode)(aug, got)
    for p in range(n_ctx):
        for io in range(2):
            g, s = _apply(aug, got.context[p, io], got.context_shapes[p, io])
            np.testing.assert_array_equal(out.context[p, io], g)
            np.testing.assert_array_equal(out.context_shapes[p, io], s)
    assert not np.asarray(out.context[n_ctx:]).any()
    assert not np.asarray(out.context_shapes[n_ctx:]).any()
    for io in range(2):
        g, s = _apply(aug, got.target[io], got.target_shape[io])
        np.testing.assert_array_equal(out.target[io], g)
        np.testing.assert_array_equal(out.target_shape[io], s)


def test_eval_episode_uses_all_train_pairs_and_test_target():
    rng = np.random.default_rng(5)
    train, train_shapes = _random_task(rng, 3, MAX_PAIRS)
    test, test_shapes = _random_task(rng, 2, 2)
    ep = eval_episode(3, MAX_PAIRS, target=1)
    np.testing.assert_array_equal(ep.context, [0, 1, 2] + [0] * (MAX_PAIRS - 3))
    assert int(ep.n_context) == 3
    got = gather_episode(train, train_shapes, ep, targets=(test, test_shapes))
    np.testing.assert_array_equal(got.context, train)
    np.testing.assert_array_equal(got.target, test[1])
    np.testing.assert_array_equal(got.target_shape, test_shapes[1])


def test_sample_episode_rejects_zero_leave_out():
    with pytest.raises(ValueError):
        sample_episode(jax.random.key(0), 3, MAX_PAIRS, n_leave_out=0, shuffle=False)
