"""Handwritten digits: scikit-learn's bundled 8x8 images and a small CNN (`experiment=digits`).

The data ships with scikit-learn (1,797 images, no download): `pip install "hydra-torch-runner[examples]"`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from runner.data import Splits

INSTALL_HINT = 'the digits example needs scikit-learn: pip install "hydra-torch-runner[examples]"'


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): float32 (N, 1, 8, 8) in [0, 1] and int64 (N,).

    Read straight from the CSV that scikit-learn ships (what `load_digits` parses): importing
    scikit-learn costs ~2.5 s, in the driver's check and in every worker; reading the file, 35 ms.
    Falls back to `sklearn.datasets.load_digits` should the file ever move."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(INSTALL_HINT)
    csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = torch.as_tensor(np.loadtxt(csv, delimiter=","))
        pixels, target = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = torch.as_tensor(bunch.data), torch.as_tensor(bunch.target)
    images = pixels.to(torch.float32).div_(16.0).reshape(-1, 1, 8, 8).contiguous()
    return images, target.to(torch.int64)


class ShiftedDigits(Dataset):
    """Training images, each read shifted by up to `shift` pixels in x and y (zero padding, then a
    random 8x8 crop). The offsets come from torch's global RNG, which the runner seeds from
    (seed, epoch, index) before every read, so the augmentation is exactly reproducible.

    Deliberately without a `.tensors` attribute: that would send it down the runner's in-memory
    fast path, which indexes the tensors directly and skips `__getitem__` (and the augmentation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 1) -> None:
        self.images, self.labels, self.shift = images, labels, int(shift)
        self.padded = F.pad(images, (self.shift,) * 4) if self.shift > 0 else images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shift
        if s <= 0:
            return self.images[index], self.labels[index]
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        h, w = self.images.shape[-2:]
        return self.padded[index, :, dy : dy + h, dx : dx + w].clone(), self.labels[index]


def DigitsData(val_fraction: float = 0.15, test_fraction: float = 0.15, shift: int = 1, seed: int = 0) -> Splits:
    """Train/val/test splits of the digits, drawn by a permutation from `seed` alone.

    The training split is augmented with random shifts of up to `shift` pixels (0 = none, and then
    it is a plain TensorDataset: the runner's fast path); val and test are TensorDatasets."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and leave samples for training"
        )
    if shift < 0:
        raise ValueError(f"shift must be >= 0 pixels, got {shift}")
    images, labels = load_digits_tensors()
    n = len(labels)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val_idx, test_idx = order[:n_val].sort().values, order[n_val : n_val + n_test].sort().values
    train_idx = order[n_val + n_test :].sort().values
    train_x, train_y = images[train_idx].contiguous(), labels[train_idx]
    train = ShiftedDigits(train_x, train_y, shift) if shift > 0 else TensorDataset(train_x, train_y)
    val = TensorDataset(images[val_idx], labels[val_idx]) if n_val else None
    test = TensorDataset(images[test_idx], labels[test_idx]) if n_test else None
    return Splits(train, val, test)


class DigitsCNN(torch.nn.Module):
    """(N, 1, 8, 8) images -> (N, num_classes) logits: two 3x3 convolutions with ReLU, a 2x2 max
    pool (8x8 -> 4x4), then a hidden linear layer with dropout and the linear head."""

    def __init__(self, channels: int = 32, hidden: int = 64, num_classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, channels, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(channels, channels, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(channels * 4 * 4, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
