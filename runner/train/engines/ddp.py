"""The DDP engine: every worker holds the whole model; gradients are averaged by DDP (NCCL, gloo,
or the shared-memory all-reduce for CPU workers on one machine).

The step over a window of `trainer.accumulate` micro-batches, autocast, clipping and the schedules
are the shared base's (runner.train.engines.base); here: DDP's `no_sync` on all but the last
micro-batch, so gradients are all-reduced once per step, and snapshots of the whole state.

DDP's options come from `trainer.ddp`. A job of one process is not wrapped in DDP at all: there is
nothing to average, and DDP's buffer broadcast fails on some models even then (a buffer that is a
transposed view, as in the classic positional encoding)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, ContextManager, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from runner.train.engines.base import DataParallelEngine

log = logging.getLogger(__name__)


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
        log.info(
            "buffers given row-major strides for DDP's broadcast: %s", ", ".join(changed), extra={"console": False}
        )
    return changed


def ddp_arguments(options: dict[str, Any]) -> dict[str, Any]:
    """trainer.ddp as DDP's keyword arguments. Newer torch renamed broadcast_buffers to
    forward_sync_buffers (the old name warns); the meaning is the same for the forward pass."""
    arguments = dict(options)
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    if "broadcast_buffers" in arguments and renamed:
        arguments["forward_sync_buffers"] = arguments.pop("broadcast_buffers")
    return arguments


class DDPEngine(DataParallelEngine):
    """Replicas: the model (in DDP when the job has more than one process) and the whole optimizer on every rank."""

    lockstep_evaluation = False  # evaluation calls the plain module: no collective in a forward

    def __init__(self, *parts: Any, shared_memory=None, ddp_options: Optional[dict] = None, **options: Any) -> None:
        """`parts` and `options`: the shared base's (model, optimizer, scheduler, task, device, collectives,
        allreduce; skip_nonfinite, precision, ...). `shared_memory`: the CPU all-reduce's segment (its comm
        hook goes on DDP); `ddp_options`: trainer.ddp."""
        super().__init__(*parts, **options)
        self.ddp_options = {k: v for k, v in (ddp_options or {}).items() if v is not None}  # None: DDP's default
        self.wrapped = self._wrap(self.model, shared_memory)

    def _wrap(self, model: torch.nn.Module, shared_memory) -> torch.nn.Module:
        """DDP around the model, or the model itself when this job is one process."""
        if self.processes == 1:
            return model
        if self.ddp_options.get("broadcast_buffers", True):
            restride_buffers(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DDP(model, device_ids=device_ids, **ddp_arguments(self.ddp_options))
        log.info(
            "DistributedDataParallel: broadcast_buffers=%s, find_unused_parameters=%s, static_graph=%s, "
            "bucket_cap_mb=%g, gradient_as_bucket_view=%s",
            ddp.broadcast_buffers,
            ddp.find_unused_parameters,
            ddp.static_graph,
            ddp.bucket_bytes_cap / 2**20,
            ddp.gradient_as_bucket_view,
            extra={"console": False},
        )
        if shared_memory is not None:
            from runner.train.shm_allreduce import shm_allreduce_hook

            ddp.register_comm_hook(shared_memory, shm_allreduce_hook)
        return ddp

    def _no_sync(self) -> ContextManager[Any]:
        """Accumulate this micro-batch's gradients locally (no all-reduce)."""
        return self.wrapped.no_sync() if isinstance(self.wrapped, DDP) else contextlib.nullcontext()

    def state_dict(self, copy_unstepped: bool = False) -> dict[str, Any]:
        model = self.model.state_dict()
        if copy_unstepped:
            model = self._copy_unstepped(model)
        return {"model": model, "optimizer": self.optimizer.state_dict(), **self._schedule_state()}

    def _load_whole_model(self, model: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(model)

    def _load_whole(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        # A DDP model holding a Python comm hook must be gone before the interpreter shuts down
        # (destroying it during shutdown aborts the process).
        self.wrapped = None
