"""The background uploader (`snapshot.upload=async`): training never waits for the network.

Each version is first a complete, verified version in a local cache (its own manifest, written by
the usual writers). This thread then copies it to the object store in step order: the file is
read once and uploaded under a name of its own, hashed as it is sent (sha256 against the cache's
manifest; MD5 against the store's ETag, else it is read back: object_store.py), then the remote
manifest that lists it is published with a conditional write, then remote retention runs (never
the resumed-from or the best version). Until the remote manifest lists a version, the cache's
retention keeps it.

A store that fails is retried with exponential backoff and jitter (capped); the first failure is
one warning (the store, the error, where the versions wait), its return one more line. Another
writer that published the manifest in between (`ManifestConflict`) is not retried: nothing is
torn, the versions stay local, and the run fails at its end saying so. The loop waits for the
uploads only at the end of the run and on a stop (`wait`, bounded), then one line says which
version is in the store and which is only local.

A version is a list of files (`files_of`), so that sharded versions can plug in; today only
single-file versions are uploaded (the checks refuse `upload=async` with `snapshot.format=dcp`).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from runner.snapshot.format import SnapshotError
from runner.snapshot.manager import SnapshotManager
from runner.snapshot.object_store import ManifestConflict, NotAsListed, ObjectStore
from runner.snapshot.versions import StoredFile, Version

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5  # seconds before the first retry; doubled each time, with jitter
BACKOFF_CAP = 10.0  # never longer between tries: the store is noticed soon after it is back
NICE = 10  # the uploader thread's niceness: hashing and sending yield to the training threads


def backoff(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before try `attempt + 1`: exponential, capped, drawn from the upper half of that
    (many workers of a fleet that lost the store together do not come back in step)."""
    ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * 2**attempt)
    return ceiling * (0.5 + 0.5 * rng())


def files_of(version: Version) -> tuple[StoredFile, ...]:
    """The files a version is made of, each with its size and sha256 (the unit an upload moves)."""
    if version.sharded:
        return version.files
    return (StoredFile(version.file, version.size, version.sha256),)


