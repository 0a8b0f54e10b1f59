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
from pathlib import Path
from typing import Any

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.optim import DistributedOptimizer

from runner import rng
from runner.rpc.loop import RpcTrainLoop
from runner.rpc.stages import LocalOptimizer, ModuleShard, load_optimizer_state, optimizer_state

log = logging.getLogger(__name__)
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def stage_name(i: int) -> str:
    return f"stage{i}"


def optimizer_args(cfg) -> tuple[str, dict]:
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items() if k not in HYDRA_KEYS}
    return str(cfg.optimizer._target_), kwargs


def train(cfg, run_dir: Path) -> dict[str, Any]:
    """Runs on the trainer (rank 0); the stage owners only serve RPCs."""
    t, n = cfg.trainer, int(cfg.launch.num_stages)
    rng.seed_everything(t.seed)
    dataset = instantiate(cfg.dataset)
    loss_fn = instantiate(t.loss)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    shards = [rpc.remote(stage_name(i), ModuleShard, args=(model_cfg, t.seed, i, n)) for i in range(n)]
    param_rrefs = [p for shard in shards for p in shard.rpc_sync().parameter_rrefs()]
    target, kwargs = optimizer_args(cfg)
    optimizer = DistributedOptimizer(LocalOptimizer, param_rrefs, target=target, **kwargs)
    log.info("pipeline: %d stages on %s, %d parameter tensors", n, ", ".join(stage_name(i) for i in range(n)), len(param_rrefs))

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with dist_autograd.context() as context_id:
            activation = rpc.RRef(x)
            for shard in shards:
                activation = shard.remote().forward(activation)
            loss = loss_fn(activation.to_here(), y)
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        return loss.detach()

    def model_state() -> dict:
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(shard.rpc_sync().full_state_dict())
        return state

    def opt_state() -> dict:
        return {"per_owner": [rpc.rpc_sync(o.owner(), optimizer_state, args=(o,)) for o in optimizer.remote_optimizers]}

    def load_model(state: dict) -> None:
        for shard in shards:
            shard.rpc_sync().load_full_state_dict(state)

    def load_opt(state: dict) -> None:
        for o, s in zip(optimizer.remote_optimizers, state["per_owner"]):
            rpc.rpc_sync(o.owner(), load_optimizer_state, args=(o, s))

    loop = RpcTrainLoop(cfg, run_dir, dataset, 0, 1, True, step, model_state, opt_state, load_model, load_opt,
                        extra_rng=lambda: [rpc.rpc_sync(stage_name(i), rng.capture) for i in range(n)],
                        load_extra_rng=lambda states: [rpc.rpc_sync(stage_name(i), rng.restore, args=(s,))
                                                       for i, s in enumerate(states)])
    loop.resume()
    return loop.fit()

