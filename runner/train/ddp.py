"""The DDP engine: every worker holds the whole model; gradients are averaged by DDP (NCCL, gloo,
or the shared-memory all-reduce for CPU workers on one machine)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from runner.train import rng
from runner.train.collectives import Collectives

log = logging.getLogger(__name__)


class DDPEngine:
    shared_state = False  # every rank holds (and loads) its own replica
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: Any,
                 device: torch.device, collectives: Collectives, allreduce: str, shared_memory=None,
                 skip_nonfinite: bool = False) -> None:
        self.model, self.optimizer, self.scheduler, self.loss_fn = model, optimizer, scheduler, loss_fn
        self.device, self.collectives, self.allreduce = device, collectives, allreduce
        self.processes = collectives.world_size
        self.skip_nonfinite = skip_nonfinite
        self.ddp_model: Optional[DDP] = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if shared_memory is not None:
            from runner.train.shm_allreduce import shm_allreduce_hook

            self.ddp_model.register_comm_hook(shared_memory, shm_allreduce_hook)

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> Optional[torch.Tensor]:
        inputs, targets = batch[0], batch[1]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.ddp_model(inputs), targets)
        loss.backward()
        if self.skip_nonfinite and not self._step_finite(loss):
            return None  # agreed across ranks: every rank skips
        self.optimizer.step()
        return loss.detach()

    def _step_finite(self, loss: torch.Tensor) -> bool:
        """This step's loss on every rank and its averaged gradients are finite (a loss that overflows
        with finite gradients would still push the weights to inf). One small collective, one sync."""
        flags = [loss.detach().isfinite()] + [p.grad.isfinite().all() for p in self.model.parameters() if p.grad is not None]
        bad = (~torch.stack(flags).all()).to(torch.float64).reshape(1)
        return self.collectives.max_(bad).item() == 0

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def end_epoch(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def parameters_finite(self) -> bool:
        flags = [p.isfinite().all() for p in self.model.parameters()]
        return bool(torch.stack(flags).all()) if flags else True

    def capture_rng(self) -> list[dict]:
        return [rng.capture()]

    def restore_rng(self, states: list[dict]) -> None:
        rng.restore(states[0])

    def close(self) -> None:
        # A DDP model holding a Python comm hook must be gone before the interpreter shuts down
        # (destroying it during shutdown aborts the process).
        self.ddp_model = None
