"""Device side of evaluation: teacher-forced val loss and decoded candidates for every test input
of every task, batched over tasks × test inputs × augmentations, with per-task adapters (a stack,
vmapped), one shared adapter, or none.

Each test input is decoded under `n_augmentations` views: view 0 is the identity, the others a
random dihedral transform and colour permutation (0 kept) drawn from the task's own key, so a
task's candidates do not depend on which other tasks are evaluated. Per view, `strategy="vote"`
decodes one sequence (`arc_jax.infer.generate`), `"dfs"` every completion above a probability
threshold (`arc_jax.infer.dfs`). With `scoring="poe"` the distinct grids (augmentation undone)
are then scored under `score_views` other views (`arc_jax.infer.scoring`), with the same
batching, memory budget and resume cache. `arc_jax.infer.evaluate` inverts, ranks and scores
them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from arc_jax.atomic import write_json_atomic
from arc_jax.data import augment
from arc_jax.data.arrays import TaskArrays
from arc_jax.data.formats import MAX_SIDE, GridFormat
from arc_jax.data.pipeline import (
    PipelineConfig,
    assign_buckets,
    episode_length,
    eval_batch,
)
from arc_jax.data.tasks import Task
from arc_jax.data.tokenizer import TokenVocab
from arc_jax.infer.dfs import _dfs, _dfs_sharded, dfs_per_task, search_options
from arc_jax.infer.evaluate import SCORINGS, Candidate, grid_key, parse_candidate
from arc_jax.infer.generate import (
    _decode,
    _decode_sharded,
    _options,
    answer_tokens,
    generate_per_task,
    max_answer_tokens,
    prompts_that_fit,
)
from arc_jax.infer.grammar import GRAMMARS, grid_grammar
from arc_jax.infer.scoring import _score, _score_sharded, answer_ids, answer_width, score_answers
from arc_jax.model.lora import LoraConfig, init_lora, stack_lora
from arc_jax.model.phi3 import Phi3
from arc_jax.train.step import masked_nll
from arc_jax.train.ttft import gather

STRATEGIES = ("vote", "dfs")
ANSWER_CAPS = ("any", "task")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The `eval.*` knobs plus what decoding needs from the run.

    strategy: `vote` decodes one sequence per view (greedy or sampled); `dfs` every completion
    with probability >= `dfs_min_prob` per view (`arc_jax.infer.dfs`), at most
    `dfs_max_candidates` per view and `dfs_max_steps` expansions (0: no cap).
    scoring: how the distinct grids are ranked (`arc_jax.infer.evaluate.rank`); `poe` scores
    them under `score_views` augmented views (`arc_jax.infer.scoring`).
    grammar: `grid` decodes (vote or dfs) only well-formed grids in the format, from the
    model's distribution renormalised over the allowed tokens (`arc_jax.infer.grammar`).
    """

    n_augmentations: int = 8
    temperature: float = 0.0
    top_k: int = 0
    max_new_tokens: int = 0  # 0 = the largest answer in the format
    strategy: str = "vote"
    dfs_min_prob: float = 0.1
    dfs_max_candidates: int = 8
    dfs_max_steps: int = 0
    scoring: str = "vote"
    score_views: int = 8
    answer_cap: str = "any"  # any: every view may decode `max_new_tokens`; task: answer_token_cap
    grammar: str = "none"  # grid: constrained to well-formed grids (`arc_jax.infer.grammar`)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.answer_cap not in ANSWER_CAPS:
            raise ValueError(f"answer_cap must be one of {ANSWER_CAPS}, got {self.answer_cap!r}")
        if self.grammar not in GRAMMARS:
            raise ValueError(f"grammar must be one of {GRAMMARS}, got {self.grammar!r}")

    def cache_settings(self, what: str) -> dict[str, Any]:
        """The settings a cached `what` ("decode" or "poe") result depends on: a vote decode
        keeps its pre-DFS key, so caches made before DFS existed stay valid."""
        keys = ["n_augmentations", "max_new_tokens"]
        keys += (["strategy", "dfs_min_prob", "dfs_max_candidates", "dfs_max_steps"]
                 if self.strategy == "dfs" else ["temperature", "top_k"])
        if what == "poe":
            keys += ["scoring", "score_views"]
        if self.answer_cap != "any":  # so caches made before the cap existed stay valid
            keys.append("answer_cap")
        if self.grammar != "none":
            keys.append("grammar")
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass
class EvalOutputs:
    """candidates per (task_id, test index); val loss and its token count per task; with
    `scoring="poe"`, each group's scores by `grid_key` of its distinct grids."""

    candidates: dict[tuple[str, int], list[Candidate]]
    val_loss: dict[str, float]
    val_tokens: dict[str, int]
    poe_scores: dict[tuple[str, int], dict] = dataclasses.field(default_factory=dict)


