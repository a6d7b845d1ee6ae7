"""Base-model training (`mode = "finetune"`) on weighted pools of pairs.

    data.train    sources with weights (`pools.parse_sources`)
      -> tasks      `load_tasks`; evaluation and held-out tasks, pairs equal to theirs up to a
                    dihedral transform, and tasks made only of such pairs (copies under another
                    id, in every source) excluded (`pools.Exclusion`)
      -> sub-pools  each task's pool split by pair length, one bucket each (`pipeline.split_pool`)
      -> steps      each step trains one bucket, drawn by its share of the episode weight; its
                    rows come from the bucket's sub-pools in proportion to their weights

Episode weights: source s gets w_s / sum(w) of the episodes, spread evenly over its tasks; a
task's share is split over its sub-pools by their pair counts, so each of its pairs is equally
likely to be a target. What was excluded, dropped and used is logged and written to
`<workdir>/training_data.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arc_jax import settings
from arc_jax.atomic import write_json_atomic
from arc_jax.data.encode import EncodedExample
from arc_jax.data.formats import GridFormat
from arc_jax.data.pipeline import (
    max_target_tokens,
    pool_fixed_length,
    pool_pair_length,
    pool_train_batch,
    split_pool,
)
from arc_jax.data.pools import (
    EVALUATION,
    HOLDOUT_SOURCE,
    Exclusion,
    PoolArrays,
    holdout_ids,
    pack_pools,
    parse_sources,
)
from arc_jax.data.tasks import BUNDLES, Task, TaskError, load_tasks
from arc_jax.data.tokenizer import TokenVocab
from arc_jax.model.lora import init_lora
from arc_jax.train import ttft
from arc_jax.train.step import StepFns, init_state, make_optimizer

if TYPE_CHECKING:
    from arc_jax.run import Setup

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SubPool:
    """Pairs of one task of one source that are drawn together, in one bucket."""

    source: str
    task_id: str
    bucket: int
    n_pairs: int
    weight: float  # probability that an episode comes from this sub-pool


@dataclasses.dataclass
class TrainingData:
    """The pools (`pools.count[s]` pairs of sub-pool s from `pools.start[s]`) and the report."""

    pools: PoolArrays
    subpools: list[SubPool]
    report: dict

    def bucket_members(self) -> dict[int, np.ndarray]:
        """bucket -> its sub-pool indices `[M]`."""
        out: dict[int, list[int]] = {}
        for i, sp in enumerate(self.subpools):
            out.setdefault(sp.bucket, []).append(i)
        return {b: np.asarray(m, np.int32) for b, m in sorted(out.items())}

    def bucket_weights(self) -> dict[int, float]:
        """bucket -> the share of the episodes it gets."""
        return {b: float(sum(self.subpools[i].weight for i in m))
                for b, m in self.bucket_members().items()}


@functools.cache
def _load_bundle(name: str) -> tuple[dict[str, Task], list[TaskError]]:
    report: list[TaskError] = []
    return load_tasks(name, report=report), report


def _loader() -> Callable[[str], tuple[dict[str, Task], list[TaskError]]]:
    """Loads each source once per call of `load_training_data`; bundles once per process."""
    cache: dict[str, tuple[dict[str, Task], list[TaskError]]] = {}

    def load(name: str):
        if name in BUNDLES:
            return _load_bundle(name)
        if name not in cache:
            report: list[TaskError] = []
            cache[name] = load_tasks(name, report=report), report
        return cache[name]

    return load


def load_training_data(
    config: ml_collections.ConfigDict, vocab: TokenVocab, fmt: GridFormat,
    eval_tasks: Sequence[Task] = (),
) -> TrainingData:
    """Reads `config.data.train`, excludes evaluation and held-out data, splits and packs pools.

    `eval_tasks`: the tasks this run evaluates (`data.eval`); they are excluded together with
    kaggle2024/evaluation. `data.max_tasks` > 0 keeps the first usable tasks (by id) of each
    source. Raises `settings.ConfigError` naming `config.data.train` when a source
    has no usable task left.
    """
    sources = parse_sources(config.data.train)
    lo, hi = (int(x) for x in config.data.context_pairs)
    buckets = settings.buckets(config)
    fixed = pool_fixed_length(vocab)
    load = _loader()
    training = load(HOLDOUT_SOURCE)[0]
    held = holdout_ids(config.data.holdout, training)
    exclusion = Exclusion({
        "evaluation": [*load(EVALUATION)[0].values(), *eval_tasks],
        "holdout": [training[i] for i in held if i in training],
    })
    exclusion.add_ids(held, "holdout")
    duplicates: dict[str, str] = {}
    for name in dict.fromkeys([HOLDOUT_SOURCE, *(n for n, _ in sources)]):
        duplicates.update(exclusion.duplicates(load(name)[0]))
    for task_id, reason in sorted(duplicates.items()):
        exclusion.add_ids([task_id], reason)

    lengths_of: dict[tuple, int] = {}

    def pair_length(pair) -> int:
        shape = (pair.input.shape, pair.output.shape)
        if shape not in lengths_of:
            lengths_of[shape] = pool_pair_length(vocab, fmt, *shape)
        return lengths_of[shape]

    total_weight = sum(w for _, w in sources)
    groups: list[tuple[str, str, int, list]] = []  # (source, task, bucket, pairs)
    group_lengths: list[list[int]] = []
    subpools: list[SubPool] = []
    source_reports = {}
    for name, weight in sources:
        tasks, bad = load(name)
        allowed, report = exclusion.apply(tasks)
        too_few, n_dropped = [], 0
        chosen = []
        for task_id in sorted(allowed):
            if config.data.max_tasks and len(chosen) == config.data.max_tasks:
                break
            pairs = allowed[task_id]
            lengths = [pair_length(p) for p in pairs]
            split, dropped = split_pool(lengths, fixed, buckets, hi)
            n_dropped += len(dropped)
            if not split:
                too_few.append(task_id)
                continue
            chosen.append((task_id, pairs, lengths, split))
        if not chosen:
            raise settings.ConfigError(
                f"config.data.train: source {name!r} has no usable task left ({len(tasks)} "
                f"loaded, {len(allowed)} after excluding evaluation and held-out data, none with "
                f"2 pairs that fit config.data.buckets {buckets})")
        share = weight / total_weight
        for task_id, pairs, lengths, split in chosen:
            n_task = sum(len(m) for _, m in split)
            for bucket, members in split:
                groups.append((name, task_id, bucket, [pairs[i] for i in members]))
                group_lengths.append([lengths[i] for i in members])
                subpools.append(SubPool(name, task_id, bucket, len(members),
                                        share / len(chosen) * len(members) / n_task))
        report.update({
            "weight": weight, "episode_share": share,
            "bad_entries": len(bad), "bad_examples": [str(e) for e in bad[:5]],
            "pairs_too_long": n_dropped, "tasks_too_few_pairs": too_few,
            "used_tasks": len(chosen),
            "used_pairs": sum(sum(len(m) for _, m in split) for *_, split in chosen),
        })
        source_reports[name] = report
        _log_source(name, report)

    pools = pack_pools([g[3] for g in groups], group_lengths)
    data = TrainingData(pools, subpools, {})
    data.report = {
        "holdout": {"rule": config.data.holdout, "ids": list(held)},
        "duplicates_of_protected_tasks": duplicates,
        "evaluation_ids": len([r for r in exclusion.ids.values() if r == "evaluation"]),
        "sources": source_reports,
        "buckets": {str(b): {"subpools": len(m), "pairs": int(sum(subpools[i].n_pairs for i in m)),
                             "episode_share": data.bucket_weights()[b]}
                    for b, m in data.bucket_members().items()},
        "cells_bytes": int(pools.cells.nbytes),
    }
    log.info("training pools: %d pairs in %d sub-pools, %.1f MB of cells; buckets %s",
             pools.lengths.shape[0], len(subpools), pools.cells.nbytes / 1e6,
             {b: round(w, 3) for b, w in data.bucket_weights().items()})
    return data


def _log_source(name: str, r: dict) -> None:
    ids = r["excluded_ids"]
    copies = sum(len(v) for k, v in ids.items() if k.endswith("_duplicate"))
    log.info(
        "%s: %d tasks / %d pairs loaded (%d bad entries skipped); excluded %d evaluation ids, "
        "%d held-out ids, %d copies of those tasks, %d pairs equal to an evaluation pair, %d to "
        "a held-out pair, %d tasks emptied; dropped %d pairs too long, %d tasks with too few "
        "pairs; using %d tasks / %d pairs for %.0f%% of the episodes",
        name, r["tasks"], r["pairs"], r["bad_entries"], len(ids.get("evaluation", [])),
        len(ids.get("holdout", [])), copies, r["excluded_pairs"].get("evaluation", 0),
        r["excluded_pairs"].get("holdout", 0), len(r["emptied"]), r["pairs_too_long"],
        len(r["tasks_too_few_pairs"]), r["used_tasks"], r["used_pairs"],
        100 * r["episode_share"])


def write_report(data: TrainingData, workdir: str) -> None:
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "training_data.json"), data.report, indent=2)


def bucket_schedule(weights: dict[int, float], steps: int, seed: int) -> list[int]:
    """Which bucket each step trains on, drawn by `weights`, from `seed` only (so a resumed run
    replays the same schedule)."""
    buckets = sorted(weights)
    p = np.asarray([weights[b] for b in buckets], float)
    rng = np.random.default_rng(seed)
    return [int(b) for b in rng.choice(buckets, size=steps, p=p / p.sum())]


def _pool_batch(key, data, *, vocab, cfg, seq_len, batch_size, max_pool, context_pairs,
                mesh) -> EncodedExample:
    """Rows of sub-pools drawn by weight from `data = (pools, members [M], probs [M])`."""
    pools, members, probs = data
    k_pick, k_rows = jax.random.split(key)
    pool_ids = jax.random.choice(k_pick, members, (batch_size,), p=probs)
    batch = pool_train_batch(k_rows, pools, pool_ids, vocab=vocab, cfg=cfg, seq_len=seq_len,
                             max_pool=max_pool, context_pairs=context_pairs)
    if mesh is not None and batch_size % mesh.size == 0:
        batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P(ttft.DATA)))
    return batch


def _bucket_batches(setup: Setup, data: TrainingData, pools: Any, mesh) -> dict[int, tuple]:
    """Per bucket: `(make_batch, inputs, max_loss_tokens)`, where `make_batch(key, inputs)`
    draws that bucket's rows of episodes."""
    config, cfg = setup.config, setup.config.train
    context_pairs = tuple(int(x) for x in config.data.context_pairs)
    out = {}
    for bucket, m in data.bucket_members().items():
        w = np.asarray([data.subpools[i].weight for i in m], np.float32)
        inputs = (pools, jnp.asarray(m), jnp.asarray(w / w.sum()))
        if setup.pipeline.loss_on == "all_outputs":
            loss_tokens = bucket
        else:
            shapes = np.concatenate([
                data.pools.shapes[data.pools.start[i]:data.pools.start[i] + data.pools.count[i],
                                  1] for i in m])
            loss_tokens = min(bucket, max_target_tokens(setup.vocab, setup.pipeline.fmt, shapes))
        make = functools.partial(
            _pool_batch, vocab=setup.vocab, cfg=setup.pipeline, seq_len=bucket,
            batch_size=cfg.batch_size, max_pool=int(data.pools.count[m].max()),
            context_pairs=context_pairs, mesh=mesh if mesh is not None and mesh.size > 1 else None)
        out[bucket] = (make, inputs, loss_tokens)
    return out


