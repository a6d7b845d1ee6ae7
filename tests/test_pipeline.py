"""The jitted sample → augment → encode pipeline, checked by decoding its rows back to grids."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.data.arrays import pad_tasks
from arc_jax.data.augment import apply_augmentation_np, sample_augmentation
from arc_jax.data.encode import check_device_encoding
from arc_jax.data.formats import PromptTemplate, text_to_grid
from arc_jax.data.pipeline import (
    PipelineConfig,
    assign_buckets,
    choose_bucket,
    max_target_tokens,
    max_train_length,
    train_batch,
)
from arc_jax.data.sample import sample_episode
from arc_jax.data.tasks import load_tasks
from arc_jax.data.tokenizer import load_tokenizer

TEMPLATE = PromptTemplate()
SEQ_LEN = 2048


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer()
    tasks = list(load_tasks("kaggle2024/evaluation").values())
    cfg = PipelineConfig(grid_format="shape_numbered")
    vocab = check_device_encoding(tokenizer, cfg.fmt)
    shapes = lambda t: np.asarray([[p.input.shape, p.output.shape] for p in t.train])
    small = [t for t in tasks if max_train_length(vocab, cfg.fmt, shapes(t)) <= SEQ_LEN][:6]
    return tokenizer, small, vocab


def _decode_row(tokenizer, cfg, tokens):
    """Row text → ([(input, output) context grids], query input, answer output)."""
    text = tokenizer.decode(tokens.tolist())
    body = text.split(TEMPLATE.prefix, 1)[1]
    user, answer = body.split(TEMPLATE.query_suffix)
    chunks = user.split(TEMPLATE.input_label)[1:]
    grids = []
    for chunk in chunks:
        for part in chunk.split(TEMPLATE.output_label):
            parsed = text_to_grid(part, cfg.fmt)
            assert parsed.ok, parsed.error
            grids.append(parsed.grid)
    parsed_answer = text_to_grid(answer.split(TEMPLATE.answer_suffix)[0], cfg.fmt)
    assert parsed_answer.ok, parsed_answer.error
    context = list(zip(grids[:-1:2], grids[1:-1:2], strict=True))
    return context, grids[-1], parsed_answer.grid


def _replay(key, tasks, task_idx, cfg):
    """The episodes and augmentations the pipeline drew, replayed from the same key plumbing."""
    arrays = pad_tasks(tasks)
    for row_key, t in zip(jax.random.split(key, len(task_idx)), task_idx, strict=True):
        k_episode, k_aug = jax.random.split(row_key)
        episode = sample_episode(k_episode, arrays.n_train[t], arrays.train.shape[1],
                                 n_leave_out=cfg.n_leave_out, shuffle=cfg.shuffle_pairs)
        aug = sample_augmentation(
            k_aug, geometric=cfg.geometric, color=cfg.color,
            keep_background=cfg.keep_background, preserve_color_prob=cfg.preserve_color_prob)
        yield jax.device_get(episode), jax.device_get(aug)


@pytest.mark.parametrize("n_leave_out, augmented", [(1, True), (2, False)])
def test_train_rows_are_augmented_leave_k_out_episodes(setup, n_leave_out, augmented):
    tokenizer, tasks, vocab = setup
    cfg = PipelineConfig(grid_format="shape_numbered", n_leave_out=n_leave_out,
                         geometric=augmented, color=augmented, shuffle_pairs=augmented)
    make = jax.jit(functools.partial(train_batch, vocab=vocab, cfg=cfg, seq_len=SEQ_LEN))
    task_idx = np.repeat(np.arange(len(tasks)), 3)
    key = jax.random.key(1)
    out = jax.device_get(make(key, pad_tasks(tasks), jnp.asarray(task_idx)))
    dihedrals = set()
    replay = _replay(key, tasks, task_idx, cfg)
    for row, (t, (episode, aug)) in enumerate(zip(task_idx, replay, strict=True)):
        task = tasks[t]
        n = len(task.train)
        assert out.fits[row]
        context, query, answer = _decode_row(tokenizer, cfg, out.tokens[row, : out.length[row]])
        used = episode.context[: episode.n_context].tolist()
        assert len(context) == len(used) == n - max(1, min(n_leave_out, n - 1))
        assert len(set(used)) == len(used) and int(episode.target) not in used
        if not augmented:
            assert used == sorted(used)
        move = functools.partial(apply_augmentation_np, aug)
        for (got_in, got_out), p in zip(context, used, strict=True):
            np.testing.assert_array_equal(got_in, move(task.train[p].input))
            np.testing.assert_array_equal(got_out, move(task.train[p].output))
        np.testing.assert_array_equal(query, move(task.train[episode.target].input))
        np.testing.assert_array_equal(answer, move(task.train[episode.target].output))
        dihedrals.add(int(aug.dihedral))
    assert (len(dihedrals) > 1) == augmented


def test_train_batch_is_a_function_of_the_key(setup):
    _, tasks, vocab = setup
    cfg = PipelineConfig()
    arrays = pad_tasks(tasks)
    make = jax.jit(functools.partial(train_batch, vocab=vocab, cfg=cfg, seq_len=SEQ_LEN))
    idx = jnp.arange(len(tasks))
    a, b = make(jax.random.key(3), arrays, idx), make(jax.random.key(3), arrays, idx)
    c = make(jax.random.key(4), arrays, idx)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_max_train_length_bounds_every_sample(setup):
    _, tasks, vocab = setup
    cfg = PipelineConfig()
    arrays = pad_tasks(tasks)
    make = jax.jit(functools.partial(train_batch, vocab=vocab, cfg=cfg, seq_len=SEQ_LEN))
    idx = jnp.asarray(np.repeat(np.arange(len(tasks)), 8))
    out = make(jax.random.key(5), arrays, idx)
    bounds = np.asarray([max_train_length(vocab, cfg.fmt, np.asarray(
        [[p.input.shape, p.output.shape] for p in tasks[t].train])) for t in np.asarray(idx)])
    assert np.all(np.asarray(out.length) <= bounds)
    # n-1 without transposition is exact: some sample reaches the bound for some task
    assert np.any(np.asarray(out.length) == bounds)
    # the loss positions a train step projects cover every row's loss mask; tight up to rounding
    loss_bounds = np.asarray([max_target_tokens(vocab, cfg.fmt, np.asarray(
        [p.output.shape for p in tasks[t].train])) for t in np.asarray(idx)])
    loss_tokens = np.asarray(out.loss_mask).sum(axis=1)
    assert np.all(loss_tokens <= loss_bounds)
    assert np.any(loss_bounds - loss_tokens < 64)


def test_buckets_report_and_skip_or_keep_long_tasks(caplog):
    cfg = PipelineConfig(buckets=(512, 1024))
    assert choose_bucket(512, cfg.buckets) == 512 and choose_bucket(513, cfg.buckets) == 1024
    assert choose_bucket(2000, cfg.buckets) is None
    with caplog.at_level(logging.WARNING):
        groups = assign_buckets(["a", "b", "c"], [100, 900, 5000], cfg)
    assert groups == {512: [0], 1024: [1, 2]}
    assert "c (5000 tokens)" in caplog.text and "shortened" in caplog.text
    skip = PipelineConfig(buckets=(512, 1024), overflow="skip")
    assert assign_buckets(["a", "b", "c"], [100, 900, 5000], skip) == {512: [0], 1024: [1]}
    with pytest.raises(ValueError, match="overflow"):
        PipelineConfig(overflow="wrap")
