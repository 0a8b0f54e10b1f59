"""What the loop tells about itself, in one place: throughput and MFU, the step-time breakdown,
memory, the profiler window and the hang watchdog's heartbeat. The loop calls a few hooks (a step,
a phase, a row, the end); nothing here reads a device value between two training rows.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch

from runner.train import watchdog
from runner.train.memory import memory_mb
from runner.train.throughput import Throughput
from runner.train.timing import PhaseClock


class Observer:
    """`profiler` (runner.train.profiling.ProfileWindow) is optional; the heartbeat of the hang
    watchdog (runner.train.watchdog) moves after every step and at every phase."""

    def __init__(
        self,
        device: torch.device,
        precision: str = "32",
        flops_per_sample: Optional[float] = None,
        peak_tflops: Optional[float] = None,
        profiler: Any = None,
    ) -> None:
        self.device = device
        self.clock = PhaseClock(device)
        self.throughput = Throughput(device, precision, flops_per_sample, peak_tflops)
        self.profiler = profiler
        self.memory_names = list(memory_mb(device))
        self.memory_peak: dict[str, float] = {}

    @classmethod
    def from_config(cls, trainer_cfg, device: torch.device, **parts: Any) -> "Observer":
        t = trainer_cfg
        return cls(device, str(t.precision), t.get("flops_per_sample"), t.get("peak_tflops"), **parts)

    # ---- each step ----------------------------------------------------------------------------
    def bind(self, loop: Any) -> "Observer":
        """The loop whose position (global step) the profiler window follows."""
        if self.profiler is not None:
            self.profiler.position = lambda: loop.global_step
        return self

    def start_row(self) -> None:
        self.clock.restart()

    def train_step(self, engine, window: list, samples: int, wait_for_staging: Callable[[], None]):
        """The engine's step over `window`, timed in phases: data (since the previous step), step
        (forward and backward, clipping), snapshot_wait (a snapshot in flight), optimizer."""
        if self.profiler is not None:
            self.profiler.before_step()
        clock = self.clock
        clock.lap("data")
        waited = []

        def wait() -> None:
            clock.lap("step")
            wait_for_staging()
            clock.lap("snapshot_wait")
            waited.append(True)

        out = self.throughput.step(lambda: engine.train_step(window, wait), samples)
        clock.lap("optimizer" if waited else "step")
        return out

    def step_done(self, global_step: int) -> None:
        if self.profiler is not None and self.profiler.active is not None:
            with self.clock.phase("profile"):  # writing the trace, once
                self.profiler.after_step(global_step)
        watchdog.beat(global_step)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A phase of the loop between steps: timed, and named in the heartbeat the hang watchdog reads."""
        watched = watchdog.LOOP_PHASES.get(name)
        if watched:
            watchdog.phase(watched)
        try:
            with self.clock.phase(name):
                yield
        finally:
            if watched:
                watchdog.phase("training")

    # ---- training rows ------------------------------------------------------------------------
    def row_tensor(self, rank: int, world: int, device: torch.device) -> torch.Tensor:
        """This rank's memory figures in its own slots of a (names x world) vector: summed over the
        ranks with the row's other sums, every rank's figures arrive in the same collective."""
        slots = torch.zeros(len(self.memory_names) * world, dtype=torch.float64)
        mem = memory_mb(self.device)
        for i, name in enumerate(self.memory_names):
            slots[i * world + rank] = mem[name]
        return slots.to(device)

    def row_fields(self, reduced: list[float], world: int, samples: int, seconds: float) -> dict[str, Any]:
        """tflops/mfu, time/<phase> (seconds of this row) and memory/<name> (the most of any rank)."""
        self.clock.lap("log")  # the row's collective and sync
        fields: dict[str, Any] = {}
        per_worker = samples / seconds / world if seconds > 0 else None
        fields.update(self.throughput.row(per_worker, seconds))
        for phase, secs in sorted(self.clock.flush().items()):
            fields[f"time/{phase}"] = secs
        for i, name in enumerate(self.memory_names):
            fields[name] = value = max(reduced[i * world : (i + 1) * world])
            self.memory_peak[name] = max(self.memory_peak.get(name, 0.0), value)
        return fields

    # ---- the end ------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        self.clock.flush()
        out: dict[str, Any] = dict(self.throughput.summary())
        out["time_breakdown"] = dict(sorted(self.clock.totals.items(), key=lambda kv: -kv[1]))
        if self.memory_peak:
            out["memory_peak"] = dict(self.memory_peak)
        if self.profiler is not None:
            out.update(self.profiler.summary())
        return out

    def close(self) -> None:
        if self.profiler is not None:
            with contextlib.suppress(Exception):
                self.profiler.close()
