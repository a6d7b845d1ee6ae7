"""Test-time fine-tuning across tasks: per-task adapters sharded over devices, or one joint one.

Per-task mode has pmap semantics, written as `jax.shard_map` over a `tasks` mesh axis: every
device holds a slice of the stacked adapters and optimizer states and trains them with `jax.vmap`
over one shared frozen base; there are no collectives. Each task's randomness derives from its
global task index and the step only, so the adapters do not depend on the device count.

Tasks are grouped into units of one length bucket, as many tasks per device as the memory
budget allows (`fit_tasks_per_device`, from XLA's estimate of the compiled step); a unit is
padded with copies of its last task to its bucket's unit size, a multiple of the device count,
and units are trained one after the other (`plan_units`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from arc_jax.data.arrays import TaskArrays
from arc_jax.data.encode import EncodedExample
from arc_jax.data.pipeline import PipelineConfig, train_batch
from arc_jax.data.tokenizer import TokenVocab
from arc_jax.train.step import StepFns, TrainState, train_step

TASKS = "tasks"
DATA = "data"


def device_mesh(axis: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) named `axis`."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (axis,))


@dataclasses.dataclass(frozen=True)
class Unit:
    """Tasks trained together: indices into the task list (padded to a multiple of the device
    count by repeating the last one), `n_real` of them real, all in one bucket."""

    name: str
    seq_len: int
    tasks: tuple[int, ...]
    n_real: int


def plan_units(
    groups: dict[int, list[int]], n_devices: int, tasks_per_device: int = 0
) -> list[Unit]:
    """Splits bucket groups (`pipeline.assign_buckets`) into per-task training units of at most
    `n_devices * tasks_per_device` tasks (0: the whole bucket). A bucket's units all have one
    size (the last padded with copies of its last task), so one program trains them all."""
    units = []
    for seq_len, members in sorted(groups.items()):
        if not members:
            continue
        cap = len(members) if tasks_per_device <= 0 else n_devices * tasks_per_device
        n_units = -(-len(members) // cap)
        size = -(-len(members) // n_units)
        size += -size % n_devices
        for u, start in enumerate(range(0, len(members), size)):
            chunk = list(members[start:start + size])
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            units.append(Unit(f"bucket{seq_len}_part{u}", seq_len, tuple(padded), len(chunk)))
    return units


# XLA:CPU's runtime holds more than its buffer assignment says (the ratio of a program's RSS
# rise to `memory_analysis()`: `experiments/benchmarks/xla_memory_factor.py`), so on CPU the
# budget is checked against the estimate times this.
CPU_RUNTIME_FACTOR = 1.5


def step_bytes(compiled: Any) -> int:
    """One device's memory for a compiled program: XLA's estimate of its temporaries, arguments
    and outputs (minus the donated arguments the outputs reuse), times `CPU_RUNTIME_FACTOR` on
    CPU."""
    m = compiled.memory_analysis()
    estimate = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                - m.alias_size_in_bytes)
    return int(estimate * (CPU_RUNTIME_FACTOR if jax.default_backend() == "cpu" else 1.0))


def fit_tasks_per_device(
    compile_for, budget_bytes: float, n_local_devices: int, most: int, shared_bytes: int = 0,
) -> tuple[int, int]:
    """The most tasks per device (<= `most`) whose compiled step fits `budget_bytes` over the
    process's local devices, and that step's estimate (bytes, all local devices).

    compile_for(m): the step compiled for m tasks per device. Costs are taken as linear in m:
    `shared_bytes` (the replicated base, per device) plus m times the rest of a 1-task step; the
    chosen m is then compiled and checked, and lowered while it does not fit.
    """
    total = lambda m: n_local_devices * step_bytes(compile_for(m))
    one = total(1)
    if most <= 1:
        return 1, one
    fixed = n_local_devices * shared_bytes
    per_task = max(one - fixed, 1)
    m = int(max(1, min(most, (budget_bytes - fixed) // per_task)))
    used = total(m) if m > 1 else one
    while m > 1 and used > budget_bytes:
        m = max(1, min(m - 1, int(m * budget_bytes / used)))
        used = total(m)
    return m, used


def place(tree: Any, sharding: NamedSharding) -> Any:
    """`tree` put on `sharding` once, explicitly (so no step transfers it again); with several
    processes the mesh is not all addressable, and jit places the values itself."""
    return jax.device_put(tree, sharding) if jax.process_count() == 1 else tree


def gather(tree: Any) -> Any:
    """A (possibly multi-host) sharded tree, whole, as host numpy arrays on every process.

    A leaf sharded over other processes' devices (`jax.device_get` refuses it) is all-gathered
    (`multihost_utils.process_allgather`: a collective, so every process must call `gather` on
    the same tree); any other leaf (numpy, a replicated array, or one on this process's
    devices) is fetched as is, never concatenated with other processes' copies.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def select_tasks(arrays: TaskArrays, indices: Sequence[int]) -> TaskArrays:
    """The arrays of `indices` (a new leading task axis, in that order)."""
    idx = np.asarray(indices)
    return TaskArrays(*(np.asarray(x)[idx] for x in arrays))