def _schedule(setup: Setup, data: TrainingData) -> list[int]:
    """The bucket of every step of the run (`bucket_schedule` of the data's bucket weights)."""
    return bucket_schedule(data.bucket_weights(), setup.config.train.steps, setup.config.seed)


def make_training(
    setup: Setup, data: TrainingData, *, init_key: jax.Array, data_key: jax.Array,
    dropout_key: jax.Array,
) -> tuple[dict[str, Any], Callable]:
    """The initial state `{"train": TrainState}` and `step_fn(state, step) -> (state, metrics)`
    for `run._run_steps`: LoRA or all weights, data-parallel over the devices, one bucket per
    step (`bucket_schedule`)."""
    config, cfg = setup.config, setup.config.train
    mesh = ttft.device_mesh(ttft.DATA)
    optimizer = make_optimizer(settings.optim_config(config))
    trainable = (init_lora(init_key, setup.params, setup.lora)
                 if setup.lora is not None else setup.params)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put({"train": init_state(trainable, optimizer)}, replicated)
    pools = jax.device_put(data.pools, replicated)
    inputs, steps = {}, {}
    for bucket, (make, bucket_inputs, loss_tokens) in _bucket_batches(
            setup, data, pools, mesh).items():
        inputs[bucket] = bucket_inputs
        fns = StepFns(model=setup.model, lora_config=setup.lora, make_batch=make,
                      max_loss_tokens=loss_tokens, grad_accum=cfg.grad_accum)
        steps[bucket] = ttft.joint_step(fns, optimizer)
    schedule = _schedule(setup, data)
    frozen = setup.params if setup.lora is not None else None

    def step_fn(state, s):
        bucket = schedule[s]
        train, metrics = steps[bucket](
            state["train"], frozen, inputs[bucket], jax.random.fold_in(data_key, s),
            jax.random.fold_in(dropout_key, s))
        return {**state, "train": train}, metrics

    return state, step_fn


