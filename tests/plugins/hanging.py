"""A model for tests: a Linear layer whose forward pass hangs from its `hang_at`-th call on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


class HangingLinear(torch.nn.Linear):
    def __init__(self, in_features: int, out_features: int, hang_at: int = 0, hang_note: str = "") -> None:
        super().__init__(in_features, out_features)
        self.hang_at, self.calls, self.hang_note = hang_at, 0, hang_note

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.hang_at and self.calls >= self.hang_at:
            if self.hang_note:  # `<hang_note>.<rank>`: a test waits for it instead of guessing how long steps take
                Path(f"{self.hang_note}.{os.environ.get('RANK', '0')}").touch()
            time.sleep(
                3600
            )  # a signal handler runs, then the sleep goes on: a worker that never reaches a step boundary
        return super().forward(x)