def _one_task_batch(key, data, *, vocab, cfg, seq_len, batch_size) -> EncodedExample:
    """Rows of one task; `data` is that task's arrays without the task axis."""
    arrays = jax.tree.map(lambda x: x[None], data)
    tasks = jnp.zeros((batch_size,), jnp.int32)
    return train_batch(key, arrays, tasks, vocab=vocab, cfg=cfg, seq_len=seq_len)


def per_task_step(
    fns: StepFns, optimizer: optax.GradientTransformation, mesh: Mesh,
):
    """Jitted `(states [G], data [G], task_ids [G], frozen, step, data_key, dropout_key) ->
    (states [G], metrics [G])`: one update of every task's adapter, G divisible by the mesh."""

    def one(state, data, task_id, frozen, step, data_key, dropout_key):
        task_key = lambda key: jax.random.fold_in(jax.random.fold_in(key, task_id), step)
        return train_step(
            fns, optimizer, state, frozen, data, task_key(data_key), task_key(dropout_key))

    local = jax.vmap(one, in_axes=(0, 0, 0, None, None, None, None))
    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(TASKS), P(TASKS), P(TASKS), P(), P(), P(), P()),
        out_specs=(P(TASKS), P(TASKS)),
        check_vma=False,  # no collectives: every value is per-device, nothing to type-check
    )
    return jax.jit(sharded, donate_argnums=(0,))


def per_task_fns(
    base: StepFns, *, vocab: TokenVocab, cfg: PipelineConfig, seq_len: int, batch_size: int,
) -> StepFns:
    make = functools.partial(
        _one_task_batch, vocab=vocab, cfg=cfg, seq_len=seq_len, batch_size=batch_size)
    return dataclasses.replace(base, make_batch=make)


def init_per_task_states(
    init_trainable, optimizer: optax.GradientTransformation, task_ids: Sequence[int],
    key: jax.Array, mesh: Mesh,
) -> TrainState:
    """Stacked states `[G]`, task `t`'s adapter from `fold_in(key, t)`, sharded over the mesh.

    Compiled once per (`init_trainable`, optimizer, mesh): pass the same function to reuse it.
    """
    sharding = NamedSharding(mesh, P(TASKS))
    keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.asarray(task_ids))
    return _init_states(place(keys, sharding), init_trainable, optimizer, sharding)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_states(keys, init_trainable, optimizer, sharding) -> TrainState:
    def init(k):
        trainable = init_trainable(k)
        return TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32))

    return jax.lax.with_sharding_constraint(jax.vmap(init)(keys), sharding)


# ---------------------------------------------------------------------------------------------
# Joint mode: one adapter over all tasks, data-parallel over devices.


def _joint_batch(key, data, *, vocab, cfg, seq_len, batch_size, mesh) -> EncodedExample:
    """Rows of tasks drawn uniformly from `data = (arrays, members [M])`."""
    arrays, members = data
    k_pick, k_rows = jax.random.split(key)
    tasks = jax.random.choice(k_pick, members, (batch_size,))
    batch = train_batch(k_rows, arrays, tasks, vocab=vocab, cfg=cfg, seq_len=seq_len)
    if mesh is not None and batch_size % mesh.size == 0:
        batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P(DATA)))
    return batch


def joint_fns(
    base: StepFns, *, vocab: TokenVocab, cfg: PipelineConfig, seq_len: int, batch_size: int,
    mesh: Mesh | None,
) -> StepFns:
    make = functools.partial(
        _joint_batch, vocab=vocab, cfg=cfg, seq_len=seq_len, batch_size=batch_size, mesh=mesh)
    return dataclasses.replace(base, make_batch=make)


def joint_step(fns: StepFns, optimizer: optax.GradientTransformation):
    """Jitted `(state, frozen, data, data_key, dropout_key) -> (state, metrics)`; the batch is
    sharded over the data mesh inside, so XLA all-reduces the gradients."""
    return jax.jit(functools.partial(train_step, fns, optimizer), donate_argnums=(0,))


def joint_bucket_schedule(
    groups: dict[int, list[int]], steps: int, seed: int
) -> list[int]:
    """Which bucket each joint step trains on: drawn in proportion to the bucket's task count,
    from `seed` only (so a resumed run replays the same schedule)."""
    buckets = sorted(groups)
    weights = np.asarray([len(groups[b]) for b in buckets], float)
    rng = np.random.default_rng(seed)
    return [int(b) for b in rng.choice(buckets, size=steps, p=weights / weights.sum())]


def unstack(tree: Any, n: int) -> list[Any]:
    """The first `n` entries of a stacked (sharded, possibly multi-host) tree, as a list of host
    trees (on every process: see `gather`)."""
    host = gather(tree)
    return [jax.tree.map(lambda x, i=i: x[i], host) for i in range(n)]
