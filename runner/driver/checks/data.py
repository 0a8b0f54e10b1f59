"""Checks of the data: the dataset is built once in the driver and one batch made of it, the way the
workers will, so a DataLoader given as the dataset, a split too small to give every worker a
sample, a stream's bad files, or a collate function that fails are reported here, not on rank 0.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from runner.config import LaunchMode, Runtime
from runner.driver.checks.objects import build_error
from runner.errors import UserError

SPLITS = ("train", "val", "test")


def check_data(cfg: DictConfig, runtime: Runtime, choice: Optional[str] = None) -> None:
    """`runtime`: what the workers will be (their count decides the smallest validation split);
    `choice`: the dataset entry picked (for the message)."""
    from runner.train.batches import make_splits

    built = build_dataset(cfg.dataset, f"conf/dataset/{choice}.yaml" if choice else "the dataset config")
    check_stream_split(cfg, built)
    splits = make_splits(built, float(cfg.data.val_fraction), int(cfg.trainer.seed))
    check_splits(cfg.dataset, splits)
    workers = runtime.nproc_per_node if cfg.launch.mode != LaunchMode.rpc else 1
    check_val_split(cfg.data, splits, workers)
    check_monitor(cfg.snapshot.monitor, splits)
    if cfg.trainer.test and splits.test is None:
        raise UserError(
            "trainer.test",
            True,
            "the dataset has no test split",
            "a dataset returning runner.data.Splits(train, val, test)",
            "drop trainer.test=true",
        )
    check_stream(cfg, splits)
    check_first_batch(cfg, splits)


def check_stream_split(cfg: DictConfig, built: Any) -> None:
    """data.val_fraction splits samples by index, which a stream does not have."""
    from torch.utils.data import IterableDataset

    if isinstance(built, IterableDataset) and float(cfg.data.val_fraction) > 0:
        raise UserError(
            "data.val_fraction",
            cfg.data.val_fraction,
            "cannot split a streamed dataset: its samples have no index",
            "0 with a stream; validation shards of their own instead",
            "pass data.val_fraction=0 and dataset.val_files=<glob> (dataset=hf: dataset.val_split=<split>)",
        )


def check_stream(cfg: DictConfig, splits: Any) -> None:
    """A stream has no length: a scheduler that needs the run's length needs trainer.max_steps, and
    a sharded model (every forward collective) cannot evaluate a split whose length no rank knows."""
    import inspect

    from hydra.utils import get_object
    from torch.utils.data import IterableDataset

    if not isinstance(splits.train, IterableDataset):
        return
    node = cfg.get("scheduler")
    if node and node.get("_target_") and not int(cfg.trainer.max_steps) and node.get("total_steps") is None:
        try:
            takes_total = "total_steps" in inspect.signature(get_object(str(node._target_))).parameters
        except (TypeError, ValueError, ImportError):
            takes_total = False
        if takes_total:
            raise UserError(
                "trainer.max_steps",
                cfg.trainer.max_steps,
                f"is 0, and {node._target_} needs the run's length, which a streamed dataset does not know",
                "trainer.max_steps > 0 (or scheduler.total_steps) with a streamed dataset",
                "pass trainer.max_steps=<optimizer steps>",
            )
    if str(cfg.trainer.get("strategy", "ddp")) == "fsdp" and any(
        isinstance(split, IterableDataset) for split in (splits.val, splits.test)
    ):
        raise UserError(
            "trainer.strategy",
            "fsdp",
            "cannot evaluate a streamed split: every rank must run as many forwards, and a stream has no length",
            "trainer.strategy=ddp, or map-style validation and test splits",
            "pass trainer.strategy=ddp, or drop dataset.val_files",
        )


def build_dataset(node: DictConfig, where: str) -> Any:
    from torch.utils.data import DataLoader

    try:
        built = instantiate(node)
    except Exception as err:
        cause = err.__cause__ or err
        if isinstance(cause, UserError):  # a built-in source's own check (a glob, a field, a dtype)
            raise cause from None
        from omegaconf.errors import MissingMandatoryValue

        if isinstance(cause, MissingMandatoryValue) and getattr(cause, "full_key", None):
            raise UserError(
                str(cause.full_key),
                "???",
                f"must be given for {where}",
                "a value on the command line",
                f"pass {cause.full_key}=<value>",
            ) from None
        if isinstance(cause, ImportError):
            raise UserError(
                "dataset._target_",
                node._target_,
                f"needs a package that is not installed: {cause}",
                "a dataset whose packages are installed",
                str(cause).split(": ", 1)[-1],
            ) from None
        raise build_error("dataset", node, err, where) from None
    if isinstance(built, DataLoader):
        raise UserError(
            "dataset._target_",
            node._target_,
            "builds a DataLoader; the dataset group names the samples "
            "and the runner makes the loader (resumable order, one shard per worker)",
            "a map-style torch.utils.data.Dataset (__getitem__ and __len__), or runner.data.Splits(train, val, test)",
            "point dataset._target_ at the dataset and move loader options to data.* "
            "(num_workers, collate_fn, pin_memory...)",
        )
    return built


def check_splits(node: DictConfig, splits: Any) -> None:
    """Every split is map-style and not empty, or an iterable dataset (a stream)."""
    from torch.utils.data import IterableDataset

    for name in SPLITS:
        split = getattr(splits, name)
        if split is None or isinstance(split, IterableDataset):
            continue
        if not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
            raise UserError(
                "dataset._target_",
                node._target_,
                f"its {name} split is a {type(split).__name__}, not a "
                "map-style dataset: resuming mid-epoch needs samples by index",
                "a dataset with __getitem__ and __len__, or a torch.utils.data.IterableDataset",
                "wrap the data in a map-style Dataset, or an IterableDataset (runner.streams.base.ShardedStream)",
            )
        if len(split) == 0:
            raise UserError(
                "dataset", node._target_, f"its {name} split has no samples", "at least one sample per split"
            )


def check_val_split(data: DictConfig, splits: Any, workers: int) -> None:
    if splits.val is not None and hasattr(splits.val, "__len__") and len(splits.val) < workers:
        raise UserError(
            "data.val_fraction",
            data.val_fraction,
            f"leaves {len(splits.val)} validation samples for {workers} workers",
            "a validation split with at least one sample per worker",
            "raise data.val_fraction or use fewer workers",
        )


def check_monitor(monitor: Optional[str], splits: Any) -> None:
    """snapshot.monitor names a metric the runner records, on a split there is."""
    if not monitor:
        return
    if str(monitor).startswith("val/") and splits.val is None:
        raise UserError(
            "snapshot.monitor",
            monitor,
            "there is no validation split to measure it on",
            "a dataset with a val split, or data.val_fraction > 0",
            "add data.val_fraction=0.1",
        )
    if not str(monitor).startswith(("val/", "train/")):
        raise UserError(
            "snapshot.monitor",
            monitor,
            "names no metric the runner records",
            "val/<name> or train/<name>, e.g. val/loss",
            "e.g. snapshot.monitor=val/loss",
        )


def check_first_batch(cfg: DictConfig, splits: Any) -> None:
    """data.collate_fn builds something callable, and it (or torch's default) batches two samples."""
    from runner.train.batches import collate_function

    try:
        collate = collate_function(cfg.data)
    except Exception as err:
        raise build_error("data.collate_fn", cfg.data.collate_fn, err, "the command line") from None
    if collate is not None and not callable(collate):
        raise UserError(
            "data.collate_fn",
            cfg.data.collate_fn._target_,
            f"builds a {type(collate).__name__}, which cannot be called",
            "a _target_ that builds a function taking a list of samples",
            "e.g. a class whose instances are callable",
        )
    try:
        samples = first_samples(splits.train)
        (collate or torch.utils.data.default_collate)(samples)
    except Exception as err:
        text = str(err).splitlines()[0] if str(err) else ""
        key = "data.collate_fn" if collate is not None else "dataset"
        raise UserError(
            key,
            cfg.data.collate_fn._target_ if collate is not None else cfg.dataset._target_,
            f"making the first batch failed: {type(err).__name__}: {text}",
            "samples that the collate function turns into a batch",
            "fix the dataset's __getitem__ or pass data.collate_fn=<a function that batches these samples>",
        ) from None


def first_samples(train: Any) -> list:
    """Two samples, as the workers will read them (the first ones of a stream: every shard is opened
    by the workers anyway, so reading the head of the first is cheap)."""
    from itertools import islice

    from torch.utils.data import IterableDataset

    if isinstance(train, IterableDataset):
        return list(islice(iter(train), 2))
    return [train[i] for i in range(min(2, len(train)))]
