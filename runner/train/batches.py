"""Batches from a dataset: one `index_select` per tensor when the dataset holds tensors (the fast
path), else the items collated by torch's `default_collate`. Either way a batch is a tuple."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import default_collate


class BatchSource:
    def __init__(self, dataset, device: torch.device) -> None:
        self.dataset, self.device = dataset, device
        tensors = getattr(dataset, "tensors", None)
        self.tensors: Optional[tuple[torch.Tensor, ...]] = None if tensors is None else tuple(t.to(device) for t in tensors)

    def index_device(self) -> torch.device:
        """Where the sampler's indices should live (next to the tensors they select from)."""
        return self.device if self.tensors is not None else torch.device("cpu")

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.tensors is not None:
            return tuple(t.index_select(0, idx) for t in self.tensors)
        items = default_collate([self.dataset[i] for i in idx.tolist()])
        return tuple(x.to(self.device) for x in items)
