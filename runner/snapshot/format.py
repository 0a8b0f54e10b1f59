"""What a snapshot holds: named parts, one format for every launch mode, loaded safely.

Plain containers and tensors only, so `torch.load(weights_only=True)` loads it and a file that
would run code when unpickled is refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

FORMAT_VERSION = 1

# Names of the parts of a snapshot; everything that must survive a restart lives under one of them.
FORMAT_KEY = "format_version"
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
SCALER_KEY = "scaler"  # the fp16 gradient scaler (None otherwise)
TRAIN_STATE_KEY = "train_state"  # epoch, global step, samples into the epoch, each rank's partial loss
RNG_KEY = "rng"  # one entry per process, in rank order
CONFIG_KEY = "config"
TORCH_VERSION_KEY = "torch_version"
WORLD_SIZE_KEY = "world_size"  # processes of the job that wrote it
ALLREDUCE_KEY = "allreduce"  # how gradients were averaged (shm, gloo, nccl, rpc): the summation order
METRICS_KEY = "metrics"
# Set when a sharded (DCP) version was loaded: its folder. Model and optimizer are not in the
# loaded state then; every rank reads its part of them from the folder (runner.snapshot.sharded).
SHARDED_KEY = "sharded"


@dataclass(frozen=True)
class ShardedVersion:
    """A verified sharded version: its folder and the files its manifest entry lists, name ->
    StoredFile (size, sha256, block digests): the only files a load may open. `preloaded`: every
    rank has already read its part into the model and optimizer (the checkpointer's walk)."""

    folder: Path
    files: dict
    preloaded: bool = False
    source: Any = None  # in an object store: StoredFile -> read_at(offset, length), ranged reads of its object


class SnapshotError(Exception):
    """A snapshot (or every snapshot) cannot be trusted or loaded."""


def make_state(
    *,
    model: dict,
    optimizer: Any,
    scheduler: Any,
    train_state: dict,
    rng: list,
    config: dict,
    world_size: int,
    allreduce: str,
    metrics: list,
    scaler: Any = None,
) -> dict[str, Any]:
    """A snapshot in the one format every launch mode writes."""
    return {
        SCALER_KEY: scaler,
        FORMAT_KEY: FORMAT_VERSION,
        MODEL_KEY: model,
        OPTIMIZER_KEY: optimizer,
        SCHEDULER_KEY: scheduler,
        TRAIN_STATE_KEY: train_state,
        RNG_KEY: rng,
        CONFIG_KEY: config,
        TORCH_VERSION_KEY: str(torch.__version__),
        WORLD_SIZE_KEY: int(world_size),
        ALLREDUCE_KEY: str(allreduce),
        METRICS_KEY: list(metrics),
    }


def load_bytes(data: bytes, origin: Union[Path, str]) -> dict[str, Any]:
    """Unpickle a snapshot safely: tensors and plain containers only, nothing executable."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for forbidden globals, RuntimeError for bad zips
        raise SnapshotError(
            f"{origin} cannot be loaded safely ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    if not isinstance(state, dict) or state.get(FORMAT_KEY) != FORMAT_VERSION:
        raise SnapshotError(f"{origin} is not a runner snapshot of format {FORMAT_VERSION}")
    missing = [k for k in (MODEL_KEY, OPTIMIZER_KEY, TRAIN_STATE_KEY, RNG_KEY, METRICS_KEY) if k not in state]
    if missing:
        raise SnapshotError(f"{origin} is not a complete runner snapshot (no {', '.join(missing)})")
    return state
