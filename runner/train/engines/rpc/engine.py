"""What the RPC topologies share as engines of the training loop: the model lives in
`ModuleShard`s on other processes (RRefs), gradients flow back through distributed autograd,
and a DistributedOptimizer steps the parameters where they live."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

from runner.tasks import training_output
from runner.train import rng
from runner.train.engine import no_snapshot_in_flight
from runner.train.engines.rpc.stages import RemoteOptimizer

ALLREDUCE = "rpc"  # recorded in snapshots: gradients travel through distributed autograd


class RpcEngine:
    """Subclasses set `shards` (RRefs to ModuleShard, in model order), `optimizer`, `task`,
    `collectives` and `processes`, and define `forward(x) -> output`."""

    allreduce = ALLREDUCE
    device = torch.device("cpu")
    shared_state = False
    lockstep_evaluation = False  # forwards are RPCs to the stages, not collectives of the ranks
    scheduler = None  # schedulers are refused with launch=rpc (preflight)
    shards: list[rpc.RRef]
    optimizer: RemoteOptimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The engine stands in for the model in the task's steps."""
        return self.forward(x)

    def train_step(
        self, batches: list, wait_for_staging: Callable[[], None] = no_snapshot_in_flight
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch per step (trainer.accumulate=1 with launch=rpc, checked before launch)."""
        with dist_autograd.context() as context_id:
            loss, logs = training_output(self.task.training_step(self, batches[0]))
            dist_autograd.backward(context_id, [loss])
            wait_for_staging()  # a snapshot in flight holds its own copy before the parameters change
            self.optimizer.step(context_id)
        return loss.detach(), {k: v.detach().float() for k, v in logs.items()}

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[Any]:
        """Forward passes without a distributed autograd context record nothing to go back through."""
        with torch.no_grad():
            yield self

    def load_model_state(self, model: dict[str, torch.Tensor]) -> None:
        for shard in self.shards:
            shard.rpc_sync().load_full_state_dict(model)

    def learning_rate(self) -> float:
        return self.optimizer.learning_rate()

    def end_epoch(self) -> None:
        pass  # schedulers are refused with launch=rpc (preflight)

    def state_dict(self, copy_unstepped: bool = False) -> dict[str, Any]:
        """Copies already: every shard's state arrives by RPC."""
        model: dict[str, torch.Tensor] = {}
        for shard in self.shards:
            model.update(shard.rpc_sync().full_state_dict())
        return {"model": model, "optimizer": self.optimizer.state_dict(), "scheduler": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for shard in self.shards:
            shard.rpc_sync().load_full_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def parameters_finite(self) -> bool:
        return all(shard.rpc_sync().parameters_finite() for shard in self.shards)

    def capture_rng(self) -> list[dict]:
        return [rng.capture()]

    def restore_rng(self, states: list[dict]) -> None:
        rng.restore(states[0])

    def close(self) -> None:
        pass
