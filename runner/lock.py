"""One driver per run directory: an exclusive `flock` on `<run dir>/.lock`, held for the whole job.

The kernel releases the lock when the holder dies however it dies, so a stale lock file never
blocks. The file records the holder's pid and start time for the message a second invocation
gets. The nodes of one launch=multinode job share the directory: their drivers take the lock
shared, which still keeps out a single-node run of the same directory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from runner.errors import UserError

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class RunDirInUse(UserError):
    """Another driver holds the run directory."""


class RunDirLock:
    def __init__(self, run_dir: Path, shared: bool = False) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.shared = shared
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise RunDirInUse naming the process that holds it. Where the
        filesystem cannot lock (some network filesystems), warn and go on without the guarantee."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:  # another user's lock file: flock needs no write access
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUse("run directory", str(self.path.parent),
                              f"is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started at "
                              f"{holder.get('started', '?')}); two runs in one directory would mix their snapshots and metrics",
                              "one run per directory at a time",
                              "wait for it to finish (or stop it), or pass name=<another name> for a separate run") from None
        except OSError as err:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks on this filesystem
            os.close(fd)
            log.warning("cannot lock %s (%s): running without the one-driver-per-directory guarantee", self.path, err.strerror)
            return self
        if not self.shared:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
            except OSError:
                pass  # who holds it is a courtesy for the message; the lock itself is held
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
