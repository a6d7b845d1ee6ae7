"""From an `ml_collections` config to the typed settings the modules take, checking every value
that has a fixed set of choices or a range; errors name the config key."""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections

from arc_jax.data import pools
from arc_jax.data.formats import GRID_FORMATS, LOSS_ON
from arc_jax.data.pipeline import OVERFLOW, PipelineConfig
from arc_jax.model.attention import IMPLEMENTATIONS
from arc_jax.model.lora import LoraConfig
from arc_jax.train.step import SCHEDULES, OptimConfig

MODES = ("finetune", "ttft", "evaluate")
TTFT_MODES = ("joint", "per_task")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
QUANTIZE = ("none", "int8", "int4")


class ConfigError(ValueError):
    """A config value is out of its allowed set or range; the message names the key."""


def _choice(config, key: str, choices) -> None:
    value = _get(config, key)
    if value not in choices:
        raise ConfigError(f"config.{key} = {value!r}: must be one of {sorted(choices)}")


def _at_least(config, key: str, low) -> None:
    value = _get(config, key)
    if value < low:
        raise ConfigError(f"config.{key} = {value!r}: must be >= {low}")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the first bad key."""
    _choice(config, "mode", MODES)
    _choice(config, "ttft.mode", TTFT_MODES)
    _choice(config, "model.dtype", DTYPES)
    _choice(config, "model.compute_dtype", DTYPES)
    _choice(config, "model.matmul_dtype", ("compute", *DTYPES))
    _choice(config, "model.quantize", QUANTIZE)
    _choice(config, "model.attention", IMPLEMENTATIONS)
    _choice(config, "data.grid_format", GRID_FORMATS)
    _choice(config, "data.loss_on", LOSS_ON)
    _choice(config, "data.overflow", OVERFLOW)
    _choice(config, "train.schedule", SCHEDULES)
    for key in ("train.steps", "train.batch_size", "train.grad_accum", "lora.rank",
                "augment.n_leave_out", "eval.n_augmentations",
                "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                "model.attention_block"):
        _at_least(config, key, 1)
    for key in ("data.max_tasks", "train.warmup_steps", "eval.top_k", "eval.temperature",
                "ttft.tasks_per_device", "train.learning_rate", "lora.dropout",
                "deadline_minutes", "train.stop_after_minutes", "eval.reserve_minutes"):
        _at_least(config, key, 0)
    if not config.memory_gb > 0:
        raise ConfigError(f"config.memory_gb = {config.memory_gb!r}: must be > 0")
    if not 0.0 <= config.augment.preserve_color_prob <= 1.0:
        raise ConfigError("config.augment.preserve_color_prob must be in [0, 1]")
    if not config.lora.enabled and config.mode != "finetune":
        raise ConfigError("config.lora.enabled = False (full fine-tuning) needs mode 'finetune'")
    if not config.lora.enabled and config.model.quantize != "none":
        raise ConfigError(f"config.model.quantize = {config.model.quantize!r} freezes a quantized "
                          "base: it needs config.lora.enabled = True")
    if not buckets(config):
        raise ConfigError(
            f"config.data.buckets {tuple(config.data.buckets)} has no bucket <= "
            f"config.data.max_seq_len = {config.data.max_seq_len}")
    check_eval(config)
    solutions = config.data.eval_solutions
    if solutions and not os.path.isfile(solutions):
        raise ConfigError(f"config.data.eval_solutions = {solutions!r}: no such file")
    check_training_data(config)


def check_eval(config) -> None:
    """`eval.strategy`, `eval.scoring`, the DFS and PoE knobs, `eval.adapters_from` and
    `ttft.export_adapters`."""
    from arc_jax.infer.evaluate import SCORINGS
    from arc_jax.infer.grammar import GRAMMARS
    from arc_jax.infer.inference import ANSWER_CAPS, STRATEGIES

    _choice(config, "eval.strategy", STRATEGIES)
    _choice(config, "eval.answer_cap", ANSWER_CAPS)
    _choice(config, "eval.grammar", GRAMMARS)
    _choice(config, "eval.scoring", SCORINGS)
    for key in ("eval.dfs_max_candidates", "eval.score_views"):
        _at_least(config, key, 1)
    _at_least(config, "eval.dfs_max_steps", 0)
    if not 0.0 < config.eval.dfs_min_prob <= 1.0:
        raise ConfigError(f"config.eval.dfs_min_prob = {config.eval.dfs_min_prob!r}: must be "
                          "in (0, 1]")
    source = config.eval.adapters_from
    if source:
        if config.mode != "evaluate":
            raise ConfigError(f"config.eval.adapters_from = {source!r} re-evaluates saved "
                              f"adapters: it needs mode 'evaluate', not {config.mode!r}")
        if not os.path.isdir(os.path.join(source, "ttft_adapters")):
            raise ConfigError(f"config.eval.adapters_from = {source!r}: no ttft_adapters/ "
                              "there (a finished per-task TTFT workdir holds one)")
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ConfigError(f"config.eval.adapters_from = {source!r}: no config.json there "
                              "(the adapters' LoRA config is read from it)")
    if config.ttft.export_adapters and (config.mode != "ttft" or config.ttft.mode != "per_task"):
        raise ConfigError("config.ttft.export_adapters = True writes per-task adapters: it needs "
                          f"mode 'ttft' and ttft.mode 'per_task' (got {config.mode!r}, "
                          f"{config.ttft.mode!r})")


def check_training_data(config) -> None:
    """`data.train` (a source or (source, weight) pairs; in finetune mode each must exist),
    `data.holdout` and `data.context_pairs`."""
    try:
        sources = pools.parse_sources(config.data.train)
        if config.mode == "finetune":
            for name, _ in sources:
                pools.check_source_exists(name)
    except ValueError as e:
        raise ConfigError(f"config.data.train = {config.data.train!r}: {e}") from None
    try:
        pools.check_holdout(config.data.holdout)
    except ValueError as e:
        raise ConfigError(f"config.data.holdout: {e}") from None
    try:
        pools.check_holdout(config.data.get("subset", ""))
    except ValueError as e:
        raise ConfigError(f"config.data.subset: {e}") from None
    context = config.data.context_pairs
    if not (isinstance(context, (tuple, list)) and len(context) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in context)
            and 1 <= context[0] <= context[1]):
        raise ConfigError(f"config.data.context_pairs = {context!r}: must be (min, max) context "
                          "pairs with 1 <= min <= max")


def buckets(config) -> tuple[int, ...]:
    return tuple(sorted(b for b in config.data.buckets if b <= config.data.max_seq_len))


def pipeline_config(config) -> PipelineConfig:
    a = config.augment
    return PipelineConfig(
        grid_format=config.data.grid_format, loss_on=config.data.loss_on,
        n_leave_out=a.n_leave_out, shuffle_pairs=a.shuffle_pairs, geometric=a.geometric,
        color=a.color_swap, keep_background=a.keep_background,
        preserve_color_prob=a.preserve_color_prob if a.preserve_color else 0.0,
        buckets=buckets(config), overflow=config.data.overflow,
    )


def optim_config(config) -> OptimConfig:
    t = config.train
    return OptimConfig(
        steps=t.steps, learning_rate=t.learning_rate, schedule=t.schedule,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)


def lora_config(config) -> LoraConfig | None:
    lo = config.lora
    if not lo.enabled:
        return None
    return LoraConfig(rank=lo.rank, alpha=float(lo.alpha), dropout=float(lo.dropout),
                      targets=tuple(lo.targets))

