"""A DistributedSampler that can start in the middle of an epoch.

The global order of an epoch is the padded permutation that `DistributedSampler` would use; rank
r takes positions r, r+W, r+2W, ... of it. After k steps of batch b on W ranks, exactly the first
k*b*W positions have been consumed, whatever the rank. Resuming therefore only needs the number
of samples consumed (`start`): the rest of the epoch is the same sequence, so a resumed run sees
every sample once, none twice, and (with the same world size) in the same batches as a run that
was never interrupted. With a different world size the remainder is re-split over the new ranks.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data.distributed import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of the epoch's global order (samples already trained on)."""
        self.start = int(start)

    def epoch_length(self) -> int:
        """Samples in one full epoch's global order (the dataset padded to a multiple of the world size)."""
        return math.ceil(len(self.dataset) / self.num_replicas) * self.num_replicas

    def local_indices(self) -> torch.Tensor:
        """This rank's remaining indices for the current epoch, as one tensor."""
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        order = _pad_to_multiple(order, self.num_replicas)[self.start :]
        order = _pad_to_multiple(order, self.num_replicas)
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.local_indices().tolist())

    def __len__(self) -> int:
        remaining = max(self.epoch_length() - self.start, 0)
        return math.ceil(remaining / self.num_replicas)


def _pad_to_multiple(order: torch.Tensor, multiple: int) -> torch.Tensor:
    """Repeat the head of `order` so its length divides evenly (what DistributedSampler does)."""
    if len(order) == 0:
        return order
    padding = (-len(order)) % multiple
    if padding:
        reps = math.ceil(padding / len(order))
        order = torch.cat([order, order.repeat(reps)[:padding]])
    return order
