"""A model for tests: a Linear layer whose forward pass hangs from its `hang_at`-th call on (on every
rank, or on `hang_rank` only; on the first attempt only with `first_attempt`), or sleeps `step_s`
seconds in every training call and `slow_s` more in every `slow_every`-th one (slow steps, not a hang)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch


class HangingLinear(torch.nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        hang_at: int = 0,
        hang_note: str = "",
        hang_rank: Optional[int] = None,
        first_attempt: bool = False,
        slow_every: int = 0,
        slow_s: float = 0.0,
        step_s: float = 0.0,
    ) -> None:
        super().__init__(in_features, out_features)
        self.hang_at, self.calls, self.hang_note = hang_at, 0, hang_note
        rank = int(os.environ.get("RANK", "0"))
        self.hangs = (hang_rank is None or hang_rank == rank) and not (
            first_attempt and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
        )
        self.slow_every, self.slow_s, self.step_s = slow_every, slow_s, step_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.training and self.step_s:
            time.sleep(self.step_s)
        if self.training and self.slow_every and self.calls % self.slow_every == 0:
            time.sleep(self.slow_s)
        if self.hangs and self.hang_at and self.calls >= self.hang_at:
            if self.hang_note:  # `<hang_note>.<rank>`: a test waits for it instead of guessing how long steps take
                Path(f"{self.hang_note}.{os.environ.get('RANK', '0')}").touch()
            time.sleep(
                3600
            )  # a signal handler runs, then the sleep goes on: a worker that never reaches a step boundary
        return super().forward(x)