def tokens_seen(setup: Setup, data: TrainingData, data_key: jax.Array, steps: int) -> dict:
    """Replays the batches of the first `steps` updates as `make_training` draws them (the same
    data key and bucket schedule; grad_accum micro-batches each) and counts them, without
    training: {"steps", "rows", "tokens" (real tokens), "loss_tokens" (supervised tokens),
    "padded_tokens" (rows x bucket)}. The model card's "tokens seen"."""
    config = setup.config
    batches = _bucket_batches(setup, data, data.pools, None)
    def count(key, inputs, make):
        batch = make(key, inputs)
        return jnp.sum(batch.length), jnp.sum(batch.loss_mask[:, 1:])

    counters = {bucket: jax.jit(functools.partial(count, make=make))
                for bucket, (make, _, _) in batches.items()}
    schedule = _schedule(setup, data)
    totals = {"steps": steps, "rows": 0, "tokens": 0, "loss_tokens": 0, "padded_tokens": 0}
    for s in range(steps):
        bucket = schedule[s]
        step_key = jax.random.fold_in(data_key, s)
        for i in range(config.train.grad_accum):
            n, loss_n = counters[bucket](jax.random.fold_in(step_key, i), batches[bucket][1])
            totals["tokens"] += int(n)
            totals["loss_tokens"] += int(loss_n)
            totals["rows"] += config.train.batch_size
            totals["padded_tokens"] += config.train.batch_size * bucket
    return totals


