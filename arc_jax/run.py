"""One run, end to end: `train_and_evaluate(config, workdir)`, dispatching on `config.mode`.

    finetune  train LoRA (or all weights) on `data.train`, export the model, evaluate
    ttft      fine-tune at test time on the `data.eval` tasks' train pairs, then evaluate
    evaluate  evaluate the model as is
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arc_jax import settings
from arc_jax.atomic import atomic_write, write_json_atomic
from arc_jax.data.arrays import TaskArrays, pad_tasks
from arc_jax.data.encode import check_device_encoding
from arc_jax.data.formats import PromptTemplate
from arc_jax.data.pipeline import (
    PipelineConfig,
    assign_buckets,
    grid_length,
    max_target_tokens,
    max_train_length,
)
from arc_jax.data.tasks import Task, load_tasks
from arc_jax.data.tokenizer import PIECES, SHIPPED_TOKENIZER_DIR, TokenVocab, load_tokenizer
from arc_jax.infer.evaluate import evaluate, write_results
from arc_jax.infer.inference import EvalSettings, evaluate_tasks
from arc_jax.job import Job
from arc_jax.model.convert import load_pretrained, save_pretrained
from arc_jax.model.lora import LoraConfig, init_lora, merge_lora
from arc_jax.model.peft_io import save_peft, save_peft_adapters
from arc_jax.model.phi3 import Phi3
from arc_jax.model.quantize import dequantize_params, quantize_params
from arc_jax.model.tiny import ensure_tiny_model, scratch_config
from arc_jax.report import build_report
from arc_jax.train import checkpoint, ttft
from arc_jax.train.step import StepFns, init_state, make_optimizer
from arc_jax.train.tensorboard import Writer, render_row
from arc_jax.workdir import claim as claim_workdir

log = logging.getLogger(__name__)

# Stream names for `fold_in` on the root key: one seed, independent streams.
INIT, DATA, DROPOUT, EVAL = range(4)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


@dataclasses.dataclass
class Setup:
    """Everything a run shares: config, model, frozen params, tokenizer bridge, writers."""

    config: ml_collections.ConfigDict
    workdir: str
    model: Phi3
    params: Any
    tokenizer: Any
    vocab: TokenVocab
    pipeline: PipelineConfig
    lora: LoraConfig | None
    writer: Writer
    key: jax.Array
    job: Job = dataclasses.field(default_factory=Job)

    @property
    def budget_bytes(self) -> float:
        """What one compiled program may use, over this process's devices: 60% of
        `config.memory_gb` (the rest is the host side: the runtime, compiled programs, task
        arrays, adapters)."""
        return 0.6 * float(self.config.get("memory_gb", 8.0)) * 2**30

    def stream(self, name: int) -> jax.Array:
        return jax.random.fold_in(self.key, name)

    @property
    def max_loss_tokens(self) -> int:
        """Loss positions projected per row for any task: a 30x30 answer, or every token."""
        if self.pipeline.loss_on == "all_outputs":
            return max(self.pipeline.buckets)
        fmt = self.pipeline.fmt
        return grid_length(self.vocab, fmt, (30, 30)) + int(
            self.vocab.piece_lens[PIECES.index("answer_suffix")])

    def train_loss_tokens(self, tasks: Sequence[Task], seq_len: int) -> int:
        """Loss positions projected per training row of `tasks` in bucket `seq_len`: their
        largest train output plus the answer suffix (rounded up to 64), or every token."""
        if self.pipeline.loss_on == "all_outputs":
            return seq_len
        shapes = np.asarray([p.output.shape for t in tasks for p in t.train])
        return min(seq_len, max_target_tokens(self.vocab, self.pipeline.fmt, shapes))


def task_seed(task_id: str) -> int:
    """A task's own random stream index, independent of which other tasks are in the run."""
    return zlib.crc32(task_id.encode()) & 0x7FFFFFFF



