"""The training loop in this process: `runner.train.session.train` around the real DDP engine of a
one-process job (not wrapped in DDP, so no process group), the one-process collectives and a tiny
tensor dataset. A run takes milliseconds, so the loop's rules are tested here and only what needs
processes (signals between processes, restarts, the CLI) is tested by launching the CLI."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import TensorDataset

from runner.config import OnNonFinite, RunnerConfig
from runner.layout import LOG_DIR
from runner.tasks import Regression
from runner.train import rng, session
from runner.train.batches import DataSource
from runner.train.collectives import Collectives
from runner.train.engines.ddp import DDPEngine

SAMPLES = 38  # with trainer.batch_size=4: 10 batches an epoch, the last of 2 samples
BASE = [
    "trainer.batch_size=4",
    "trainer.total_epochs=2",
    "trainer.log_every=0",
    "trainer.progress=false",
    "snapshot.keep_last=100",
]


def config(*overrides: str) -> DictConfig:
    """The schema's defaults, a small run, then `overrides` as on the command line."""
    return OmegaConf.merge(OmegaConf.structured(RunnerConfig), OmegaConf.from_dotlist([*BASE, *overrides]))


def samples(n: int = SAMPLES, nan_at: Optional[int] = None, seed: int = 1) -> TensorDataset:
    """(inputs, targets, sample index); the index lets a task tell which samples a step trained on.
    `nan_at`: that sample's target is NaN (a bad record in the data)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    if nan_at is not None:
        y[nan_at] = math.nan
    return TensorDataset(x, y, torch.arange(n))


class RecordingRegression(Regression):
    """Regression that notes the samples of every training forward, and can raise a real SIGTERM
    in this process during its `stop_at`-th one (the run's StopRequest catches it)."""

    def __init__(self, stop_at: Optional[int] = None) -> None:
        super().__init__()
        self.seen: list[list[int]] = []
        self.stop_at = stop_at

    def training_step(self, model, batch):
        if model.training:
            self.seen.append(batch[2].tolist())
            if len(self.seen) == self.stop_at:
                handler = signal.getsignal(signal.SIGTERM)
                if handler in (signal.SIG_DFL, signal.SIG_IGN, None):  # would end the test process itself
                    raise RuntimeError("no stop handler is installed for SIGTERM")
                signal.raise_signal(signal.SIGTERM)
        return super().training_step(model, batch)


def build_engine(cfg: DictConfig, task) -> DDPEngine:
    """What the worker builds for a one-process DDP job: seeded init, dropout (so the RNG matters),
    SGD with momentum (optimizer state matters) and a per-epoch schedule (scheduler state matters)."""
    t = cfg.trainer
    rng.seed_everything(int(t.seed))
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    rng.seed_everything(int(t.seed))  # the per-rank stream of rank 0
    return DDPEngine(
        model,
        optimizer,
        scheduler,
        task,
        torch.device("cpu"),
        Collectives(),
        "gloo",
        skip_nonfinite=OnNonFinite(str(t.on_nonfinite)) == OnNonFinite.skip,
        clip_grad_norm=t.clip_grad_norm,
    )


class StepSpy:
    """Wraps an engine's `train_step` to note each step's window size, samples and mean loss."""

    def __init__(self, engine: DDPEngine) -> None:
        self.windows: list[int] = []
        self.samples: list[int] = []
        self.losses: list[Optional[float]] = []
        step = engine.train_step

        def spied(batches: list, *wait):
            out = step(batches, *wait)
            self.windows.append(len(batches))
            self.samples.append(sum(len(b[0]) for b in batches))
            self.losses.append(None if out is None else float(out[0]))
            return out

        engine.train_step = spied


@dataclass
class Run:
    """What one in-process run left: its summary (or the exception it ended with) and its files."""

    run_dir: Path
    engine: DDPEngine
    task: RecordingRegression
    spy: StepSpy
    summary: Optional[dict[str, Any]] = None
    error: Optional[BaseException] = None

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.engine.model.state_dict().items()}


def train(run_dir: Path, cfg: DictConfig, dataset: Any = None, task: Optional[RecordingRegression] = None) -> Run:
    """One rank-0 run of `session.train` (as a worker runs it, through `run_reported`); a Stopped or
    other exception is kept in `Run.error`, not raised."""
    run_dir = Path(run_dir)
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)  # the driver makes it before workers start
    task = task or RecordingRegression()
    engine = build_engine(cfg, task)
    spy = StepSpy(engine)
    data = DataSource(cfg, 0, 1, engine.device, dataset=samples() if dataset is None else dataset)
    run = Run(run_dir, engine, task, spy)
    try:
        run.summary = session.run_reported(lambda: session.train(cfg, run_dir, engine, data, task), run_dir, 0)
    except Exception as err:  # Stopped is re-raised by run_reported, as in a worker
        run.error = err
    return run
