"""Faults: injected ones (`trainer.crash_at_step`, `trainer.crash_rank`), to rehearse recovery for
real, and the record of real ones that lets the driver's elastic agent tell a bug from bad luck.

Injection: the chosen rank kills itself with SIGKILL (no cleanup, like an OOM kill) at the chosen
global step, on the first attempt only, so the workers the agent restarts go on and finish.

Records: a worker that fails with an exception writes its signature (type, message, last optimizer
step) to `<RUNNER_FAILURE_RECORDS>/attempt-<restart>-rank-<rank>.json`, a folder the driver makes
per launch (next to torch's error files, off the run directory). The agent does not restart an
attempt that failed like the attempt before (`repeated_failure`): a restart that replays the same
steps from the same snapshot meets the same bug again. Failures that a restart can fix write no
record, so they are always restarted: a killed process (SIGKILL, the OOM killer) writes nothing,
and a lost peer or node surfaces as torch.distributed's DistError. A CUDA out-of-memory error is
recorded (as one message, whatever sizes torch names), so one that repeats at its step ends the job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
FAILURE_RECORDS = "RUNNER_FAILURE_RECORDS"  # in the workers' environment: where they record failures
current_step: Optional[int] = None  # the last optimizer step this process completed (set by the loop)


def note_step(step: int) -> None:
    """Called by the loop after every optimizer step: where a failure happened, for its signature."""
    global current_step
    current_step = step


def crash_step(trainer_cfg) -> Optional[int]:
    """The step at which this process must die, or None. `crash_rank` is the process's RANK."""
    if (
        trainer_cfg.crash_at_step
        and int(os.environ.get("RANK", "0")) == trainer_cfg.crash_rank
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    ):
        return int(trainer_cfg.crash_at_step)
    return None


def crash_now(step: int) -> None:
    log.warning("crash_at_step=%d: killing rank %s with SIGKILL (fault injection)", step, os.environ.get("RANK", "0"))
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def restart_may_fix(err: BaseException) -> bool:
    """Failures of the machine rather than of the code: a lost peer or node (torch.distributed's
    DistError: backend, network, store, timeout) and host memory pressure, which other processes
    cause. A CUDA out-of-memory error is recorded: one that repeats at the same step is the model's
    size, not bad luck (runner.train.memory names the peak)."""
    import torch.distributed as dist

    return isinstance(err, (dist.DistError, MemoryError)) or lost_peer(err)


# gloo reports a peer that went away (its process or node died) as a plain RuntimeError
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def lost_peer(err: BaseException) -> bool:
    """A collective failed because a peer process is gone (it died, or its node did)."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistNetworkError) or (
        isinstance(err, RuntimeError) and "gloo" in text and any(words in text for words in LOST_PEER)
    )


def _message(err: BaseException) -> str:
    """The message a signature compares: torch's out-of-memory text names sizes that vary between
    attempts (free memory, other processes), so an out-of-memory error is one message."""
    import torch

    return "CUDA out of memory" if isinstance(err, torch.OutOfMemoryError) else str(err)[:4000]


def _write_record(kind: str, rank: int, record: dict) -> None:
    """`<kind>-<restart>-rank-<rank>.json` in the launch's record folder, whole or not at all (the
    agent never reads half a record); nothing outside an agent that asked for records. Without a
    record the attempt is handled as before these records existed."""
    folder = os.environ.get(FAILURE_RECORDS)
    if not folder:
        return
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    path = Path(folder) / f"{kind}-{attempt}-rank-{rank}.json"
    try:
        path.with_suffix(".tmp").write_text(json.dumps(record))
        os.replace(path.with_suffix(".tmp"), path)
    except OSError:
        pass


def _read_records(folder: Path, kind: str, attempt: int) -> list:
    """The records of restart `attempt` of one kind, by rank; unreadable ones are left out."""
    found = []
    for path in sorted(Path(folder).glob(f"{kind}-{attempt}-rank-*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def record_failure(err: BaseException, rank: int) -> None:
    """Write this worker's failure signature for the agent (only under an agent that asked for it)."""
    if not os.environ.get(FAILURE_RECORDS):
        return
    if restart_may_fix(err):  # a lost peer or node: where it happened, for the agent's "left at step N"
        _write_record("lost", rank, {"step": current_step})
        return
    lines = str(err).strip().splitlines()
    signature = {
        "type": f"{type(err).__module__}.{type(err).__qualname__}",
        "message": _message(err),
        "step": current_step,
        "rank": rank,  # these two are for the driver's report, not part of the signature
        "text": f"{type(err).__name__}: {lines[0] if lines else ''}"[:500],
    }
    _write_record("attempt", rank, signature)


def recorded_failures(folder: Path, attempt: int) -> list[dict]:
    """What the workers of restart `attempt` recorded about their own failures ({rank, text, ...})."""
    return [r for r in _read_records(folder, "attempt", attempt) if isinstance(r, dict)]


def record_stop(signum: Optional[int], step: int, rank: int) -> None:
    """Tell the agent that this worker stopped on request (a snapshot, then exit), which it must not
    restart: on a node whose workers got no signal themselves, the request came from another node."""
    _write_record("stop", rank, {"signal": signum, "step": step})


def lost_at_step(folder: Path, attempt: int) -> Optional[int]:
    """The last step a worker of restart `attempt` completed before it lost a peer, if one recorded it."""
    steps = [r["step"] for r in _read_records(folder, "lost", attempt) if isinstance(r.get("step"), int)]
    return max(steps) if steps else None


def clear_stops(folder: Path, attempt: int) -> None:
    """Forget the stop records of restart `attempt`: the agent stopped its workers itself (to let a
    node join), and the workers it starts next run under the same attempt number."""
    for path in Path(folder).glob(f"stop-{attempt}-rank-*.json"):
        path.unlink(missing_ok=True)


def stop_request(folder: Path, attempt: int) -> Optional[dict]:
    """{"signal", "step"} when a worker of restart `attempt` stopped on request, else None; the
    signal is that of a worker that received one (None: every worker here stopped because a
    worker elsewhere was asked to)."""
    found = _read_records(folder, "stop", attempt)
    return next((r for r in found if r.get("signal")), found[0] if found else None)


def _signatures(folder: Path, attempt: int) -> set[tuple]:
    found = set()
    for record in _read_records(folder, "attempt", attempt):
        try:
            found.add((record["type"], record["message"], record["step"]))
        except (KeyError, TypeError):
            continue
    return found


def repeated_failure(folder: Path, attempt: int) -> Optional[dict]:
    """The failure of restart `attempt` that the attempt before also ended with (same exception type,
    message and optimizer step), or None when this attempt failed differently (or was killed)."""
    if attempt < 1:
        return None
    same = _signatures(folder, attempt) & _signatures(folder, attempt - 1)
    if not same:
        return None
    kind, message, step = sorted(same, key=str)[0]
    return {"type": kind, "message": message, "step": step}