def use_compilation_cache(directory: str) -> None:
    """Keeps compiled programs in JAX's persistent cache under `directory` ("" = off), so a
    rerun or a resume does not compile again."""
    if not directory:
        return
    directory = os.path.expanduser(directory)
    os.makedirs(directory, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def load_setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Checks the config, writes it to the workdir, loads model, tokenizer and the bridge."""
    settings.check(config)
    os.makedirs(workdir, exist_ok=True)
    use_compilation_cache(config.get("compilation_cache", ""))
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict(), indent=2,
                          sort_keys=True)
    scratch = config.model.get("scratch")
    if scratch is not None and scratch.hidden_size > 0:  # a random model of that size
        model = Phi3(scratch_config(-(-len(load_tokenizer(SHIPPED_TOKENIZER_DIR)) // 16) * 16,
                                    **scratch.to_dict()),
                     dtype=settings.DTYPES[config.model.compute_dtype],
                     param_dtype=settings.DTYPES[config.model.dtype])
        params = model.init(jax.random.fold_in(jax.random.key(config.seed), INIT),
                            jnp.zeros((1, 1), jnp.int32))["params"]
    else:
        if ensure_tiny_model(config.model.path):
            log.warning("created the placeholder tiny random model at %s", config.model.path)
        model, params = load_pretrained(
            config.model.path, dtype=settings.DTYPES[config.model.dtype],
            compute_dtype=settings.DTYPES[config.model.compute_dtype])
    matmul = config.model.matmul_dtype
    model = model.clone(attention=config.model.attention, remat=config.model.remat,
                        attention_block=config.model.attention_block,
                        matmul_dtype=None if matmul == "compute" else settings.DTYPES[matmul])
    if config.model.quantize != "none":
        params = quantize_params(params, config.model.quantize)
    tokenizer_path = config.model.tokenizer or (
        config.model.path if not (scratch is not None and scratch.hidden_size > 0) and (
            os.path.exists(os.path.join(config.model.path, "tokenizer.json"))
            or os.path.exists(os.path.join(config.model.path, "tokenizer_config.json")))
        else SHIPPED_TOKENIZER_DIR)
    tokenizer = load_tokenizer(tokenizer_path)
    pipeline = settings.pipeline_config(config)
    vocab = check_device_encoding(tokenizer, pipeline.fmt, PromptTemplate())
    if len(tokenizer) > model.config.vocab_size:
        raise settings.ConfigError(
            f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens, more than the model's "
            f"vocab_size {model.config.vocab_size} (config.model.path = {config.model.path})")
    job = Job(config.get("deadline_minutes", 0), config.eval.get("reserve_minutes", 0),
              ledger=os.path.join(workdir, "job_seconds.json"))
    return Setup(config, workdir, model, params, tokenizer, vocab, pipeline,
                 settings.lora_config(config), Writer(workdir), jax.random.key(config.seed), job)


def load_task_list(
    source: str, solutions: str, max_tasks: int, task_ids: Sequence[str] = (),
    subset: str = "",
) -> list[Task]:
    """Validated tasks from `source` (bad ones reported and skipped), restricted to `task_ids`
    when given, then to the `subset` rule (`data.subset`: "every:N[:K]" of the sorted ids, or
    ids), then the first `max_tasks`."""
    from arc_jax.data.pools import holdout_ids

    loaded = load_tasks(source, solutions or None)
    if task_ids:
        missing = sorted(set(task_ids) - set(loaded))
        if missing:
            raise settings.ConfigError(
                f"config.data.task_ids: {missing} not among the valid tasks of {source!r}")
        loaded = {i: loaded[i] for i in sorted(task_ids)}
    if subset and subset != "none":
        chosen = holdout_ids(subset, sorted(loaded))
        missing = sorted(set(chosen) - set(loaded))
        if missing:
            raise settings.ConfigError(
                f"config.data.subset: {missing} not among the valid tasks of {source!r}")
        loaded = {i: loaded[i] for i in chosen}
    tasks = list(loaded.values())
    if not tasks:
        raise ValueError(f"no valid task in {source!r}")
    return tasks[:max_tasks] if max_tasks else tasks


def train_lengths(setup: Setup, tasks: Sequence[Task]) -> list[int]:
    shapes = lambda t: np.asarray([[p.input.shape, p.output.shape] for p in t.train])
    return [max_train_length(setup.vocab, setup.pipeline.fmt, shapes(t)) for t in tasks]


def _step_fns(setup: Setup, max_loss_tokens: int) -> StepFns:
    return StepFns(model=setup.model, lora_config=setup.lora, make_batch=None,
                   max_loss_tokens=max_loss_tokens, grad_accum=setup.config.train.grad_accum)


def _check_finite(loss: np.ndarray, where: str, step: int) -> None:
    if not np.all(np.isfinite(loss)):
        raise NonFiniteLossError(
            f"non-finite loss {loss} at {where} step {step}; stopped, the last good checkpoint "
            "is kept (lower train.learning_rate or check model.dtype)")


def _lr(setup: Setup, step: int) -> float:
    from arc_jax.train.step import learning_rate_schedule

    return float(learning_rate_schedule(settings.optim_config(setup.config))(step))


def _run_steps(setup: Setup, name: str, state: Any, step_fn, steps: int, offset: int = 0,
               work: float = 0.0, every: tuple[int, Callable[[Any, int], None]] | None = None):
    """The shared loop: restore, step, check, log, checkpoint. `step_fn(state, step)` returns
    (state, metrics); `state` is a dict with a TrainState under "train". `work`: the tasks this
    loop trains, for the job's progress. Returns (state, finished all `steps`).

    Metrics stay on the device and are fetched every `train.log_every` steps and before every
    checkpoint save; the window fetched is checked for non-finite losses, so a saved checkpoint
    is always a good one. `every = (n, fn)`: `fn(trainable, step)` after every n-th step and the
    last. The loop pauses (saving a checkpoint) after `train.stop_after_steps`
    updates or `train.stop_after_minutes`, and stops at the job's deadline.
    """
    cfg, job = setup.config.train, setup.job
    mngr = checkpoint.manager(
        os.path.join(setup.workdir, "checkpoints", name), cfg.keep_checkpoints,
        cfg.checkpoint_every)
    # The data key is saved with the state: every step's batches derive from it and the step.
    data_key = np.asarray(jax.random.key_data(setup.stream(DATA)))
    state = {**state, "data_key": data_key}
    restored = checkpoint.restore_latest(mngr, state)
    start = 0
    if restored is not None:
        start, state = restored
        if not np.array_equal(np.asarray(state["data_key"]), data_key):
            raise settings.ConfigError(
                f"checkpoints in {mngr.directory} were made with another data key (config.seed "
                "changed?); use a fresh --workdir or the original seed")
        log.info("%s: resumed from step %d", name, start)
    stop = steps if not cfg.get("stop_after_steps") else min(steps, start + cfg.stop_after_steps)
    minutes = cfg.get("stop_after_minutes", 0)
    pause_at = time.monotonic() + 60 * minutes if minutes else None
    job.describe(name)
    job.advance(work * start / steps)
    window: list[tuple[int, Any]] = []

    def fetch() -> None:
        fetched = list(window)
        window.clear()
        host = ttft.gather([m for _, m in fetched])
        for (s, _), metrics in zip(fetched, host, strict=True):
            _check_finite(np.asarray(metrics["loss"]), name, s)
        s, last = fetched[-1][0], host[-1]
        loss = float(np.mean(last["loss"]))
        tokens = float(sum(np.sum(m["tokens"]) for m in host))
        job.advance(work * len(fetched) / steps, tokens, loss=f"{loss:.4f}")
        setup.writer.scalars(offset + s + 1, {
            "train/loss": loss, "train/learning_rate": _lr(setup, s),
            "train/tokens_per_s": job.tokens / max(time.monotonic() - job.start, 1e-9),
            "train/grad_norm": float(np.mean(last["grad_norm"]))})

    step = start
    try:
        while step < stop:
            if job.training_must_stop():
                log.warning("%s: stopped at step %d of %d for the job's deadline", name, step,
                            steps)
                break
            state, metrics = step_fn(state, step)
            window.append((step, metrics))
            step += 1
            paused = pause_at is not None and time.monotonic() > pause_at
            save = step == steps or paused or step == stop or mngr.should_save(step)
            if save or step % cfg.log_every == 0 or step == start + 1:
                fetch()
            if save:
                checkpoint.save(mngr, step, state, force=True)
            if every is not None and every[0] and (step % every[0] == 0 or step == steps):
                every[1](state["train"].trainable, step)
            if paused:
                log.warning("%s: paused after train.stop_after_minutes at step %d", name, step)
                break
    finally:
        if window:
            fetch()
        mngr.wait_until_finished()
        mngr.close()
    return state, step == steps


def _adapter_file(setup: Setup, task_id: str) -> str:
    return os.path.join(setup.workdir, "ttft_adapters", f"{task_id}.npz")


def save_task_adapter(setup: Setup, task_id: str, tree: Any) -> None:
    """A finished task's adapter, `<workdir>/ttft_adapters/<task_id>.npz` (atomic)."""
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}
    atomic_write(_adapter_file(setup, task_id), lambda tmp: np.savez(open(tmp, "wb"), **flat))