class HeldoutCurve:
    """Val loss of the held-out training tasks (`data.holdout`, their test outputs given all
    their train pairs, no augmentation) during base training, every `train.heldout_every`
    steps: TensorBoard `heldout/val_loss` and `<workdir>/heldout.json` (the model card's
    curve). Tasks whose test episode exceeds the largest bucket are left out and listed."""

    def __init__(self, setup: Setup):
        from arc_jax.data.arrays import pad_tasks
        from arc_jax.infer.inference import test_length

        config = setup.config
        training = _loader()(HOLDOUT_SOURCE)[0]
        held = [training[i] for i in holdout_ids(config.data.holdout, training) if i in training]
        limit = max(settings.buckets(config))
        fits = lambda t: all(test_length(setup.vocab, setup.pipeline.fmt, t, q, answer=True)
                             <= limit for q in range(len(t.test)))
        self.tasks = [t for t in held if fits(t)]
        self.too_long = [t.task_id for t in held if not fits(t)]
        self.arrays = pad_tasks(self.tasks) if self.tasks else None
        self.setup = setup
        self.path = os.path.join(setup.workdir, "heldout.json")
        self.curve: list[dict] = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.curve = json.load(f).get("curve", [])
        log.info("held-out curve: %d tasks (%d longer than the largest bucket left out)",
                 len(self.tasks), len(self.too_long))

    def __call__(self, trainable: Any, step: int) -> None:
        from arc_jax.infer.evaluate import _overall_val_loss
        from arc_jax.infer.inference import EvalSettings, evaluate_tasks

        if not self.tasks:
            return
        setup = self.setup
        params, lora = (trainable, None) if setup.lora is None else (setup.params, trainable)
        out = evaluate_tasks(
            setup.model, params, setup.tokenizer, setup.vocab, setup.pipeline, self.tasks,
            self.arrays, lora, setup.lora, EvalSettings(n_augmentations=1), jax.random.key(0),
            list(range(len(self.tasks))), setup.max_loss_tokens, setup.budget_bytes,
            decode=False)
        loss = _overall_val_loss(out.val_loss, out.val_tokens)
        task_mean = float(np.mean(list(out.val_loss.values())))
        self.curve = [c for c in self.curve if c["step"] < step] + [
            {"step": step, "val_loss": loss, "task_mean_val_loss": task_mean,
             "val_tokens": int(sum(out.val_tokens.values()))}]
        setup.writer.scalars(step, {"heldout/val_loss": loss,
                                    "heldout/task_mean_val_loss": task_mean})
        log.info("held-out val loss at step %d: %.4f (%d tasks)", step, loss, len(out.val_loss))
        if jax.process_index() == 0:
            write_json_atomic(self.path, {
                "rule": setup.config.data.holdout, "tasks": [t.task_id for t in self.tasks],
                "left_out_too_long": self.too_long, "curve": self.curve})
