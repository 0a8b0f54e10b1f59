"""Versioned, atomic, verified snapshots.

Layout of a snapshot directory:

    snapshot-000000120.pt   one version per global step (zero padded so names sort)
    manifest.json           every complete version: file, step, epoch, size, sha256, time

A version counts only once its manifest entry exists, and the entry is written after the file has
been fsync'ed and renamed into place; the manifest itself is replaced atomically. A crash at any
moment therefore leaves either the old set of versions or the new one. Loads check the size and
the sha256 before unpickling, and unpickle with `weights_only=True`, so a torn, corrupted or
malicious file is reported and skipped, never loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Names of the parts of a snapshot; everything that must survive a restart lives under one of them.
FORMAT_KEY = "format_version"
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
TRAIN_STATE_KEY = "train_state"  # epoch, global step, step and samples within the epoch
SAMPLER_KEY = "sampler"
RNG_KEY = "rng"  # one entry per rank
CONFIG_KEY = "config"
TORCH_VERSION_KEY = "torch_version"
WORLD_SIZE_KEY = "world_size"
METRICS_KEY = "metrics"


def make_state(*, model: dict, optimizer: Any, scheduler: Any, train_state: dict, sampler: dict, rng: list,
               config: dict, world_size: int, metrics: list) -> dict[str, Any]:
    """A snapshot in the one format every launch mode writes (plain containers and tensors only)."""
    return {
        FORMAT_KEY: FORMAT_VERSION,
        MODEL_KEY: model,
        OPTIMIZER_KEY: optimizer,
        SCHEDULER_KEY: scheduler,
        TRAIN_STATE_KEY: train_state,
        SAMPLER_KEY: sampler,
        RNG_KEY: rng,
        CONFIG_KEY: config,
        TORCH_VERSION_KEY: str(torch.__version__),
        WORLD_SIZE_KEY: int(world_size),
        METRICS_KEY: list(metrics),
    }


class SnapshotError(Exception):
    """No snapshot could be loaded although some exist."""


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:09d}.pt"


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class SnapshotManager:
    """Writes, lists, verifies and prunes the snapshot versions of one run.

    Only one process (rank 0) writes; any process may read.
    """

    def __init__(self, directory: Path | str, keep_last: int = 3, milestone_every: int = 0) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.milestone_every = milestone_every

    # ---- manifest -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one when none was written yet."""
        try:
            text = self.manifest_path.read_text()
        except FileNotFoundError:
            return {"format_version": FORMAT_VERSION, "snapshots": []}
        try:
            manifest = json.loads(text)
            if not isinstance(manifest.get("snapshots"), list):
                raise ValueError("no 'snapshots' list")
        except ValueError as err:
            raise SnapshotError(f"{self.manifest_path} is not a valid manifest ({err})") from err
        return manifest

    def entries(self) -> list[dict[str, Any]]:
        """Complete versions, oldest first."""
        return sorted(self.read_manifest()["snapshots"], key=lambda e: e["step"])

    def stored_config(self) -> Optional[dict]:
        """The resolved config of the run that wrote the newest version."""
        return self.read_manifest().get("config")

    # ---- writing --------------------------------------------------------------------------
    def save(self, state: dict[str, Any], step: int, epoch: int, config: Optional[dict] = None,
             end_of_epoch: bool = False) -> dict[str, Any]:
        """Write one version atomically, record it in the manifest, then apply retention."""
        return self.commit(self.write(state, step), step, epoch, config, end_of_epoch)

    def write(self, state: dict[str, Any], step: int) -> Path:
        """Serialise `state` to a temporary file; it is not a version until `commit`.

        This is the only part that must read the live training state, so it is the only part a
        synchronous snapshot makes the training loop wait for."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{snapshot_name(step)}.tmp-{os.getpid()}"
        try:
            torch.save(state, str(tmp))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def commit(self, tmp: Path, step: int, epoch: int, config: Optional[dict] = None,
               end_of_epoch: bool = False) -> dict[str, Any]:
        """Hash and fsync the temporary file, rename it into place, then list it in the manifest.

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
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "milestone": bool(end_of_epoch and self.milestone_every and epoch % self.milestone_every == 0),
            "commit_seconds": round(time.perf_counter() - started, 4),
        }
        manifest = self.read_manifest()
        kept = [e for e in manifest["snapshots"] if e["step"] != entry["step"]] + [entry]
        kept.sort(key=lambda e: e["step"])
        kept, dropped = self._retain(kept)
        manifest.update(format_version=FORMAT_VERSION, snapshots=kept)
        if config is not None:
            manifest["config"] = config
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1).encode())
        for old in dropped:  # only after the manifest no longer lists them
            (self.dir / old["file"]).unlink(missing_ok=True)
        return entry

    def _retain(self, entries: list[dict]) -> tuple[list[dict], list[dict]]:
        """Keep the newest `keep_last` versions, plus every milestone."""
        older = entries[: max(len(entries) - self.keep_last, 0)]
        drop = {e["file"] for e in older if not e.get("milestone")}
        return [e for e in entries if e["file"] not in drop], [e for e in entries if e["file"] in drop]

    def remove_stale_temporaries(self) -> None:
        """Delete half-written files left by a writer that was killed."""
        if self.dir.is_dir():
            for tmp in self.dir.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    # ---- reading --------------------------------------------------------------------------
    def verify(self, entry: dict[str, Any]) -> bytes:
        """The file's bytes if they match the manifest entry; SnapshotError saying why otherwise."""
        path = self.dir / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SnapshotError(f"{path} is missing") from None
        if len(data) != entry["size"]:
            raise SnapshotError(f"{path} has {len(data)} bytes, the manifest says {entry['size']} (truncated or torn)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SnapshotError(f"{path} does not match its sha256 (corrupted)")
        return data

    def load_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        return load_bytes(self.verify(entry), self.dir / entry["file"])

    def load_latest(self) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
        """(entry, state) of the newest valid version; None when there is none at all.

        Invalid versions are skipped with a warning; if every version is invalid, SnapshotError
        lists them all rather than letting training start over silently.
        """
        problems = []
        for entry in reversed(self.entries()):
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
        problems = []
        for entry in reversed(self.entries()):
            try:
                self.verify(entry)
            except SnapshotError as err:
                problems.append(str(err))
                continue
            return entry, problems
        return None, problems


def load_bytes(data: bytes, origin: Path | str) -> dict[str, Any]:
    """Unpickle a snapshot safely: tensors and plain containers only, nothing executable."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for forbidden globals, RuntimeError for bad zips
        raise SnapshotError(f"{origin} cannot be loaded safely ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if not isinstance(state, dict) or state.get(FORMAT_KEY) != FORMAT_VERSION:
        raise SnapshotError(f"{origin} is not a runner snapshot of format {FORMAT_VERSION}")
    return state


def load_path(path: Path | str) -> dict[str, Any]:
    """Load a snapshot named by the user; verified against its manifest when one lies beside it."""
    path = Path(path)
    manager = SnapshotManager(path.parent)
    for entry in manager.entries() if manager.manifest_path.exists() else []:
        if entry["file"] == path.name:
            return manager.load_entry(entry)
    log.warning("%s is not listed in a manifest; loading it without a checksum", path)
    return load_bytes(path.read_bytes(), path)
