"""Objects that live on the workers that own parameters, driven through RRefs.

`ModuleShard` builds the whole model from the config (same seed, so the same initial weights as
an unsplit run) and keeps only its contiguous slice of an nn.Sequential. Its state_dict keys are
those of the full model, so the shards of a snapshot merge back into one state_dict that loads
into the plain model.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed.rpc as rpc
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.optim import DistributedOptimizer


def stage_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, as even as possible."""
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for i in range(n_stages):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def build_full_model(model_cfg: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return instantiate(OmegaConf.create(model_cfg))


class ModuleShard(torch.nn.Module):
    def __init__(self, model_cfg: dict, seed: int, stage: int = 0, num_stages: int = 1, shared: bool = False) -> None:
        """`shared`: several trainers use this shard at once (parameter server); see `forward`."""
        super().__init__()
        self.shared = shared
        full = build_full_model(model_cfg, seed)
        if isinstance(full, torch.nn.Sequential):
            start, end = stage_bounds(len(full), num_stages)[stage]
            children = list(full.named_children())[start:end]
        elif num_stages == 1:
            children = [("", full)]
        else:
            raise ValueError(f"only an nn.Sequential can be split into stages, not {type(full).__name__}")
        self.prefixes = [name for name, _ in children]
        self.parts = torch.nn.ModuleList([module for _, module in children])
        self.lock = threading.Lock()

    def forward(self, x_rref: rpc.RRef) -> torch.Tensor:
        x = x_rref.to_here()  # records a send/recv pair in the distributed autograd graph
        with self.lock:
            for part in self.parts:
                if self.shared:
                    # Another trainer's optimizer step may update the parameters in place before this
                    # trainer's backward pass; computing with copies (gradients still reach the
                    # parameters through the copy) gives the classic asynchronous parameter-server
                    # semantics instead of autograd's "modified by an inplace operation" error.
                    params = {name: p.clone() for name, p in part.named_parameters()}
                    x = torch.func.functional_call(part, params, (x,))
                else:
                    x = part(x)
        return x

    def parameters_finite(self) -> bool:
        return all(bool(p.isfinite().all()) for p in self.parameters())

    def parameter_rrefs(self) -> list[rpc.RRef]:
        return [rpc.RRef(p) for p in self.parameters()]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """This shard's tensors under the full model's key names."""
        out = {}
        for prefix, part in zip(self.prefixes, self.parts):
            for key, value in part.state_dict().items():
                out[f"{prefix}.{key}" if prefix else key] = value.detach().clone()
        return out

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, part in zip(self.prefixes, self.parts):
            head = f"{prefix}." if prefix else ""
            part.load_state_dict({k[len(head) :]: v for k, v in state.items() if k.startswith(head)})


class LocalOptimizer:
    """The optimizer class handed to DistributedOptimizer: builds the configured torch optimizer.

    DistributedOptimizer turns the torch classes it knows into TorchScript functional optimizers,
    whose state cannot be saved. Through this indirection each owner gets a regular
    `torch.optim.Optimizer` (wrapped in `_LocalOptimizer`, whose lock serialises concurrent steps),
    so its state_dict goes into snapshots like in DDP mode.
    """

    def __new__(cls, params, optimizer_cfg: dict):
        return instantiate(OmegaConf.create(optimizer_cfg))(params)  # conf/optimizer entries are _partial_


def _optimizer_state(optim_rref: rpc.RRef) -> dict:
    return optim_rref.local_value().optim.state_dict()


def _load_optimizer_state(optim_rref: rpc.RRef, state: dict) -> None:
    optim_rref.local_value().optim.load_state_dict(state)


def _learning_rate(optim_rref: rpc.RRef) -> float:
    return float(optim_rref.local_value().optim.param_groups[0]["lr"])


class RemoteOptimizer:
    """A DistributedOptimizer over `param_rrefs`, built from the optimizer config on each owner,
    with the state_dict / load_state_dict / learning rate the loop's snapshots and metrics need."""

    def __init__(self, param_rrefs: list, optimizer_cfg: dict) -> None:
        self.optimizer = DistributedOptimizer(LocalOptimizer, param_rrefs, optimizer_cfg=optimizer_cfg)

    def step(self, context_id: int) -> None:
        self.optimizer.step(context_id)

    def state_dict(self) -> dict:
        return {
            "per_owner": [
                rpc.rpc_sync(o.owner(), _optimizer_state, args=(o,)) for o in self.optimizer.remote_optimizers
            ]
        }

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizer.remote_optimizers, state["per_owner"]):
            rpc.rpc_sync(o.owner(), _load_optimizer_state, args=(o, s))

    def learning_rate(self) -> float:
        first = self.optimizer.remote_optimizers[0]
        return rpc.rpc_sync(first.owner(), _learning_rate, args=(first,))
