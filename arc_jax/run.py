"""One run, end to end: `train_and_evaluate(config, workdir)`, dispatching on `config.mode`.

    finetune  train LoRA (or all weights) on `data.train`, export the model, evaluate
    ttft      fine-tune at test time on the `data.eval` tasks' train pairs, then evaluate
    evaluate  evaluate the model as is
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arc_jax import settings
from arc_jax.atomic import write_json_atomic
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
from arc_jax.model.convert import load_pretrained, save_pretrained
from arc_jax.model.lora import LoraConfig, init_lora, merge_lora
from arc_jax.model.peft_io import save_peft
from arc_jax.model.phi3 import Phi3
from arc_jax.model.quantize import dequantize_params, quantize_params
from arc_jax.model.tiny import ensure_tiny_model
from arc_jax.train import checkpoint, ttft
from arc_jax.train.step import StepFns, init_state, make_optimizer
from arc_jax.train.tensorboard import Writer, render_row

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



def load_setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Checks the config, writes it to the workdir, loads model, tokenizer and the bridge."""
    settings.check(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict(), indent=2,
                          sort_keys=True)
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
        config.model.path if os.path.exists(os.path.join(config.model.path, "tokenizer.json"))
        or os.path.exists(os.path.join(config.model.path, "tokenizer_config.json"))
        else SHIPPED_TOKENIZER_DIR)
    tokenizer = load_tokenizer(tokenizer_path)
    pipeline = settings.pipeline_config(config)
    vocab = check_device_encoding(tokenizer, pipeline.fmt, PromptTemplate())
    if len(tokenizer) > model.config.vocab_size:
        raise settings.ConfigError(
            f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens, more than the model's "
            f"vocab_size {model.config.vocab_size} (config.model.path = {config.model.path})")
    return Setup(config, workdir, model, params, tokenizer, vocab, pipeline,
                 settings.lora_config(config), Writer(workdir), jax.random.key(config.seed))


def load_task_list(
    source: str, solutions: str, max_tasks: int, task_ids: Sequence[str] = (),
) -> list[Task]:
    """Validated tasks from `source` (bad ones reported and skipped), restricted to `task_ids`
    when given, then the first `max_tasks`."""
    loaded = load_tasks(source, solutions or None)
    if task_ids:
        missing = sorted(set(task_ids) - set(loaded))
        if missing:
            raise settings.ConfigError(
                f"config.data.task_ids: {missing} not among the valid tasks of {source!r}")
        loaded = {i: loaded[i] for i in sorted(task_ids)}
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


class _Progress:
    """tqdm bar with loss and tokens/s, on process 0; scalars to TensorBoard every log_every."""

    def __init__(self, setup: Setup, total: int, initial: int, desc: str, offset: int = 0):
        self.setup, self.offset = setup, offset
        self.bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step",
                             disable=jax.process_index() != 0, dynamic_ncols=True)
        self.tokens, self.start = 0.0, time.perf_counter()

    def update(self, step: int, metrics: dict[str, np.ndarray], lr: float) -> None:
        self.tokens += float(np.sum(metrics["tokens"]))
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        loss = float(np.mean(metrics["loss"]))
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
        self.bar.update(1)
        if (step + 1) % self.setup.config.train.log_every == 0 or step == 0:
            self.setup.writer.scalars(self.offset + step + 1, {
                "train/loss": loss, "train/learning_rate": lr, "train/tokens_per_s": rate,
                "train/grad_norm": float(np.mean(metrics["grad_norm"]))})

    def close(self) -> None:
        self.bar.close()


def _lr(setup: Setup, step: int) -> float:
    from arc_jax.train.step import learning_rate_schedule

    return float(learning_rate_schedule(settings.optim_config(setup.config))(step))


def _run_steps(setup: Setup, name: str, state: Any, step_fn, steps: int, offset: int = 0):
    """The shared loop: restore, step, check, log, checkpoint. `step_fn(state, step)` returns
    (state, metrics); `state` is a dict with a TrainState under "train"."""
    cfg = setup.config.train
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
    progress = _Progress(setup, steps, start, name, offset)
    try:
        for step in range(start, stop):
            state, metrics = step_fn(state, step)
            metrics = jax.device_get(metrics)
            _check_finite(np.asarray(metrics["loss"]), name, step)
            progress.update(step, metrics, _lr(setup, step))
            checkpoint.save(mngr, step + 1, state, force=step + 1 == steps)
    finally:
        progress.close()
        mngr.wait_until_finished()
        mngr.close()
    return state, stop == steps


