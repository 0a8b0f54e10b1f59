"""The catalogue of one run's snapshot versions: what the manifest lists, keeps and loads.

Layout of a snapshot directory:

    snapshot-000000120.pt   one version per global step (zero padded so names sort), or
    step-000000120/         a sharded version (snapshot.format=dcp): every rank's shards
                            (__<rank>_0.distcp), DCP's .metadata, and loop.pt (the loop's state,
                            written by rank 0); each file has its own size and sha256 in the entry,
                            and one sha256 per 64 MB block (digests.py)
    manifest.json           every complete version: file, step, epoch, size, sha256, time

A version counts only once the manifest that lists it is published, and that happens after its
data is complete and durable in the store (store.py: data first, manifest last). A crash at any
moment therefore leaves either the old set of versions or the new one. Loads go through the
store's verified reads (size and sha256 before unpickling) and unpickle with
`weights_only=True`, so a torn, corrupted or malicious file is reported and skipped, never loaded.

The manifest is checked against its schema (manifest.py) on every read and turned into typed
versions (versions.py): an entry that names anything but one of our own files is dropped with a
warning. Every "newest version that passes X" question is the one walk, `newest`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from runner.snapshot.format import FORMAT_VERSION, SHARDED_KEY, ShardedVersion, SnapshotError, load_bytes
from runner.snapshot.manifest import describe, parse_manifest, validate_manifest
from runner.snapshot.retention import Retention
from runner.snapshot.store import MANIFEST, LocalStore, SnapshotStore, write_staged
from runner.snapshot.versions import LOOP_FILE, SHARDED_KIND, Monitored, StoredFile, Version

log = logging.getLogger(__name__)

__all__ = ["LOOP_FILE", "MANIFEST", "SnapshotManager", "folder_name", "load_path", "snapshot_name"]


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:09d}.pt"


def folder_name(step: int) -> str:
    """A sharded version's folder."""
    return f"step-{step:09d}"


