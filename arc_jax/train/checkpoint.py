"""orbax checkpoints of a training run: trainable tree, optimizer state, step, data key.

One `CheckpointManager` per training unit (`workdir/checkpoints/<unit>`), async saves, keep N
plus the final step. A restarted run restores the latest step and goes on; since every data and
dropout key derives from the saved data key and the step, it ends where an uninterrupted run ends.
A latest checkpoint that does not restore (a truncated file) is moved aside to
`<unit>.corrupt/<step>`, and the run resumes from the one before it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a unit restores; the message names the directory and each failure."""


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


def corrupt_dir(mngr: ocp.CheckpointManager) -> str:
    """Where checkpoints of `mngr` that failed to restore are kept: `<directory>.corrupt`,
    outside the directory orbax manages."""
    return f"{os.fspath(mngr.directory).rstrip(os.sep)}.corrupt"


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
    """Moves step `step` out of `mngr`'s directory (kept for inspection, and so that the step can
    be saved again) and returns where it went."""
    src = os.path.join(os.fspath(mngr.directory), str(step))
    dst = os.path.join(corrupt_dir(mngr), str(step))
    n = 0
    while os.path.exists(dst):  # the same step set aside by an earlier resume
        n += 1
        dst = os.path.join(corrupt_dir(mngr), f"{step}.{n}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"arc_jax checkpoint set aside {src}")
    mngr.reload()
    return dst


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> tuple[int, Any] | None:
    """(step, state) of the latest checkpoint that restores, laid out like `like` (same tree,
    shapes, shardings), or None when there is none.

    Checkpoints after it that fail to restore (e.g. a file truncated by a kill or a full disk)
    are moved to `corrupt_dir(mngr)`, with a warning naming each. When none restores, nothing
    is moved and `CheckpointRestoreError` names the directory and each failure.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
        try:
            state = mngr.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
        except Exception as err:  # orbax, tensorstore and json raise many types for a bad file
            failures.append((step, f"{type(err).__name__}: {_first_line(err)}"))
            continue
        for bad, why in failures:
            path = os.path.join(os.fspath(mngr.directory), str(bad))
            moved = _set_aside(mngr, bad)
            log.warning("checkpoint %s does not restore (%s); moved it to %s", path, why, moved)
        if failures:
            log.warning("resuming from the previous checkpoint %s instead",
                        os.path.join(os.fspath(mngr.directory), str(step)))
        return step, state
    if not steps:
        return None
    raise CheckpointRestoreError(
        f"no checkpoint in {mngr.directory} restores:\n  "
        + "\n  ".join(f"step {step}: {why}" for step, why in failures)
        + "\nIf the config or the code changed since they were saved, resume with the original; "
        f"otherwise start afresh with another --workdir (or delete {mngr.directory}).")


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def final_step_saved(mngr: ocp.CheckpointManager, steps: int) -> bool:
    return mngr.latest_step() == steps
