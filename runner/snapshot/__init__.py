"""Snapshots: the format (format.py), the versioned directory and its manifest (manager.py), and
the writer that keeps the training loop's wait short (writer.py)."""

from runner.snapshot.format import FORMAT_KEY, FORMAT_VERSION, SHARDED_KEY, SnapshotError, load_bytes, make_state
from runner.snapshot.manager import MANIFEST, SnapshotManager, load_path, snapshot_name
from runner.snapshot.writer import NullWriter, SnapshotWriter

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "MANIFEST",
    "NullWriter",
    "SHARDED_KEY",
    "SnapshotError",
    "SnapshotManager",
    "SnapshotWriter",
    "load_bytes",
    "load_path",
    "make_state",
    "snapshot_name",
]
