"""A run's hold on its workdir: one run at a time, and a resume only under the same config.

    with workdir.claim(config, path):   # lock <path>/.lock, then check the config
        ...                             # the run

The lock is an `fcntl.flock` on `<workdir>/.lock`, held (by process 0) for the run's lifetime.
The kernel drops it when the holder exits, killed or not, so a stale lock file never blocks;
the file only records who holds it (pid, host, start time) for the refusal message.

A workdir that holds checkpoints was trained under the `config.json` it holds; a resume under a
config that differs in a key that changes results is refused, naming the keys (`RESUMABLE`
lists the keys that may change).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections

from arc_jax.settings import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
# Keys (or key prefixes: "eval" covers every eval.* key) that may change on a resume: they change
# how the work is split, logged, checkpointed or evaluated (evaluation is redone), not what
# training computes.
RESUMABLE = (
    "name", "workdir", "memory_gb", "deadline_minutes", "compilation_cache", "distributed",
    "eval", "train.stop_after_steps", "train.stop_after_minutes", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.heldout_every",
    "ttft.tasks_per_device", "ttft.export_adapters",
)
_ABSENT = "(absent)"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lock."""


class ResumeConfigError(ConfigError):
    """The workdir's checkpoints were made under a config that differs in a key that matters."""


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[str]:
    """Holds the exclusive lock `<workdir>/.lock` for the block (the workdir is created);
    yields the lock file's path. Raises `WorkdirBusyError` naming the workdir and the holder
    when another process (or another `lock` in this one) holds it."""
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirBusyError(
            f"workdir {workdir} is in use by another run ({holder}; lock file {path}). Wait for "
            "it to finish, or pass another --workdir.") from None
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("cannot lock %s (%s): this filesystem has no flock; a second run in %s "
                    "would not be refused", path, err, workdir)
        fd = None
    if fd is None:
        yield path
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _holder(fd: int) -> str:
    """Who holds the lock, as its file records it: "pid 123 on host h, since ..."."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, TypeError, KeyError, OSError):
        return "holder unknown"


def flat_config(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"a.b": value}, values as JSON gives them back (tuples as lists,
    other non-JSON values as `str`), so a config and its `config.json` compare equal."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return flat


def resumable(key: str) -> bool:
    """Whether `key` ("train.steps") may differ between a run and its resume."""
    return any(key == p or key.startswith(p + ".") for p in RESUMABLE)


def changed_keys(old: Mapping, new: Mapping,
                 defaults: Mapping | None = None) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} for the keys of two nested config dicts that differ and matter; a key
    missing from one side shows as "(absent)". With `defaults` (the code's own base config), a
    key the old config lacks but the new one holds at its default is no change: it was added to
    arc_jax since, and its default is the behaviour the old run had."""
    old, new = flat_config(old), flat_config(new)
    defaults = flat_config(defaults) if defaults is not None else {}
    added_at_default = lambda k: (k not in old and k in defaults and
                                  new.get(k, _ABSENT) == defaults[k])
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT))
            for k in sorted(set(old) | set(new))
            if not resumable(k) and old.get(k, _ABSENT) != new.get(k, _ABSENT)
            and not added_at_default(k)}


def _base_defaults() -> dict | None:
    """The defaults of `configs/base.py` when that package is importable (a checkout)."""
    try:
        from configs import base
    except ImportError:
        return None
    return base.get_config().to_dict()


def checkpoint_dirs(workdir: str | os.PathLike) -> list[str]:
    """The training checkpoints under `<workdir>/checkpoints/<unit>/<step>` (sorted)."""
    return sorted(glob.glob(os.path.join(os.fspath(workdir), "checkpoints", "*", "[0-9]*")))


def check_resume(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Raises `ResumeConfigError` when `workdir` holds checkpoints and its `config.json` differs
    from `config` in a key not in `RESUMABLE`; names each key with its old and new value."""
    workdir = os.fspath(workdir)
    found = checkpoint_dirs(workdir)
    if not found:
        return
    path = os.path.join(workdir, CONFIG_NAME)
    if not os.path.exists(path):
        log.warning("%s holds checkpoints but no %s: the resume's config cannot be checked",
                    workdir, CONFIG_NAME)
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as err:
        raise ResumeConfigError(
            f"{path} is unreadable ({err}), so the resume's config cannot be checked against "
            f"the checkpoints in {os.path.join(workdir, 'checkpoints')}; restore the file or "
            "use another --workdir") from err
    changed = changed_keys(old, config.to_dict(), _base_defaults())
    if changed:
        lines = "\n  ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changed.items())
        raise ResumeConfigError(
            f"workdir {workdir} holds checkpoints ({len(found)}, e.g. {found[-1]}) made under "
            f"another config ({path}); to resume, keep these keys as they were:\n  {lines}\n"
            "or start afresh with another --workdir.")


@contextlib.contextmanager
def claim(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Iterator[None]:
    """The run's hold on `workdir` for the block: the lock (taken by process 0) and the resume
    check (`check_resume`), before the run writes anything there."""
    with lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        check_resume(config, workdir)
        yield
