"""What the loop tells about itself, in one place: throughput and MFU, the step-time breakdown,
memory, the profiler window and the hang watchdog's heartbeat. The loop calls a few hooks (a step,
a phase, a row, the end); nothing here reads a device value between two training rows.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

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
        self.phases: dict[str, WatchedPhase] = {}
        self._staging: Callable[[], None] = lambda: None
        self._waited = False

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
        self.clock.lap("data")
        self._staging, self._waited = wait_for_staging, False
        if self.throughput.counting:
            out = self.throughput.step(lambda: engine.train_step(window, self._wait), samples)
        else:
            out = engine.train_step(window, self._wait)
        self.clock.lap("optimizer" if self._waited else "step")
        return out

    def _wait(self) -> None:
        """The engine calls it between backward and the optimizer step."""
        self.clock.lap("step")
        self._staging()
        self.clock.lap("snapshot_wait")
        self._waited = True

    def step_done(self, global_step: int) -> None:
        if self.profiler is not None and self.profiler.active is not None:
            with self.clock.phase("profile"):  # writing the trace, once
                self.profiler.after_step(global_step)
        watchdog.beat(global_step)

    def watched(self, method: Callable[..., Any], name: str) -> Callable[..., Any]:
        """`method` (a checkpointer's save or wait) as a phase: timed under `name`, named in the heartbeat."""
        phase = self.phase(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with phase:
                return method(*args, **kwargs)

        return call

    def phase(self, name: str) -> "WatchedPhase":
        """A phase of the loop between steps: timed, and named in the heartbeat the hang watchdog reads."""
        found = self.phases.get(name)
        if found is None:
            found = self.phases[name] = WatchedPhase(self.clock.phase(name), watchdog.LOOP_PHASES.get(name))
        return found

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


class WatchedPhase:
    """The clock's phase, and the heartbeat's phase while it runs (reused: entered once per step)."""

    __slots__ = ("timed", "watched")

    def __init__(self, timed: Any, watched: Optional[str]) -> None:
        self.timed, self.watched = timed, watched

    def __enter__(self) -> None:
        if self.watched:
            watchdog.phase(self.watched)
        self.timed.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.timed.__exit__(*exc)
        if self.watched:
            watchdog.phase("training")
