"""Batches of an iterable (streaming) training split, through torchdata's `StatefulDataLoader`.

The loader asks each worker's dataset for its `state_dict()` with every batch, so its own
`state_dict()` is the position of every loader worker of this rank; the loop gathers one per rank
into each snapshot. The loop reads one batch ahead (to know whether the epoch ends), so the
position saved is the one before the batch it holds, and a resumed run starts with that batch.

Ranks step together: before each batch every rank says whether it has one (one small all-reduce),
and the epoch ends for all when one rank's stream ends (with the sharding rule of
runner.streams.plan and shards of equal size, every rank ends together). A length is never needed:
trainer.max_steps or the stream's end ends an epoch.

A dataset without `state_dict`/`load_state_dict` still trains; a resume restarts its epoch.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from runner.train.batches import loader_batches, loader_options, next_batch, to_device

log = logging.getLogger(__name__)
# torchdata 0.11 calls a torch function that newer torch deprecates, once per loader: not the user's concern.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def stateful(dataset: Any) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def stream_loader(dataset: IterableDataset, data_cfg, batch_size: int, device: torch.device, seed: int):
    from torchdata.stateful_dataloader import StatefulDataLoader

    options = loader_options(data_cfg, device, seed)  # its own generator: workers' seeds never draw from torch's
    options["persistent_workers"] = False  # a new epoch forks workers from the dataset as configured for it
    return StatefulDataLoader(dataset, batch_size=batch_size, drop_last=bool(data_cfg.drop_last), **options)


class StreamBatches:
    """This rank's batches of an iterable training split, epoch by epoch, from a saved position."""

    kind = "stream"

    def __init__(
        self, dataset, data_cfg, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool, device
    ) -> None:
        self.dataset, self.device, self.rank, self.world_size = dataset, device, rank, world_size
        self.workers = int(data_cfg.num_workers)
        self.stateful = stateful(dataset)
        if hasattr(dataset, "configure"):
            dataset.configure(rank, world_size, seed, shuffle)
        self.loader = stream_loader(dataset, data_cfg, batch_size, device, seed)
        self.non_blocking = device.type == "cuda"
        self.agree: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # min over ranks (set by the loop)
        self._resume: Optional[dict[str, Any]] = None
        self._before_last: Optional[dict[str, Any]] = None
        self._ended = False
        self._finished_epoch: Optional[int] = None  # saved after its last batch: nothing left to read
        if not self.stateful and rank == 0:
            log.warning(
                "the training stream (%s) has no state_dict/load_state_dict: a resume restarts the epoch it "
                "stopped in, so the samples of that epoch before the snapshot are read again (snapshots, every "
                "trainer.save_every_steps steps or epoch, keep the model's progress, not the stream's position; "
                "give the dataset state_dict/load_state_dict, or use dataset=text_shards|token_shards|webdataset, "
                "to resume mid-epoch)",
                type(dataset).__name__,
            )

    def batches_per_epoch(self, start: int = 0) -> Optional[int]:
        """Unknown: a stream has no length."""
        return None

    def bind(self, collectives) -> None:
        """Ranks agree on the end of an epoch through `collectives` (several ranks only)."""
        if collectives.world_size > 1:
            self.agree = lambda have: -collectives.max_(-have)

    def epoch(self, epoch: int, start: int) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        resume, self._resume = self._resume, None
        if self._finished_epoch == epoch:
            return iter(())
        if resume is not None and resume.get("epoch") == epoch and resume.get("loader") is not None:
            self.loader.load_state_dict(resume["loader"])
        elif start and not self.stateful and self.rank == 0:
            log.warning(
                "the training stream (%s) has no state_dict/load_state_dict: its epoch %d restarts from the "
                "beginning after the resume",
                type(self.dataset).__name__,
                epoch + 1,
            )
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[Any]:
        self._ended = False
        self._epoch = epoch
        iterator = iter(self.loader)
        if hasattr(self.dataset, "redealt"):
            self.dataset.redealt = None  # the workers have their copy; the next epoch starts afresh
        while True:
            before = self.loader.state_dict() if self.stateful else None
            batch = next_batch(iterator)
            if self.agree is not None:
                have = torch.tensor([0.0 if batch is None else 1.0], dtype=torch.float64)
                if self.agree(have).item() == 0:
                    batch = None
            if batch is None:
                self._ended = True
                return
            self._before_last = before
            yield to_device(batch, self.device, self.non_blocking)

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches the loop has trained on (it holds one more, read ahead)."""
        if not self.stateful or self._ended:
            return {"epoch": getattr(self, "_epoch", 0), "loader": None, "ended": self._ended}
        return {"epoch": self._epoch, "loader": self._before_last, "workers": self.workers, "rank": self.rank}

    def load_state(self, per_rank: Optional[list[dict[str, Any]]], epoch: int) -> None:
        """This rank's saved position; on another number of ranks or loader workers the remaining
        work of every saved reader is dealt out again (runner.streams.plan), with a warning."""
        if per_rank and any(s and s.get("ended") and s.get("epoch") == epoch for s in per_rank):
            self._finished_epoch = epoch
            return
        if not per_rank or not self.stateful:
            return
        mine = [s for s in per_rank if s and s.get("loader") is not None and s.get("epoch") == epoch]
        if not mine:
            return
        same = len(per_rank) == self.world_size and all(s.get("workers") == self.workers for s in mine)
        if same:
            self._resume = per_rank[self.rank]
            return
        from runner.streams.plan import redeal

        if not hasattr(self.dataset, "redealt"):
            if self.rank == 0:
                log.warning(
                    "the training stream was saved by %d ranks, this run has %d: %s cannot re-split its "
                    "position, so epoch %d restarts",
                    len(per_rank),
                    self.world_size,
                    type(self.dataset).__name__,
                    epoch + 1,
                )
            return
        old = [reader for s in mine for reader in reader_states(self.dataset, s, len(per_rank))]
        self.dataset.redealt = redeal(old, self.world_size * max(self.workers, 1))
        if self.rank == 0:
            log.warning(
                "the training stream was saved by %d ranks x %d loader workers, this run has %d x %d: the rest "
                "of epoch %d is dealt out again (every sample once, but not in the same order: results will not "
                "be bitwise equal to an uninterrupted run)",
                len(per_rank),
                max(mine[0].get("workers") or 0, 1),
                self.world_size,
                max(self.workers, 1),
                epoch + 1,
            )


def reader_states(dataset, saved: dict[str, Any], ranks: int) -> list[dict[str, Any]]:
    """Each loader worker's dataset state in one rank's saved loader state (a fresh plan for a
    worker that had not given a batch yet)."""
    from runner.streams.plan import slot_pieces

    loader = saved["loader"]
    workers = int(saved.get("workers") or 0)
    snap = loader.get("_snapshot") or {}
    found = snap.get("_worker_snapshots") or {}
    states = []
    rank = saved.get("rank", 0)
    for w in range(max(workers, 1)):
        if workers:
            state = (found.get(f"worker_{w}") or {}).get("dataset_state")
        else:
            state = loader.get("dataset_state")
        if state is None or state.get("pieces") is None:
            slots = ranks * max(workers, 1)
            pieces = slot_pieces(
                len(dataset.paths), slots, rank * max(workers, 1) + w, dataset.seed, saved["epoch"], dataset.shuffle
            )
            state = {"pieces": pieces, "carry": []}
        states.append(state)
    return states


class StreamEvalBatches:
    """An iterable validation or test split: each rank reads its shards (the sharding rule of the
    training split), in the order of epoch 0, the same every time."""

    def __init__(self, dataset, data_cfg, batch_size: int, rank: int, world_size: int, seed: int, device) -> None:
        self.dataset, self.device = dataset, device
        if hasattr(dataset, "configure"):
            dataset.configure(rank, world_size, seed, False)
        options = loader_options(data_cfg, device, seed)
        options["persistent_workers"] = False
        self.loader = DataLoader(dataset, batch_size=batch_size, **options)
        self.non_blocking = device.type == "cuda"

    def __iter__(self) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(0)
        yield from loader_batches(self.loader, self.device, self.non_blocking)
