"""Which snapshots a tool reads (`runner.export`, `runner.load_model`, `runner.sample`,
`trainer.init_from`): a run directory, whose config.yaml names its `snapshot.dir` (a folder inside
it or a URL), or the URL of a run's snapshots itself (`s3://bucket/prefix`, `file:///abs/path`).

A URL needs no run directory: the manifest records the resolved config of the run that wrote it,
so the model can be built on a machine that never saw the run (a serving machine reading the
bucket a preemptible training machine wrote).
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf

from runner.errors import UserError
from runner.snapshot.format import SnapshotError
from runner.snapshot.location import BACKENDS, is_url, open_store, scheme, url_problem
from runner.snapshot.manager import SnapshotManager

URL_ALLOWED = "s3://bucket/prefix, gs://..., az://... or file:///abs/path: the snapshot.dir a run wrote to"


@dataclass
class RunSnapshots:
    """The versions a tool reads, and where they came from."""

    manager: SnapshotManager
    where: str  # the folder or URL of the versions, for messages
    run_dir: Optional[Path]  # None when the source is a URL

    def path_of(self, file: str) -> str:
        return f"{self.where.rstrip('/')}/{file}"


def is_snapshot_url(source: Union[str, Path]) -> bool:
    return isinstance(source, str) and is_url(source)


def run_snapshots(run_dir: Path, cfg: Optional[DictConfig]) -> RunSnapshots:
    """The versions of the run in `run_dir`, wherever its `snapshot.dir` keeps them."""
    snapshot_dir = "snapshots"
    if cfg is not None:
        snapshot_dir = str(OmegaConf.select(cfg, "snapshot.dir", default="snapshots") or "snapshots")
    if is_url(snapshot_dir):
        return url_snapshots(snapshot_dir, key="snapshot.dir", staging=run_dir)
    store = open_store(snapshot_dir, run_dir)
    return RunSnapshots(SnapshotManager(None, store=store), str(store.location), run_dir)


def url_snapshots(url: str, key: str = "run_dir", staging: Optional[Path] = None) -> RunSnapshots:
    """The versions at `url`; UserError (naming `key`) for a URL that cannot hold them or a backend
    that is not installed. `staging`: a local folder for what a read needs on disk."""
    problem = url_problem(url)
    if problem is not None:
        raise UserError(key, url, problem, URL_ALLOWED, "e.g. s3://my-bucket/runs/exp1")
    kind = scheme(url)
    if kind != "file":
        package, extra = BACKENDS[kind]
        if importlib.util.find_spec(package) is None:
            raise UserError(
                key,
                url,
                f"{kind}:// URLs are read through the {package} package (fsspec), which is not installed",
                URL_ALLOWED,
                f"pip install {package} (or pip install 'hydra-torch-runner[{extra}]')",
            )
    base = staging if staging is not None else Path(tempfile.gettempdir()) / "runner-snapshot-reads"
    store = open_store(url, base)
    return RunSnapshots(SnapshotManager(None, store=store), store.where(), None)


def stored_model_config(snapshots: RunSnapshots, key: str) -> dict[str, Any]:
    """The `model:` node of the config the manifest at a URL records (the run that wrote it)."""
    try:
        config = snapshots.manager.stored_config()
    except SnapshotError as err:
        raise UserError(
            key,
            snapshots.where,
            f"its manifest cannot be read: {err}",
            URL_ALLOWED,
            "check the URL and the credentials (AWS_* variables or a profile)",
        ) from None
    except Exception as err:  # network, permissions: the store's own words
        raise UserError(
            key,
            snapshots.where,
            f"cannot be read ({type(err).__name__}: {err})",
            URL_ALLOWED,
            "check the URL, the endpoint (AWS_ENDPOINT_URL) and the credentials",
        ) from None
    if config is None:
        published = snapshots.manager.published()
        raise UserError(
            key,
            snapshots.where,
            "lists no snapshot with its run's config" if published else "holds no manifest.json: no run wrote here",
            URL_ALLOWED,
            "pass the snapshot.dir URL a training run wrote to",
        )
    model = config.get("model")
    if not isinstance(model, dict) or not model.get("_target_"):
        raise UserError(
            "model",
            model,
            f"the config recorded in {snapshots.where} has no model: node with a _target_",
            "snapshots a training run of the runner wrote",
            "pass the snapshot.dir URL a training run wrote to",
        )
    return model