@functools.partial(jax.jit, static_argnames=("n_tests", "n_views"))
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


# Streams of a (task, test input) group's key: decoding views, sampling, PoE scoring views.
VIEWS, SAMPLING, SCORE_VIEWS = range(3)


def stream_key(key: jax.Array, stream: int, task_key: int, q: int) -> jax.Array:
    """The key of stream `stream` of test input `q` of the task with stream index `task_key`:
    it follows the group, not the batch the group is evaluated in."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, stream), task_key), q)


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


def _chunks(members: list, size: int):
    for start in range(0, len(members), size):
        chunk = members[start:start + size]
        yield chunk, chunk + [chunk[-1]] * (size - len(chunk))


def _val_nll(params, lora_stack, arrays, tasks, tests, *, model, lora_config, vocab, cfg,
             seq_len, max_loss_tokens):
    """NLL sums and token counts `[G]` of identity-augmented test pairs (`tasks`, `tests` `[G]`),
    group g under adapter `lora_stack[g]`."""
    ident = augment.Augmentation(jnp.int32(0), jnp.arange(10, dtype=jnp.int32))

    def one(lora, task, test):
        row = eval_batch(arrays, task[None], test[None], jax.tree.map(lambda x: x[None], ident),
                         vocab=vocab, cfg=cfg, seq_len=seq_len)
        return masked_nll(model, params, lora, lora_config, row, max_loss_tokens)

    lora_axis = None if lora_stack is None else 0
    return jax.vmap(one, in_axes=(lora_axis, 0, 0))(lora_stack, tasks, tests)


def _prompts(arrays, tasks, tests, augs, *, vocab, cfg, seq_len):
    return eval_batch(arrays, tasks, tests, augs, vocab=vocab, cfg=cfg, seq_len=seq_len,
                      with_answer=False)


def _view_prompts(make_prompts, device_arrays, keys: jax.Array, chunk, n_views: int,
                  seq_len: int):
    """`n_views` augmented prompts for each (task, test input) group of `chunk` `[G]`, group g's
    views drawn from `keys[g]`: (augmentations flattened to `[G * n_views]`, prompt rows)."""
    augs = jax.vmap(lambda k: view_augmentations(k, 1, n_views))(keys)
    flat_augs = jax.tree.map(lambda x: x.reshape(-1, *x.shape[3:]), augs)
    tasks_idx = jnp.repeat(jnp.asarray([i for i, _ in chunk]), n_views)
    tests_idx = jnp.repeat(jnp.asarray([q for _, q in chunk]), n_views)
    return flat_augs, make_prompts(device_arrays, tasks_idx, tests_idx, flat_augs,
                                   seq_len=seq_len)


def test_length(vocab: TokenVocab, fmt: GridFormat, task: Task, q: int, answer: bool) -> int:
    """Longest evaluation episode of `task`'s test input `q` over both orientations, with its
    answer (a known output) or the prompt only."""
    test, longest = task.test[q], 0
    for flip in (False, True):
        orient = (lambda s: s[::-1]) if flip else (lambda s: s)
        context = [(orient(p.input.shape), orient(p.output.shape)) for p in task.train]
        out = orient(test.output.shape) if answer and test.output is not None else None
        longest = max(longest, episode_length(vocab, fmt, context, orient(test.input.shape),
                                              out))
    return longest


def answer_token_cap(vocab: TokenVocab, fmt: GridFormat, task: Task, q: int) -> int:
    """New tokens a view of `task`'s test input `q` may decode under `answer_cap = "task"`: the
    answer suffix plus the longer orientation (a view may transpose) of an H x W grid. H is the
    larger of the tallest train output and the test input's height times the largest train
    output / input height ratio, at most 30; W likewise. Answers of the inputs' size, of a fixed
    size or of a fixed scale of the input fit; a test output larger than all of these is cut.
    """
    h, w = answer_shape_cap(task, q)
    return max(answer_tokens(vocab, fmt, (h, w)), answer_tokens(vocab, fmt, (w, h)))


def answer_shape_cap(task: Task, q: int) -> tuple[int, int]:
    """(H, W) of `answer_token_cap`, in the task's own orientation: the grammar's bound on the
    shape of test input `q`'s answer (a view that transposes swaps them)."""
    test = task.test[q].input
    sides = []
    for axis in (0, 1):
        tallest = max(p.output.shape[axis] for p in task.train)
        ratio = max(p.output.shape[axis] / p.input.shape[axis] for p in task.train)
        sides.append(min(MAX_SIDE, max(tallest, int(np.ceil(test.shape[axis] * ratio - 1e-9)))))
    return sides[0], sides[1]


