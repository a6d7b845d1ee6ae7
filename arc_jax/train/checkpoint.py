"""orbax checkpoints of a training run: trainable tree, optimizer state, step, data key.

One `CheckpointManager` per training unit (`workdir/checkpoints/<unit>`), async saves, keep N
plus the final step. A restarted run restores the latest step and goes on; since every data and
dropout key derives from the saved data key and the step, it ends where an uninterrupted run ends.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: str, keep: int, every: int) -> ocp.CheckpointManager:
    """An async manager over `directory` keeping the `keep` latest checkpoints."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(keep, 1), save_interval_steps=max(every, 1), create=True,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) at `step` if due (or `force`); async."""
    return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def _abstract(tree: Any) -> Any:
    def spec(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(spec, tree)


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> tuple[int, Any] | None:
    """(step, state) of the latest checkpoint, laid out like `like` (same tree, shapes,
    shardings), or None when there is none."""
    step = mngr.latest_step()
    if step is None:
        return None
    state = mngr.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
    return step, state


def final_step_saved(mngr: ocp.CheckpointManager, steps: int) -> bool:
    return mngr.latest_step() == steps
