"""Graceful stop on SIGTERM/SIGINT: finish the step, snapshot, exit.

A scheduler's SIGTERM or a Ctrl-C can reach the ranks at slightly different steps; if each rank
stopped on its own, the others would hang in the next collective. So a signal only sets a flag,
and once per step the ranks agree on it with a small all-reduce that runs on the CPU (gloo) and
overlaps with the step's compute. A second signal aborts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.signal: Optional[int] = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._work = None
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

    def start(self) -> None:
        """Start this step's agreement on whether to stop (asynchronous)."""
        self._flag.fill_(1 if self.signal is not None else 0)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def agreed(self) -> bool:
        """True when any rank has been asked to stop (waits for the all-reduce started by start())."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return bool(self._flag.item())

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
