"""Atomic file writes: readers, and a run killed mid-write, see the old file or the new one,
never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a temporary path in `target`'s folder, then renames it to `target`
    (the folder is created if needed; on failure the temporary file is removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; run outputs are for sharing
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None,
                      sort_keys: bool = False) -> None:
    """`obj` as JSON (non-JSON values via `str`), written and fsynced atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=str, sort_keys=sort_keys)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
