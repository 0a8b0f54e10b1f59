"""Evaluation: a split's metrics over every rank, and the watch on one metric that picks the best
snapshots and stops a run that has stopped improving.

`evaluate` keeps the task's per-batch means as weighted device tensors and reduces them in one
collective at the end, so a validation pass costs its forward passes and one host sync. `Monitor`
holds what must survive a restart (the best value, its step, validations without improvement, why
training ended), so a resumed run stops early exactly where an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from runner.config import Mode

log = logging.getLogger(__name__)


def evaluate(engine, task, batches) -> dict[str, float]:
    """The task's metrics over a whole split: every rank evaluates its shard; the sums meet in one
    collective at the end (no host sync per batch)."""
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=engine.device)
    extra = _batches_behind(engine, batches)
    with engine.evaluation() as model:
        batch = None
        for batch in batches:
            n = task.batch_size(batch)
            for name, value in task.validation_step(model, batch).items():
                acc = sums.get(name)
                if acc is None:
                    acc = sums[name] = torch.zeros((), dtype=torch.float64, device=count.device)
                acc.add_(value.detach().double(), alpha=n)
            count += n
        for _ in range(extra):  # keep step with the ranks that have more batches; the results are not counted
            task.validation_step(model, batch)
    names = sorted(sums)
    total = torch.stack([count, *(sums[k] for k in names)])
    engine.collectives.sum_(total)
    values = total.tolist()
    return task.finish({k: v / values[0] for k, v in zip(names, values[1:])})


def _batches_behind(engine, batches) -> int:
    """With a sharded model every forward is collective, so every rank must run as many as the rank
    with the most batches (a split need not divide evenly): how many this rank repeats its last."""
    if not engine.lockstep_evaluation or engine.collectives.world_size == 1:
        return 0
    mine = batches.num_batches() if hasattr(batches, "num_batches") else len(batches)
    most = int(engine.collectives.max_(torch.tensor([float(mine)], dtype=torch.float64)).item())
    if mine == 0 and most > 0:
        raise RuntimeError(
            f"rank {engine.collectives.rank} has no evaluation batch while others do: with "
            "trainer.strategy=fsdp every rank needs at least one sample of the split"
        )
    return most - mine


class Monitor:
    """`snapshot.monitor` watched in `snapshot.mode`, with `trainer.early_stop` (patience, min_delta)."""

    def __init__(self, name: Optional[str], mode: str, patience: int = 0, min_delta: float = 0.0) -> None:
        self.name, self.mode = name, Mode(str(mode))
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_validations = 0  # validations since the metric last improved by more than min_delta
        self.ended: Optional[str] = None  # why training ended before its epochs/steps (early stop)

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Take a validation's metrics; returns whether the watched one reached a new best."""
        value = metrics.get(self.name) if self.name else None
        if value is None or not math.isfinite(value):
            return False
        sign = 1 if self.mode == Mode.max else -1
        improved = self.best is None or sign * (value - self.best) > 0
        significant = self.best is None or sign * (value - self.best) > self.min_delta
        if improved:
            self.best, self.best_step = value, step
        self.bad_validations = 0 if significant else self.bad_validations + 1
        if self.patience and self.bad_validations >= self.patience:
            self.ended = (
                f"early stop: {self.name} has not improved by more than {self.min_delta:g} in "
                f"{self.bad_validations} validations (best {self.best:.6g} at step {self.best_step})"
            )
        return improved

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_validations": self.bad_validations,
            "ended": self.ended,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_validations, self.ended = int(state.get("bad_validations", 0)), state.get("ended")
