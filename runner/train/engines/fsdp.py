"""The FSDP engine: parameters, gradients and optimizer state sharded over the workers (FSDP2,
`torch.distributed.fsdp.fully_shard` over a 1-D device mesh of all workers).

Each block (every module of the class `trainer.fsdp.shard` names, else each top-level child that
has parameters) is sharded on its own, the root last, so a forward gathers one block's parameters
at a time and frees them again (`reshard_after_forward`); gradients are reduce-scattered, and each
rank's optimizer steps its own shard. Per worker that holds about 1/N of the parameters,
gradients and optimizer state plus one gathered block, where DDP holds all of it.

The step over a window of micro-batches, autocast, clipping (the norm of the whole sharded
gradient) and the schedules are the shared base's (runner.train.engines.base); here: gradient sync
on the last micro-batch only, through `set_requires_gradient_sync`, and the state. Snapshots are
sharded (runner.snapshot.sharded): every rank writes its own shards, and a run resumes on another
number of workers.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Optional

import torch

from runner.train.engines.base import DataParallelEngine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "32": torch.float32}


def shard_blocks(model: torch.nn.Module, shard: Optional[str]) -> list[torch.nn.Module]:
    """The modules sharded on their own before the root: every module whose class is `shard` (its
    name, or module.Name), else each top-level child that holds parameters, looking inside
    containers that have no forward of their own (ModuleList, ModuleDict). A unit that shares a
    parameter with another (tied embedding and head) is left to the root, which holds it once."""
    if shard:
        candidates = [
            m
            for m in model.modules()
            if m is not model
            and _has_forward(m)
            and shard in (type(m).__name__, f"{type(m).__module__}.{type(m).__qualname__}")
        ]
    else:
        candidates = list(_top_level_units(model))
    owners: dict[int, int] = {}
    for unit in candidates:
        for p in unit.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [
        u for u in candidates if any(True for _ in u.parameters()) and all(owners[id(p)] == 1 for p in u.parameters())
    ]


def _has_forward(module: torch.nn.Module) -> bool:
    return type(module).forward is not torch.nn.Module.forward


def _top_level_units(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for child in module.children():
        if _has_forward(child):
            yield child
        else:  # a container: its members are the units
            yield from _top_level_units(child)


def shard_model(model: torch.nn.Module, device: torch.device, options: Any) -> list[str]:
    """Shard `model` in place over all workers (call before building the optimizer: its parameters
    become DTensors). Returns the names of the blocks sharded on their own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": bool(options.reshard_after_forward)}
    param_dtype = DTYPES.get(str(options.param_dtype)) if options.param_dtype is not None else None
    reduce_dtype = DTYPES.get(str(options.reduce_dtype)) if options.reduce_dtype is not None else None
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype or param_dtype)
    if options.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    names = {id(m): name for name, m in model.named_modules()}
    blocks = shard_blocks(model, options.shard)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return [names[id(b)] for b in blocks]


def initialise_shards(model: torch.nn.Module, device: torch.device, options: Any, seed: int, rank: int) -> None:
    """Give a model built on the meta device and sharded its memory and initial values, shard by
    shard: `model.init_weights()` when the model has one (torchtitan's convention), else every
    module's `reset_parameters()`. Each rank draws its shards from its own stream (seed, rank), so
    shards of one weight are independent draws from the distribution the whole tensor's init uses
    (its bounds come from the global shape); the values differ from a whole-model build's."""
    from runner.train import rng

    model.to_empty(device="cpu" if options.cpu_offload else device)
    rng.seed_everything(seed * 1009 + 7919 * (rank + 1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*DTensor random operators.*")
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()
        else:
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()


class FSDPEngine(DataParallelEngine):
    """`model` is already sharded (`shard_model`) and the optimizer built over its DTensor parameters:
    a training step calls the module itself (fully_shard changed it in place)."""

    lockstep_evaluation = True  # every forward gathers parameters from every rank: all ranks run the same number

    def __init__(self, *parts: Any, backend: str = "gloo", **options: Any) -> None:
        """`parts` and `options`: the shared base's (model, optimizer, scheduler, task, device, collectives;
        skip_nonfinite, precision, ...). Gradients are reduce-scattered over the process group of `backend`
        (recorded in snapshots as the all-reduce)."""
        super().__init__(*parts, f"fsdp-{backend}", **options)

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def state_dict(self, copy_unstepped: bool = False) -> dict[str, Any]:
        """The whole model on one rank is what FSDP avoids: snapshots are sharded (`sharded_state`)."""
        raise RuntimeError("an FSDP model is snapshotted in shards: snapshot.format=dcp")

    def _load_whole_model(self, model: dict[str, torch.Tensor]) -> None:
        """Whole weights (a single-file best snapshot of the DDP part of the run): each rank keeps its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, model, options=StateDictOptions(full_state_dict=True))

    def _load_whole(self, state: dict[str, Any]) -> None:
        """A single-file snapshot (written by a DDP run of the same model): every rank loads the whole
        state and keeps its shards. The optimizer's state is keyed by parameter index there and by
        name here."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        names = [name for name, _ in self.model.named_parameters()]
        saved = state["optimizer"]
        optimizer = {
            "state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in saved["param_groups"]],
        }
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=optimizer,
            options=StateDictOptions(full_state_dict=True),
        )
