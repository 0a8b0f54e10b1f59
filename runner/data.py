"""Datasets held as tensors, so that a batch is one indexing operation, not a Python loop, and
`Splits`, the shape of a dataset that comes with its own validation and test splits.

Both datasets are `TensorDataset`s: any dataset with a `.tensors` attribute takes the fast path
in the trainer; any other map-style `torch.utils.data.Dataset` goes through a DataLoader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

SEED_TASK_WEIGHTS = (-2.0, 3.4)  # the seed script's true_w for input_dim=2


class RegressionDataset(TensorDataset):
    """y = X w + b + noise, with X ~ N(0, 1) and noise ~ N(0, noise^2).

    The data is generated from `seed` alone, so every worker builds the same tensors. `true_w` and
    `true_b` are kept so tests and users can check what training recovered.
    """

    def __init__(
        self,
        size: int = 2048,
        input_dim: int = 2,
        output_dim: int = 1,
        noise: float = 0.01,
        true_w: Optional[Sequence[float]] = None,
        true_b: float = 4.2,
        seed: int = 1234,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        if true_w is None:
            if input_dim == len(SEED_TASK_WEIGHTS) and output_dim == 1:
                true_w = SEED_TASK_WEIGHTS
            else:
                true_w = torch.randn(input_dim * output_dim, generator=gen).tolist()
        w = torch.tensor(list(true_w), dtype=torch.float32).view(input_dim, output_dim)
        x = torch.randn(size, input_dim, generator=gen)
        y = x @ w + true_b + noise * torch.randn(size, output_dim, generator=gen)
        super().__init__(x, y)
        self.true_w, self.true_b, self.noise = w, float(true_b), float(noise)


class RandomDataset(TensorDataset):
    """Uniform random inputs and targets: nothing to learn, a pure throughput workload."""

    def __init__(self, size: int = 2048, input_dim: int = 20, output_dim: int = 1, seed: int = 1234) -> None:
        gen = torch.Generator().manual_seed(seed)
        super().__init__(torch.rand(size, input_dim, generator=gen), torch.rand(size, output_dim, generator=gen))


@dataclass
class Splits:
    """Datasets for training, validation and (optionally) a final test, given as one `dataset`.

    Return one from the `dataset` group's `_target_` when the data comes split already; a single
    dataset is split by `data.val_fraction` instead."""

    train: Dataset
    val: Optional[Dataset] = None
    test: Optional[Dataset] = None


def split_off(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Optional[Dataset]]:
    """(train, val): `fraction` of the samples, drawn by a permutation from `seed` alone, go to val.

    Tensor datasets stay tensor datasets (the fast path); others become `Subset`s."""
    n = len(dataset)
    k = int(round(n * fraction))
    if k <= 0:
        return dataset, None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:k].sort().values, order[k:].sort().values
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return TensorDataset(*(t[train_idx] for t in tensors)), TensorDataset(*(t[val_idx] for t in tensors))
    return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())
