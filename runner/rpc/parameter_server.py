"""Parameter-server topology: one worker owns the model, several trainers share it.

Each trainer takes its own shard of every epoch (a DistributedSampler over the trainers), runs the
forward pass on the server through an RRef inside its own distributed autograd context, and steps
the shared parameters with its own DistributedOptimizer. The local optimizers on the server share
one lock, so concurrent steps from different trainers are applied one at a time. Trainers meet
at the end of every epoch on the server (which also sums their losses), and the first trainer
writes the snapshots.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.optim import DistributedOptimizer

from runner import rng
from runner.rpc.loop import RpcTrainLoop
from runner.rpc.pipeline import optimizer_args
from runner.rpc.stages import LocalOptimizer, ModuleShard, load_optimizer_state, optimizer_state

log = logging.getLogger(__name__)
SERVER = "ps"

# State that lives on the server process.
_model: Optional[ModuleShard] = None
_model_lock = threading.Lock()
_epoch_barrier: Optional["EpochBarrier"] = None


class EpochBarrier:
    """All trainers wait here at the end of an epoch and get the loss summed over all of them."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.cond = threading.Condition()
        self.round, self.arrived, self.total = 0, 0, [0.0, 0]
        self.result: dict[int, tuple[float, int]] = {}

    def arrive(self, loss_sum: float, count: int) -> tuple[float, int]:
        with self.cond:
            my_round = self.round
            self.total[0] += loss_sum
            self.total[1] += count
            self.arrived += 1
            if self.arrived == self.parties:
                self.result[my_round] = (self.total[0], self.total[1])
                self.round, self.arrived, self.total = self.round + 1, 0, [0.0, 0]
                self.cond.notify_all()
            else:
                self.cond.wait_for(lambda: self.round > my_round)
            return self.result[my_round]


def get_model(model_cfg: dict, seed: int, trainers: int) -> rpc.RRef:
    """On the server: the one shared model (built on first call) as an RRef."""
    global _model, _epoch_barrier
    with _model_lock:
        if _model is None:
            _model = ModuleShard(model_cfg, seed, shared=trainers > 1)
            _epoch_barrier = EpochBarrier(trainers)
    return rpc.RRef(_model)


def end_epoch(loss_sum: float, count: int) -> tuple[float, int]:
    return _epoch_barrier.arrive(loss_sum, count)


def train(cfg, run_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Runs on every trainer (ranks 1..N); rank 0 is the server and only serves RPCs."""
    t = cfg.trainer
    trainers, me = world_size - 1, rank - 1
    rng.seed_everything(t.seed + rank)
    dataset = instantiate(cfg.dataset)
    loss_fn = instantiate(t.loss)
    model = rpc.rpc_sync(SERVER, get_model, args=(OmegaConf.to_container(cfg.model, resolve=True), t.seed, trainers))
    target, kwargs = optimizer_args(cfg)
    optimizer = DistributedOptimizer(LocalOptimizer, model.rpc_sync().parameter_rrefs(), target=target, **kwargs)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with dist_autograd.context() as context_id:
            loss = loss_fn(model.rpc_sync().forward(rpc.RRef(x)), y)
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        return loss.detach()

    def opt_state() -> dict:
        return {"per_owner": [rpc.rpc_sync(o.owner(), optimizer_state, args=(o,)) for o in optimizer.remote_optimizers]}

    def load_opt(state: dict) -> None:
        for o, s in zip(optimizer.remote_optimizers, state["per_owner"]):
            rpc.rpc_sync(o.owner(), load_optimizer_state, args=(o, s))

    loop = RpcTrainLoop(cfg, run_dir, dataset, me, trainers, me == 0, step,
                        model_state=lambda: model.rpc_sync().full_state_dict(), optimizer_state=opt_state,
                        load_model=lambda state: model.rpc_sync().load_full_state_dict(state), load_optimizer=load_opt,
                        epoch_end=lambda s, c: rpc.rpc_sync(SERVER, end_epoch, args=(s, c)))
    loop.resume()
    return loop.fit()
