"""`ShardedStream`: an iterable dataset over shard files that knows where it stands.

The state protocol is torchdata's `Stateful` convention: `state_dict()` says where the reader is
(its remaining pieces of the epoch, the samples of the current record already given, a packer's
unfinished tokens), `load_state_dict()` puts a fresh copy there. The runner reads it through
torchdata's `StatefulDataLoader`, which asks every loader worker for its dataset's state with each
batch, so a snapshot holds each rank's and each worker's position (runner.train.streams).

A source says what its shards are and how a shard reads (`files`, `read`); this class splits the
shards over ranks x loader workers (runner.streams.plan), turns records into samples (`samples`),
or packs their tokens into fixed windows (`pack=True`), and seeds Python's, NumPy's and torch's
RNG from (seed, epoch, shard, record, sample) before `transform`, so random augmentation is the
same whichever worker reads a sample and whenever.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from runner.streams.plan import slot_pieces


def record_seed(seed: int, epoch: int, shard: int, record: int, within: int) -> int:
    return (((seed * 1_000_003 + epoch + 1) * 10_000_019 + shard) * 1_000_033 + record) * 1_009 + within


class ShardedStream(IterableDataset):
    """Subclasses set `self.paths` (sorted shard files) and implement `read` (and `samples`)."""

    paths: list[str] = []

    def __init__(self, pack: bool = False, seq_len: Optional[int] = None, eot: int = 0) -> None:
        self.pack, self.seq_len, self.eot = bool(pack), None if seq_len is None else int(seq_len), int(eot)
        self.rank, self.world_size, self.seed, self.shuffle, self.epoch = 0, 1, 0, False, 0
        self.redealt: Optional[list[dict[str, Any]]] = None  # remaining work per slot after a re-shard
        self._loaded: Optional[dict[str, Any]] = None
        self._state: dict[str, Any] = {"epoch": 0, "pieces": None, "carry": [], "current": None, "within": 0}

    # ---- what the runner sets before each epoch ----------------------------------------------
    def configure(self, rank: int, world_size: int, seed: int, shuffle: bool) -> None:
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, int(seed), bool(shuffle)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ---- what a source implements --------------------------------------------------------------
    def read(self, shard: int, start: int, step: int, offset: int) -> Iterator[tuple[int, Any]]:
        """Records start, start+step, ... of shard `shard`, each as (offset of the next one or 0, record)."""
        raise NotImplementedError

    def samples(self, record: Any) -> Iterator[Any]:
        """The samples one record gives (one by default; windows of tokens for text sources)."""
        yield record

    def tokens(self, record: Any) -> list[int]:
        """A record's token ids (text sources, for packing)."""
        raise NotImplementedError

    def transform(self, sample: Any) -> Any:
        """Per-sample work, random augmentation included (the RNGs are seeded per sample)."""
        return sample

    # ---- the state protocol ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self._state
        pieces = None if s["pieces"] is None else [list(p) for p in s["pieces"]]
        if pieces and s.get("current") is not None:  # mid-record: the head piece starts at that record again
            pieces[0] = [*s["current"], s["within"]]
        return {"epoch": s["epoch"], "pieces": pieces, "carry": list(s["carry"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state

    # ---- iteration -----------------------------------------------------------------------------
    def slot(self) -> tuple[int, int]:
        """(this reader's slot, number of slots): rank-major over ranks x loader workers."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _start(self) -> dict[str, Any]:
        """Where this reader starts: a loaded position of this epoch, its share of a re-shard, or the
        epoch's plan."""
        loaded, self._loaded = self._loaded, None
        slot, slots = self.slot()
        resumed = loaded is not None and loaded.get("pieces") is not None and loaded["epoch"] == self.epoch
        if not resumed and self.redealt is not None and len(self.redealt) == slots:
            loaded = self.redealt[slot]
        elif not resumed:
            loaded = {"pieces": slot_pieces(len(self.paths), slots, slot, self.seed, self.epoch, self.shuffle)}
        return {
            "epoch": self.epoch,
            "pieces": [list(p) for p in loaded["pieces"]],
            "carry": list(loaded.get("carry") or []),
            "current": None,
            "within": 0,
        }

    def __iter__(self) -> Iterator[Any]:
        self._state = self._start()
        return self._packed() if self.pack else self._plain()

    def _records(self) -> Iterator[tuple[list, int, Any]]:
        """(piece at the record, its samples or tokens already given, record) over the remaining
        pieces; the head piece is advanced past the record before the caller sees it, and the
        caller marks the record `current` until it is used up (see state_dict)."""
        pieces = self._state["pieces"]
        while pieces:
            shard, start, step, offset = pieces[0][:4]
            skip = pieces[0][4] if len(pieces[0]) > 4 else 0
            index = start
            for next_offset, record in self.read(shard, start, step, offset):
                current = [shard, index, step, offset]
                index += step
                pieces[0] = [shard, index, step, next_offset]
                offset = next_offset
                yield current, skip, record
                skip = 0
            pieces.pop(0)

    def _plain(self) -> Iterator[Any]:
        state = self._state
        for current, skip, record in self._records():
            state["current"] = current  # until the record's last sample
            for within, sample in enumerate(self.samples(record), 1):
                if within <= skip:
                    continue
                state["within"] = within
                yield self._seeded(sample, current[0], current[1], within)
            state["current"], state["within"] = None, 0

    def _packed(self) -> Iterator[torch.Tensor]:
        """Records' tokens (`eot` after each document) cut into windows of seq_len + 1 that share
        their edge token (the last target of one is the first input of the next), across record
        and shard boundaries. The state keeps the tokens read but not given (`carry`) and how far
        into the current record the reader is, so a resume continues mid-document."""
        state, width = self._state, int(self.seq_len) + 1
        for current, skip, record in self._records():
            state["current"] = current
            ids = self.tokens(record)
            pos = skip
            while pos < len(ids):
                take = min(width - len(state["carry"]), len(ids) - pos)
                state["carry"].extend(ids[pos : pos + take])
                pos += take
                state["within"] = pos
                if len(state["carry"]) == width:
                    window = torch.tensor(state["carry"], dtype=torch.int64)
                    state["carry"] = state["carry"][-1:]
                    if pos == len(ids):
                        state["current"], state["within"] = None, 0
                    yield window
            state["current"], state["within"] = None, 0

    def _seeded(self, sample: Any, shard: int, index: int, within: int) -> Any:
        if type(self).transform is ShardedStream.transform:
            return sample
        in_worker = get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        s = record_seed(self.seed, self.epoch, shard, index, within) % (2**63 - 1)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.default_generator.manual_seed(s)
        try:
            return self.transform(sample)
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])
