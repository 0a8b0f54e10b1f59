"""Batches for the loop: the training split in the resumable global order, and the evaluation
splits sharded over the ranks.

Two paths, chosen by `data.loader` (auto picks the first when it can):

- tensor: a dataset holding tensors (`.tensors`, e.g. TensorDataset) is moved to the device once
  and a batch is one `index_select` per tensor. No per-sample Python at all: this is why small
  models train fast.
- dataloader: a `torch.utils.data.DataLoader` with the `data.*` options (workers, pinned memory,
  prefetching, a collate function). The sampler is the resumable one, so the loader yields the
  rest of an epoch after a resume; every sample's random draws (augmentation in the workers)
  are seeded from (seed, epoch, sample index) by `SeededSamples`, so they do not depend on the
  number of loader workers, on prefetching or on where a run was interrupted.

Batches are whatever the collate function returns (tuples, dicts, masks), moved to the device
recursively.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import numpy as np
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset, Sampler

from runner.config import LoaderKind
from runner.data import Splits, split_off
from runner.train.sampler import ResumableDistributedSampler


def make_splits(dataset: Any, val_fraction: float, seed: int) -> Splits:
    """The dataset group's object as train/val/test splits."""
    if isinstance(dataset, Splits):
        return dataset
    if isinstance(dataset, Mapping) and "train" in dataset:
        return Splits(dataset["train"], dataset.get("val"), dataset.get("test"))
    if not hasattr(dataset, "__getitem__") and hasattr(dataset, "train"):
        return Splits(dataset.train, getattr(dataset, "val", None), getattr(dataset, "test", None))
    train, val = split_off(dataset, val_fraction, seed) if val_fraction > 0 else (dataset, None)
    return Splits(train, val, None)


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor of a batch (nested tuples, lists, dicts, named tuples) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def next_batch(iterator: Iterator[Any]) -> Any:
    """`next(iterator, None)` on a DataLoader's iterator, where a loader worker that died (SIGKILL, the
    OOM killer) is named as such. Its death can reach the rank first as an unrelated error (a
    connection reset while the worker handed over a tensor), which reads like a lost peer; torch's
    own check then names the worker and its signal, with the first error as its cause. An error
    the dataset raised in a worker is torch's "Caught ... in DataLoader worker process N": as it came."""
    try:
        return next(iterator, None)
    except Exception as err:
        text = str(err)
        if text.startswith("DataLoader worker") or "in DataLoader worker process" in text:
            raise
        died = dead_loader_worker(wait=1.0 if isinstance(err, (OSError, EOFError)) else 0.0)
        if died is not None:
            raise died from err
        raise


def dead_loader_worker(wait: float = 0.0) -> Optional[RuntimeError]:
    """torch's error for a loader worker of this process that was killed or exited with an error, if
    any; looked for up to `wait` seconds (a dying process closes its sockets before the kernel
    reports its exit)."""
    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

    deadline = time.monotonic() + wait
    while True:
        try:
            _error_if_any_worker_fails()
        except RuntimeError as err:
            return err
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def loader_batches(loader: DataLoader, device: torch.device, non_blocking: bool) -> Iterator[Any]:
    """`loader`'s batches on `device`, a dead loader worker named as such (`next_batch`)."""
    iterator = iter(loader)
    while (batch := next_batch(iterator)) is not None:
        yield to_device(batch, device, non_blocking)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch + 1) * 10_000_019 + index) % (2**63 - 1)


