"""Graceful stop on SIGTERM/SIGINT (and a cluster's preemption notice): finish the step, snapshot, exit.

A scheduler's SIGTERM or a Ctrl-C can reach the ranks at slightly different steps; if each rank
stopped on its own, the others would hang in the next collective. So a signal only sets a flag,
and the ranks agree on it with a tiny max-reduction. On a small CPU job that collective costs as
much as the gradient all-reduce itself, so it does not run every step: it runs every `every`
steps, and rank 0 re-tunes `every` at each check so that checks happen about every `interval`
seconds (the value travels in the same reduction, so all ranks agree on it).

A second signal aborts at once, unless it arrives within `SAME_CAUSE_SECONDS` of the first: one
event often delivers several (the parent-death signal reaches a worker once per thread of the
agent that dies; a terminal's Ctrl-C reaches the whole process group), and those are one request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

import torch

from runner.train.collectives import Collectives

log = logging.getLogger(__name__)
# SIGTERM/SIGINT: scheduler stop, Ctrl-C. SIGUSR1/SIGUSR2: a cluster's preemption notice
# (SLURM --signal, submitit); the driver requeues the job once the snapshot is written.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
MAX_EVERY = 1000
SAME_CAUSE_SECONDS = 1.0


class StopRequest:
    def __init__(self, collectives: Collectives, interval: float = 0.05) -> None:
        self.collectives = collectives
        self.interval = interval
        self.signal: Optional[int] = None
        self._signal_time = 0.0
        self.every = 1
        self._last_check = (0, time.perf_counter())
        self._buf = torch.zeros(2, dtype=torch.int64)
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal is not None:
            if now - self._signal_time < SAME_CAUSE_SECONDS:
                return  # the same event delivered again, not a second request
            self.restore()
            raise KeyboardInterrupt  # a second request: the user means it
        self.signal, self._signal_time = signum, now
        log.warning(
            "received %s: finishing the current step, then writing a snapshot",
            signal.Signals(signum).name,
            extra={"console": first_of_node()},
        )

    @property
    def signal_time(self) -> Optional[float]:
        """When (time.monotonic) this process got its stop signal; None when it got none itself."""
        return self._signal_time if self.signal is not None else None

    def should_stop(self, step: int) -> bool:
        """Collective at agreed steps: True when any rank has been asked to stop."""
        if self.collectives.world_size == 1:
            return self.signal is not None
        if step % self.every:
            return False
        last_step, last_time = self._last_check
        now = time.perf_counter()
        proposal = 0
        if self.collectives.rank == 0 and step > last_step:
            per_step = (now - last_time) / (step - last_step)
            proposal = max(1, min(MAX_EVERY, int(self.interval / max(per_step, 1e-9))))
        self._buf[0] = 1 if self.signal is not None else 0
        self._buf[1] = proposal
        self.collectives.max_(self._buf)
        if self._buf[1] > 0:
            self.every = int(self._buf[1])
        self._last_check = (step, now)
        return bool(self._buf[0])

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def first_of_node() -> bool:
    """Whether this worker speaks for its node on the console about a stop: a Ctrl-C or a
    scheduler's signal reaches every worker of the node (its process group) at once, and one line
    says it; the others write theirs to their log files only."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


class Stopped(Exception):
    """Training stopped at a step boundary on request; `snapshot` is the manifest entry written for
    it (None when none could be: non-finite weights)."""

    def __init__(
        self, signum: Optional[int], snapshot: Optional[dict] = None, step: int = 0, lead: bool = True
    ) -> None:
        self.signum, self.snapshot, self.step, self.lead = signum, snapshot, step, lead
        name = signal.Signals(signum).name if signum else "a stop request"
        super().__init__(f"stopped by {name}")


class Diverged(Exception):
    """A loss or a weight became NaN or infinite (trainer.on_nonfinite=stop); every rank raises it
    at the same step. `last_snapshot` is the newest (finite) snapshot this run wrote, if any."""

    def __init__(self, step: int, what: str, last_snapshot: Optional[dict] = None) -> None:
        self.step, self.what, self.last_snapshot = step, what, last_snapshot
        super().__init__(f"{what} is not finite at step {step}")
