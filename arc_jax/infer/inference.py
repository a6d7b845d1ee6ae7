"""Device side of evaluation: teacher-forced val loss and decoded candidates for every test input
of every task, batched over tasks × test inputs × augmentations, with per-task adapters (a stack,
vmapped), one shared adapter, or none.

Each test input is decoded under `n_augmentations` views: view 0 is the identity, the others a
random dihedral transform and colour permutation (0 kept) drawn from the task's own key, so a
task's candidates do not depend on which other tasks are evaluated. `arc_jax.infer.evaluate`
inverts, votes and scores them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arc_jax.data import augment
from arc_jax.data.arrays import TaskArrays
from arc_jax.data.formats import GridFormat
from arc_jax.data.pipeline import (
    PipelineConfig,
    assign_buckets,
    choose_bucket,
    episode_length,
    eval_batch,
)
from arc_jax.data.tasks import Task
from arc_jax.data.tokenizer import TokenVocab
from arc_jax.infer.evaluate import Candidate
from arc_jax.infer.generate import generate_per_task, max_answer_tokens, prompts_that_fit
from arc_jax.model.lora import LoraConfig, stack_lora
from arc_jax.model.phi3 import Phi3
from arc_jax.train.step import masked_nll


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The `eval.*` knobs plus what decoding needs from the run."""

    n_augmentations: int = 8
    temperature: float = 0.0
    top_k: int = 0
    batch_size: int = 8  # tasks per compiled call
    max_new_tokens: int = 0  # 0 = the largest answer in the format


@dataclasses.dataclass
class EvalOutputs:
    candidates: dict[tuple[str, int], list[Candidate]]
    val_loss: dict[str, float]
    val_tokens: dict[str, int]


def view_augmentations(key: jax.Array, n_tests: int, n_views: int) -> augment.Augmentation:
    """Augmentations `[n_tests, n_views]`: view 0 the identity, the rest random (dihedral and
    colour permutation keeping 0), from `key` (the task's own)."""
    keys = jax.random.split(key, n_tests * n_views)
    sample = lambda k: augment.sample_augmentation(k, geometric=True, color=True)
    augs = jax.vmap(sample)(keys)
    first = (jnp.arange(n_tests * n_views) % n_views) == 0
    augs = augment.Augmentation(
        jnp.where(first, 0, augs.dihedral),
        jnp.where(first[:, None], jnp.arange(10, dtype=jnp.int32), augs.colors))
    return jax.tree.map(lambda x: x.reshape(n_tests, n_views, *x.shape[1:]), augs)


def prompt_length(vocab: TokenVocab, fmt: GridFormat, task: Task, answer: bool) -> int:
    """Longest evaluation episode of `task` over its test inputs and both orientations; with the
    answer (known outputs) or the prompt only."""
    longest = 0
    for test in task.test:
        for flip in (False, True):
            orient = (lambda s: s[::-1]) if flip else (lambda s: s)
            context = [(orient(p.input.shape), orient(p.output.shape)) for p in task.train]
            out = orient(test.output.shape) if answer and test.output is not None else None
            longest = max(longest, episode_length(
                vocab, fmt, context, orient(test.input.shape), out))
    return longest


