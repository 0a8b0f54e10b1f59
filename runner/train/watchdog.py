"""The worker's side of the hang watchdog: a heartbeat the elastic agent reads, and stacks on demand.

Each worker keeps a small memory-mapped file in the launch's record folder (beside the failure
records: `heartbeat-rank-N`) holding a counter that moves at every step and phase change, the last
optimizer step and the phase (rendezvous, building, loading a snapshot, training, ...). Writing it
is a few bytes of memory: no system call, no sync. The agent (runner.launch.hangs) notices when the
counters stop moving and sends DUMP_SIGNAL: `faulthandler`, registered at start, writes the Python
stacks of all the worker's threads to its log (from C, so a thread stuck in a collective with or
without the GIL cannot stop it).
"""

from __future__ import annotations

import faulthandler
import mmap
import os
import signal
import struct
from pathlib import Path
from typing import IO, Optional

from runner.train import faults

DUMP_SIGNAL = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else None  # not one of the stop signals
PHASES = (
    "starting",
    "rendezvous",
    "building",
    "loading a snapshot",
    "training",
    "evaluating",
    "writing a snapshot",
    "epoch end",
    "finishing",
)
LOOP_PHASES = {"eval": "evaluating", "snapshot": "writing a snapshot", "epoch_end": "epoch end"}  # the loop's names
LAYOUT = struct.Struct("<qqq")  # counter, last optimizer step, phase index
HANG_BEFORE_JOIN = "RUNNER_TEST_HANG_BEFORE_JOIN"  # fault injection for tests: this RANK sleeps before the rendezvous


def heartbeat_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"heartbeat-rank-{rank}"


class Heartbeat:
    def __init__(self, path: Path) -> None:
        with open(path, "wb") as f:  # fresh for each attempt: the agent reads it by rank
            f.write(b"\0" * LAYOUT.size)
        self.file = open(path, "r+b")
        self.map = mmap.mmap(self.file.fileno(), LAYOUT.size)
        self.counter = self.step = self.phase = 0

    def write(self) -> None:
        self.counter += 1
        LAYOUT.pack_into(self.map, 0, self.counter, self.step, self.phase)

    def close(self) -> None:
        self.map.close()
        self.file.close()


def read(path: Path) -> Optional[tuple[int, int, str]]:
    """(counter, step, phase) of a worker's heartbeat, or None before the worker made it."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < LAYOUT.size:
        return None
    counter, step, phase = LAYOUT.unpack_from(data)
    return counter, step, PHASES[phase] if 0 <= phase < len(PHASES) else "?"


_current: Optional[Heartbeat] = None
_dump_file: Optional[IO] = None


def start(log_path: Path, rank: int) -> None:
    """In a worker, first thing: stacks to `log_path` on DUMP_SIGNAL, and the heartbeat (under an
    agent that asked for records)."""
    global _current, _dump_file
    if DUMP_SIGNAL is not None:
        _dump_file = open(log_path, "a")
        faulthandler.register(DUMP_SIGNAL, file=_dump_file, all_threads=True, chain=False)
    folder = os.environ.get(faults.FAILURE_RECORDS)
    if folder:
        _current = Heartbeat(heartbeat_path(Path(folder), rank))
        phase("rendezvous")
    if os.environ.get(HANG_BEFORE_JOIN) == str(rank) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        import time

        time.sleep(3600)  # a rank that never joins (first attempt only)


def stop() -> None:
    global _current, _dump_file
    if _current is not None:
        phase("finishing")
        _current.close()
        _current = None
    if _dump_file is not None:
        faulthandler.unregister(DUMP_SIGNAL)
        _dump_file.close()
        _dump_file = None


def phase(name: str) -> None:
    if _current is not None:
        _current.phase = PHASES.index(name)
        _current.write()


def beat(step: int) -> None:
    """After every optimizer step."""
    if _current is not None:
        _current.step = step
        _current.write()
