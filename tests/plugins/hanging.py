"""A model for tests: a Linear layer whose forward pass hangs from its `hang_at`-th call on."""

from __future__ import annotations

import time

import torch


class HangingLinear(torch.nn.Linear):
    def __init__(self, in_features: int, out_features: int, hang_at: int = 0) -> None:
        super().__init__(in_features, out_features)
        self.hang_at, self.calls = hang_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.hang_at and self.calls >= self.hang_at:
            time.sleep(3600)  # a signal handler runs, then the sleep goes on: a worker that never reaches a step boundary
        return super().forward(x)
