"""One driver per run directory: an exclusive `flock` on `<run dir>/.lock`, held for the whole job.

The kernel releases the lock when the holder dies however it dies, so a stale lock file never
blocks. The file records the holder's pid and start time for the message a second invocation
gets. The nodes of one launch=multinode job share the directory: their drivers take the lock
shared, which still keeps out a single-node run of the same directory.

The lock is taken after the quick checks and before the slow ones (building the dataset, reading
the snapshots), and only its holder writes into the directory. A command refused while holding it
gives it up with `abandon()`, which puts the lock file's record back as it was and removes what
taking it created (the lock file in a directory that holds nothing else, and the directories made
for it), so a rejected command leaves no trace. While the holder is still checking (it may yet be
refused) a second command waits for it; once the holder is `accepted()`, a second command is
refused at once. A driver holds a directory's lock once: the single-run preflight takes it and
the job reuses it.
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
from runner.layout import LOCK_FILE

log = logging.getLogger(__name__)
_HELD: dict[Path, "RunDirLock"] = {}  # the locks this process holds, by run directory
CHECKING, RUNNING = "checking", "running"  # a holder still checking its config may yet be refused...
CHECKING_WAIT_S = 120.0  # ...so a second command waits for it up to this long before being refused
RELEASE_GRACE_S = 0.5  # how long any holder is given to let go before a second command is refused


class RunDirInUse(UserError):
    """Another driver holds the run directory."""


class RunDirLock:
    def __init__(self, run_dir: Path, shared: bool = False) -> None:
        self.path = Path(os.path.abspath(run_dir)) / LOCK_FILE
        self.shared = shared
        self._fd: Optional[int] = None
        self._unlockable = False  # the filesystem has no locks: going on without the guarantee
        self._created: list[Path] = []  # directories that taking the lock made
        self._previous: Optional[bytes] = None  # the lock file's record before we took it

    @staticmethod
    def held(run_dir: Path) -> Optional["RunDirLock"]:
        """This process's lock on `run_dir`, if it holds one (taken by the preflight of a single run)."""
        return _HELD.get(Path(os.path.abspath(run_dir)))

    @property
    def holding(self) -> bool:
        return self._fd is not None or self._unlockable

    def acquire(self, wait: bool = True) -> "RunDirLock":
        """Take the lock or raise RunDirInUse naming the process that holds it. A holder still
        checking its config (it may yet be refused) is waited for, up to CHECKING_WAIT_S, unless
        `wait` is false. Where the filesystem cannot lock (some network filesystems), warn and go on
        without the guarantee."""
        if self.holding:
            return self
        self._created = _missing(self.path.parent)
        started = time.monotonic()
        deadline = started + (CHECKING_WAIT_S if wait else 0)
        # A refused holder puts the previous record back just before it releases: a record that says
        # "running" may be that moment, so it is believed only once it has held for a moment.
        grace = started + (RELEASE_GRACE_S if wait else 0)
        while True:
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
                if time.monotonic() < (deadline if holder.get("state") == CHECKING else grace):
                    time.sleep(0.05)
                    continue
                raise RunDirInUse(
                    "run directory",
                    str(self.path.parent),
                    f"is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started at "
                    f"{holder.get('started', '?')}); two runs in one directory would mix their "
                    "snapshots and metrics",
                    "one run per directory at a time",
                    "wait for it to finish (or stop it), or pass name=<another name> for a separate run",
                ) from None
            except OSError as err:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks on this filesystem
                os.close(fd)
                log.warning(
                    "cannot lock %s (%s): running without the one-driver-per-directory guarantee",
                    self.path,
                    err.strerror,
                )
                self._unlockable = True
                break
            if _same_file(fd, self.path):
                self._fd = fd
                break
            os.close(fd)  # a refused command removed the file between our open and flock: lock the new one
        if self._fd is not None and not self.shared:
            try:
                self._previous = os.pread(self._fd, 4096, 0)
            except OSError:
                self._previous = None
            self._write(_holder(CHECKING))
        _HELD[self.path.parent] = self
        return self

    def accepted(self) -> "RunDirLock":
        """The command passed its checks: a second one is now refused at once, not kept waiting."""
        if self._fd is not None and not self.shared:
            self._write(_holder(RUNNING))
        return self

    def _write(self, content: bytes) -> None:
        """Who holds the lock, for the message a second command gets (a courtesy: the flock is the lock)."""
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, content, 0)
        except OSError:
            pass

    def release(self) -> None:
        _HELD.pop(self.path.parent, None)
        self._unlockable = False
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def abandon(self) -> None:
        """Release after a refusal, removing the lock file when the directory holds nothing else, and
        then the directory and the parents that taking the lock created (a rejected command leaves
        no trace; Hydra's empty job directory of a refused sweep job goes too). Nothing else is touched."""
        if not self.holding:
            return
        run_dir = self.path.parent
        if self._fd is not None and self._previous is not None:
            self._write(self._previous)  # the lock file as the last accepted command left it
        try:
            if not self.shared and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                self.path.unlink()  # while still held: a waiting command then finds the file gone and retries
                for folder in [run_dir, *(p for p in reversed(self._created) if p != run_dir)]:
                    try:
                        folder.rmdir()
                    except OSError:
                        break  # not empty (or already gone): what is left was not ours alone
        except OSError:
            pass
        finally:
            self.release()

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(state: str) -> bytes:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "state": state,
        }
    ).encode()


def _missing(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
