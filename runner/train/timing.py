"""Where a step's time goes, without a host sync per step.

The loop marks the boundaries between phases (`lap`): waiting for data, forward and backward, the
wait for a snapshot in flight, the optimizer step, evaluation, snapshots, the training row. On a CPU
a mark is a clock read (the work is done when the call returns). On a GPU a mark is a CUDA event
recorded in the stream (no wait): the time between two events is the device's time for what was
queued between them, and a device left idle while the host waits for data shows as data time.
The events are read at the training row, after the row's own host sync, when they have all passed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Union

import torch

Mark = Union[float, "torch.cuda.Event"]


class PhaseClock:
    """Time since the previous mark is charged to the phase named at the next one; `flush()` returns
    the seconds of each phase since the last flush and adds them to the run's totals."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.row: dict[str, float] = defaultdict(float)
        self.pending: list[tuple[str, Mark, Mark]] = []  # CUDA: (phase, start event, end event), read at flush
        self.spare: list[Mark] = []
        self.stack: list[str] = []
        self.phases: dict[str, Phase] = {}
        self.last: Mark = self._mark()

    def _mark(self) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = self.spare.pop() if self.spare else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def restart(self) -> None:
        """Start timing afresh from now (what happened since the last mark is charged to nobody)."""
        self.last = self._mark()

    def lap(self, phase: str) -> None:
        now = self._mark()
        if self.cuda:
            self.pending.append((phase, self.last, now))
        else:
            self.row[phase] += now - self.last
        self.last = now

    def phase(self, name: str) -> "Phase":
        """Charge what runs inside to `name`; what ran before it to the enclosing phase, or to `loop`
        (the loop's own bookkeeping between a step and its snapshot point)."""
        found = self.phases.get(name)
        if found is None:
            found = self.phases[name] = Phase(self, name)
        return found

    def flush(self) -> dict[str, float]:
        """The seconds of each phase since the last flush (call it after a host sync on a GPU)."""
        if self.pending:
            self.pending[-1][2].synchronize()  # has passed already after the row's sync: returns at once
            seen: set[int] = set()
            for phase, start, end in self.pending:
                self.row[phase] += start.elapsed_time(end) / 1000.0
                for event in (start, end):
                    if id(event) not in seen and event is not self.last:
                        seen.add(id(event))
                        self.spare.append(event)
            self.pending = []
        row, self.row = dict(self.row), defaultdict(float)
        for phase, seconds in row.items():
            self.totals[phase] += seconds
        return row


class Phase:
    """A reusable context manager (entered once per step: cheaper than a generator's)."""

    __slots__ = ("clock", "name")

    def __init__(self, clock: PhaseClock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        clock = self.clock
        clock.lap(clock.stack[-1] if clock.stack else "loop")
        clock.stack.append(self.name)

    def __exit__(self, *exc: object) -> None:
        self.clock.stack.pop()
        self.clock.lap(self.name)
