"""The seam between the training loop and an engine (DDP, FSDP, RPC topologies: runner.train.engines).

The loop owns everything a user sees and everything that must survive a restart besides the
trained objects: position, loss bookkeeping, snapshot policy, stop, resume, metrics, summary. An
engine owns how one optimizer step runs and how the model, optimizer and scheduler (and the RNG of
the processes it drives) are captured and restored.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional, Protocol, Union

import torch

from runner.train.collectives import Collectives


def no_snapshot_in_flight() -> None:
    """What `train_step` waits for when no checkpointer is given: nothing."""


class Engine(Protocol):
    collectives: Collectives  # connects the data-parallel ranks that run this loop
    device: torch.device  # where batches go
    allreduce: str  # how gradients are averaged (recorded in snapshots: it fixes the summation order)
    processes: int  # processes of the job (recorded in snapshots)
    shared_state: bool  # one model and optimizer state for all ranks (parameter server): the lead alone loads it
    # Every forward is collective (a sharded model gathers its parameters from every rank), so every rank
    # must run as many evaluation batches as the rank with the most (runner.train.evaluation).
    lockstep_evaluation: bool
    scheduler: Any  # the learning-rate scheduler or None: a resume compares its planned length (resume_notes)

    def train_step(
        self, batches: list, wait_for_staging: Callable[[], None] = ...
    ) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """One optimizer step over a window of micro-batches (trainer.accumulate): the mean loss and
        the task's mean logs (detached, not synced to the host), or None when the step was skipped
        because its gradients were not finite (trainer.on_nonfinite=skip).

        `wait_for_staging` (the checkpointer's) is called right before the optimizer changes the
        parameters, explicitly: an asynchronous snapshot copies the state while forward and
        backward run, and the step waits for that copy there and only there."""

    def evaluation(self) -> ContextManager[Any]:
        """A context giving the model to call in `validation_step`: eval mode, no gradients."""

    def learning_rate(self) -> float:
        """The rate the last optimizer step used."""

    def end_epoch(self) -> None:
        """Per-epoch work of the trained objects (the learning-rate scheduler)."""

    def state_dict(self, copy_unstepped: bool = False) -> dict[str, Any]:
        """{"model": ..., "optimizer": ..., "scheduler": ...}: plain containers and tensors, the live
        ones where possible. `copy_unstepped`: every model tensor the optimizer does not step
        (buffers, frozen parameters: the forward pass may change them) as a copy, for a snapshot
        copied while the next step runs."""

    def sharded_state(self, copy_unstepped: bool = False) -> dict[str, Any]:
        """The same parts for a sharded snapshot (snapshot.format=dcp): model and optimizer keyed by
        parameter names as torch.distributed.checkpoint saves them, this rank's shards only."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A loaded snapshot: whole parts, or (SHARDED_KEY) a sharded version every rank reads its part of."""

    def load_model_state(self, model: Union[dict[str, torch.Tensor], Any]) -> None:
        """The model's weights alone (a best snapshot, before testing): a state dict, or a sharded
        version (runner.snapshot.format.ShardedVersion)."""

    def parameters_finite(self) -> bool:
        """Every weight is finite (checked before a snapshot is written; one host sync)."""

    def capture_rng(self) -> list[dict]:
        """RNG states of the processes this rank drives (itself first)."""

    def restore_rng(self, states: list[dict]) -> None: ...

    def close(self) -> None: ...
