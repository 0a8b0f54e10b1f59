"""Typed manifest entries: one `Version` per listed snapshot, built only from entries that pass
the schema (manifest.py).

Everything that decides about versions (retention, verification, the newest loadable version,
deletion) works on these instead of raw JSON objects, so a field is spelled in one place. The
manifest on disk keeps its schema: `as_dict()` gives back exactly the JSON object a version is
listed as (unknown fields of a newer writer included), and a `Version` also reads like that
object (`version["step"]`, `version.get("file")`), for the reports that show it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from runner.snapshot.format import SnapshotError
from runner.snapshot.manifest import describe, entry_problem

FILE_KIND = "file"  # one file, snapshot-<step>.pt
SHARDED_KIND = "dcp"  # a folder step-<step>/ of DCP shards and loop.pt
LOOP_FILE = "loop.pt"  # a sharded version's loop state (position, RNG, metrics, schedules), written by the lead

_KNOWN = (
    "file",
    "kind",
    "step",
    "epoch",
    "size",
    "sha256",
    "files",
    "created",
    "milestone",
    "commit_seconds",
    "monitor",
    "ended",
    "best",
    "object",
)


@dataclass(frozen=True)
class StoredFile:
    """One file of a version as the store holds it: its name, size and sha256 (and, for shards, one
    sha256 per block of `block_size` bytes, so a reader verifies just the blocks it reads)."""

    name: str
    size: int
    sha256: str
    object: Optional[str] = None  # in an object store: the name it was uploaded under (unique per writer)
    block_size: int = 0  # 0: no block digests (manifests written before them); the file is checked whole
    blocks: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size, "sha256": self.sha256}
        if self.block_size:
            out.update(block_size=self.block_size, blocks=list(self.blocks))
        if self.object is not None:
            out["object"] = self.object
        return out

    @classmethod
    def from_dict(cls, item: dict[str, Any]) -> StoredFile:
        """An item of a sharded version's `files` (checked by the schema first)."""
        return cls(
            item["name"],
            item["size"],
            item["sha256"],
            item.get("object"),
            item.get("block_size", 0),
            tuple(item.get("blocks") or ()),
        )


@dataclass(frozen=True)
class Monitored:
    """The validation metric a version was saved with: what `keep_best` ranks versions by."""

    name: str
    value: float


@dataclass(frozen=True, eq=False)
class Version(Mapping):
    """One complete version listed in the manifest."""

    file: str  # the file (kind "file") or folder (kind "dcp") inside the snapshot directory
    step: int
    epoch: int
    size: int  # bytes in all
    sha256: str  # of the file; of the sorted list of files for a sharded version
    kind: str = FILE_KIND
    files: tuple[StoredFile, ...] = ()  # a sharded version's files, each with its own digest
    created: Optional[str] = None
    milestone: Optional[bool] = None
    commit_seconds: Optional[float] = None
    monitor: Optional[Monitored] = None
    ended: Optional[str] = None  # training ended here for good (early stop)
    best: Optional[bool] = None  # kept by keep_best
    object: Optional[str] = None  # in an object store: the object holding the file (store-checked)
    extra: dict = field(default_factory=dict)  # fields this version of the runner does not know, kept as they are

    @property
    def sharded(self) -> bool:
        return self.kind == SHARDED_KIND

    @property
    def loop_file(self) -> StoredFile:
        """A sharded version's loop.pt: the one file every rank reads whole."""
        return next(f for f in self.files if f.name == LOOP_FILE)

    @classmethod
    def from_entry(cls, entry: Any, where: str = "") -> Version:
        """The version an entry lists; SnapshotError when it breaks the schema (`where`: e.g. " in <folder>",
        for the message)."""
        if isinstance(entry, Version):
            return entry
        problem = entry_problem(entry)
        if problem is not None:
            raise SnapshotError(f"manifest entry ({describe(entry)}){where} is invalid: {problem}")
        monitor = entry.get("monitor")
        return cls(
            file=entry["file"],
            step=entry["step"],
            epoch=entry["epoch"],
            size=entry["size"],
            sha256=entry["sha256"],
            kind=entry.get("kind", FILE_KIND),
            files=tuple(StoredFile.from_dict(f) for f in entry.get("files") or ()),
            created=entry.get("created"),
            milestone=entry.get("milestone"),
            commit_seconds=entry.get("commit_seconds"),
            monitor=None if monitor is None else Monitored(monitor["name"], float(monitor["value"])),
            ended=entry.get("ended"),
            best=entry.get("best"),
            object=entry.get("object"),
            extra={k: v for k, v in entry.items() if k not in _KNOWN},
        )

    def as_dict(self) -> dict[str, Any]:
        """The manifest's JSON object for this version."""
        out: dict[str, Any] = {"file": self.file}
        if self.kind != FILE_KIND:
            out["kind"] = self.kind
        out.update(step=self.step, epoch=self.epoch, size=self.size, sha256=self.sha256)
        if self.files:
            out["files"] = [f.as_dict() for f in self.files]
        optional = {
            "created": self.created,
            "milestone": self.milestone,
            "commit_seconds": self.commit_seconds,
            "monitor": None if self.monitor is None else {"name": self.monitor.name, "value": self.monitor.value},
            "ended": self.ended,
            "best": self.best,
            "object": self.object,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        out.update(self.extra)
        return out

    def replace(self, **changes: Any) -> Version:
        return dataclasses.replace(self, **changes)

    # A version reads like its JSON object (reports, summaries and tests index it so).
    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __hash__(self) -> int:
        return hash((self.file, self.step, self.sha256))