class Uploader:
    """One thread that moves versions from the local cache (`local`) to the store (`remote`)."""

    def __init__(self, local: SnapshotManager, remote: SnapshotManager) -> None:
        if not isinstance(remote.store, ObjectStore):
            raise TypeError(f"uploads go to an object store, not {remote.store!r}")
        self.local, self.remote = local, remote
        self._pending: list[tuple[Version, Optional[dict], bool]] = []  # (version, config, from this process)
        self._busy = False  # a version is being uploaded (it is still in _pending)
        self._cond = threading.Condition()
        self._closed = False
        self.conflict: Optional[SnapshotError] = None  # another writer won the manifest: uploads stopped
        self.failing: Optional[str] = None  # the last error while the store fails (warned once)
        self.in_store: Optional[Version] = None  # the newest version this uploader saw listed in the store
        self._thread = threading.Thread(target=self._run, name="snapshot-uploader", daemon=True)
        self._thread.start()

    # ---- the loop's side ---------------------------------------------------------------------------
    def submit(self, version: Version, config: Optional[dict], new: bool = True) -> None:
        """Queue a version the local cache lists (it stays there until the store lists it). `new`:
        committed by this process, so not in the store yet (an older one may be: it is looked up)."""
        with self._cond:  # a step written again (after a restart) replaces what was queued for it
            self._pending = [item for item in self._pending if item[0].file != version.file]
            self._pending.append((version, config, new))
            self._pending.sort(key=lambda item: item[0].step)
            self._cond.notify_all()

    def pending_files(self) -> set[str]:
        """Versions not in the store yet: the cache's retention must keep them."""
        with self._cond:
            return {v.file for v, *_ in self._pending}

    def pending(self) -> list[Version]:
        with self._cond:
            return [v for v, *_ in self._pending]

    def wait(self, timeout: float) -> bool:
        """Block until every queued version is in the store, at most `timeout` seconds (or until the
        uploads stopped on a conflict); True when none is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and self.conflict is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return not self._pending

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=0.5)  # an upload in flight is not waited for: unlisted, it is never read

    # ---- the thread ------------------------------------------------------------------------------
    def _next(self) -> Optional[tuple[Version, Optional[dict], bool]]:
        with self._cond:
            while not self._closed and (not self._pending or self.conflict is not None):
                self._cond.wait()
            if self._closed:
                return None
            self._busy = True
            return self._pending[0]

    def _done(self, version: Version) -> None:
        with self._cond:
            self._pending = [item for item in self._pending if item[0].file != version.file]
            self._busy = False
            self._cond.notify_all()

    def _run(self) -> None:
        try:  # background work: the training threads come first for the CPU (Linux: per thread)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except (AttributeError, OSError):
            pass
        attempt = 0
        while (item := self._next()) is not None:
            version, config, new = item
            try:
                listed = self.upload(version, config, new and attempt == 0)  # a retry looks first
            except ManifestConflict as err:
                with self._cond:
                    self.conflict, self._busy = err, False
                    self._cond.notify_all()
                log.error(
                    "snapshot uploads to %s stopped: %s; the versions stay in %s",
                    self.remote.store.where(),
                    err,
                    self.local.dir,
                )
                continue
            except NotAsListed as err:
                self._not_as_listed(version, err)
                continue
            except Exception as err:  # the network, the store, a full bucket: retried
                self._failed(err)
                with self._cond:
                    self._busy = False
                    self._cond.wait(backoff(attempt))  # close() wakes it
                attempt += 1
                continue
            if self.failing is not None:
                log.warning("snapshot uploads to %s work again (%s uploaded)", self.remote.store.where(), version.file)
                self.failing = None
            attempt = 0
            self.in_store = listed
            self._done(version)

    def _not_as_listed(self, version: Version, err: SnapshotError) -> None:
        """The cached file is not what was queued: written again since (its new entry is queued, or
        is now), or rotten (never uploaded: the store keeps its previous versions)."""
        listed = next((v for v in self.local.entries() if v.file == version.file), None)
        with self._cond:
            self._busy = False
            head = self._pending and self._pending[0][0] is version
            if listed is not None and listed.sha256 != version.sha256 and head:
                self._pending[0] = (listed, self._pending[0][1], False)
                return
        if head:
            log.error("snapshot %s is not uploaded: %s", version.file, err)
            self._done(version)

    def _failed(self, err: BaseException) -> None:
        text = f"{type(err).__name__}: {err}"
        if self.failing is None:
            log.warning(
                "snapshot upload to %s failed (%s); training goes on; versions kept locally in %s, "
                "uploaded when it is back",
                self.remote.store.where(),
                text,
                self.local.dir,
            )
        else:
            log.debug("snapshot upload to %s failed again (%s)", self.remote.store.where(), text)
        self.failing = text

    def upload(self, version: Version, config: Optional[dict], new: bool = False) -> Version:
        """Upload one version, verify it, list it in the store's manifest (retention after).
        Returns the version as the store lists it."""
        if not new:
            known = next((v for v in self.remote.entries() if v.file == version.file), None)
            if known is not None and known.sha256 == version.sha256:
                return known  # uploaded by a run before this one
        started = time.perf_counter()
        store = self.remote.store
        (item,) = files_of(version)  # sharded versions are refused before launch
        # What is sent is hashed as it is sent and must match the cache's manifest: no second read.
        stored = store.upload_file(Path(self.local.dir) / version.file, item)
        remote = version.replace(object=stored.object, commit_seconds=round(time.perf_counter() - started, 4))
        try:
            self.remote.list_version(remote, config)
        except BaseException:
            store.discard(stored)  # listed by no manifest
            raise
        return remote

    def summary(self) -> str:
        """Which version is in the store and which is only local (and where)."""
        where = self.remote.store.where()
        remote = f"{where} holds {_named(self.in_store)}" if self.in_store else f"nothing was uploaded to {where}"
        left = self.pending()
        if not left:
            return remote
        names = ", ".join(_named(v) for v in left)
        return f"{remote}; only local, in {self.local.dir}: {names}"


def _named(version: Any) -> str:
    return f"{version.file} (step {version.step})"