class SnapshotManager:
    """Writes, lists, verifies and prunes the snapshot versions of one run, in one store.

    Only one process (rank 0) writes; any process may read.
    """

    def __init__(
        self,
        directory: Path | str | None,
        keep_last: int = 3,
        milestone_every: int = 0,
        keep_best: int = 0,
        mode: str = "min",
        store: Optional[SnapshotStore] = None,
    ) -> None:
        self.store = store if store is not None else LocalStore(directory)
        self.retention = Retention(keep_last, milestone_every, keep_best, str(mode))
        self.resumed_from: Optional[str] = None  # the version this run loaded: retention never deletes it
        self.held: Callable[[], Collection[str]] = tuple  # more files retention keeps (versions not uploaded yet)

    @property
    def dir(self) -> Path:
        return self.store.location

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    # ---- manifest -------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The manifest (top level checked, entries not yet), or an empty one when none was written yet."""
        data = self.store.read_manifest()
        if data is None:
            return {"format_version": FORMAT_VERSION, "snapshots": []}
        return parse_manifest(data, self.manifest_path)

    def entries(self) -> list[Version]:
        """Complete versions that pass the manifest's schema, oldest first; the others are warned about."""
        return self._listed(self.read_manifest())[0]

    def _listed(self, manifest: dict[str, Any]) -> tuple[list[Version], list[str]]:
        """(valid versions sorted by step, problems of the invalid entries), each problem logged once per read."""
        valid, problems = validate_manifest(manifest, self.manifest_path)
        for problem in problems:
            log.warning("%s", problem)
        return sorted((Version.from_entry(e) for e in valid), key=lambda v: v.step), problems

    def pin(self, version: Version) -> None:
        """The run resumed from `version`: retention keeps it for as long as this run writes."""
        self.resumed_from = version.file

    def published(self) -> bool:
        """A manifest was published (it may still list nothing valid)."""
        return self.store.read_manifest() is not None

    def stored_config(self) -> Optional[dict]:
        """The resolved config of the run that wrote the newest version."""
        config = self.read_manifest().get("config")
        if config is not None and not isinstance(config, dict):
            log.warning("%s: ignoring its 'config', which is not an object", self.manifest_path)
            return None
        return config

    # ---- writing --------------------------------------------------------------------------
    def save(
        self, state: dict[str, Any], step: int, epoch: int, config: Optional[dict] = None, **marks: Any
    ) -> Version:
        """Write one version, list it in the manifest, then apply retention."""
        return self.commit(self.write(state, step), step, epoch, config, **marks)

    def write(self, state: dict[str, Any], step: int) -> Path:
        """Serialise `state` to a staging file; it is not a version until `commit`.

        This is the only part that must read the live training state, so it is the only part a
        synchronous snapshot makes the training loop wait for."""
        staged = self.store.staging_file(snapshot_name(step))
        write_staged(staged, lambda path: torch.save(state, str(path)))
        return staged

    def commit(self, staged: Path, step: int, epoch: int, config: Optional[dict] = None, **marks: Any) -> Version:
        """Store the staged file (hashed, durable, in place), then list it in the manifest
        (`marks`: end_of_epoch, monitor, ended, as `_publish` takes them).

        Only the manifest entry makes the version count, so a crash anywhere in here leaves the
        previous versions as they were."""
        started = time.perf_counter()
        stored = self.store.commit_file(staged, snapshot_name(step))
        version = Version(stored.name, int(step), int(epoch), stored.size, stored.sha256, object=stored.object)
        return self._publish(version, started, config, **marks)

    def commit_folder(
        self,
        staged: Path,
        step: int,
        epoch: int,
        config: Optional[dict] = None,
        digests: Optional[dict[str, StoredFile]] = None,
        **marks: Any,
    ) -> Version:
        """A sharded version: every rank's files and DCP's .metadata are complete in the staging
        folder (DCP writes .metadata last, once every rank has written) and the lead has added
        loop.pt. Store each file (durable; hashed, unless `digests` has what its writer hashed while
        writing it), then list the version, each file with its own size and sha256 (and block
        digests): only the manifest entry makes it count."""
        started = time.perf_counter()
        try:
            files = self.store.commit_folder(staged, folder_name(step), digests)
            digest = hashlib.sha256(json.dumps([f.as_dict() for f in files], sort_keys=True).encode()).hexdigest()
            size = sum(f.size for f in files)
            version = Version(folder_name(step), int(step), int(epoch), size, digest, SHARDED_KIND, files)
            return self._publish(version, started, config, **marks)
        finally:
            self.store.after_publish()

    def _publish(
        self,
        version: Version,
        started: float,
        config: Optional[dict],
        end_of_epoch: bool = False,
        monitor: Optional[dict] = None,
        ended: Optional[str] = None,
    ) -> Version:
        """Publish a manifest that lists a stored version, then delete what retention dropped."""
        version = version.replace(
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            milestone=self.retention.is_milestone(version.epoch, end_of_epoch),
            commit_seconds=round(time.perf_counter() - started, 4),
            monitor=None if monitor is None else Monitored(str(monitor["name"]), float(monitor["value"])),
            ended=None if ended is None else str(ended),  # training ended here for good (early stop)
        )
        return self.list_version(version, config)

    def list_version(self, version: Optional[Version], config: Optional[dict] = None) -> Optional[Version]:
        """Publish a manifest that lists `version` (stored already, its entry as given), then delete
        what retention dropped. `version=None`: apply retention again, publishing only if it drops
        something (versions it held back are uploaded now)."""
        manifest = self.read_manifest()
        trusted = self._trusted(manifest)
        if version is None:
            kept, replaced = trusted, []
        else:
            kept = [v for v in trusted if v.step != version.step and v.file != version.file]
            replaced = [v for v in trusted if v.step == version.step and v.file != version.file]  # the other format
            kept.append(version)
        pinned = {*self.held(), *([self.resumed_from] if self.resumed_from else [])}
        kept, dropped = self.retention.apply(sorted(kept, key=lambda v: v.step), pinned)
        if version is None and not dropped:
            return None
        manifest.update(format_version=FORMAT_VERSION, snapshots=[v.as_dict() for v in kept])
        best = self.retention.best_first(kept)
        if best:
            manifest["best"] = best[0].file
        if config is not None:
            manifest["config"] = config
        self.store.publish_manifest(json.dumps(manifest, indent=1).encode())
        for old in dropped + replaced:  # only after the manifest no longer lists them
            self.store.delete(old)
        return version

    def _trusted(self, manifest: dict[str, Any]) -> list[Version]:
        """The versions a rewritten manifest may keep: schema-valid, and not naming a symlink or
        other non-regular file. The rest are dropped from the manifest, but what they name is
        left alone: a bogus entry must not make retention delete anything (nor, with a huge
        step, count as the newest version and push the real ones out)."""
        trusted = []
        for version in self._listed(manifest)[0]:
            problem = self.store.problem(version)
            if problem is not None:
                log.warning(
                    "%s: dropping entry (%s) without touching its file: %s",
                    self.manifest_path,
                    describe(version.as_dict()),
                    problem,
                )
                continue
            trusted.append(version)
        return trusted

    def best_entry(self) -> Optional[Version]:
        """The version the manifest names as best (by `snapshot.monitor`), if any is listed and valid."""
        manifest = self.read_manifest()
        name = manifest.get("best")
        return next((v for v in self._listed(manifest)[0] if v.file == name), None)

    def remove_stale_temporaries(self) -> None:
        """Delete half-written files left by a writer that was killed."""
        self.store.remove_stale_temporaries()

    # ---- reading --------------------------------------------------------------------------
    def _version(self, entry: Any) -> Version:
        """A typed version of what a caller passed (a Version, or any dict, checked against the schema)."""
        return Version.from_entry(entry, where=f" in {self.dir}")

    def verify(self, entry: Any, whole: bool = True) -> bytes:
        """The bytes every rank reads whole (the file; a sharded version's loop.pt) if the whole
        version matches its manifest entry; SnapshotError saying why otherwise. `whole=False`: a
        sharded version's shards are only checked to be there with their listed sizes; their
        bytes are verified where they are read (dcp_reading.py), by the rank that reads them."""
        version = self._version(entry)
        path = self.dir / version.file
        if not version.sharded:
            return self.store.read_verified(
                path, StoredFile(version.file, version.size, version.sha256, version.object)
            )
        problem = self.store.problem(version)
        if problem is None and self.store.local and not path.is_dir():
            problem = f"{path} is missing"
        if problem is not None:
            raise SnapshotError(problem)
        for item in version.files:  # a torn or missing shard of any rank makes the whole version invalid
            if item.name == LOOP_FILE:
                continue
            if whole:
                self.store.check_verified(path / item.name, item)
            else:
                self.store.check_listed(path / item.name, item)
        return self.store.read_verified(path / LOOP_FILE, version.loop_file)

    def load_entry(self, entry: Any, verified: bool = False, whole: bool = True) -> dict[str, Any]:
        """A verified version's state. For a sharded version: the loop state, with SHARDED_KEY naming
        the folder the model and optimizer are read from (by every rank, or by `sharded.full_model`).
        `verified`: another process (the lead) has just checked the shards of this sharded
        version; only loop.pt is checked here. `whole=False`: shards are checked as `verify` says."""
        version = self._version(entry)
        path = self.dir / version.file
        if not version.sharded:
            return load_bytes(self.verify(version), path)
        if verified:
            data = self.store.read_verified(path / LOOP_FILE, version.loop_file)
        else:
            data = self.verify(version, whole)
        state = load_bytes(data, path / LOOP_FILE)
        source = None if self.store.local else functools.partial(self.store.shard_reader, version)
        state[SHARDED_KEY] = ShardedVersion(path, {f.name: f for f in version.files}, source=source)
        return state

    def newest(
        self, check: Callable[[Version], Any], warn: bool = False, skip: Optional[dict[str, str]] = None
    ) -> tuple[Optional[Version], Any, list[str]]:
        """The one walk: (newest version that passes `check`, what `check` returned, the problems
        met on the way). `check` raises SnapshotError for a version that does not pass; `warn`
        logs each skipped version; `skip`: versions already found invalid (file -> why)."""
        versions, problems = self._catalogue()
        for version in reversed(versions):
            if skip and version.file in skip:
                problems.append(skip[version.file])
                continue
            try:
                result = check(version)
            except SnapshotError as err:
                if warn:
                    log.warning("skipping snapshot %s: %s", version.file, err)
                problems.append(str(err))
                continue
            return version, result, problems
        return None, None, problems

    def _catalogue(self) -> tuple[list[Version], list[str]]:
        """Every version a read may take, oldest first (at one step, the one to try first last), and
        the problems of the entries left out."""
        return self._listed(self.read_manifest())

    def finish_uploads(self, timeout: float) -> None:
        """Block until versions on their way to a remote store are there (at most `timeout` s);
        a local store has none."""

    def close(self) -> None:
        """Stop what runs in the background (nothing, for a local store)."""

    def load_latest(self) -> Optional[tuple[Version, dict[str, Any]]]:
        """(version, state) of the newest valid version; None when there is none at all.

        Invalid versions (and entries that break the schema) are skipped with a warning; if every
        version is invalid, SnapshotError lists them all rather than letting training start over
        silently.
        """
        version, state, problems = self.newest(self.load_entry, warn=True)
        if version is not None:
            return version, state
        if problems:
            raise SnapshotError("no snapshot in %s is valid: %s" % (self.store.where(), "; ".join(problems)))
        return None

    def newest_valid_entry(self) -> tuple[Optional[Version], list[str]]:
        """The newest version whose bytes verify (without unpickling) and the problems met on the way;
        a sharded version's shards only by their sizes (their bytes are verified by the ranks that
        read them, so no one process reads them all)."""
        version, _, problems = self.newest(lambda v: self.verify(v, whole=False))
        return version, problems

    def newest_loadable_entry(self) -> tuple[Optional[Version], list[str]]:
        """The newest version whose bytes verify and load as a runner snapshot, and the problems met.

        What "this run is already complete" must rest on: bytes that merely match the manifest
        may be anything (a plain tensor, a file of another program), so they are unpickled
        (safely) too."""
        version, _, problems = self.newest(self.load_entry)
        return version, problems


def load_path(path: Path | str) -> dict[str, Any]:
    """Load a snapshot named by the user; verified against its manifest when one lies beside it."""
    path = Path(path)
    manager = SnapshotManager(path.parent)
    for version in manager.entries() if manager.manifest_path.exists() else []:
        if version.file == path.name:
            return manager.load_entry(version)
    if path.is_dir():  # a sharded version: its files can only be trusted through their manifest entry
        raise SnapshotError(
            f"{path} is a folder not (validly) listed in {manager.manifest_path}: a sharded snapshot "
            "is loaded only through its manifest entry"
        )
    log.warning("%s is not (validly) listed in a manifest; loading it without a checksum", path)
    return load_bytes(path.read_bytes(), path)