def train_per_task(
    setup: Setup, tasks: Sequence[Task], arrays: TaskArrays,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[dict[int, Any], bool]:
    """One adapter per task, units of a bucket sharded over `devices` (default: all); returns
    ({task index: host LoRA tree}, finished)."""
    if setup.lora is None:
        raise settings.ConfigError("per_task TTFT needs config.lora.enabled = True")
    groups = assign_buckets([t.task_id for t in tasks], train_lengths(setup, tasks),
                            setup.pipeline)
    mesh = ttft.device_mesh(ttft.TASKS, devices)
    units = ttft.plan_units(groups, mesh.size, setup.config.ttft.tasks_per_device)
    optimizer = make_optimizer(settings.optim_config(setup.config))
    steps = setup.config.train.steps
    adapters: dict[int, Any] = {}
    finished = True
    for u, unit in enumerate(units):
        base = _step_fns(setup, setup.train_loss_tokens(
            [tasks[i] for i in unit.tasks], unit.seq_len))
        fns = ttft.per_task_fns(base, vocab=setup.vocab, cfg=setup.pipeline,
                                seq_len=unit.seq_len, batch_size=setup.config.train.batch_size)
        step = ttft.per_task_step(fns, optimizer, mesh)
        seeds = jnp.asarray([task_seed(tasks[i].task_id) for i in unit.tasks])
        init = lambda k: init_lora(k, setup.params, setup.lora)
        states = ttft.init_per_task_states(
            init, optimizer, np.asarray(seeds), setup.stream(INIT), mesh)
        sharded = NamedSharding(mesh, P(ttft.TASKS))
        data = jax.device_put(ttft.select_tasks(arrays, unit.tasks), sharded)
        seeds = jax.device_put(seeds, sharded)
        data_key, dropout_key = setup.stream(DATA), setup.stream(DROPOUT)

        def step_fn(state, s, step=step, data=data, seeds=seeds, dk=data_key, rk=dropout_key):
            train, metrics = step(state["train"], data, seeds, setup.params, jnp.int32(s), dk, rk)
            return {**state, "train": train}, metrics

        state, done = _run_steps(setup, unit.name, {"train": states}, step_fn, steps,
                                 offset=u * steps)
        finished &= done
        for i, tree in zip(unit.tasks[: unit.n_real],
                           ttft.unstack(state["train"].trainable, unit.n_real), strict=True):
            adapters[i] = tree
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

    state, done = _run_steps(setup, name, state, step_fn, cfg.steps)
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
    return EvalSettings(n_augmentations=e.n_augmentations, temperature=float(e.temperature),
                        top_k=e.top_k, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens)


def evaluate_and_write(
    setup: Setup, tasks: Sequence[Task], adapters: Any, params: Any,
    ttft_seconds: float | None = None,
) -> dict:
    """Val loss, decoding, voting and metrics; writes results.json, predictions/,
    submission.json and TensorBoard scalars/images (process 0). Returns the overall metrics."""
    arrays = pad_tasks(tasks)
    outputs = evaluate_tasks(
        setup.model, params, setup.tokenizer, setup.vocab, setup.pipeline, tasks, arrays,
        adapters, setup.lora, eval_settings(setup.config), setup.stream(EVAL),
        [task_seed(t.task_id) for t in tasks], setup.max_loss_tokens)
    by_id = {t.task_id: t for t in tasks}
    evaluation = evaluate(by_id, outputs.candidates, setup.pipeline.fmt,
                          val_loss=outputs.val_loss or None,
                          val_tokens=outputs.val_tokens or None)
    if jax.process_index() == 0:
        write_results(setup.workdir, evaluation, by_id, name=setup.config.name,
                      metadata=setup.config.to_dict(), ttft_seconds=ttft_seconds)
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
    setup = load_setup(config, workdir)
    try:
        eval_tasks = load_task_list(config.data.eval, config.data.eval_solutions,
                                    config.data.max_tasks, config.data.task_ids)
        params, adapters, seconds, done = setup.params, None, None, True
        start = time.perf_counter()
        if config.mode == "finetune":
            train_tasks = load_task_list(config.data.train, "", config.data.max_tasks)
            trainable, done = train_joint(setup, train_tasks, pad_tasks(train_tasks),
                                          name="finetune")
            if done and jax.process_index() == 0:
                export_model(setup, trainable, workdir)
            if setup.lora is None:
                params = trainable
            else:
                adapters = trainable
        elif config.mode == "ttft":
            arrays = pad_tasks(eval_tasks)
            if config.ttft.mode == "per_task":
                adapters, done = train_per_task(setup, eval_tasks, arrays)
            else:
                adapters, done = train_joint(setup, eval_tasks, arrays)
            seconds = time.perf_counter() - start
        if not done:
            log.warning("stopped after train.stop_after_steps; rerun the same command to resume")
            return None
        return evaluate_and_write(setup, eval_tasks, adapters, params, seconds)
    finally:
        setup.writer.close()
