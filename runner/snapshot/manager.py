"""Versioned, atomic, verified snapshots of one run: the manifest and the files it lists.

Layout of a snapshot directory:

    snapshot-000000120.pt   one version per global step (zero padded so names sort), or
    step-000000120/         a sharded version (snapshot.format=dcp): every rank's shards
                            (__<rank>_0.distcp), DCP's .metadata, and loop.pt (the loop's state,
                            written by rank 0); each file has its own size and sha256 in the entry
    manifest.json           every complete version: file, step, epoch, size, sha256, time

A version counts only once its manifest entry exists, and the entry is written after the file has
been fsync'ed and renamed into place; the manifest itself is replaced atomically. A crash at any
moment therefore leaves either the old set of versions or the new one. Loads check the size and
the sha256 before unpickling, and unpickle with `weights_only=True`, so a torn, corrupted or
malicious file is reported and skipped, never loaded.

The manifest is checked against its schema (manifest.py) on every read: an entry that names
anything but one of our own files in this directory is dropped with a warning, and a file that is
not a regular file (a symlink, say) is never followed and never deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Optional

import torch

from runner.fileio import atomic_write, fsync_dir, temporary_path
from runner.snapshot.format import FORMAT_VERSION, SHARDED_KEY, ShardedVersion, SnapshotError, load_bytes
from runner.snapshot.manifest import (
    SHARD_FILE_PATTERN,
    describe,
    entry_problem,
    file_name_problem,
    parse_manifest,
    validate_manifest,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # no links, no FIFO hang


def _out_of_space(directory: Path) -> bool:
    """The filesystem has (next to) no room left: what a failed write there most likely means."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < (1 << 20)


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:09d}.pt"


def folder_name(step: int) -> str:
    """A sharded version's folder."""
    return f"step-{step:09d}"


LOOP_FILE = "loop.pt"  # a sharded version's loop state (position, RNG, metrics, schedules), written by the lead


# sha256 of shard files this process has hashed (written or verified), by file identity: the driver,
# the lead at resume and the test of the best version would otherwise read a large version again.
_HASHED: dict[tuple, str] = {}


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _remember_hash(path: Path, sha256: str) -> None:
    try:
        _HASHED[_identity(os.lstat(path))] = sha256
    except OSError:
        pass


def _is_sharded(entry: dict[str, Any]) -> bool:
    return entry.get("kind") == "dcp"