def _fit_groups(compile_for, budget_bytes: float, most: int, shared_bytes: int,
                n_local: int, what: str = "") -> int:
    """Groups per device per call that fit the budget, from XLA's estimate of the program
    (see `arc_jax.train.ttft.fit_tasks_per_device`); logged as `what`."""
    from arc_jax.train.ttft import fit_tasks_per_device

    m, used = fit_tasks_per_device(compile_for, budget_bytes, n_local, most, shared_bytes)
    logging.info("%s: %d group(s) per device per call (%.2f GiB by XLA's estimate, of the %.2f "
                 "GiB budget)", what or "evaluation", m, used / 2**30, budget_bytes / 2**30)
    return m


def evaluate_tasks(
    model: Phi3, params: Any, tokenizer, vocab: TokenVocab, pipeline: PipelineConfig,
    tasks: Sequence[Task], arrays: TaskArrays, adapters: Mapping[int, Any] | Any | None,
    lora_config: LoraConfig | None, settings: EvalSettings, key: jax.Array,
    task_keys: Sequence[int], max_loss_tokens: int, budget_bytes: float = 6 * 2**30,
    mesh: Mesh | None = None, cache_dir: str | None = None,
    out_of_time: Callable[[], bool] = lambda: False, decode: bool = True,
) -> EvalOutputs:
    """Val loss and candidates for every test input of every task.

    adapters: `{task index: LoRA tree}` (per-task; a task without one runs the base), one LoRA
    tree for all, or None (base). task_keys: each task's random stream index (its views and
    sampling keys). Work is done per (task, test input) group, each with its own adapter and
    `n_augmentations` rows, so a task decodes only its own test inputs. Groups are bucketed by
    length (`assign_buckets`, honouring `pipeline.overflow`), batched as many per call as
    `budget_bytes` allows (XLA's estimate of the compiled program) and, with a `mesh` of
    several devices, sharded over it. Results do not depend on which other tasks are
    evaluated, how many at once, or on how many devices. With `cache_dir`, each group's results
    are kept there as they come (`GroupCache`), so a killed evaluation resumes where it was.
    Once `out_of_time()`, no more calls are made: the groups not done get no candidates.
    `decode=False`: the val loss only.
    """
    fmt = pipeline.fmt
    per_task = isinstance(adapters, Mapping) and all(isinstance(k, int) for k in adapters)
    n_views = settings.n_augmentations
    max_new = settings.max_new_tokens or max_answer_tokens(vocab, fmt)
    n_dev = 1 if mesh is None else mesh.size
    n_local = 1 if mesh is None else sum(
        d.process_index == jax.process_index() for d in mesh.devices.flat)
    if mesh is not None:
        from arc_jax.train.ttft import place

        params = place(params, NamedSharding(mesh, P()))  # on the mesh once
        device_arrays = place(jax.tree.map(jnp.asarray, arrays), NamedSharding(mesh, P()))
    else:
        device_arrays = jax.tree.map(jnp.asarray, arrays)
    shared = sum(x.nbytes for x in jax.tree.leaves(params))
    out = EvalOutputs({}, {}, {})
    val_programs: dict[int, Any] = {}

    def val_program(seq_len: int):
        if seq_len not in val_programs:  # one program per bucket
            fn = functools.partial(
                _val_nll, model=model, lora_config=lora_config, vocab=vocab, cfg=pipeline,
                seq_len=seq_len, max_loss_tokens=max_loss_tokens)
            if n_dev > 1:
                ax = P(mesh.axis_names[0])
                fn = jax.shard_map(fn, mesh=mesh, check_vma=False, out_specs=ax, in_specs=(
                    P(), None if adapters is None else ax, P(), ax, ax))
            val_programs[seq_len] = jax.jit(fn)
        return val_programs[seq_len]

    make_prompts = jax.jit(functools.partial(_prompts, vocab=vocab, cfg=pipeline),
                           static_argnames=("seq_len",))
    blank = None
    if per_task and lora_config is not None and len(adapters) < len(tasks):
        blank = init_lora(jax.random.key(0), params, lora_config)  # b = 0: the base exactly

    def lora_for(groups):
        if adapters is None:
            return None
        if per_task:
            return stack_lora([adapters.get(i, blank) for i, _ in groups])
        return stack_lora([adapters] * len(groups))

    def group_key(stream: int, i: int, q: int) -> jax.Array:
        return stream_key(key, stream, task_keys[i], q)

    def group_size(compile_for, groups, what: str = "") -> int:
        m = _fit_groups(compile_for, budget_bytes, -(-len(groups) // n_dev), shared, n_local,
                        what)
        return m * n_dev

    pairs = [(i, q) for i, t in enumerate(tasks) for q in range(len(t.test))]
    ids = [f"{tasks[i].task_id}/test{q}" for i, q in pairs]
    extra = {"views": n_views, "max_new": max_new}
    cache = GroupCache(cache_dir, settings.cache_settings("decode") | extra)
    score_cache = GroupCache(cache_dir, settings.cache_settings("poe") | extra)

    # Teacher-forced val loss on the known test outputs.
    known = [n for n, (i, q) in enumerate(pairs) if tasks[i].test[q].output is not None]
    full = [test_length(vocab, fmt, tasks[pairs[n][0]], pairs[n][1], answer=True) for n in known]
    sums: dict[int, float] = {}
    counts: dict[int, float] = {}
    scored: dict[int, int] = {}
    for n in known:
        hit = cache.get("val", tasks[pairs[n][0]].task_id, pairs[n][1])
        if hit is not None:
            i = pairs[n][0]
            sums[i] = sums.get(i, 0.0) + hit["sum"]
            counts[i] = counts.get(i, 0.0) + hit["count"]
            scored[i] = scored.get(i, 0) + 1
    for seq_len, members in assign_buckets([ids[n] for n in known], full, pipeline).items():
        groups = [pairs[known[m]] for m in members
                  if cache.get("val", tasks[pairs[known[m]][0]].task_id, pairs[known[m]][1])
                  is None]
        if not groups:
            continue
        program = val_program(seq_len)

        def compile_val(m, program=program, groups=groups):
            idx = jax.ShapeDtypeStruct((m * n_dev,), jnp.int32)
            return program.lower(params, lora_for(groups[:1] * (m * n_dev)), device_arrays,
                                 idx, idx).compile()

        for real, chunk in _chunks(groups, group_size(compile_val, groups,
                                                      f"val loss, bucket {seq_len}")):
            if out_of_time():
                break
            s, c = gather(program(
                params, lora_for(chunk), device_arrays, jnp.asarray([i for i, _ in chunk]),
                jnp.asarray([q for _, q in chunk])))
            for g, (i, q) in enumerate(real):
                sums[i] = sums.get(i, 0.0) + float(s[g])
                counts[i] = counts.get(i, 0.0) + float(c[g])
                scored[i] = scored.get(i, 0) + 1
                cache.put("val", tasks[i].task_id, q, {"sum": float(s[g]), "count": float(c[g])})
    for i, total in sums.items():
        if scored[i] == len(tasks[i].test):  # a task's val loss needs all its test inputs
            out.val_loss[tasks[i].task_id] = total / max(counts[i], 1.0)
            out.val_tokens[tasks[i].task_id] = int(counts[i])
    if not decode:
        return out

    # Decoding: per call, G groups of `n_views` rows.
    prompt_lens = [test_length(vocab, fmt, tasks[i], q, answer=False) for i, q in pairs]
    for i, q in pairs:
        hit = cache.get("decode", tasks[i].task_id, q)
        if hit is not None:
            out.candidates[(tasks[i].task_id, q)] = [Candidate(
                augment.Augmentation(c["dihedral"], np.asarray(c["colors"])), c["text"],
                c["logprob"], c.get("total")) for c in hit["candidates"]]
    dfs = settings.strategy == "dfs"
    grammar = grid_grammar(vocab, fmt) if settings.grammar == "grid" else None
    lora_axis = None if adapters is None else 0
    dfs_options = dict(min_prob=settings.dfs_min_prob, max_candidates=settings.dfs_max_candidates,
                       max_new_tokens=max_new, eos_token_id=int(vocab.end),
                       pad_token_id=int(vocab.pad), max_steps=settings.dfs_max_steps)
    caps = ({} if settings.answer_cap == "any" or dfs else
            {(i, q): answer_token_cap(vocab, fmt, tasks[i], q) for i, q in pairs})
    # with the grammar, the cap bounds the grid itself (vote and dfs): a view's header, its
    # rows and their widths, in the view's orientation
    shape_caps = ({(i, q): answer_shape_cap(tasks[i], q) for i, q in pairs}
                  if grammar is not None and settings.answer_cap == "task" else {})

    def view_shape_caps(chunk, dihedral):  # -> [G, views, 2] or None
        if not shape_caps:
            return None
        swap = jnp.asarray(augment.DIHEDRAL_SWAPS_AXES)[dihedral].reshape(len(chunk), n_views)
        hw = jnp.asarray([shape_caps[group] for group in chunk], jnp.int32)[:, None, :]
        return jnp.where(swap[..., None], hw[..., ::-1], hw)

    stopped: list = []  # groups at which decoding stopped for the deadline

    def decode_run(seq_len: int, groups: list) -> None:
        """Decodes `groups` of one bucket in calls of as many groups as the memory budget
        allows."""

        def compile_decode(m):
            g = m * n_dev
            tokens = jax.ShapeDtypeStruct((g, n_views, seq_len), jnp.int32)
            lens = jax.ShapeDtypeStruct((g, n_views), jnp.int32)
            lora = lora_for(groups[:1] * g)
            bounds = (jax.ShapeDtypeStruct((g, n_views, 2), jnp.int32) if shape_caps
                      else None)
            if dfs:
                options = search_options(**dfs_options)
                if n_dev > 1:
                    return _dfs_sharded.lower(model, params, lora, lora_config, tokens, lens,
                                              **options, grammar=grammar, max_shape=bounds,
                                              lora_axis=lora_axis, mesh=mesh).compile()
                return _dfs.lower(model, params, lora, lora_config, tokens, lens, **options,
                                  grammar=grammar, max_shape=bounds,
                                  lora_axis=lora_axis).compile()
            options = _options(jax.random.split(key, g), g, max_new, int(vocab.end),
                               int(vocab.pad), settings.temperature, settings.top_k)
            if n_dev > 1:
                return _decode_sharded.lower(
                    model, params, lora, lora_config, tokens, lens,
                    **options, grammar=grammar, max_shape=bounds, lora_axis=lora_axis,
                    mesh=mesh).compile()
            return _decode.lower(model, params, lora, lora_config, tokens, lens, **options,
                                 grammar=grammar, max_shape=bounds,
                                 lora_axis=lora_axis).compile()

        what = f"{settings.strategy} decode, bucket {seq_len}"
        for real, chunk in _chunks(groups, group_size(compile_decode, groups, what)):
            if out_of_time():
                if not stopped:  # once, naming the first group left out
                    logging.warning("evaluation stopped for the job's deadline: %s and later "
                                    "groups get the fallback answer", ids[pairs.index(real[0])])
                stopped.append(real[0])
                break
            flat_augs, prompts = _view_prompts(
                make_prompts, device_arrays, jnp.stack([group_key(VIEWS, i, q) for i, q in chunk]),
                chunk, n_views, seq_len)
            lengths = np.asarray(prompts.length)
            row_ids = [f"{tasks[i].task_id}/test{q}/view{v}" for i, q in real
                       for v in range(n_views)]
            keep = prompts_that_fit(lengths[: len(row_ids)], max_new, model.config, ids=row_ids)
            view_prompts = prompts.tokens.reshape(len(chunk), n_views, -1)
            view_lengths = jnp.asarray(lengths).reshape(len(chunk), n_views)
            bounds = view_shape_caps(chunk, flat_augs.dihedral)
            if dfs:
                found = gather(dfs_per_task(
                    model, params, lora_for(chunk), view_prompts, view_lengths, **dfs_options,
                    lora_config=lora_config, mesh=mesh, grammar=grammar, max_shape=bounds))
                # per view: (tokens [C, N], lengths [C], whole log-probs [C])
                per_view = lambda g, v, found=found: [(
                    found.tokens[g, v, c], int(found.lengths[g, v, c]),
                    float(found.logprobs[g, v, c]) / max(int(found.lengths[g, v, c]), 1),
                    float(found.logprobs[g, v, c])) for c in range(found.n_found[g, v])]
            else:
                gen = gather(generate_per_task(
                    model, params, lora_for(chunk), view_prompts, view_lengths,
                    max_new_tokens=max_new, eos_token_id=int(vocab.end),
                    pad_token_id=int(vocab.pad), temperature=settings.temperature,
                    top_k=settings.top_k, lora_config=lora_config, mesh=mesh,
                    group_keys=jnp.stack([group_key(SAMPLING, i, q) for i, q in chunk]),
                    max_new_per_group=jnp.asarray([caps[g] for g in chunk]) if caps else None,
                    grammar=grammar, max_shape=bounds))
                per_view = lambda g, v, gen=gen: [(
                    gen.tokens[g, v], int(gen.lengths[g, v]),
                    float(np.mean(gen.logprobs[g, v, : gen.lengths[g, v]]))
                    if gen.lengths[g, v] else float("-inf"),
                    float(np.sum(gen.logprobs[g, v, : gen.lengths[g, v]])))]
            host_augs = jax.device_get(flat_augs)
            for g, (i, q) in enumerate(real):
                cands = out.candidates.setdefault((tasks[i].task_id, q), [])
                for v in range(n_views):
                    r = g * n_views + v
                    if not keep[r]:
                        continue
                    aug = augment.Augmentation(int(host_augs.dihedral[r]),
                                               np.asarray(host_augs.colors[r]))
                    for tokens, n, mean, total in per_view(g, v):
                        text = tokenizer.decode(tokens[:n].tolist())
                        cands.append(Candidate(aug, text, mean, total))
                cache.put("decode", tasks[i].task_id, q, {"candidates": [
                    {"dihedral": int(c.augmentation.dihedral),
                     "colors": np.asarray(c.augmentation.colors).tolist(), "text": c.text,
                     "logprob": c.mean_logprob, "total": c.logprob} for c in cands]})

    for seq_len, members in assign_buckets(ids, prompt_lens, pipeline).items():
        groups = [pairs[m] for m in members if (tasks[pairs[m][0]].task_id, pairs[m][1])
                  not in out.candidates]
        if not groups:
            continue
        if caps:  # a call runs to its largest cap: batch groups of like caps together
            groups.sort(key=lambda group: caps[group])
        decode_run(seq_len, groups)

    if settings.scoring == "poe":
        out.poe_scores = _poe_scores(
            model, params, vocab, pipeline, tasks, pairs, ids, prompt_lens, out.candidates,
            lora_config, lora_axis, settings, score_cache, make_prompts=make_prompts,
            device_arrays=device_arrays, lora_for=lora_for, group_key=group_key,
            group_size=group_size, mesh=mesh, out_of_time=out_of_time)
    return out


def _poe_scores(model, params, vocab, pipeline, tasks, pairs, ids, prompt_lens, candidates,
                lora_config, lora_axis, settings, cache, *, make_prompts, device_arrays, lora_for,
                group_key, group_size, mesh, out_of_time):
    """Product-of-experts scores `{(task_id, q): {grid_key: sum over K views of log p}}` of
    each group's distinct candidate grids (deduplicated after their augmentation is undone),
    under `settings.score_views` views of the group's own (`SCORE_VIEWS` stream), view 0 the
    identity. Batched and budgeted as decoding is; kept in `cache` per group."""
    fmt = pipeline.fmt
    n_views = settings.score_views
    n_dev = 1 if mesh is None else mesh.size
    scores: dict[tuple[str, int], dict] = {}
    distinct: dict[tuple[str, int], list[np.ndarray]] = {}
    for i, q in pairs:
        key = (tasks[i].task_id, q)
        grids = distinct_grids(candidates.get(key, ()), fmt)
        if not grids:
            continue
        hit = cache.get("poe", *key)
        if hit is not None:
            scores[key] = {grid_key(np.asarray(e["grid"], np.uint8)): e["score"]
                           for e in hit["grids"]}
        else:
            distinct[key] = grids
    capacity = max([len(g) for g in distinct.values()], default=0)
    width_cap = max_answer_tokens(vocab, fmt)
    for seq_len, members in assign_buckets(ids, prompt_lens, pipeline).items():
        groups = [pairs[m] for m in members if (tasks[pairs[m][0]].task_id, pairs[m][1])
                  in distinct]
        if not groups:
            continue
        longest = max(len(answer_ids(vocab, fmt, grid)) for i, q in groups  # both ways up
                      for g in distinct[(tasks[i].task_id, q)] for grid in (g, g.T))
        width = answer_width(longest, width_cap)

        def compile_score(m, seq_len=seq_len, groups=groups, width=width):
            g = m * n_dev
            shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
            program = _score_sharded if n_dev > 1 else _score
            extra = dict(mesh=mesh) if n_dev > 1 else {}
            return program.lower(
                model, params, lora_for(groups[:1] * g), lora_config,
                shape(g, n_views, seq_len), shape(g, n_views),
                shape(g, n_views, capacity, width), shape(g, n_views, capacity), shape(),
                lora_axis=lora_axis, **extra).compile()

        for real, chunk in _chunks(groups, group_size(compile_score, groups, "poe scores")):
            if out_of_time():
                logging.warning("scoring stopped for the job's deadline: %s and later groups "
                                "are ranked by vote", ids[pairs.index(real[0])])
                break
            flat_augs, prompts = _view_prompts(
                make_prompts, device_arrays,
                jnp.stack([group_key(SCORE_VIEWS, i, q) for i, q in chunk]), chunk, n_views,
                seq_len)
            host_augs = jax.device_get(flat_augs)
            lengths = np.asarray(prompts.length).reshape(len(chunk), n_views)
            answers = np.full((len(chunk), n_views, capacity, width), int(vocab.pad), np.int32)
            answer_lens = np.ones((len(chunk), n_views, capacity), np.int32)
            for g, (i, q) in enumerate(chunk):
                for v in range(n_views):
                    r = g * n_views + v
                    aug = augment.Augmentation(int(host_augs.dihedral[r]),
                                               np.asarray(host_augs.colors[r]))
                    for c, grid in enumerate(distinct[(tasks[i].task_id, q)]):
                        spelled = answer_ids(vocab, fmt, augment.apply_augmentation_np(aug, grid))
                        answers[g, v, c, : len(spelled)] = spelled
                        answer_lens[g, v, c] = len(spelled)
            # views whose prompt leaves no room for the answer block take no part
            fits = lengths + width + 1 <= model.config.max_position_embeddings
            logp = gather(score_answers(
                model, params, lora_for(chunk), prompts.tokens.reshape(len(chunk), n_views, -1),
                lengths, answers, answer_lens,
                n_answers=max(len(distinct[(tasks[i].task_id, q)]) for i, q in chunk),
                lora_config=lora_config, mesh=mesh))
            for g, (i, q) in enumerate(real):
                key = (tasks[i].task_id, q)
                grids = distinct[key]
                total = np.where(fits[g][:, None], logp[g, :, : len(grids)], 0.0).sum(0)
                scores[key] = {grid_key(grid): float(t) for grid, t in zip(grids, total,
                                                                           strict=True)}
                cache.put("poe", *key, {"grids": [{"grid": grid.tolist(), "score": float(t)}
                                                  for grid, t in zip(grids, total, strict=True)]})
    return scores


def distinct_grids(candidates: Sequence[Candidate], fmt: GridFormat) -> list[np.ndarray]:
    """The distinct valid grids `[h, w]` of `candidates`, each in the task's own frame (its
    view's augmentation undone before deduplication), in order of first appearance."""
    seen: dict = {}
    for c in candidates:
        grid = parse_candidate(c, fmt).grid
        if grid is not None:
            seen.setdefault(grid_key(grid), grid)
    return list(seen.values())


class GroupCache:
    """Per (task, test input) evaluation results kept in `directory` as JSON files, written
    atomically; entries made under other evaluation settings are ignored. No directory: off."""

    def __init__(self, directory: str | None, settings: Mapping[str, Any]):
        self.directory = directory
        self.settings = json.loads(json.dumps(dict(settings), default=str))

    def _path(self, kind: str, task_id: str, q: int) -> str:
        return os.path.join(self.directory, f"{kind}_{task_id}_test{q}.json")

    def get(self, kind: str, task_id: str, q: int) -> dict | None:
        if self.directory is None or not os.path.exists(self._path(kind, task_id, q)):
            return None
        with open(self._path(kind, task_id, q)) as f:
            entry = json.load(f)
        return entry["value"] if entry.get("settings") == self.settings else None

    def put(self, kind: str, task_id: str, q: int, value: dict) -> None:
        if self.directory is not None and jax.process_index() == 0:
            write_json_atomic(self._path(kind, task_id, q),
                              {"settings": self.settings, "value": value})
