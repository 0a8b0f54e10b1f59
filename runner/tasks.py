"""Tasks: what a batch means and what is measured. Chosen with `task=` (conf/task/).

A task is any object with these methods (subclass `Task` to inherit the defaults):

    training_step(model, batch) -> loss | (loss, {name: tensor})
        The loss to minimise for one batch (a scalar tensor), optionally with extra per-batch means
        to log as train/<name>. `model` is the (possibly DDP-wrapped, compiled) module.
    validation_step(model, batch) -> {name: tensor}
        Per-batch means of the metrics (scalar tensors); logged as val/<name> (test/<name>).
    batch_size(batch) -> int
        Samples in the batch: the weight of its means when batches are averaged.
    finish(means) -> means
        Metrics derived from the averages over a whole split (perplexity from the mean loss).

`batch` is whatever the data pipeline returns (a tuple from a tensor dataset, or what the collate
function builds: tuples, dicts, masks), already moved to the training device. Metrics are kept
as tensors until a split ends, so evaluating costs no host synchronisation per batch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Logs = dict[str, torch.Tensor]
StepOutput = Union[torch.Tensor, tuple[torch.Tensor, Logs]]


class Task:
    """Defaults shared by the built-in tasks."""

    # Throughput is reported in samples/s, and also in `unit`/s when a task counts something else.
    unit: Optional[str] = None

    def training_step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        raise NotImplementedError

    def validation_step(self, model: torch.nn.Module, batch: Any) -> Logs:
        loss = self.training_step(model, batch)
        return {"loss": loss[0] if isinstance(loss, tuple) else loss}

    def batch_size(self, batch: Any) -> int:
        return len(first_tensor(batch))

    def units(self, batch: Any) -> int:
        """How many `unit`s a batch holds (tokens, say); only called when `unit` is set."""
        return self.batch_size(batch)

    def finish(self, means: dict[str, float]) -> dict[str, float]:
        return means


class Regression(Task):
    """`(inputs, targets, ...)` batches against a loss module (MSE by default): the seed task."""

    def __init__(self, loss: Any = None) -> None:
        self.loss = loss if loss is not None else torch.nn.MSELoss()

    def training_step(self, model, batch):
        return self.loss(model(batch[0]), batch[1])


class Classification(Task):
    """`(inputs, labels, ...)` batches; the model returns logits. Cross-entropy, accuracy, top-k."""

    def __init__(self, top_k: Sequence[int] = (), label_smoothing: float = 0.0) -> None:
        self.top_k = tuple(int(k) for k in top_k if int(k) > 1)
        self.label_smoothing = float(label_smoothing)

    def training_step(self, model, batch):
        logits = model(batch[0])
        return F.cross_entropy(logits, batch[1], label_smoothing=self.label_smoothing)

    def validation_step(self, model, batch):
        logits, labels = model(batch[0]), batch[1]
        metrics = {
            "loss": F.cross_entropy(logits.float(), labels),
            "accuracy": (logits.argmax(-1) == labels).float().mean(),
        }
        for k in self.top_k:
            top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
            metrics[f"top{k}_accuracy"] = (top == labels.unsqueeze(-1)).any(-1).float().mean()
        return metrics


class LanguageModel(Task):
    """Next-token prediction over `tokens` batches of shape (batch, length + 1) (or the first tensor
    of a tuple/dict); the model maps (batch, length) token ids to (batch, length, vocab) logits.
    Reports perplexity and throughput in tokens/s."""

    unit = "tokens"

    def training_step(self, model, batch):
        tokens = first_tensor(batch)
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    def units(self, batch) -> int:
        tokens = first_tensor(batch)
        return tokens.shape[0] * (tokens.shape[1] - 1)

    def finish(self, means):
        if "loss" in means:
            means["perplexity"] = math.exp(min(means["loss"], 700.0))
        return means


def first_tensor(batch: Any) -> torch.Tensor:
    """The first tensor of a batch (a tensor, a tuple/list, or a dict in insertion order)."""
    found = _find_tensor(batch)
    if found is None:
        raise TypeError(f"a batch of {type(batch).__name__} holds no tensor")
    return found


def _find_tensor(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for value in batch:
            found = _find_tensor(value)
            if found is not None:
                return found
    return None


def training_output(out: StepOutput) -> tuple[torch.Tensor, Logs]:
    """(loss, logs) from what `training_step` returned."""
    if isinstance(out, tuple):
        loss, logs = out
        return loss, dict(logs or {})
    return out, {}