def _groups(lengths: Sequence[int], buckets: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(choose_bucket(n, buckets) or buckets[-1], []).append(i)
    return groups


def _chunks(members: list[int], size: int):
    for start in range(0, len(members), size):
        chunk = members[start:start + size]
        yield chunk, chunk + [chunk[-1]] * (size - len(chunk))


def _val_nll(params, lora_stack, arrays, tasks, *, model, lora_config, vocab, cfg, seq_len,
             max_loss_tokens):
    """Per (task, test) NLL sums and token counts `[G, Q]` for identity-augmented test pairs."""
    n_tests = arrays.test.shape[1]
    ident = augment.Augmentation(jnp.int32(0), jnp.arange(10, dtype=jnp.int32))

    def one_task(lora, task):
        def one_test(q):
            row = eval_batch(arrays, task[None], q[None],
                             jax.tree.map(lambda x: x[None], ident),
                             vocab=vocab, cfg=cfg, seq_len=seq_len)
            return masked_nll(model, params, lora, lora_config, row, max_loss_tokens)

        return jax.vmap(one_test)(jnp.arange(n_tests))

    lora_axis = None if lora_stack is None else 0
    return jax.vmap(one_task, in_axes=(lora_axis, 0))(lora_stack, tasks)


def _prompts(arrays, tasks, tests, augs, *, vocab, cfg, seq_len):
    return eval_batch(arrays, tasks, tests, augs, vocab=vocab, cfg=cfg, seq_len=seq_len,
                      with_answer=False)


def evaluate_tasks(
    model: Phi3, params: Any, tokenizer, vocab: TokenVocab, pipeline: PipelineConfig,
    tasks: Sequence[Task], arrays: TaskArrays, adapters: Mapping[int, Any] | Any | None,
    lora_config: LoraConfig | None, settings: EvalSettings, key: jax.Array,
    task_keys: Sequence[int], max_loss_tokens: int,
) -> EvalOutputs:
    """Val loss and candidates for every task.

    adapters: `{task index: LoRA tree}` (per-task), one LoRA tree for all, or None (base).
    task_keys: each task's random stream index (its augmentations and sampling keys).
    """
    fmt = pipeline.fmt
    per_task = isinstance(adapters, Mapping) and all(isinstance(k, int) for k in adapters)
    n_views = settings.n_augmentations
    max_new = settings.max_new_tokens or max_answer_tokens(vocab, fmt)
    n_tests = arrays.test.shape[1]
    device_arrays = jax.tree.map(jnp.asarray, arrays)
    out = EvalOutputs({}, {}, {})
    # Closures over the (unhashable) vocab; jitted once per evaluation and shape.
    val_nll = jax.jit(functools.partial(
        _val_nll, model=model, lora_config=lora_config, vocab=vocab, cfg=pipeline,
        max_loss_tokens=max_loss_tokens), static_argnames=("seq_len",))
    make_prompts = jax.jit(functools.partial(_prompts, vocab=vocab, cfg=pipeline),
                           static_argnames=("seq_len",))

    def lora_for(chunk):
        if adapters is None:
            return None
        if per_task:
            return stack_lora([adapters[i] for i in chunk])
        return stack_lora([adapters] * len(chunk))

    # Teacher-forced val loss on the known test outputs.
    known = [i for i, t in enumerate(tasks) if all(p.output is not None for p in t.test)]
    full = [prompt_length(vocab, fmt, tasks[i], answer=True) for i in known]
    for seq_len, members in _groups(full, pipeline.buckets).items():
        for real, chunk in _chunks([known[m] for m in members], settings.batch_size):
            sums, counts = jax.device_get(val_nll(
                params, lora_for(chunk), device_arrays, jnp.asarray(chunk), seq_len=seq_len))
            for g, i in enumerate(real):
                q = len(tasks[i].test)
                out.val_loss[tasks[i].task_id] = float(sums[g, :q].sum() / counts[g, :q].sum())
                out.val_tokens[tasks[i].task_id] = int(counts[g, :q].sum())

    # Decoding: rows [G, Q * V] per chunk of G tasks.
    prompt_lens = [prompt_length(vocab, fmt, t, answer=False) for t in tasks]
    groups = assign_buckets([t.task_id for t in tasks], prompt_lens, pipeline)
    for seq_len, members in groups.items():
        for real, chunk in _chunks(members, settings.batch_size):
            view_keys = jnp.stack([jax.random.fold_in(key, task_keys[i]) for i in chunk])
            augs = jax.vmap(lambda k: view_augmentations(k, n_tests, n_views))(view_keys)
            g, rows = len(chunk), n_tests * n_views
            tasks_idx = jnp.repeat(jnp.asarray(chunk), rows)
            tests_idx = jnp.tile(jnp.repeat(jnp.arange(n_tests), n_views), g)
            flat_augs = jax.tree.map(lambda x, n=g * rows: x.reshape(n, *x.shape[3:]), augs)
            prompts = make_prompts(device_arrays, tasks_idx, tests_idx, flat_augs,
                                   seq_len=seq_len)
            lengths = np.asarray(prompts.length)
            ids = [f"{tasks[t].task_id}/test{q}/view{v}" for t in chunk for q in range(n_tests)
                   for v in range(n_views)]
            keep = prompts_that_fit(lengths, max_new, model.config, ids=ids)
            # Sampling keys follow the chunk (its first task); greedy decoding uses none.
            decode_key = jax.random.fold_in(jax.random.split(key)[1], task_keys[chunk[0]])
            gen = jax.device_get(generate_per_task(
                model, params, lora_for(chunk), prompts.tokens.reshape(g, rows, seq_len),
                jnp.asarray(lengths).reshape(g, rows), max_new_tokens=max_new,
                eos_token_id=int(vocab.end), pad_token_id=int(vocab.pad), key=decode_key,
                temperature=settings.temperature, top_k=settings.top_k,
                lora_config=lora_config))
            host_augs = jax.device_get(flat_augs)
            for gi, i in enumerate(real):
                task = tasks[i]
                for q in range(len(task.test)):
                    cands = out.candidates.setdefault((task.task_id, q), [])
                    for v in range(n_views):
                        r = q * n_views + v
                        if not keep[gi * rows + r]:
                            continue
                        n = int(gen.lengths[gi, r])
                        text = tokenizer.decode(gen.tokens[gi, r, :n].tolist())
                        logprob = float(np.mean(gen.logprobs[gi, r, :n])) if n else float("-inf")
                        aug = augment.Augmentation(int(host_augs.dihedral[gi * rows + r]),
                                                   np.asarray(host_augs.colors[gi * rows + r]))
                        cands.append(Candidate(aug, text, logprob))
    return out
