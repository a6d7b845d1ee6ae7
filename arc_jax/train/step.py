"""Loss, optimizer and the pure train step.

The step owns its data: it receives the padded task arrays and a PRNG key, runs the jitted
sample → augment → encode pipeline for `grad_accum` micro-batches (a `lax.scan`), and applies one
optimizer update. Nothing leaves the device inside a step.

Only loss positions reach the vocabulary: for each row the model returns the hidden states before
its `max_loss_tokens` (K) masked tokens, `[B, K, d]` instead of `[B, T, d]`, and its last layer
computes queries, output projection and MLP at those K tokens only (`Phi3(..., rows=...)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from arc_jax.data.encode import EncodedExample
from arc_jax.model.lora import LoraConfig
from arc_jax.model.phi3 import Phi3, project_logits

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `train.*` knobs that shape the optimizer."""

    steps: int = 100
    learning_rate: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine or linear decay to 0, or constant."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    decay_steps = max(cfg.steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    if warmup == 0:
        return decay
    ramp = (optax.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup - 1)
            if warmup > 1 else optax.constant_schedule(cfg.learning_rate))
    return optax.join_schedules([ramp, decay], [warmup])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the learning-rate schedule."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay),
    )


class TrainState(NamedTuple):
    """What a run checkpoints: the trainable tree (LoRA, or all params for full fine-tuning), its
    optimizer state and the number of updates done."""

    trainable: Any
    opt_state: Any
    step: jax.Array


def init_state(trainable: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32))


def masked_nll(
    model: Phi3, params: Mapping, lora: Mapping | None, lora_config: LoraConfig | None,
    batch: EncodedExample, max_loss_tokens: int, dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token NLL over the loss mask, and the number of loss tokens.

    batch fields are `[B, T]`; token t with `loss_mask[t]` is predicted from hidden state t-1.
    Only `max_loss_tokens` (K) positions per row are projected to the vocabulary.
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    seq_len = batch.tokens.shape[1]
    k = min(max_loss_tokens, seq_len - 1)
    mask = batch.loss_mask.at[:, 0].set(False)

    def select(row_mask):
        (idx,) = jnp.nonzero(row_mask, size=k, fill_value=1)
        return idx, jnp.arange(k) < jnp.sum(row_mask)

    label_pos, valid = jax.vmap(select)(mask)  # [B, K]
    hidden = model.apply(
        {"params": params}, batch.tokens, batch.positions, batch.attention_mask, lora=lora,
        lora_config=lora_config, return_hidden=True, rows=label_pos - 1, rngs=rngs)  # [B, K, d]
    rows = jnp.arange(hidden.shape[0])[:, None]
    logits = project_logits(model, params, hidden, lora, lora_config)
    labels = batch.tokens[rows, label_pos]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class StepFns:
    """Static pieces of a train step: the model, how a micro-batch is made, LoRA or full."""

    model: Phi3
    lora_config: LoraConfig | None  # None = full fine-tuning
    make_batch: Callable[[jax.Array, Any], EncodedExample]  # (key, data) -> micro-batch [B, T]
    max_loss_tokens: int
    grad_accum: int = 1


def train_step(
    fns: StepFns, optimizer: optax.GradientTransformation, state: TrainState, frozen: Any,
    data: Any, data_key: jax.Array, dropout_key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from `grad_accum` micro-batches drawn with `data_key`.

    frozen: the base params when training LoRA (ignored for full fine-tuning).
    data: what `fns.make_batch` draws rows from (task arrays, task indices).
    Returns the new state and metrics: loss (mean NLL per loss token), tokens (real tokens
    processed), loss_tokens, grad_norm, learning-rate step.
    """

    def loss_fn(trainable, batch, rng):
        if fns.lora_config is None:
            params, lora = trainable, None
        else:
            params, lora = frozen, trainable
        total, count = masked_nll(
            fns.model, params, lora, fns.lora_config, batch, fns.max_loss_tokens, rng)
        return total / jnp.maximum(count, 1.0), (total, count, jnp.sum(batch.length))

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def micro(carry, i):
        grads_sum, total, count, tokens = carry
        batch = fns.make_batch(jax.random.fold_in(data_key, i), data)
        rng = jax.random.fold_in(dropout_key, i) if fns.lora_config and \
            fns.lora_config.dropout > 0 else None
        grads, (t, c, n) = grad_fn(state.trainable, batch, rng)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, total + t, count + c, tokens + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32))
    (grads, total, count, tokens), _ = jax.lax.scan(micro, init, jnp.arange(fns.grad_accum))
    grads = jax.tree.map(lambda g: g / fns.grad_accum, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
        "loss": total / jnp.maximum(count, 1.0), "loss_tokens": count, "tokens": tokens,
        "grad_norm": optax.global_norm(grads),
    }
    return TrainState(trainable, opt_state, state.step + 1), metrics
