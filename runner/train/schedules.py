"""Learning-rate schedules: when a scheduler steps (`interval`), and warmup + cosine over steps.

The scheduler group's `_target_` is any torch scheduler built with `_partial_: true`; the runner
reads one key of its own from that node, `interval: epoch | step` (default epoch), and calls the
scheduler after every optimizer step or after every epoch accordingly. A scheduler whose
constructor takes `total_steps` and leaves it null is given the run's number of optimizer steps.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from runner.config import Interval

RUNNER_KEYS = ("interval",)


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio` x the base
    rate at `total_steps` (held there after)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        total_steps: Optional[int] = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None:
            raise ValueError("WarmupCosine needs total_steps (the runner fills it in when it is null)")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = (
            int(warmup_steps),
            int(total_steps),
            float(min_lr_ratio),
        )
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_interval(node: Optional[DictConfig]) -> Interval:
    return Interval(str(node.get("interval", "epoch"))) if node else Interval.epoch


def build_scheduler(node: Optional[DictConfig], optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The scheduler the node names (None without one), `total_steps` filled in where it is null."""
    if not node:
        return None
    plain = OmegaConf.to_container(node, resolve=True)
    for key in RUNNER_KEYS:
        plain.pop(key, None)
    factory = instantiate(plain)
    target = getattr(factory, "func", factory)
    kwargs: dict[str, Any] = {}
    try:
        takes_total = "total_steps" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        takes_total = False
    if takes_total and plain.get("total_steps") is None:
        kwargs["total_steps"] = total_steps
    return factory(optimizer, **kwargs)