def _sha256_of_file(path: Path, chunk: int = 16 * 2**20) -> tuple[str, int]:
    """Hash what is actually in the file (read back from the page cache), not what we meant to write."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


class SnapshotManager:
    """Writes, lists, verifies and prunes the snapshot versions of one run.

    Only one process (rank 0) writes; any process may read.
    """

    def __init__(
        self, directory: Path | str, keep_last: int = 3, milestone_every: int = 0, keep_best: int = 0, mode: str = "min"
    ) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.milestone_every = milestone_every
        self.keep_best = keep_best  # versions with the best `monitor` values, kept beyond keep_last
        self.mode = str(mode)

    # ---- manifest -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        """The manifest (top level checked, entries not yet), or an empty one when none was written yet."""
        try:
            data = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return {"format_version": FORMAT_VERSION, "snapshots": []}
        except OSError as err:
            raise SnapshotError(f"{self.manifest_path} cannot be read ({err.strerror or err})") from None
        return parse_manifest(data, self.manifest_path)

    def entries(self) -> list[dict[str, Any]]:
        """Complete versions that pass the manifest's schema, oldest first; the others are warned about."""
        return self._checked_entries(self.read_manifest())[0]

    def _checked_entries(self, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
        """(valid entries sorted by step, problems of the invalid ones), each problem logged once per read."""
        valid, problems = validate_manifest(manifest, self.manifest_path)
        for problem in problems:
            log.warning("%s", problem)
        return sorted(valid, key=lambda e: e["step"]), problems

    def stored_config(self) -> Optional[dict]:
        """The resolved config of the run that wrote the newest version."""
        config = self.read_manifest().get("config")
        if config is not None and not isinstance(config, dict):
            log.warning("%s: ignoring its 'config', which is not an object", self.manifest_path)
            return None
        return config

    # ---- writing --------------------------------------------------------------------------
    def save(
        self,
        state: dict[str, Any],
        step: int,
        epoch: int,
        config: Optional[dict] = None,
        end_of_epoch: bool = False,
        **marks: Any,
    ) -> dict[str, Any]:
        """Write one version atomically, record it in the manifest, then apply retention."""
        return self.commit(self.write(state, step), step, epoch, config, end_of_epoch=end_of_epoch, **marks)

    def write(self, state: dict[str, Any], step: int) -> Path:
        """Serialise `state` to a temporary file; it is not a version until `commit`.

        This is the only part that must read the live training state, so it is the only part a
        synchronous snapshot makes the training loop wait for."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(self.dir / snapshot_name(step))
        try:
            torch.save(state, str(tmp))
        except BaseException as err:
            full = isinstance(err, Exception) and _out_of_space(self.dir)
            tmp.unlink(missing_ok=True)
            if full and not isinstance(err, OSError):  # torch reports a full disk as "unexpected pos ..."
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from err
            raise
        return tmp

    def commit(self, tmp: Path, step: int, epoch: int, config: Optional[dict] = None, **marks: Any) -> dict[str, Any]:
        """Hash and fsync the temporary file, rename it into place, then list it in the manifest
        (`marks`: end_of_epoch, monitor, ended, as `_record` takes them).

        Only the manifest entry makes the version count, so a crash anywhere in here leaves the
        previous versions as they were."""
        started = time.perf_counter()
        name = snapshot_name(step)
        try:
            sha256, size = _sha256_of_file(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)  # the manifest's directory fsync below persists this rename
        finally:
            tmp.unlink(missing_ok=True)
        entry = {
            "file": name,
            "step": int(step),
            "epoch": int(epoch),
            "size": size,
            "sha256": sha256,
        }
        return self._record(entry, started, config, **marks)

    def commit_folder(
        self, tmp: Path, step: int, epoch: int, config: Optional[dict] = None, **marks: Any
    ) -> dict[str, Any]:
        """A sharded version: every rank's files and DCP's .metadata are complete in the temporary
        folder `tmp` (DCP writes .metadata last, once every rank has written) and the lead has
        added loop.pt. Hash and fsync each file, rename the folder into place, then list it, each
        file with its own size and sha256: only the manifest entry makes it count."""
        started = time.perf_counter()
        name = folder_name(step)
        final = self.dir / name
        files = []
        for path in sorted(tmp.iterdir(), key=lambda p: p.name):
            if not SHARD_FILE_PATTERN.fullmatch(path.name) or self._file_type_problem(path) is not None:
                raise SnapshotError(f"{tmp} holds {path.name}, which a sharded snapshot never writes")
            sha256, size = _sha256_of_file(path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files.append({"name": path.name, "size": size, "sha256": sha256})
        fsync_dir(tmp)
        aside = None
        if os.path.lexists(final):  # this step was written before (a torn version, resumed from an older one)
            aside = final.with_name(f".{name}.old-{os.getpid()}")
            os.replace(final, aside)
        try:
            os.replace(tmp, final)  # the manifest's directory fsync below persists this rename
        except BaseException:
            if aside is not None:  # put back what was there
                os.replace(aside, final)
            raise
        for item in files:
            _remember_hash(final / item["name"], item["sha256"])
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        entry = {
            "file": name,
            "kind": "dcp",
            "step": int(step),
            "epoch": int(epoch),
            "size": sum(f["size"] for f in files),
            "sha256": digest,
            "files": files,
        }
        try:
            return self._record(entry, started, config, **marks)
        finally:
            if aside is not None:
                self._remove_folder(aside)

    def _record(
        self,
        entry: dict[str, Any],
        started: float,
        config: Optional[dict],
        end_of_epoch: bool = False,
        monitor: Optional[dict] = None,
        ended: Optional[str] = None,
    ) -> dict[str, Any]:
        """List a complete version in the manifest (atomically), then apply retention."""
        epoch, name = entry["epoch"], entry["file"]
        entry.update(
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            milestone=bool(end_of_epoch and self.milestone_every and epoch % self.milestone_every == 0),
            commit_seconds=round(time.perf_counter() - started, 4),
        )
        if monitor is not None:  # {"name": "val/accuracy", "value": 0.97}: what retention keeps the best by
            entry["monitor"] = {"name": str(monitor["name"]), "value": float(monitor["value"])}
        if ended is not None:  # training ended here for good (early stop): re-invoking does not train on
            entry["ended"] = str(ended)
        manifest = self.read_manifest()
        trusted = self._trusted_entries(manifest)
        kept = [e for e in trusted if e["step"] != entry["step"] and e["file"] != name]
        replaced = [
            e for e in trusted if e["step"] == entry["step"] and e["file"] != name
        ]  # the same step in the other format
        kept = sorted(kept + [entry], key=lambda e: e["step"])
        kept, dropped = self._retain(kept)
        dropped += replaced
        manifest.update(format_version=FORMAT_VERSION, snapshots=kept)
        best = self._best(kept)
        if best:
            manifest["best"] = best[0]["file"]
        if config is not None:
            manifest["config"] = config
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1))
        for old in dropped:  # only after the manifest no longer lists them
            self._delete_version(old)
        return entry

    def _trusted_entries(self, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        """The entries a rewritten manifest may keep: schema-valid, and not naming a symlink or
        other non-regular file. The rest are dropped from the manifest, but what they name is
        left alone: a bogus entry must not make retention delete anything (nor, with a huge
        step, count as the newest version and push the real ones out)."""
        trusted = []
        for entry in self._checked_entries(manifest)[0]:
            problem = self._entry_type_problem(entry)
            if problem is not None:
                log.warning(
                    "%s: dropping entry (%s) without touching its file: %s",
                    self.manifest_path,
                    describe(entry),
                    problem,
                )
                continue
            trusted.append(entry)
        return trusted

    def _entry_type_problem(self, entry: dict[str, Any]) -> Optional[str]:
        """Why what the entry names is not what its kind must be (a regular file, or a real folder), or None."""
        return self._file_type_problem(self.dir / entry["file"], folder=_is_sharded(entry))

    @staticmethod
    def _file_type_problem(path: Path, folder: bool = False) -> Optional[str]:
        """Why `path` (not followed if a link) is not a regular file (a folder with `folder`); None
        if it is one or is missing."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            return f"{path} is a symlink (never followed)"
        if folder and not stat.S_ISDIR(mode):
            return f"{path} is not a folder"
        if not folder and not stat.S_ISREG(mode):
            return f"{path} is not a regular file"
        return None

    def _delete_version(self, entry: dict[str, Any]) -> None:
        """Delete one pruned version: only a regular file (or a real folder of shards) of ours,
        directly inside the snapshot directory."""
        name = entry["file"]
        problem = file_name_problem(name, entry.get("kind", "file"))
        path = self.dir / name
        if problem is None:
            problem = self._entry_type_problem(entry)
        if problem is None and path.resolve().parent != self.dir.resolve():
            problem = f"{path} resolves outside {self.dir}"
        if problem is not None:
            log.warning("retention: not deleting %r: %s", name, problem)
            return
        if _is_sharded(entry):
            self._remove_folder(path)
        else:
            path.unlink(missing_ok=True)

    def _remove_folder(self, path: Path) -> None:
        """Remove a folder of shards: the files a sharded snapshot writes, then the folder itself
        (anything else in it is left, with a warning)."""
        if not path.is_dir() or path.is_symlink():
            return
        for child in path.iterdir():
            if SHARD_FILE_PATTERN.fullmatch(child.name) and self._file_type_problem(child) is None:
                child.unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            log.warning("retention: %s holds files a snapshot never writes: left in place", path)

    def _retain(self, entries: list[dict]) -> tuple[list[dict], list[dict]]:
        """Keep the newest `keep_last` versions, every milestone and the `keep_best` best ones."""
        older = entries[: max(len(entries) - self.keep_last, 0)]
        best = {e["file"] for e in self._best(entries)[: self.keep_best]}
        drop = {e["file"] for e in older if not e.get("milestone") and e["file"] not in best}
        kept = [
            dict(e, best=True) if e["file"] in best else {k: v for k, v in e.items() if k != "best"}
            for e in entries
            if e["file"] not in drop
        ]
        return kept, [e for e in entries if e["file"] in drop]

    def _best(self, entries: list[dict]) -> list[dict]:
        """Entries with a monitored value, best first (ties: the earlier step)."""
        scored = [
            e
            for e in entries
            if isinstance(e.get("monitor"), dict) and math.isfinite(e["monitor"].get("value", math.nan))
        ]
        sign = -1 if self.mode == "max" else 1
        return sorted(scored, key=lambda e: (sign * e["monitor"]["value"], e["step"]))

    def best_entry(self) -> Optional[dict[str, Any]]:
        """The version the manifest names as best (by `snapshot.monitor`), if any is listed and valid."""
        manifest = self.read_manifest()
        name = manifest.get("best")
        return next((e for e in self._checked_entries(manifest)[0] if e["file"] == name), None)

    def remove_stale_temporaries(self) -> None:
        """Delete half-written files left by a writer that was killed."""
        if self.dir.is_dir():
            for tmp in self.dir.glob(".*.tmp-*"):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)
            for tmp in [*self.dir.glob(".step-*.tmp-*"), *self.dir.glob(".step-*.old-*")]:
                if tmp.is_dir() and not tmp.is_symlink():  # a sharded version that never became one
                    shutil.rmtree(tmp, ignore_errors=True)

    # ---- reading --------------------------------------------------------------------------
    def verify(self, entry: dict[str, Any]) -> bytes:
        """The file's bytes if they match the manifest entry; SnapshotError saying why otherwise.

        The entry is checked against the schema first, since callers may pass any dict, and the
        file is opened only if it is a regular file directly in this directory."""
        problem = entry_problem(entry)
        if problem is not None:
            raise SnapshotError(f"manifest entry ({describe(entry)}) in {self.dir} is invalid: {problem}")
        if _is_sharded(entry):
            return self._verify_folder(entry)
        path = self.dir / entry["file"]
        data = self._read_regular_file(path, entry["size"])
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SnapshotError(f"{path} does not match its sha256 (corrupted)")
        return data

    def _verify_folder(self, entry: dict[str, Any]) -> bytes:
        """Every file of a sharded version matches its size and sha256 (a torn or missing shard of
        any rank makes the whole version invalid); returns loop.pt's bytes."""
        folder = self.dir / entry["file"]
        problem = self._entry_type_problem(entry)
        if problem is None and not folder.is_dir():
            problem = f"{folder} is missing"
        if problem is not None:
            raise SnapshotError(problem)
        loop_bytes = b""
        for item in entry["files"]:
            path = folder / item["name"]
            if item["name"] == LOOP_FILE:
                loop_bytes = self._read_regular_file(path, item["size"])
                sha256 = hashlib.sha256(loop_bytes).hexdigest()
            else:
                sha256 = self._hash_regular_file(path, item["size"])
            if sha256 != item["sha256"]:
                raise SnapshotError(f"{path} does not match its sha256 (corrupted)")
        return loop_bytes

    def _verify_loop_file(self, entry: dict[str, Any]) -> bytes:
        problem = entry_problem(entry)
        if problem is not None:
            raise SnapshotError(f"manifest entry ({describe(entry)}) in {self.dir} is invalid: {problem}")
        item = next(f for f in entry["files"] if f["name"] == LOOP_FILE)
        path = self.dir / entry["file"] / LOOP_FILE
        data = self._read_regular_file(path, item["size"])
        if hashlib.sha256(data).hexdigest() != item["sha256"]:
            raise SnapshotError(f"{path} does not match its sha256 (corrupted)")
        return data

    def _hash_regular_file(self, path: Path, size: int) -> str:
        """sha256 of a regular file of exactly `size` bytes, read in chunks (shards can be large);
        not read again in this process while the file is unchanged (same inode, size, mtime)."""
        fd = self._open_regular(path)
        digest, seen = hashlib.sha256(), 0
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            self._check_size(path, st, size)
            known = _HASHED.get(_identity(st))
            if known is not None:
                return known
            while chunk := f.read(16 * 2**20):
                digest.update(chunk)
                seen += len(chunk)
            unchanged = _identity(os.fstat(f.fileno())) == _identity(st)
        if seen != size:
            raise SnapshotError(f"{path} has {seen} bytes, the manifest says {size} (truncated or torn)")
        if unchanged:  # not written to while it was read
            _HASHED[_identity(st)] = digest.hexdigest()
        return digest.hexdigest()

    def _read_regular_file(self, path: Path, size: int) -> bytes:
        """Its bytes, refusing links and special files, and never reading far past `size`."""
        fd = self._open_regular(path)
        with os.fdopen(fd, "rb") as f:
            self._check_size(path, os.fstat(f.fileno()), size)
            data = f.read(size + 1)
        if len(data) != size:
            raise SnapshotError(f"{path} has {len(data)} bytes, the manifest says {size} (truncated or torn)")
        return data

    def _open_regular(self, path: Path) -> int:
        problem = self._file_type_problem(path)
        if problem is not None:
            raise SnapshotError(problem)
        try:
            return os.open(path, _OPEN_FLAGS)  # O_NOFOLLOW: a link swapped in after the lstat is refused too
        except FileNotFoundError:
            raise SnapshotError(f"{path} is missing") from None
        except OSError as err:
            raise SnapshotError(f"{path} cannot be opened ({err.strerror or err})") from None

    @staticmethod
    def _check_size(path: Path, st: os.stat_result, size: int) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{path} is not a regular file")
        if st.st_size != size:
            raise SnapshotError(f"{path} has {st.st_size} bytes, the manifest says {size} (truncated or torn)")

    def load_entry(self, entry: dict[str, Any], verified: bool = False) -> dict[str, Any]:
        """A verified version's state. For a sharded version: the loop state, with SHARDED_KEY naming
        the folder the model and optimizer are read from (by every rank, or by `sharded.full_model`).
        `verified`: another process (the lead) has just verified the shards of this sharded
        version; only loop.pt is checked here."""
        data = self._verify_loop_file(entry) if verified and _is_sharded(entry) else self.verify(entry)
        if not _is_sharded(entry):
            return load_bytes(data, self.dir / entry["file"])
        folder = self.dir / entry["file"]
        state = load_bytes(data, folder / LOOP_FILE)
        state[SHARDED_KEY] = ShardedVersion(folder, {f["name"]: (f["size"], f["sha256"]) for f in entry["files"]})
        return state

    def load_latest(self) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
        """(entry, state) of the newest valid version; None when there is none at all.

        Invalid versions (and entries that break the schema) are skipped with a warning; if every
        version is invalid, SnapshotError lists them all rather than letting training start over
        silently.
        """
        entries, problems = self._checked_entries(self.read_manifest())
        for entry in reversed(entries):
            try:
                state = self.load_entry(entry)
            except SnapshotError as err:
                log.warning("skipping snapshot %s: %s", entry["file"], err)
                problems.append(str(err))
                continue
            return entry, state
        if problems:
            raise SnapshotError("no snapshot in %s is valid: %s" % (self.dir, "; ".join(problems)))
        return None

    def newest_valid_entry(self) -> tuple[Optional[dict[str, Any]], list[str]]:
        """The newest entry whose bytes verify (without unpickling) and the problems met on the way."""
        return self._newest_entry(self.verify)

    def newest_loadable_entry(self) -> tuple[Optional[dict[str, Any]], list[str]]:
        """The newest entry whose bytes verify and load as a runner snapshot, and the problems met.

        What "this run is already complete" must rest on: bytes that merely match the manifest
        may be anything (a plain tensor, a file of another program), so they are unpickled
        (safely) too."""
        return self._newest_entry(self.load_entry)

    def _newest_entry(self, check) -> tuple[Optional[dict[str, Any]], list[str]]:
        entries, problems = self._checked_entries(self.read_manifest())
        for entry in reversed(entries):
            try:
                check(entry)
            except SnapshotError as err:
                problems.append(str(err))
                continue
            return entry, problems
        return None, problems


def load_path(path: Path | str) -> dict[str, Any]:
    """Load a snapshot named by the user; verified against its manifest when one lies beside it."""
    path = Path(path)
    manager = SnapshotManager(path.parent)
    for entry in manager.entries() if manager.manifest_path.exists() else []:
        if entry["file"] == path.name:
            return manager.load_entry(entry)
    if path.is_dir():  # a sharded version: its files can only be trusted through their manifest entry
        raise SnapshotError(
            f"{path} is a folder not (validly) listed in {manager.manifest_path}: a sharded snapshot "
            "is loaded only through its manifest entry"
        )
    log.warning("%s is not (validly) listed in a manifest; loading it without a checksum", path)
    return load_bytes(path.read_bytes(), path)