def load_task_adapter(setup: Setup, task_id: str) -> Any | None:
    """The saved adapter of a task, or None."""
    path = _adapter_file(setup, task_id)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})


def _per_task_compiler(setup, step, optimizer, init, arrays, mesh, data_key, dropout_key, base):
    """compile_for(m): the bucket's step compiled for m tasks per device (abstract inputs)."""
    sharded = NamedSharding(mesh, P(ttft.TASKS))

    def compile_for(m: int):
        g = m * mesh.size
        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded)
        states = jax.eval_shape(lambda k: jax.vmap(
            lambda k: init_state(init(k), optimizer))(k), jax.random.split(data_key, g))
        data = TaskArrays(*(jax.ShapeDtypeStruct((g, *np.shape(x)[1:]), np.asarray(x).dtype,
                                                 sharding=sharded) for x in arrays))
        seeds = jax.ShapeDtypeStruct((g,), jnp.int32, sharding=sharded)
        return step.lower(jax.tree.map(spec, states), data, seeds, base,
                          jax.ShapeDtypeStruct((), jnp.int32), data_key, dropout_key).compile()

    return compile_for


def train_per_task(
    setup: Setup, tasks: Sequence[Task], arrays: TaskArrays,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[dict[int, Any], bool]:
    """One adapter per task; each bucket's tasks in units sized by the memory budget, sharded
    over `devices` (default: all). Finished adapters are saved per task, so a rerun (or a resume
    under another budget) trains only the rest. Returns ({task index: host LoRA tree}, finished);
    a stop for the deadline returns what was trained."""
    if setup.lora is None:
        raise settings.ConfigError("per_task TTFT needs config.lora.enabled = True")
    cfg = setup.config
    groups = assign_buckets([t.task_id for t in tasks], train_lengths(setup, tasks),
                            setup.pipeline)
    mesh = ttft.device_mesh(ttft.TASKS, devices)
    sharded = NamedSharding(mesh, P(ttft.TASKS))
    replicated = NamedSharding(mesh, P())
    base = ttft.place(setup.params, replicated)  # on the mesh once
    optimizer = make_optimizer(settings.optim_config(cfg))
    steps = cfg.train.steps
    data_key, dropout_key = (ttft.place(setup.stream(s), replicated) for s in (DATA, DROPOUT))
    init = functools.partial(init_lora, base_params=setup.params, config=setup.lora)
    adapters: dict[int, Any] = {}
    for members in groups.values():
        for i in members:
            tree = load_task_adapter(setup, tasks[i].task_id)
            if tree is not None:
                adapters[i] = tree
    todo_total = sum(len(m) for m in groups.values()) - len(adapters)
    setup.job.advance(len(adapters))
    log.info("per-task TTFT: %d tasks to train, %d already trained", todo_total, len(adapters))
    finished, offset = True, 0
    shared = sum(x.nbytes for x in jax.tree.leaves(setup.params))
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    for seq_len, members in groups.items():
        todo = [i for i in members if i not in adapters]
        if not todo or setup.job.training_must_stop():
            finished &= not todo
            continue
        fns = ttft.per_task_fns(
            _step_fns(setup, setup.train_loss_tokens([tasks[i] for i in members], seq_len)),
            vocab=setup.vocab, cfg=setup.pipeline, seq_len=seq_len,
            batch_size=cfg.train.batch_size)
        step = ttft.per_task_step(fns, optimizer, mesh)  # one program per bucket
        per_device = cfg.ttft.tasks_per_device
        if per_device <= 0:
            compile_for = _per_task_compiler(setup, step, optimizer, init, arrays, mesh,
                                             data_key, dropout_key, base)
            most = -(-len(todo) // mesh.size)
            per_device, used = ttft.fit_tasks_per_device(
                compile_for, setup.budget_bytes, n_local, most, shared)
            log.info("bucket %d: %d task(s) per device (%.2f GiB by XLA's estimate, of the %.2f "
                     "GiB step budget)", seq_len, per_device, used / 2**30,
                     setup.budget_bytes / 2**30)
            if used > setup.budget_bytes:
                log.warning("bucket %d: one task per device needs %.2f GiB, over the budget "
                            "(config.memory_gb = %s)", seq_len, used / 2**30, cfg.memory_gb)
        for unit in ttft.plan_units({seq_len: todo}, mesh.size, per_device):
            seeds = np.asarray([task_seed(tasks[i].task_id) for i in unit.tasks])
            states = ttft.init_per_task_states(init, optimizer, seeds, setup.stream(INIT), mesh)
            data = jax.device_put(ttft.select_tasks(arrays, unit.tasks), sharded)
            unit_seeds = jax.device_put(jnp.asarray(seeds), sharded)

            def step_fn(state, s, step=step, data=data, seeds=unit_seeds):
                train, metrics = step(state["train"], data, seeds, base,
                                      ttft.place(np.int32(s), replicated), data_key,
                                      dropout_key)
                return {**state, "train": train}, metrics

            name = f"bucket{seq_len}_{tasks[unit.tasks[0]].task_id}_{unit.n_real}"
            state, done = _run_steps(setup, name, {"train": states}, step_fn, steps,
                                     offset=offset, work=unit.n_real)
            offset += steps
            finished &= done
            trees = ttft.unstack(state["train"].trainable, unit.n_real)
            for i, tree in zip(unit.tasks[: unit.n_real], trees, strict=True):
                adapters[i] = tree
                if done and jax.process_index() == 0:
                    save_task_adapter(setup, tasks[i].task_id, tree)
            if not done:
                break
    return adapters, finished


def train_joint(
    setup: Setup, tasks: Sequence[Task], arrays: TaskArrays, name: str = "joint",
) -> tuple[Any, bool]:
    """One trainable tree (LoRA, or all params) over all tasks' episodes, data-parallel over
    the devices; each step trains one bucket, drawn in proportion to its task count."""
    groups = assign_buckets([t.task_id for t in tasks], train_lengths(setup, tasks),
                            setup.pipeline)
    mesh = ttft.device_mesh(ttft.DATA)
    optimizer = make_optimizer(settings.optim_config(setup.config))
    cfg = setup.config.train
    trainable = (init_lora(setup.stream(INIT), setup.params, setup.lora)
                 if setup.lora is not None else setup.params)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put({"train": init_state(trainable, optimizer)}, replicated)
    arrays = jax.device_put(arrays, replicated)
    members = {b: jnp.asarray(m, jnp.int32) for b, m in groups.items()}
    schedule = ttft.joint_bucket_schedule(groups, cfg.steps, setup.config.seed)
    step_fns = {
        b: ttft.joint_step(ttft.joint_fns(
            _step_fns(setup, setup.train_loss_tokens([tasks[i] for i in groups[b]], b)),
            vocab=setup.vocab, cfg=setup.pipeline, seq_len=b,
            batch_size=cfg.batch_size, mesh=mesh if mesh.size > 1 else None), optimizer)
        for b in groups
    }
    frozen = setup.params if setup.lora is not None else None
    data_key, dropout_key = setup.stream(DATA), setup.stream(DROPOUT)

    def step_fn(state, s):
        bucket = schedule[s]
        train, metrics = step_fns[bucket](
            state["train"], frozen, (arrays, members[bucket]),
            jax.random.fold_in(data_key, s), jax.random.fold_in(dropout_key, s))
        return {**state, "train": train}, metrics

    state, done = _run_steps(setup, name, state, step_fn, cfg.steps, work=len(tasks))
    return jax.device_get(state["train"].trainable), done


def export_model(setup: Setup, trainable: Any, directory: str) -> None:
    """The fine-tuned model as a transformers directory (LoRA merged), plus the PEFT adapter."""
    if setup.lora is not None:
        save_peft(os.path.join(directory, "adapter"), trainable, setup.lora,
                  base_model_name_or_path=setup.config.model.path)
        params = merge_lora(dequantize_params(setup.params, setup.model.param_dtype),
                            trainable, setup.lora)
    else:
        params = trainable
    save_pretrained(os.path.join(directory, "model"), setup.model, params)
    setup.tokenizer.save_pretrained(os.path.join(directory, "model"))



def eval_settings(config) -> EvalSettings:
    e = config.eval
    return EvalSettings(
        n_augmentations=e.n_augmentations, temperature=float(e.temperature), top_k=e.top_k,
        max_new_tokens=e.max_new_tokens, strategy=e.get("strategy", "vote"),
        dfs_min_prob=float(e.get("dfs_min_prob", 0.1)),
        dfs_max_candidates=e.get("dfs_max_candidates", 8),
        dfs_max_steps=e.get("dfs_max_steps", 0), scoring=e.get("scoring", "vote"),
        score_views=e.get("score_views", 8), answer_cap=e.get("answer_cap", "any"),
        grammar=e.get("grammar", "none"))


def export_task_adapters(setup: Setup, tasks: Sequence[Task], adapters: dict[int, Any]) -> dict:
    """`<workdir>/adapters/<task_id>/` (PEFT) for every trained task, over one base: `model.path`
    itself when arc_jax runs it as stored, else (a quantized or scratch base) the base as
    arc_jax runs it, exported once to `<workdir>/adapters/base/` (transformers). Returns the
    manifest (`adapters/adapters.json`)."""
    cfg = setup.config
    root = os.path.join(setup.workdir, "adapters")
    scratch = cfg.model.get("scratch")
    as_stored = cfg.model.quantize == "none" and not (scratch and scratch.hidden_size > 0)
    if as_stored:
        base = os.path.abspath(cfg.model.path)
    else:
        base = os.path.abspath(os.path.join(root, "base"))
        save_pretrained(base, setup.model, dequantize_params(setup.params,
                                                             setup.model.param_dtype))
        setup.tokenizer.save_pretrained(base)
    manifest = save_peft_adapters(root, {tasks[i].task_id: tree for i, tree in
                                         sorted(adapters.items())}, setup.lora, base)
    log.info("exported %d per-task adapters to %s (base %s)", len(adapters), root, base)
    return manifest


def load_adapters_from(setup: Setup, tasks: Sequence[Task]) -> tuple[dict[int, Any], LoraConfig]:
    """The per-task adapters a finished TTFT workdir (`eval.adapters_from`) saved, by task
    index, and the LoRA config they were trained with (from its config.json). A task without
    one runs the base (named in a warning)."""
    source = setup.config.eval.adapters_from
    with open(os.path.join(source, "config.json")) as f:
        trained = ml_collections.ConfigDict(json.load(f))
    if os.path.abspath(trained.model.path) != os.path.abspath(setup.config.model.path):
        raise settings.ConfigError(
            f"config.eval.adapters_from = {source!r} holds adapters of model.path "
            f"{trained.model.path!r}, not of {setup.config.model.path!r}")
    if trained.data.grid_format != setup.config.data.grid_format:
        log.warning("the adapters in %s were trained with data.grid_format %r, evaluated "
                    "with %r", source, trained.data.grid_format, setup.config.data.grid_format)
    adapters = {}
    for i, task in enumerate(tasks):
        tree = load_task_adapter(dataclasses.replace(setup, workdir=source), task.task_id)
        if tree is not None:
            adapters[i] = tree
    missing = [t.task_id for i, t in enumerate(tasks) if i not in adapters]
    if missing:
        log.warning("%d task(s) have no adapter in %s/ttft_adapters and run the base: %s",
                    len(missing), source, ", ".join(missing))
    log.info("evaluating %d saved per-task adapters from %s", len(adapters), source)
    return adapters, settings.lora_config(trained)


def evaluate_and_write(
    setup: Setup, tasks: Sequence[Task], adapters: Any, params: Any,
    ttft_seconds: float | None = None,
) -> dict:
    """Val loss, decoding, voting and metrics; writes results.json, predictions/,
    submission.json and TensorBoard scalars/images (process 0). Returns the overall metrics."""
    arrays = pad_tasks(tasks)
    setup.job.describe("evaluate")
    with setup.job.phase("evaluate"):
        outputs = evaluate_tasks(
            setup.model, params, setup.tokenizer, setup.vocab, setup.pipeline, tasks, arrays,
            adapters, setup.lora, eval_settings(setup.config), setup.stream(EVAL),
            [task_seed(t.task_id) for t in tasks], setup.max_loss_tokens, setup.budget_bytes,
            mesh=ttft.device_mesh(ttft.TASKS), cache_dir=os.path.join(setup.workdir, "eval"),
            out_of_time=lambda: setup.job.seconds_left() <= 0)
    setup.job.advance(len(tasks))
    by_id = {t.task_id: t for t in tasks}
    evaluation = evaluate(by_id, outputs.candidates, setup.pipeline.fmt,
                          val_loss=outputs.val_loss or None,
                          val_tokens=outputs.val_tokens or None,
                          scoring=setup.config.eval.get("scoring", "vote"),
                          poe_scores=outputs.poe_scores)
    if jax.process_index() == 0:
        not_decoded = sorted(t.task_id for t in tasks if not any(
            outputs.candidates.get((t.task_id, q)) for q in range(len(t.test))))
        if not_decoded:
            log.warning("%d task(s) have no decoded answer (skipped as too long, out of time, "
                        "or no DFS completion above eval.dfs_min_prob) and get the fallback in "
                        "submission.json: %s", len(not_decoded),
                        ", ".join(not_decoded))
        metadata = {**setup.config.to_dict(), **setup.job.times(), "not_decoded": not_decoded}
        write_results(setup.workdir, evaluation, by_id, name=setup.config.name,
                      metadata=metadata, ttft_seconds=ttft_seconds)
        try:  # the page only shows the files just written: it must never fail the run
            build_report(setup.workdir, tasks=by_id)
        except Exception as e:
            log.warning("report.html not written: %s", e)
        step = setup.config.train.steps if setup.config.mode != "evaluate" else 0
        overall = {k: v for k, v in evaluation.overall.items()
                   if isinstance(v, (int, float)) and v is not None}
        setup.writer.scalars(step, overall, prefix="eval/")
        for task in tasks[: setup.config.eval.images]:
            result = evaluation.tests[task.task_id][0]
            attempts = result.attempts
            image = render_row([task.test[0].input, task.test[0].output,
                                attempts[0] if attempts else None])
            setup.writer.image(f"tasks/{task.task_id}", image, step)
    return evaluation.overall


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """Runs `config.mode` in `workdir`; returns the overall metrics, or None when the run
    stopped early (`train.stop_after_steps`) and is to be resumed."""
    if config.distributed.initialize or os.environ.get("ARC_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    with claim_workdir(config, workdir):  # the lock, and a resume only under the same config
        return _run_claimed(config, workdir)


def _run_claimed(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    setup = load_setup(config, workdir)
    try:
        eval_tasks = load_task_list(config.data.eval, config.data.eval_solutions,
                                    config.data.max_tasks, config.data.task_ids,
                                    config.data.get("subset", ""))
        params, adapters, seconds, done = setup.params, None, None, True
        setup.job.add_work(len(eval_tasks))  # evaluation
        if config.mode == "finetune":
            from arc_jax.train import finetune

            data = finetune.load_training_data(config, setup.vocab, setup.pipeline.fmt,
                                               eval_tasks)
            finetune.write_report(data, workdir)
            state, step_fn = finetune.make_training(
                setup, data, init_key=setup.stream(INIT), data_key=setup.stream(DATA),
                dropout_key=setup.stream(DROPOUT))
            heldout = config.train.get("heldout_every", 0)
            every = (heldout, finetune.HeldoutCurve(setup)) if heldout else None
            state, done = _run_steps(setup, "finetune", state, step_fn, config.train.steps,
                                     every=every)
            trainable = jax.device_get(state["train"].trainable)
            if done and jax.process_index() == 0:
                export_model(setup, trainable, workdir)
            if setup.lora is None:
                params = trainable
            else:
                adapters = trainable
        elif config.mode == "evaluate" and config.eval.get("adapters_from"):
            adapters, lora = load_adapters_from(setup, eval_tasks)
            setup = dataclasses.replace(setup, lora=lora)
        elif config.mode == "ttft":
            arrays = pad_tasks(eval_tasks)
            setup.job.add_work(len(eval_tasks))
            with setup.job.phase("ttft"):
                if config.ttft.mode == "per_task":
                    adapters, done = train_per_task(setup, eval_tasks, arrays)
                    if done and config.ttft.get("export_adapters") and jax.process_index() == 0:
                        export_task_adapters(setup, eval_tasks, adapters)
                else:
                    adapters, done = train_joint(setup, eval_tasks, arrays)
            seconds = setup.job.phase_seconds["ttft"]  # every chunk of a resumed run
        if not done and not setup.job.deadline_hit:
            log.warning("stopped after train.stop_after_steps or train.stop_after_minutes; "
                        "rerun the same command to resume")
            return None
        if setup.job.deadline_hit:
            log.warning("the job's deadline (deadline_minutes = %s) stopped training; "
                        "evaluating what was trained", config.deadline_minutes)
        return evaluate_and_write(setup, eval_tasks, adapters, params, seconds)
    finally:
        setup.job.close()
        setup.writer.close()
