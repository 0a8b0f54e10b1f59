"""What the DDP and FSDP engines share: every rank runs the model in its own process and steps a
torch optimizer over its parameters (all of them with DDP, its shards with FSDP).

One optimizer step is a window of `trainer.accumulate` micro-batches, gradients synchronised on the
last one only (`_no_sync` on the others: how is the engine's); autocast (bf16/fp16, fp16 with a
gradient scaler), gradient clipping, skipping a non-finite step, the scheduler's per-step or
per-epoch interval, and the capture and restore of the schedules and the RNG happen here. An engine
adds how gradients are synchronised and how the whole (unsharded) state is written and read.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, ContextManager, Iterator, Optional, Union

import torch

from runner.config import Interval, Precision
from runner.snapshot import sharded
from runner.snapshot.format import SHARDED_KEY, ShardedVersion
from runner.tasks import training_output
from runner.train import rng
from runner.train.collectives import Collectives
from runner.train.engine import no_snapshot_in_flight

AUTOCAST_DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard under FSDP), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def autocast(device: torch.device, precision: Precision):
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class DataParallelEngine(abc.ABC):
    """The step, evaluation, schedules and snapshots of an engine whose ranks each hold the model
    (or their shards of it) and a torch optimizer. `wrapped` is what a training step calls."""

    shared_state = False  # every rank holds (and loads) its own replica or shards
    lockstep_evaluation = False  # a forward is local to the rank unless an engine says otherwise

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        task: Any,
        device: torch.device,
        collectives: Collectives,
        allreduce: str,
        *,
        skip_nonfinite: bool = False,
        precision: str = "32",
        clip_grad_norm: Optional[float] = None,
        compile: bool = False,
        scheduler_interval: str = "epoch",
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.task = model, optimizer, scheduler, task
        self.device, self.collectives, self.allreduce = device, collectives, allreduce
        self.processes = collectives.world_size
        self.skip_nonfinite = skip_nonfinite
        self.precision = Precision(str(precision))
        self.clip_grad_norm = clip_grad_norm
        self.step_scheduler = Interval(str(scheduler_interval)) == Interval.step
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == Precision.fp16 else None
        self.last_lr = self._current_lr()
        if compile:
            model.compile()  # in place: the module keeps its own state_dict keys
        self.wrapped: Optional[torch.nn.Module] = model

    @abc.abstractmethod
    def _no_sync(self) -> ContextManager[Any]:
        """Accumulate this micro-batch's gradients locally (no synchronisation over the ranks)."""

    @abc.abstractmethod
    def state_dict(self, copy_unstepped: bool = False) -> dict[str, Any]:
        """The whole parts (runner.train.engine.Engine.state_dict)."""

    @abc.abstractmethod
    def _load_whole_model(self, model: dict[str, torch.Tensor]) -> None:
        """Whole weights (a single-file snapshot's model)."""

    @abc.abstractmethod
    def _load_whole(self, state: dict[str, Any]) -> None:
        """A single-file snapshot's model and optimizer."""

    def train_step(
        self, batches: list, wait_for_staging: Callable[[], None] = no_snapshot_in_flight
    ) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """One optimizer step over the micro-batches of a window: (mean loss, mean logs), detached
        and on the device (no host sync), or None when the step was skipped (non-finite).
        `wait_for_staging`: the checkpointer's wait for a snapshot in flight to hold its own copy."""
        self.optimizer.zero_grad(set_to_none=True)
        total: Optional[torch.Tensor] = None
        logs: dict[str, torch.Tensor] = {}
        last = len(batches) - 1
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == last else self._no_sync()
            with sync:
                with autocast(self.device, self.precision):
                    loss, step_logs = training_output(self.task.training_step(self.wrapped, batch))
                scaled = loss / len(batches)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total = loss.detach() if total is None else total + loss.detach()
            for name, value in step_logs.items():
                value = value.detach().float()
                logs[name] = value if name not in logs else logs[name] + value
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        n = len(batches)
        logs = {k: v / n for k, v in logs.items()}  # means over the window's micro-batches
        if self.clip_grad_norm is not None:  # one norm per step (before clipping), not a mean
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip_grad_norm))
            logs["grad_norm"] = local(norm).detach()
        if self.skip_nonfinite and self.scaler is None and not self._step_finite(total):
            return None  # agreed across ranks: every rank skips
        self.last_lr = self._current_lr()
        wait_for_staging()  # a snapshot in flight holds its own copy before the parameters change
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself when the unscaled gradients are not finite
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.step_scheduler and self.scheduler is not None:
            self.scheduler.step()
        return total / n, logs

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[Any]:
        """The model to evaluate with: the plain module (no DDP synchronisation), in eval mode,
        without gradients, under the training precision."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.precision):
                yield self.model
        finally:
            self.model.train(was_training)

    def _step_finite(self, loss: torch.Tensor) -> bool:
        """This step's loss on every rank and its averaged gradients are finite (a loss that overflows
        with finite gradients would still push the weights to inf). One small collective, one sync."""
        flags = [loss.detach().isfinite()]
        flags += [local(p.grad).isfinite().all() for p in self.model.parameters() if p.grad is not None]
        # offloaded gradients live on the CPU
        bad = (~torch.stack([f.to(loss.device) for f in flags]).all()).to(torch.float64).reshape(1)
        return self.collectives.max_(bad).item() == 0

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def learning_rate(self) -> float:
        """The rate the last optimizer step used (before a per-step scheduler moved it on)."""
        return self.last_lr

    def end_epoch(self) -> None:
        if self.scheduler is not None and not self.step_scheduler:
            self.scheduler.step()

    def close(self) -> None:
        pass  # nothing outlives the engine here; DDP drops its comm hook

    def _schedule_state(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def _copy_unstepped(self, model: dict[str, Any]) -> dict[str, Any]:
        """Whatever the optimizer does not step may change in forward (BatchNorm statistics): copies of those."""
        stepped = {local(p).data_ptr() for group in self.optimizer.param_groups for p in group["params"]}
        return {
            name: tensor if local(tensor).data_ptr() in stepped else tensor.clone() for name, tensor in model.items()
        }

    def sharded_state(self, copy_unstepped: bool = False) -> dict[str, Any]:
        """{"model", "optimizer"} keyed by parameter names, as torch.distributed.checkpoint saves and
        reshards them (each rank's shards with FSDP; replicas with DDP, which DCP writes once), and
        the schedules (scheduler, scaler) beside them, which the lead writes."""
        model, optimizer = sharded.get_state_dict(self.model, self.optimizer)
        if copy_unstepped:
            model = self._copy_unstepped(model)
        return {"model": model, "optimizer": optimizer, **self._schedule_state()}

    def load_model_state(self, model: Union[dict[str, torch.Tensor], ShardedVersion]) -> None:
        """The weights alone: a state dict, or a sharded version (every rank reads its part)."""
        if isinstance(model, ShardedVersion):
            sharded.load_model(self.model, model)
        else:
            self._load_whole_model(model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get(SHARDED_KEY)
        if version is not None:  # every rank reads its part; DCP reshards to this run's ranks
            sharded.load(self.model, self.optimizer, version)
        else:
            self._load_whole(state)
        self._load_schedules(state)

    def _load_schedules(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.last_lr = self._current_lr()

    def parameters_finite(self) -> bool:
        flags = [local(p).isfinite().all() for p in self.model.parameters()]
        return bool(torch.stack(flags).all()) if flags else True

    def capture_rng(self) -> list[dict]:
        return [rng.capture()]

    def restore_rng(self, states: list[dict]) -> None:
        rng.restore(states[0])
