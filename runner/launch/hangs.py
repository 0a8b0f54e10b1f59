"""The agent's side of the hang watchdog (`launch.hang_timeout`): notice that no worker moves, show
where each one is, and end the attempt as a failure that a restart may fix.

Every monitor tick the elastic agent reads its workers' heartbeats (runner.train.watchdog). When
no rank's heartbeat has moved for the limit, each worker is sent DUMP_SIGNAL (faulthandler writes
the stacks of all its threads to its log), the driver prints one table of which rank is where
(phase, last step, innermost line of its main thread, and the line of the run's own code that led
there), and the workers are killed: the agent sees a failed attempt and restarts it (or ends the job
when no restarts are left). The limit is `launch.hang_timeout`, raised to SLOW_FACTOR times the
slowest step seen so far, so slow steps never trip it; while a rank evaluates or writes a snapshot
(no heartbeat inside), at least `launch.collective_timeout`. Before training (the rendezvous,
building, loading a snapshot) the phase is named.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from runner.layout import rank_log_path
from runner.train import watchdog

log = logging.getLogger(__name__)
SLOW_FACTOR = 10.0
LONG_PHASES = ("evaluating", "writing a snapshot", "epoch end")
FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
LIBRARY = re.compile(r"(site-packages|dist-packages|/lib/python\d[\d.]*/)")


@dataclass
class Beat:
    counter: Optional[int]
    step: int
    phase: str
    moved: float  # monotonic time the counter last moved (or the attempt started)
    step_moved: float


@dataclass
class Hang:
    seconds: float
    limit: float
    rows: list[tuple[int, str, int, str]] = field(default_factory=list)  # rank, phase, step, where

    def table(self, run_dir: Path) -> str:
        head = (
            f"no rank finished a step or a phase for {self.seconds:.0f} s (limit {self.limit:.0f} s: "
            f"launch.hang_timeout, or {SLOW_FACTOR:g}x the slowest step seen). Where each rank is:"
        )
        width = max(len(r[1]) for r in self.rows) if self.rows else 5
        lines = [head, f"  rank  {'phase':<{width}}  after step  where"]
        for rank, phase, step, where in self.rows:
            lines.append(f"  {rank:<4}  {phase:<{width}}  {step:<10}  {where}")
        lines.append(f"  stacks of every thread: {rank_log_path(run_dir, 0).parent}/rank-N.log")
        return "\n".join(lines)

    def summary(self) -> str:
        stuck = ", ".join(f"rank {r}: {w}" for r, _, _, w in self.rows[:4])
        return f"hung: no rank moved for {self.seconds:.0f} s ({stuck})"


class HangWatch:
    def __init__(self, folder: Path, run_dir: Path, hang_timeout: float, collective_timeout: float) -> None:
        self.folder, self.run_dir = Path(folder), Path(run_dir)
        self.hang_timeout, self.collective_timeout = float(hang_timeout), float(collective_timeout)
        self.pids: tuple = ()
        self.beats: dict[int, Beat] = {}
        self.slowest = 0.0

    def _reset(self, pids: tuple) -> None:
        """A new attempt: its workers start with fresh heartbeats (steps seen before still count)."""
        self.pids, self.beats = pids, {}

    def limit(self, phases: list[str]) -> float:
        base = max(self.hang_timeout, SLOW_FACTOR * self.slowest)
        return max(base, self.collective_timeout) if any(p in LONG_PHASES for p in phases) else base

    def check(self, workers: list) -> Optional[Hang]:
        """Called every monitor tick with the agent's workers (`global_rank`, `id`: the pid)."""
        now = time.monotonic()
        pids = tuple(w.id for w in workers)
        if pids != self.pids:
            self._reset(pids)
        for w in workers:
            found = watchdog.read(watchdog.heartbeat_path(self.folder, w.global_rank))
            counter, step, phase = found if found else (None, 0, "starting")
            old = self.beats.get(w.global_rank)
            if old is None:
                self.beats[w.global_rank] = Beat(counter, step, phase, now, now)
                continue
            if step != old.step:
                if old.phase == "training" and old.step:  # the first step after a resume counts too, from its start
                    self.slowest = max(self.slowest, now - old.step_moved)
                old.step, old.step_moved = step, now
            if counter != old.counter:
                old.counter, old.phase, old.moved = counter, phase, now
        if not self.beats:
            return None
        idle = now - max(b.moved for b in self.beats.values())
        limit = self.limit([b.phase for b in self.beats.values()])
        return Hang(idle, limit) if idle > limit else None

    def report(self, workers: list, hang: Hang) -> Hang:
        """Stacks of every worker into its log, then where each one is, in `hang.rows`."""
        sizes = {}
        for w in workers:
            path = rank_log_path(self.run_dir, w.global_rank)
            sizes[w.global_rank] = path.stat().st_size if path.exists() else 0
            if watchdog.DUMP_SIGNAL is not None and self.beats.get(w.global_rank, None) is not None:
                try:
                    os.kill(w.id, watchdog.DUMP_SIGNAL)
                except (ProcessLookupError, PermissionError):
                    pass
        time.sleep(1.0)  # faulthandler writes from the signal handler itself: at once
        for w in sorted(workers, key=lambda w: w.global_rank):
            beat = self.beats.get(w.global_rank)
            stack = _new_text(rank_log_path(self.run_dir, w.global_rank), sizes[w.global_rank])
            where = where_stuck(stack) if stack else "no stack (the worker had not started its watchdog)"
            hang.rows.append((w.global_rank, beat.phase if beat else "starting", beat.step if beat else 0, where))
        return hang


def _new_text(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""


def _short(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def where_stuck(dump: str) -> str:
    """The main thread's innermost frame in a faulthandler dump, and the innermost frame of the run's
    own code (not the standard library or an installed package) when that is another one."""
    blocks: list[list[tuple[str, str, str]]] = []
    for line in dump.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append([])
            continue
        m = FRAME.match(line)
        if m and blocks:
            blocks[-1].append((m["file"], m["line"], m["func"]))
    main = [b for b in blocks if b and not (b[-1][0].endswith("threading.py") and b[-1][2] == "_bootstrap")]
    if not main:
        return "no Python frame (stuck in native code)"
    frames = main[0]
    file, line, func = frames[0]
    where = f"in {func}, {_short(file)}:{line}"
    own = next(((f, ln, fn) for f, ln, fn in frames if not LIBRARY.search(f)), None)
    if own is not None and own != frames[0]:
        where += f" (from {own[2]}, {_short(own[0])}:{own[1]})"
    return where


def kill_all(workers: list) -> None:
    """SIGKILL: a hung worker may never reach the point where it would act on SIGTERM."""
    for w in workers:
        try:
            os.kill(w.id, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, TypeError):
            pass


def describe(hang: Any, run_dir: Path) -> None:
    log.error("%s", hang.table(run_dir))
