"""Snapshots: a snapshot is the state of a run's stateful parts, written and read without the
training loop knowing the format.

- checkpointer.py: takes the parts (the engine's model, optimizer and schedules; the loop's
  position, RNG streams, monitor, metrics); the strategy picks the format (one file, or DCP
  shards from every rank); the explicit wait for staged copies before the optimizer step.
- manager.py: the catalogue of versions: manifest, retention (retention.py), the one walk to the
  newest version that verifies or loads, loads.
- store.py: where the bytes live, behind one interface (data first, manifest published last,
  verified reads, the hash cache); LocalStore is the local filesystem, object_store.py's
  ObjectStore an S3 bucket (uploads verified, the manifest published with a conditional write);
  location.py picks one from `snapshot.dir` (a folder name or a URL).
- versions.py / manifest.py / format.py: typed manifest entries, the manifest's on-disk schema,
  what a snapshot file holds.
- writer.py / sharded.py / dcp_reading.py / dcp_writing.py: background writers, DCP writes (each
  rank hashing its files as it writes them) and DCP reads (each block verified as it is read);
  digests.py: those per-block digests.
"""

from runner.snapshot.format import FORMAT_KEY, FORMAT_VERSION, SHARDED_KEY, SnapshotError, load_bytes, make_state
from runner.snapshot.manager import MANIFEST, SnapshotManager, load_path, snapshot_name
from runner.snapshot.store import LocalStore, SnapshotStore
from runner.snapshot.versions import Version
from runner.snapshot.writer import NullWriter, SnapshotWriter

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "LocalStore",
    "MANIFEST",
    "NullWriter",
    "SHARDED_KEY",
    "SnapshotError",
    "SnapshotManager",
    "SnapshotStore",
    "SnapshotWriter",
    "Version",
    "load_bytes",
    "load_path",
    "make_state",
    "snapshot_name",
]
