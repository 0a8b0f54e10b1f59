"""Pipeline topology: stages of the model on their own workers, driven by one trainer.

Forward: the trainer wraps the batch in an RRef; each stage's owner fetches its input with
`to_here()` (a send/recv pair recorded by distributed autograd) and returns its output as an RRef
that the next stage fetches; the trainer fetches the last output and computes the loss.
Backward: `dist_autograd.backward(context_id, [loss])` follows the recorded send/recv pairs back
through every stage (FAST mode), leaving each stage's gradients in that context on its owner.
Step: a DistributedOptimizer asks each owner's local optimizer to apply them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from omegaconf import DictConfig, OmegaConf

from runner.train import rng
from runner.train.collectives import Collectives
from runner.train.rpc.stages import ModuleShard, RemoteOptimizer

log = logging.getLogger(__name__)


def stage_name(i: int) -> str:
    return f"stage{i}"


class PipelineEngine:
    """The trainer's side of the pipeline: the only data-parallel rank, driving 1 + S processes."""

    allreduce = "rpc"

    def __init__(self, cfg: DictConfig, loss_fn: Any) -> None:
        self.num_stages = int(cfg.launch.num_stages)
        self.collectives, self.device, self.processes = Collectives(), torch.device("cpu"), self.num_stages + 1
        self.loss_fn = loss_fn
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        seed = int(cfg.trainer.seed)
        self.shards = [rpc.remote(stage_name(i), ModuleShard, args=(model_cfg, seed, i, self.num_stages)) for i in range(self.num_stages)]
        param_rrefs = [p for shard in self.shards for p in shard.rpc_sync().parameter_rrefs()]
        self.optimizer = RemoteOptimizer(param_rrefs, OmegaConf.to_container(cfg.optimizer, resolve=True))
        log.info("pipeline: %d stages on %s, %d parameter tensors", self.num_stages,
                 ", ".join(stage_name(i) for i in range(self.num_stages)), len(param_rrefs))

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with dist_autograd.context() as context_id:
            activation = rpc.RRef(batch[0])
            for shard in self.shards:
                activation = shard.remote().forward(activation)
            loss = self.loss_fn(activation.to_here(), batch[1])
            dist_autograd.backward(context_id, [loss])
            self.optimizer.step(context_id)
        return loss.detach()

    def learning_rate(self) -> float:
        return self.optimizer.learning_rate()

    def end_epoch(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
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
        return [rng.capture(), *[rpc.rpc_sync(stage_name(i), rng.capture) for i in range(self.num_stages)]]

    def restore_rng(self, states: list[dict]) -> None:
        rng.restore(states[0])
        for i, state in enumerate(states[1:]):
            rpc.rpc_sync(stage_name(i), rng.restore, args=(state,))

    def close(self) -> None:
        pass
