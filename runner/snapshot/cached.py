"""One run's versions in two places: a local cache that the writers commit to, and the object store
the background uploader copies them to (`snapshot.upload=async`).

Writes go to the cache (`snapshot-cache/` in the run directory: a `LocalStore` with its own
manifest, so each version there is complete and verified), and each committed version is handed
to the uploader (upload.py). The cache keeps its newest version, so that a resume on the same
machine reads the local disk, and every version not in the store yet.

Reads see both catalogues as one: the newest loadable version of either (after an outage the
cache may be ahead of the store; at one step the local copy is tried first), and a fresh machine
with an empty run directory reads the store alone. A store that cannot be read leaves the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from runner.snapshot.format import SnapshotError
from runner.snapshot.manager import SnapshotManager
from runner.snapshot.store import LocalStore
from runner.snapshot.upload import Uploader
from runner.snapshot.versions import Version

log = logging.getLogger(__name__)

KEEP_LOCAL = 1  # versions the cache keeps once they are in the store: the newest


class CachedManager(SnapshotManager):
    """The catalogue the workers and the driver use with `snapshot.upload=async`: `self` is the
    local cache (what the writers commit to), `remote` the store's catalogue."""

    def __init__(self, cache: Path, remote: SnapshotManager) -> None:
        super().__init__(None, keep_last=KEEP_LOCAL, mode=remote.retention.mode, store=LocalStore(cache))
        self.remote = remote
        self._uploader: Optional[Uploader] = None
        self.held = self._not_uploaded

    def _not_uploaded(self) -> set[str]:
        return set() if self._uploader is None else self._uploader.pending_files()

    def uploads(self) -> Uploader:
        """The uploader, started on first use with what an earlier run left in the cache unuploaded."""
        if self._uploader is None:
            self._uploader = Uploader(self, self.remote)
            config = super().stored_config()
            for version in self.entries_local():  # the uploader skips what the store lists already
                self._uploader.submit(version, config, new=False)
        return self._uploader

    # ---- writing -------------------------------------------------------------------------------
    def commit(self, staged: Path, step: int, epoch: int, config: Optional[dict] = None, **marks: Any) -> Version:
        """Commit locally (a complete version in the cache), then queue its upload."""
        uploads = self.uploads()
        version = super().commit(staged, step, epoch, config, **marks)
        uploads.submit(version, config)
        return version

    def commit_folder(
        self, staged: Path, step: int, epoch: int, config: Optional[dict] = None, digests: Any = None, **marks: Any
    ):
        raise SnapshotError("sharded (DCP) versions are not uploaded in the background yet: snapshot.upload=sync")

    def pin(self, version: Version) -> None:
        self.remote.pin(version)  # retention in the store; the cache keeps what is not uploaded anyway

    def finish_uploads(self, timeout: float) -> None:
        """Wait for the uploads (at most `timeout` s), prune the cache, and say where the versions are."""
        uploader = self.uploads()
        done = uploader.wait(timeout)
        self.list_version(None)  # what is in the store now leaves the cache (its newest stays)
        summary = uploader.summary()
        if done:
            log.info("snapshot uploads done: %s", summary)
        else:
            log.warning("snapshot uploads not finished within %.0f s: %s", timeout, summary)
        if uploader.conflict is not None:
            raise uploader.conflict

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.close()

    def remove_stale_temporaries(self) -> None:
        super().remove_stale_temporaries()
        self.remote.remove_stale_temporaries()

    # ---- reading -------------------------------------------------------------------------------
    def entries_local(self) -> list[Version]:
        return super().entries()

    def _remote_listed(self) -> tuple[list[Version], list[str]]:
        try:
            return self.remote._listed(self.remote.read_manifest())
        except SnapshotError as err:
            log.warning("%s; reading only the local copies in %s", err, self.dir)
            return [], [str(err)]

    def _catalogue(self) -> tuple[list[Version], list[str]]:
        """Both catalogues, oldest first; at one step the local copy last (the walk tries it first)."""
        remote, problems = self._remote_listed()
        local, local_problems = super()._catalogue()
        merged = [(v.step, 0, v) for v in remote] + [(v.step, 1, v) for v in local]
        return [v for *_, v in sorted(merged, key=lambda t: t[:2])], problems + local_problems

    def entries(self) -> list[Version]:
        """Every version of either place once (the local copy where both hold it), oldest first."""
        versions = {v.file: v for v in self._catalogue()[0]}
        return sorted(versions.values(), key=lambda v: v.step)

    def _owner(self, version: Version) -> SnapshotManager:
        """The catalogue a version came from: the store names an object for each of its files."""
        return self.remote if version.object is not None else self

    def verify(self, entry: Any, whole: bool = True) -> bytes:
        version = self._version(entry)
        owner = self._owner(version)
        return owner.verify(version, whole) if owner is self.remote else super().verify(version, whole)

    def load_entry(self, entry: Any, verified: bool = False, whole: bool = True) -> dict[str, Any]:
        version = self._version(entry)
        owner = self._owner(version)
        if owner is self.remote:
            return owner.load_entry(version, verified, whole)
        return super().load_entry(version, verified, whole)

    def best_entry(self) -> Optional[Version]:
        try:
            remote = self.remote.best_entry()
        except SnapshotError:
            remote = None
        found = [v for v in (remote, super().best_entry()) if v is not None]
        ranked = self.remote.retention.best_first(found)
        return ranked[0] if ranked else (found[0] if found else None)

    def stored_config(self) -> Optional[dict]:
        try:
            config = self.remote.stored_config()
        except SnapshotError:
            config = None
        return config if config is not None else super().stored_config()

    def published(self) -> bool:
        try:
            if self.remote.published():
                return True
        except SnapshotError:
            pass
        return super().published()
