"""Parameter-server topology: one worker owns the model, several trainers share it.

Each trainer takes its own shard of every epoch (a DistributedSampler over the trainers), runs the
forward pass on the server through an RRef inside its own distributed autograd context, and steps
the shared parameters with its own DistributedOptimizer. The local optimizers on the server share
one lock, so concurrent steps from different trainers are applied one at a time. Trainers meet on
the server for the loop's collectives (the summed loss, the stop agreement), and the first trainer
writes the snapshots. Updates are asynchronous, so a resume continues the data order but is not bitwise exact.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import torch
import torch.distributed.rpc as rpc
from omegaconf import DictConfig, OmegaConf

from runner.train.collectives import CallbackCollectives
from runner.train.engines.rpc.engine import RpcEngine
from runner.train.engines.rpc.stages import ModuleShard, RemoteOptimizer

log = logging.getLogger(__name__)
SERVER = "ps"


class ReduceBarrier:
    """All trainers wait here and each gets the element-wise sum (or max) of what all of them brought.
    Every trainer makes the same sequence of calls (the loop's collectives), so rounds line up."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.cond = threading.Condition()
        self.round, self.arrived, self.total = 0, 0, None
        self.result: dict[int, list[float]] = {}

    def arrive(self, values: list[float], op: str) -> list[float]:
        combine = max if op == "max" else (lambda a, b: a + b)
        with self.cond:
            my_round = self.round
            self.total = list(values) if self.total is None else [combine(a, b) for a, b in zip(self.total, values)]
            self.arrived += 1
            if self.arrived == self.parties:
                self.result[my_round] = self.total
                self.round, self.arrived, self.total = self.round + 1, 0, None
                self.cond.notify_all()
            else:
                self.cond.wait_for(lambda: self.round > my_round)
            return self.result[my_round]


class _Server:
    """What lives in the server process; trainers reach it only through the functions below,
    which RPC runs on the server (RPC calls a function by name, hence one process-wide instance)."""

    lock = threading.Lock()
    model: Optional[ModuleShard] = None
    barrier: Optional[ReduceBarrier] = None


def get_model(model_cfg: dict, seed: int, trainers: int) -> rpc.RRef:
    """On the server: the one shared model (built on first call) as an RRef."""
    with _Server.lock:
        if _Server.model is None:
            _Server.model = ModuleShard(model_cfg, seed, shared=trainers > 1)
            _Server.barrier = ReduceBarrier(trainers)
    return rpc.RRef(_Server.model)


def reduce_over_trainers(values: list[float], op: str) -> list[float]:
    return _Server.barrier.arrive(values, op)


class ParameterServerEngine(RpcEngine):
    """One trainer's side: `trainer` is its index among the `trainers` (0 writes snapshots)."""

    shared_state = True  # the one model on the server: the lead loads it on resume

    def __init__(self, cfg: DictConfig, task: Any, trainer: int, trainers: int, processes: int) -> None:
        self.collectives = CallbackCollectives(
            trainer, trainers, lambda v, op: rpc.rpc_sync(SERVER, reduce_over_trainers, args=(v, op))
        )
        self.processes, self.task = processes, task
        model = rpc.rpc_sync(
            SERVER, get_model, args=(OmegaConf.to_container(cfg.model, resolve=True), int(cfg.trainer.seed), trainers)
        )
        self.shards = [model]
        self.optimizer = RemoteOptimizer(
            model.rpc_sync().parameter_rrefs(), OmegaConf.to_container(cfg.optimizer, resolve=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shards[0].rpc_sync().forward(rpc.RRef(x))
