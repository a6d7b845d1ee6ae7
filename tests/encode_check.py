"""Shared by the encoding tests: the on-device encoding of every test input of a task list against
the HF tokenizer's encoding of the same text, batched on both sides (one jitted call, one
tokenizer call)."""
import functools

import jax
import jax.numpy as jnp

from arc_jax.data import augment
from arc_jax.data.arrays import pad_tasks
from arc_jax.data.encode import episode_text
from arc_jax.data.formats import PromptTemplate
from arc_jax.data.pipeline import PipelineConfig, episode_length, eval_batch
from arc_jax.data.tokenizer import TokenVocab


def identity(n: int) -> augment.Augmentation:
    """`n` identity augmentations."""
    return augment.Augmentation(
        jnp.zeros(n, jnp.int32), jnp.tile(jnp.arange(10, dtype=jnp.int32), (n, 1)))


def assert_device_equals_tokenizer(tokenizer, vocab: TokenVocab, fmt_name: str, tasks) -> int:
    """Every (task, test input) with its answer, identity view, all train pairs as context:
    device tokens == the tokenizer's ids of the text, the episode fits, and `episode_length`
    is exact. Returns the number of rows checked."""
    cfg = PipelineConfig(grid_format=fmt_name)
    rows = [(t, q) for t, task in enumerate(tasks) for q in range(len(task.test))]
    texts = []
    for t, q in rows:
        task, test = tasks[t], tasks[t].test[q]
        prompt, answer = episode_text([(p.input, p.output) for p in task.train], test.input,
                                      test.output, cfg.fmt, PromptTemplate())
        texts.append(prompt + answer)
    expected = tokenizer(texts, add_special_tokens=True)["input_ids"]
    seq_len = -(-max(map(len, expected)) // 256) * 256
    encode = jax.jit(functools.partial(eval_batch, vocab=vocab, cfg=cfg, seq_len=seq_len))
    out = jax.device_get(encode(pad_tasks(tasks), jnp.asarray([t for t, _ in rows]),
                                jnp.asarray([q for _, q in rows]), identity(len(rows))))
    for i, (t, q) in enumerate(rows):
        task, test = tasks[t], tasks[t].test[q]
        got = out.tokens[i, : out.length[i]].tolist()
        want = list(expected[i])
        first = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                     min(len(got), len(want)))
        assert got == want, (f"{fmt_name}: task {task.task_id} test {q}, first difference at "
                             f"token {first}: {got[first:first + 5]} vs {want[first:first + 5]}")
        assert out.fits[i]
        shapes = [(p.input.shape, p.output.shape) for p in task.train]
        assert episode_length(vocab, cfg.fmt, shapes, test.input.shape,
                              test.output.shape) == len(want)
    return len(rows)
