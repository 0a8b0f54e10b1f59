"""Graceful stop on SIGTERM/SIGINT: finish the step, snapshot, exit.

A scheduler's SIGTERM or a Ctrl-C can reach the ranks at slightly different steps; if each rank
stopped on its own, the others would hang in the next collective. So a signal only sets a flag,
and the ranks agree on it with a tiny all-reduce on the CPU. On a small CPU job that collective
costs as much as the gradient all-reduce itself, so it does not run every step: it runs every
`every` steps, and rank 0 re-tunes `every` at each check so that checks happen about every
`interval` seconds (the value travels in the same all-reduce, so all ranks agree on it).
A second signal aborts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
# SIGTERM/SIGINT: scheduler stop, Ctrl-C. SIGUSR1/SIGUSR2: a cluster's preemption notice
# (SLURM --signal, submitit); the driver requeues the job once the snapshot is written.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
MAX_EVERY = 1000


class StopRequest:
    def __init__(self, group: Optional[dist.ProcessGroup] = None, interval: float = 0.05) -> None:
        self.group = group
        self.interval = interval
        self.signal: Optional[int] = None
        self.every = 1
        self._last_check = (0, time.perf_counter())
        self._buf = torch.zeros(2, dtype=torch.int64)
        self.shared_memory = None  # a runner.shm_allreduce.SharedMemoryAllreduce: the same agreement, ~100x cheaper
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # second signal: the user means it
            self.restore()
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: finishing the current step, then writing a snapshot", signal.Signals(signum).name)

    def should_stop(self, step: int) -> bool:
        """Collective at agreed steps: True when any rank has been asked to stop."""
        distributed = dist.is_initialized() and dist.get_world_size(self.group) > 1
        if not distributed:
            return self.signal is not None
        if step % self.every:
            return False
        last_step, last_time = self._last_check
        now = time.perf_counter()
        proposal = 0
        if dist.get_rank() == 0 and step > last_step:
            per_step = (now - last_time) / (step - last_step)
            proposal = max(1, min(MAX_EVERY, int(self.interval / max(per_step, 1e-9))))
        self._buf[0] = 1 if self.signal is not None else 0
        self._buf[1] = proposal
        if self.shared_memory is not None:
            self.shared_memory.all_reduce_(self._buf, op="max")
        else:
            dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group)
        if self._buf[1] > 0:
            self.every = int(self._buf[1])
        self._last_check = (step, now)
        return bool(self._buf[0])

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Stopped(Exception):
    """Training stopped at a step boundary on request; a snapshot of that step was written."""

    def __init__(self, signum: Optional[int]) -> None:
        self.signum = signum
        name = signal.Signals(signum).name if signum else "a stop request"
        super().__init__(f"stopped by {name}")
