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
import torch.distributed.rpc as rpc
from omegaconf import DictConfig, OmegaConf

from runner.train import rng
from runner.train.collectives import Collectives
from runner.train.engines.rpc.engine import RpcEngine
from runner.train.engines.rpc.stages import ModuleShard, RemoteOptimizer

log = logging.getLogger(__name__)


def stage_name(i: int) -> str:
    return f"stage{i}"


class PipelineEngine(RpcEngine):
    """The trainer's side of the pipeline: the only data-parallel rank, driving 1 + S processes."""

    def __init__(self, cfg: DictConfig, task: Any) -> None:
        self.num_stages = int(cfg.launch.num_stages)
        self.collectives, self.processes, self.task = Collectives(), self.num_stages + 1, task
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        seed = int(cfg.trainer.seed)
        self.shards = [
            rpc.remote(stage_name(i), ModuleShard, args=(model_cfg, seed, i, self.num_stages))
            for i in range(self.num_stages)
        ]
        param_rrefs = [p for shard in self.shards for p in shard.rpc_sync().parameter_rrefs()]
        self.optimizer = RemoteOptimizer(param_rrefs, OmegaConf.to_container(cfg.optimizer, resolve=True))
        log.info(
            "pipeline: %d stages on %s, %d parameter tensors",
            self.num_stages,
            ", ".join(stage_name(i) for i in range(self.num_stages)),
            len(param_rrefs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activation = rpc.RRef(x)
        for shard in self.shards:
            activation = shard.remote().forward(activation)
        return activation.to_here()

    def capture_rng(self) -> list[dict]:
        """The trainer's and every stage's (dropout runs on the stages)."""
        return [rng.capture(), *[rpc.rpc_sync(stage_name(i), rng.capture) for i in range(self.num_stages)]]

    def restore_rng(self, states: list[dict]) -> None:
        rng.restore(states[0])
        for i, state in enumerate(states[1:]):
            rpc.rpc_sync(stage_name(i), rng.restore, args=(state,))
