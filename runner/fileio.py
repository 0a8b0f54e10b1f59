"""The one way the runner replaces a file: write a temporary beside it, fsync, rename, fsync the folder.

A reader (or a crash at any moment) sees either the old content or the new one, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """A hidden name in the same folder (same filesystem, so the rename is atomic), unique per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Union[Path, str], data: Union[bytes, str], durable: bool = True) -> None:
    """Replace `path` with `data` atomically; `durable` also fsyncs (survives a power cut, not only a crash)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
