"""On-device encoding equals the HF tokenizer's encoding of the same text."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.data import augment
from arc_jax.data.arrays import pad_tasks
from arc_jax.data.encode import check_device_encoding, encode_episode, episode_text
from arc_jax.data.formats import GRID_FORMATS, PromptTemplate
from arc_jax.data.pipeline import PipelineConfig, episode_length, eval_batch
from arc_jax.data.tasks import load_tasks
from arc_jax.data.tokenizer import encode_text, load_tokenizer

TEMPLATE = PromptTemplate()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def eval_tasks():
    return list(load_tasks("kaggle2024/evaluation").values())


def _host_ids(tokenizer, task, test_index, fmt, with_answer=True):
    context = [(p.input, p.output) for p in task.train]
    test = task.test[test_index]
    prompt, answer = episode_text(
        context, test.input, test.output if with_answer else None, fmt, TEMPLATE)
    return encode_text(tokenizer, prompt, answer)


def _identity(n):
    return augment.Augmentation(
        jnp.zeros(n, jnp.int32), jnp.tile(jnp.arange(10, dtype=jnp.int32), (n, 1)))


@pytest.mark.parametrize("fmt_name", ["minimal", "shape_numbered"])
def test_device_encoding_equals_tokenizer_on_all_evaluation_tasks(tokenizer, eval_tasks, fmt_name):
    cfg = PipelineConfig(grid_format=fmt_name)
    vocab = check_device_encoding(tokenizer, cfg.fmt)
    rows = [(t, q) for t, task in enumerate(eval_tasks) for q in range(len(task.test))]
    expected = [_host_ids(tokenizer, eval_tasks[t], q, cfg.fmt) for t, q in rows]
    seq_len = max(len(e) for e in expected)
    arrays = pad_tasks(eval_tasks)
    encode = jax.jit(functools.partial(eval_batch, vocab=vocab, cfg=cfg, seq_len=seq_len))
    chunk = 64
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        part += [part[-1]] * (chunk - len(part))  # one compiled shape
        tasks = jnp.asarray([t for t, _ in part])
        tests = jnp.asarray([q for _, q in part])
        out = jax.device_get(encode(arrays, tasks, tests, _identity(chunk)))
        for i, (t, q) in enumerate(part[: len(rows) - start]):
            want = expected[start + i]
            got = out.tokens[i, : out.length[i]].tolist()
            assert got == want, f"task {eval_tasks[t].task_id} test {q}"
            assert out.fits[i]
            task = eval_tasks[t]
            shapes = [(p.input.shape, p.output.shape) for p in task.train]
            assert episode_length(
                vocab, cfg.fmt, shapes, task.test[q].input.shape, task.test[q].output.shape
            ) == len(want)


def test_loss_mask_covers_exactly_the_answer(tokenizer, eval_tasks):
    cfg = PipelineConfig(grid_format="shape_numbered")
    vocab = check_device_encoding(tokenizer, cfg.fmt)
    task = eval_tasks[0]
    arrays = pad_tasks([task])
    out = eval_batch(arrays, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), _identity(1),
                     vocab=vocab, cfg=cfg, seq_len=2048)
    tokens, mask = np.asarray(out.tokens[0]), np.asarray(out.loss_mask[0])
    prompt_len, length = int(out.prompt_length[0]), int(out.length[0])
    assert not mask[:prompt_len].any() and mask[prompt_len:length].all()
    assert not mask[length:].any()
    _, answer = episode_text([], task.test[0].input, task.test[0].output, cfg.fmt, TEMPLATE)
    assert tokenizer.decode(tokens[mask].tolist()) == answer
    np.testing.assert_array_equal(out.positions[0, :length], np.arange(length))
    assert out.attention_mask[0].sum() == length

    prompt_only = eval_batch(arrays, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                             _identity(1), vocab=vocab, cfg=cfg, seq_len=2048, with_answer=False)
    assert int(prompt_only.length[0]) == prompt_len
    assert not prompt_only.loss_mask.any()


def test_all_outputs_loss_covers_context_outputs(tokenizer, eval_tasks):
    fmt = GRID_FORMATS["minimal"]
    vocab = check_device_encoding(tokenizer, fmt)
    task = eval_tasks[1]
    arrays = pad_tasks([task])
    out = encode_episode(
        vocab, fmt, arrays.train[0], arrays.train_shapes[0], arrays.n_train[0], arrays.test[0, 0],
        arrays.test_shapes[0, 0], seq_len=4096, loss_on="all_outputs")
    n_out_tokens = sum(p.output.size + p.output.shape[0] for p in task.train)
    answer = task.test[0].output
    assert int(out.loss_mask.sum()) == n_out_tokens + answer.size + answer.shape[0] + 1


def test_truncation_drops_context_pairs_and_reports_overflow(tokenizer, eval_tasks):
    task = max(eval_tasks, key=lambda t: len(t.train))
    arrays = pad_tasks([task])
    args = (arrays, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), _identity(1))
    full = _host_ids(tokenizer, task, 0, GRID_FORMATS["minimal"])
    seq_len = len(full) - 1
    cut = eval_batch(*args, vocab=load_vocab(tokenizer), cfg=PipelineConfig(
        grid_format="minimal"), seq_len=seq_len)
    assert not cut.fits[0] and int(cut.n_context[0]) < len(task.train)
    assert int(cut.length[0]) <= seq_len
    kept = int(cut.n_context[0])
    shortened = task.train[:kept]
    context = [(p.input, p.output) for p in shortened]
    prompt, answer = episode_text(context, task.test[0].input, task.test[0].output,
                                  GRID_FORMATS["minimal"], TEMPLATE)
    assert cut.tokens[0, : cut.length[0]].tolist() == encode_text(tokenizer, prompt, answer)

    skip = eval_batch(*args, vocab=load_vocab(tokenizer), cfg=PipelineConfig(
        grid_format="minimal", overflow="skip"), seq_len=seq_len)
    assert not skip.fits[0] and int(skip.n_context[0]) == len(task.train)


def load_vocab(tokenizer):
    return check_device_encoding(tokenizer, GRID_FORMATS["minimal"])
