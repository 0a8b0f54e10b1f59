"""Checks of `snapshot.dir` when it is a URL: the config alone first (scheme, no credentials in it,
the fsspec backend installed), then the store itself (the
bucket exists and answers), so a wrong URL costs one clear paragraph before any worker starts
rather than a failure at the first snapshot.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import DictConfig

from runner.config import ResumeWord, SnapshotFormat, UploadMode, snapshot_format
from runner.errors import UserError
from runner.snapshot.location import BACKENDS, CONDITIONAL, is_url, scheme, url_problem

KEY = "snapshot.dir"
ALLOWED = (
    "a folder name inside the run directory, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix "
    "or file:///abs/path"
)


def check_store_config(cfg: DictConfig) -> None:
    """The URL alone: no network."""
    url = str(cfg.snapshot.dir)
    check_upload(cfg)
    if not is_url(url):
        return
    problem = url_problem(url)
    if problem is not None:
        raise UserError(KEY, url, problem, ALLOWED, "e.g. snapshot.dir=s3://my-bucket/runs/exp1")
    kind = scheme(url)
    if kind == "file":
        return
    package, extra = BACKENDS[kind]
    if importlib.util.find_spec(package) is None:
        raise UserError(
            KEY,
            url,
            f"{kind}:// URLs are read and written through the {package} package (fsspec), which is not "
            "installed in this environment",
            ALLOWED,
            f"pip install {package} (or pip install 'hydra-torch-runner[{extra}]'), then run the same command again",
        )
    if str(cfg.snapshot.resume) == ResumeWord.never:
        raise UserError(
            "snapshot.resume",
            "never",
            f"starts over by archiving the run directory's snapshots, and those in {url} are not in the run directory",
            "snapshot.resume=auto|must with a URL",
            f"point {KEY} at a new prefix to start over (the old one is left as it is)",
        )


def check_upload(cfg: DictConfig) -> None:
    """`snapshot.upload=async` needs something to upload to, and versions it can upload."""
    if str(cfg.snapshot.get("upload", UploadMode.auto)) != UploadMode.async_:
        return
    url = str(cfg.snapshot.dir)
    if not is_url(url) or scheme(url) not in CONDITIONAL:
        raise UserError(
            "snapshot.upload",
            "async",
            f"uploads versions to an object store in the background, and {KEY}={url} is a local folder: "
            "there is nothing to upload",
            "async with snapshot.dir=s3://, gs:// or az:// URLs; auto or sync otherwise",
            "drop snapshot.upload (auto), or point snapshot.dir at a bucket",
        )
    if snapshot_format(cfg) == SnapshotFormat.dcp:
        raise UserError(
            "snapshot.upload",
            "async",
            "sharded (DCP) versions are not uploaded in the background yet",
            "snapshot.upload=auto|sync with snapshot.format=dcp",
            "drop snapshot.upload (auto uploads sharded versions synchronously), or use snapshot.format=file",
        )


def check_store_reachable(cfg: DictConfig, run_dir: Path) -> None:
    """The store answers: its manifest reads, or there is none yet in a bucket that exists."""
    url = str(cfg.snapshot.dir)
    if not is_url(url) or scheme(url) == "file":
        return
    from runner.snapshot.location import open_store

    store = open_store(url, run_dir)
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    try:
        if store.read_manifest() is None:  # a manifest can be missing, the bucket cannot
            store.fs.ls(bucket)  # (only then: a run that reads its manifest needs no list permission)
    except FileNotFoundError:
        raise UserError(KEY, url, f"the bucket {bucket!r} does not exist", ALLOWED, "create it first") from None
    except Exception as err:
        raise UserError(
            KEY,
            url,
            f"the store cannot be reached ({type(err).__name__}: {err})",
            ALLOWED,
            "check the credentials (AWS_* variables or a profile; Google's application default credentials; "
            "AZURE_STORAGE_* variables) and the endpoint (AWS_ENDPOINT_URL; STORAGE_EMULATOR_HOST)",
        ) from None