class SeededSamples(Dataset):
    """Reads sample `index` of `epoch` with Python's, NumPy's and torch's RNG seeded from (seed,
    epoch, index), so random augmentation is the same whichever process reads it and whenever.

    Indexed with (epoch, index) pairs (see `EpochSampler`): the epoch travels with the index, so
    persistent loader workers need no notice of a new epoch. In the training process itself
    (num_workers=0) the RNG states are put back afterwards, so dropout's stream is untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        s = sample_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.default_generator.manual_seed(s)  # the CPU generator only: torch.manual_seed would reseed CUDA's too
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs of a resumable sampler's remaining order."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return iter([(epoch, i) for i in self.sampler.local_indices().tolist()])

    def __len__(self) -> int:
        return len(self.sampler)


def use_tensor_path(dataset: Any, data_cfg, evaluation: bool = False) -> bool:
    """Tensor datasets are indexed directly unless loader options ask for a DataLoader. An
    evaluation split of tensors never needs loader workers (there is nothing to augment), so it
    is indexed directly whatever `num_workers` says: validation starts no processes."""
    kind = LoaderKind(str(data_cfg.loader))
    if kind == LoaderKind.tensor:
        return True
    if kind == LoaderKind.dataloader:
        return False
    return (
        getattr(dataset, "tensors", None) is not None
        and (evaluation or not data_cfg.num_workers)
        and data_cfg.collate_fn is None
    )


def collate_function(data_cfg):
    return instantiate(data_cfg.collate_fn) if data_cfg.collate_fn is not None else None


def loader_options(data_cfg, device: torch.device, seed: int) -> dict[str, Any]:
    workers = int(data_cfg.num_workers)
    pin = data_cfg.pin_memory if data_cfg.pin_memory is not None else device.type == "cuda"
    options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": bool(pin),
        "collate_fn": collate_function(data_cfg),
        "generator": torch.Generator().manual_seed(seed),
    }
    if workers:
        options["persistent_workers"] = bool(data_cfg.persistent_workers)
        if "fork" in mp.get_all_start_methods() and sys.platform == "linux":
            # The training process was started with spawn, which its children inherit: each loader
            # worker would import torch again (~3 s). Forking is torch's default on Linux and safe
            # for workers that only read samples (they never touch CUDA).
            options["multiprocessing_context"] = "fork"
        if data_cfg.prefetch_factor is not None:
            options["prefetch_factor"] = int(data_cfg.prefetch_factor)
    return options


class TrainBatches:
    """This rank's batches of the training split, epoch by epoch, from any position."""

    def __init__(
        self,
        dataset: Dataset,
        data_cfg,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        device: torch.device,
    ) -> None:
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.drop_last = bool(data_cfg.drop_last)
        self.sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed)
        self.world_size = world_size
        self.tensors: Optional[tuple[torch.Tensor, ...]] = None
        self.loader: Optional[DataLoader] = None
        if use_tensor_path(dataset, data_cfg):
            self.tensors = tuple(t.to(device) for t in dataset.tensors)
        else:
            self.non_blocking = device.type == "cuda"
            self.loader = DataLoader(
                SeededSamples(dataset, seed),
                batch_size=batch_size,
                sampler=EpochSampler(self.sampler),
                drop_last=self.drop_last,
                **loader_options(data_cfg, device, seed),
            )

    @property
    def kind(self) -> str:
        return "tensor" if self.tensors is not None else "dataloader"

    def batches_per_epoch(self, start: int = 0) -> int:
        """This rank's batches in an epoch that begins `start` samples in."""
        per_rank = math.ceil(max(self.sampler.epoch_length() - start, 0) / self.world_size)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def epoch(self, epoch: int, start: int) -> Iterator[Any]:
        """The batches of `epoch` after the first `start` samples of its global order."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start)
        if self.tensors is not None:
            return self._tensor_batches()
        return loader_batches(self.loader, self.device, self.non_blocking)

    def _tensor_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        indices = self.sampler.local_indices().to(self.device)
        for i in range(self.batches_per_epoch(self.sampler.start)):
            idx = indices[i * self.batch_size : (i + 1) * self.batch_size]
            yield tuple(t.index_select(0, idx) for t in self.tensors)


class EvalBatches:
    """One split for validation or test: rank r evaluates samples r, r+W, ... (no padding, so
    every sample counts exactly once once the ranks' sums are added up)."""

    def __init__(
        self, dataset: Dataset, data_cfg, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device
    ) -> None:
        self.device, self.batch_size = device, batch_size
        self.indices = torch.arange(rank, len(dataset), world_size)
        self.tensors: Optional[tuple[torch.Tensor, ...]] = None
        self.loader: Optional[DataLoader] = None
        if use_tensor_path(dataset, data_cfg, evaluation=True):
            self.tensors = tuple(t.to(device) for t in dataset.tensors)
            self.indices = self.indices.to(device)
        else:
            pairs = [(0, int(i)) for i in self.indices]  # a fixed "epoch": evaluation draws the same numbers every time
            self.non_blocking = device.type == "cuda"
            self.loader = DataLoader(
                SeededSamples(dataset, seed),
                batch_size=batch_size,
                sampler=pairs,
                **loader_options(data_cfg, device, seed),
            )

    def __len__(self) -> int:
        """Samples this rank evaluates."""
        return len(self.indices)

    def num_batches(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        if self.tensors is not None:
            for begin in range(0, len(self.indices), self.batch_size):
                idx = self.indices[begin : begin + self.batch_size]
                yield tuple(t.index_select(0, idx) for t in self.tensors)
        else:
            yield from loader_batches(self.loader, self.device, self.non_blocking)


class DataSource:
    """The three splits of one run, as this rank sees them."""

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, dataset: Any = None) -> None:
        trainer, data = cfg.trainer, cfg.data
        seed = int(trainer.seed)
        splits = make_splits(instantiate(cfg.dataset) if dataset is None else dataset, float(data.val_fraction), seed)
        eval_batch = int(data.eval_batch_size or trainer.batch_size)
        from runner.train.streams import StreamBatches, StreamEvalBatches, is_stream

        train = StreamBatches if is_stream(splits.train) else TrainBatches
        self.train = train(
            splits.train, data, int(trainer.batch_size), rank, world_size, seed, bool(trainer.shuffle), device
        )
        evals = lambda split: StreamEvalBatches if is_stream(split) else EvalBatches
        self.val = (
            None
            if splits.val is None
            else evals(splits.val)(splits.val, data, eval_batch, rank, world_size, seed, device)
        )
        self.test = (
            None
            if splits.test is None
            else evals(splits.test)(splits.test, data, eval_batch, rank, world_size, seed, device)
        )
