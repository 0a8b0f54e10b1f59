"""Where a run keeps its snapshots: a folder inside the run directory, or a URL (`snapshot.dir`).

`snapshot.dir=snapshots` (the default) keeps versions in the run directory. A URL keeps them in an
object store (`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`) or any local
folder (`file:///abs/path`), while the run directory stays on this machine (config, logs,
metrics): a fresh machine with an empty outputs/ resumes from the URL by running the same command.
Every module that opens a run's snapshots goes through `snapshot_manager`, so the driver's checks,
the workers and the reports see one store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from runner.snapshot.manager import SnapshotManager
from runner.snapshot.store import LocalStore, SnapshotStore

# URL scheme -> (fsspec backend package, pip extra that installs it)
BACKENDS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure")}
CONDITIONAL = {"s3", "gs", "gcs", "az"}  # schemes whose manifest is published with a conditional write (conditional.py)
CACHE_DIR = ".snapshot-staging"  # inside the run directory: versions written here before they are uploaded
LOCAL_COPIES = "snapshot-cache"  # inside the run directory, snapshot.upload=async: versions kept until uploaded


def is_url(snapshot_dir: Any) -> bool:
    return "://" in str(snapshot_dir)


def scheme(snapshot_dir: str) -> str:
    return urlsplit(str(snapshot_dir)).scheme.lower()


def url_problem(url: str) -> Optional[str]:
    """Why `url` cannot hold snapshots, or None (the config alone: no package imported, no network)."""
    parts = urlsplit(url)
    kind = parts.scheme.lower()
    if kind != "file" and kind not in BACKENDS:
        return f"the scheme {kind!r} is not one of s3://, gs://, az://, file://"
    if parts.username or parts.password or "@" in parts.netloc:
        return "holds credentials; they come from the environment or a profile, never from the config"
    if parts.query or parts.fragment:
        return "must not carry a query or a fragment"
    if kind == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return "a file:// URL names an absolute path: file:///abs/path"
        return None
    if not parts.netloc:
        return f"names no bucket: {kind}://<bucket>/<prefix>"
    if any(p in (".", "..") for p in parts.path.split("/")):
        return "must not hold '.' or '..' segments"
    return None


def open_store(snapshot_dir: str, run_dir: Path) -> SnapshotStore:
    """The store `snapshot.dir` names (its URL checked before launch: see driver/checks/store.py)."""
    text = str(snapshot_dir)
    if not is_url(text):
        return LocalStore(run_dir / text)
    if scheme(text) == "file":
        return LocalStore(Path(urlsplit(text).path))
    from runner.snapshot.object_store import ObjectStore

    return ObjectStore(text, run_dir / CACHE_DIR)


def uploads_in_background(cfg: Any) -> bool:
    """`snapshot.upload` decided: async (`auto`'s choice for file snapshots) applies to object stores
    only; sharded versions upload synchronously for now."""
    from runner.config import SnapshotFormat, UploadMode, snapshot_format

    text = str(cfg.snapshot.dir)
    if not is_url(text) or scheme(text) not in CONDITIONAL:
        return False
    mode = str(cfg.snapshot.get("upload", UploadMode.auto))
    if mode == UploadMode.auto:
        return snapshot_format(cfg) == SnapshotFormat.file
    return mode == UploadMode.async_


def snapshot_manager(cfg: Any, run_dir: Path) -> SnapshotManager:
    """The run's catalogue of versions in the store `snapshot.dir` names (with background uploads:
    the local cache and the store, read as one)."""
    snapshot = cfg.snapshot
    manager = SnapshotManager(
        None,
        snapshot.keep_last,
        snapshot.milestone_every,
        keep_best=snapshot.keep_best if snapshot.monitor else 0,
        mode=str(snapshot.mode),
        store=open_store(str(snapshot.dir), Path(run_dir)),
    )
    if uploads_in_background(cfg):
        from runner.snapshot.cached import CachedManager

        return CachedManager(Path(run_dir) / LOCAL_COPIES, manager)
    return manager


def shown(cfg: Any, run_dir: Path) -> str:
    """Where the snapshots are, for messages."""
    text = str(cfg.snapshot.dir)
    return text if is_url(text) else str(run_dir / text)
