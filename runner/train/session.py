"""What every worker (DDP or RPC) does around the training loop: wire it to an engine, resume it,
and report how training ended.

How training ended reaches the driver as follows: a summary (rank 0's return value) when it
finished or diverged (`status`), an exception when it failed, and `Stopped` (re-raised) with the
marker file `logs/stopped.json` when it stopped on a signal after writing its snapshot. A worker
that diverged returns normally, so the elastic agent does not restart it to diverge again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from runner.config import resume_path
from runner.loggers import build_logger
from runner.logs import LOG_DIR, rank_log_path
from runner.snapshot import NullWriter, SnapshotManager, SnapshotWriter, load_path
from runner.train.batches import BatchSource
from runner.train.engine import Engine
from runner.train.loop import TrainLoop
from runner.train.metrics import METRICS_FILE, MetricsWriter
from runner.train.stop import Diverged, StopRequest, Stopped

log = logging.getLogger(__name__)
STOP_MARKER = "stopped.json"
OS_ERRORS = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EROFS: "the filesystem is read-only",
             errno.EDQUOT: "the disk quota is exceeded"}


def snapshot_manager(cfg: DictConfig, run_dir: Path) -> SnapshotManager:
    return SnapshotManager(run_dir / cfg.snapshot.dir, cfg.snapshot.keep_last, cfg.snapshot.milestone_every)


def train(cfg: DictConfig, run_dir: Path, engine: Engine, dataset) -> dict[str, Any]:
    """Wire the loop to `engine` (the lead rank writes snapshots, metrics and the extra logger; the
    others write nothing), resume it if there is a snapshot, and run it to the end."""
    lead = engine.collectives.rank == 0
    manager = snapshot_manager(cfg, run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    if lead:
        manager.remove_stale_temporaries()
        writer, metrics = SnapshotWriter(manager, config, bool(cfg.snapshot["async"])), MetricsWriter(run_dir / METRICS_FILE)
    else:
        writer, metrics = NullWriter(), None
    logger = build_logger(cfg, run_dir) if lead else None
    stop = StopRequest(engine.collectives)
    loop = TrainLoop(cfg.trainer, config, engine, BatchSource(dataset, engine.device), writer, stop, metrics, logger)
    try:
        loaded = find_resume_state(cfg, manager)
        if loaded is not None:
            entry, state = loaded
            loop.resume(state, entry)
            log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch%s", entry.get("file"), loop.epoch,
                     loop.global_step, loop.samples_in_epoch, restart_note())
        elif lead:
            log.info("starting from scratch: %d processes, %s, run directory %s%s", engine.processes, engine.device,
                     run_dir, restart_note())
        return loop.fit()
    finally:
        stop.restore()
        if logger is not None:
            logger.close()
        engine.close()


def find_resume_state(cfg: DictConfig, manager: SnapshotManager):
    """(entry, state) to resume from: the run directory's newest valid snapshot wins, else a
    snapshot path given by the user, else None (start fresh)."""
    latest = manager.load_latest()  # raises SnapshotError when versions exist but none is valid
    if latest is not None:
        return latest
    path = resume_path(cfg.snapshot.resume)
    return ({"file": str(path)}, load_path(path)) if path is not None else None


def restart_note() -> str:
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return f" (restart {restarts} after a worker failure)" if restarts else ""


def stop_marker(run_dir: Path) -> Path:
    return Path(run_dir) / LOG_DIR / STOP_MARKER


def run_reported(train: Callable[[], dict[str, Any]], run_dir: Path, rank: int) -> Optional[dict[str, Any]]:
    """Run `train()` and turn each way it can end into what the driver reports."""
    try:
        return train()
    except Stopped as stopped:
        # Raised, not returned: a worker that returns a value waits for the agent to read it,
        # and an agent that is shutting down on the same signal never does.
        written = stopped.snapshot
        if stopped.lead:  # the rank that writes snapshots knows whether this one was written
            stop_marker(run_dir).write_text(json.dumps({"file": written["file"] if written else None,
                                                        "step": stopped.step, "signal": stopped.signum}))
        if not stopped.lead:
            log.warning("%s at step %d", stopped, stopped.step)
        elif written:
            log.warning("%s at step %d; its snapshot is on disk", stopped, stopped.step)
        else:
            log.warning("%s at step %d; no snapshot of it was written (its weights are not finite)", stopped, stopped.step)
        raise
    except Diverged as diverged:
        log.error("stopping: %s (trainer.on_nonfinite=stop)", diverged)
        last = diverged.last_snapshot
        return {"status": "diverged", "step": diverged.step, "what": diverged.what,
                "last_snapshot": last["file"] if last else None}
    except OSError as err:
        if err.errno in OS_ERRORS:
            log.error("training failed on rank %d: %s (%s) writing %s", rank, os.strerror(err.errno), OS_ERRORS[err.errno],
                      err.filename or "a file", exc_info=True, extra={"console": False})
        _log_failure(err, run_dir, rank)
        raise
    except Exception as err:
        _log_failure(err, run_dir, rank)
        raise


def _log_failure(err: BaseException, run_dir: Path, rank: int) -> None:
    log.error("training failed on rank %d", rank, exc_info=True, extra={"console": False})
    log.warning("failed: %s: %s (traceback in %s)", type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                rank_log_path(run_dir, rank), extra={"file": False})
    traceback.clear_frames(err.__traceback__)  # free what the frames hold (the DDP model) before exit
