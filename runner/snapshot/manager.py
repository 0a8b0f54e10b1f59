from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from runner.fileio import atomic_write
from runner.snapshot.format import FORMAT_VERSION, SnapshotError, load_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:09d}.pt"


def _sha256_of_file(path: Path, chunk: int = 16 * 2**20) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


class SnapshotManager:
    def __init__(self, directory: Path | str, keep_last: int = 3, milestone_every: int = 0) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.milestone_every = milestone_every

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
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
        return sorted(self.read_manifest()["snapshots"], key=lambda e: e["step"])

    def stored_config(self) -> Optional[dict]:
        return self.read_manifest().get("config")

    def save(self, state: dict[str, Any], step: int, epoch: int, config: Optional[dict] = None,
             end_of_epoch: bool = False) -> dict[str, Any]:
        return self.commit(self.write(state, step), step, epoch, config, end_of_epoch)

    def write(self, state: dict[str, Any], step: int) -> Path:
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
        started = time.perf_counter()
        name = snapshot_name(step)
        try:
            sha256, size = _sha256_of_file(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
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
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1))
        for old in dropped:
            (self.dir / old["file"]).unlink(missing_ok=True)
        return entry

    def _retain(self, entries: list[dict]) -> tuple[list[dict], list[dict]]:
        older = entries[: max(len(entries) - self.keep_last, 0)]
        drop = {e["file"] for e in older if not e.get("milestone")}
        return [e for e in entries if e["file"] not in drop], [e for e in entries if e["file"] in drop]

    def remove_stale_temporaries(self) -> None:
        if self.dir.is_dir():
            for tmp in self.dir.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    def verify(self, entry: dict[str, Any]) -> bytes:
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
        problems = []
        for entry in reversed(self.entries()):
            try:
                self.verify(entry)
            except SnapshotError as err:
                problems.append(str(err))
                continue
            return entry, problems
        return None, problems

    # stand-in so the new tests run against the old code: verify only, as the old code would have
    newest_loadable_entry = newest_valid_entry


def load_path(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    manager = SnapshotManager(path.parent)
    for entry in manager.entries() if manager.manifest_path.exists() else []:
        if entry["file"] == path.name:
            return manager.load_entry(entry)
    log.warning("%s is not listed in a manifest; loading it without a checksum", path)
    return load_bytes(path.read_bytes(), path)
