"""A model for tests: a Linear layer with a bug, raised in a forward pass of training."""

from __future__ import annotations

import os
import signal

import torch

from runner.train import faults


class FaultyLinear(torch.nn.Linear):
    """Raises KeyError('label') in training, at the step after optimizer step `fail_after_step`
        (0: the first batch), in every process and every attempt: a bug a restart cannot fix. With
        `fail_at_call` instead, at this process's N-th forward pass: a failure that moves, since a
        restarted process resumes from a snapshot and counts again. With `kill_rank`, that rank is
        killed with SIGKILL at that step instead, in every attempt (like a recurring OOM kill); with
    `oom_rank`, that rank raises torch's CUDA out-of-memory error instead (its sizes differ per attempt)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fail_after_step: int = -1,
        fail_at_call: int = 0,
        kill_rank: int = -1,
        oom_rank: int = -1,
    ) -> None:
        super().__init__(in_features, out_features)
        self.fail_after_step, self.fail_at_call, self.kill_rank = fail_after_step, fail_at_call, kill_rank
        self.oom_rank = oom_rank
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.training and (
            (faults.current_step or 0) == self.fail_after_step
            or (self.fail_at_call and self.calls >= self.fail_at_call)
        ):
            if self.oom_rank >= 0:
                if int(os.environ.get("RANK", "0")) == self.oom_rank:
                    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory. Tried to allocate {2 + attempt}.00 GiB. GPU 0 has a total capacity "
                        f"of 79.10 GiB of which {100 + attempt}.00 MiB is free."
                    )
                return super().forward(x)
            if self.kill_rank < 0:
                raise KeyError("label")
            if int(os.environ.get("RANK", "0")) == self.kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)
