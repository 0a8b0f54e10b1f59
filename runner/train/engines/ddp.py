"""The DDP engine: every worker holds the whole model; gradients are averaged by DDP (NCCL, gloo,
or the shared-memory all-reduce for CPU workers on one machine).

One optimizer step is a window of `trainer.accumulate` micro-batches: DDP's `no_sync` on all but
the last, so gradients are all-reduced once per step; autocast (bf16/fp16, fp16 with a gradient
scaler), gradient clipping and the scheduler's per-step interval happen here too.

DDP's options come from `trainer.ddp`. A job of one process is not wrapped in DDP at all: there is
nothing to average, and DDP's buffer broadcast fails on some models even then (a buffer that is a
transposed view, as in the classic positional encoding)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, ContextManager, Iterator, Optional, Union

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from runner.config import Interval, Precision
from runner.snapshot import sharded
from runner.snapshot.format import SHARDED_KEY, ShardedVersion
from runner.tasks import training_output
from runner.train import rng
from runner.train.collectives import Collectives

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard under FSDP), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def restride_buffers(model: torch.nn.Module) -> list[str]:
    """Give every buffer whose strides are not the plain row-major ones for its shape (a transposed
    view: `pe.unsqueeze(0).transpose(0, 1)`) a row-major copy of its values. DDP's buffer broadcast
    copies a lone buffer's bucket back onto the buffer's own memory with other strides, which torch
    refuses ("some elements of the input tensor and the written-to tensor refer to a single memory
    location", pytorch/pytorch#68407). Same values and state_dict; returns the names changed."""
    changed, copies = [], {}  # copies by id: a buffer two modules share stays shared
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, buffer in module._buffers.items():
            if buffer is None or buffer.stride() == torch.empty(buffer.shape, device="meta").stride():
                continue
            if id(buffer) not in copies:
                copies[id(buffer)] = buffer.clone(memory_format=torch.contiguous_format)
            module._buffers[attr] = copies[id(buffer)]
            changed.append(f"{module_name}.{attr}" if module_name else attr)
    if changed:
        log.info("buffers given row-major strides for DDP's broadcast: %s", ", ".join(changed),
                 extra={"console": False})
    return changed


def ddp_arguments(options: dict[str, Any]) -> dict[str, Any]:
    """trainer.ddp as DDP's keyword arguments. Newer torch renamed broadcast_buffers to
    forward_sync_buffers (the old name warns); the meaning is the same for the forward pass."""
    arguments = dict(options)
    if "broadcast_buffers" in arguments and "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        arguments["forward_sync_buffers"] = arguments.pop("broadcast_buffers")
    return arguments


def autocast(device: torch.device, precision: Precision):
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class DDPEngine:
    shared_state = False  # every rank holds (and loads) its own replica

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, task: Any,
                 device: torch.device, collectives: Collectives, allreduce: str, shared_memory=None, *,
                 skip_nonfinite: bool = False, precision: str = "32", clip_grad_norm: Optional[float] = None,
                 compile: bool = False, scheduler_interval: str = "epoch",
                 ddp_options: Optional[dict] = None) -> None:
        self.model, self.optimizer, self.scheduler, self.task = model, optimizer, scheduler, task
        self.device, self.collectives, self.allreduce = device, collectives, allreduce
        self.processes = collectives.world_size
        self.skip_nonfinite = skip_nonfinite
        self.precision = Precision(str(precision))
        self.clip_grad_norm = clip_grad_norm
        self.step_scheduler = Interval(str(scheduler_interval)) == Interval.step
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == Precision.fp16 else None
        self.last_lr = self._current_lr()
        self.ddp_options = {k: v for k, v in (ddp_options or {}).items() if v is not None}  # None: DDP's default
        if compile:
            model.compile()  # in place: the module keeps its own state_dict keys
        self.wrapped: Optional[torch.nn.Module] = self._wrap(model, shared_memory)  # what a training step calls

    def _wrap(self, model: torch.nn.Module, shared_memory) -> torch.nn.Module:
        """DDP around the model, or the model itself when this job is one process."""
        if self.processes == 1:
            return model
        if self.ddp_options.get("broadcast_buffers", True):
            restride_buffers(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DDP(model, device_ids=device_ids, **ddp_arguments(self.ddp_options))
        log.info("DistributedDataParallel: broadcast_buffers=%s, find_unused_parameters=%s, static_graph=%s, "
                 "bucket_cap_mb=%g, gradient_as_bucket_view=%s", ddp.broadcast_buffers, ddp.find_unused_parameters,
                 ddp.static_graph, ddp.bucket_bytes_cap / 2**20, ddp.gradient_as_bucket_view, extra={"console": False})
        if shared_memory is not None:
            from runner.train.shm_allreduce import shm_allreduce_hook

            ddp.register_comm_hook(shared_memory, shm_allreduce_hook)
        return ddp

    def _no_sync(self) -> ContextManager[Any]:
        """Accumulate this micro-batch's gradients locally (no all-reduce)."""
        return self.wrapped.no_sync() if isinstance(self.wrapped, DDP) else contextlib.nullcontext()

    def train_step(self, batches: list) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """One optimizer step over the micro-batches of a window: (mean loss, mean logs), detached
        and on the device (no host sync), or None when the step was skipped (non-finite)."""
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
            logs["grad_norm"] = local(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip_grad_norm))).detach()
        if self.skip_nonfinite and self.scaler is None and not self._step_finite(total):
            return None  # agreed across ranks: every rank skips
        self.last_lr = self._current_lr()
        self.before_update()
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
        flags = [loss.detach().isfinite()] + [local(p.grad).isfinite().all() for p in self.model.parameters() if p.grad is not None]
        bad = (~torch.stack([f.to(loss.device) for f in flags]).all()).to(torch.float64).reshape(1)  # offloaded gradients live on the CPU
        return self.collectives.max_(bad).item() == 0

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def learning_rate(self) -> float:
        """The rate the last optimizer step used (before a per-step scheduler moved it on)."""
        return self.last_lr

    def end_epoch(self) -> None:
        if self.scheduler is not None and not self.step_scheduler:
            self.scheduler.step()

    def before_update(self) -> None:
        pass

    def state_dict(self, copy_unstepped: bool = False) -> dict[str, Any]:
        model = self.model.state_dict()
        if copy_unstepped:
            model = self._copy_unstepped(model)
        return {"model": model, "optimizer": self.optimizer.state_dict(), **self._schedule_state()}

    def _schedule_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def _copy_unstepped(self, model: dict[str, Any]) -> dict[str, Any]:
        """Whatever the optimizer does not step may change in forward (BatchNorm statistics): copies of those."""
        stepped = {local(p).data_ptr() for group in self.optimizer.param_groups for p in group["params"]}
        return {name: tensor if local(tensor).data_ptr() in stepped else tensor.clone() for name, tensor in model.items()}

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

    def _load_whole_model(self, model: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get(SHARDED_KEY)
        if version is not None:  # every rank reads its part; DCP reshards to this run's ranks
            sharded.load(self.model, self.optimizer, version)
        else:
            self._load_whole(state)
        self._load_schedules(state)

    def _load_whole(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

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

    def close(self) -> None:
        # A DDP model holding a Python comm hook must be gone before the interpreter shuts down
        # (destroying it during shutdown aborts the process).
        self.wrapped = None
