"""The few collectives the training loop needs, over whatever connects its data-parallel ranks.

The loop sums the epoch's loss, agrees on stop requests and gathers each rank's resume state; it
does not care whether that travels through a process group, through shared memory or through an
RPC to a parameter server. Each engine hands the loop one of these.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


class Collectives:
    """One process: every collective is the identity. Base class of the others, which override
    `_reduce` (in place, "sum" or "max") and `gather`."""

    rank = 0
    world_size = 1

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "sum")

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "max")

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]


class ProcessGroupCollectives(Collectives):
    """A torch.distributed process group; small CPU tensors go through shared memory when the
    gradients do (runner.train.shm_allreduce: ~100x cheaper than gloo for a few numbers)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, shared_memory=None) -> None:
        self.group, self.shared_memory = group, shared_memory
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if self.shared_memory is not None and self.shared_memory.fits(tensor):
            return self.shared_memory.all_reduce_(tensor, op=op)
        group = None if tensor.is_cuda else self.group  # CUDA tensors on the default (NCCL) group
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class CallbackCollectives(Collectives):
    """Ranks joined by something else (an RPC service): `reduce_fn(values, op)` reduces a list of
    numbers over all of them ("sum" or "max"); there is no gather (each rank's resume state stays
    its own, the lead's is saved)."""

    def __init__(self, rank: int, world_size: int, reduce_fn: Callable[[list[float], str], list[float]]) -> None:
        self.rank, self.world_size, self._reduce_fn = rank, world_size, reduce_fn

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        flat = tensor.view(-1)
        flat.copy_(torch.tensor(self._reduce_fn(flat.tolist(), op), dtype=tensor.dtype))
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        return [obj]
