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

import torch
from omegaconf import DictConfig, OmegaConf

from runner.config import resume_path
from runner.fileio import atomic_write
from runner.layout import METRICS_FILE, RESULTS_FILE, rank_log_path, stop_marker
from runner.loggers import build_logger
from runner.snapshot import format as snap
from runner.snapshot import load_path
from runner.snapshot.checkpointer import Checkpointer, build_checkpointer
from runner.snapshot.location import snapshot_manager
from runner.snapshot.versions import Version
from runner.train import faults, watchdog
from runner.train.batches import DataSource
from runner.train.engine import Engine
from runner.train.loop import TrainLoop
from runner.train.memory import describe_oom, start_history
from runner.train.metrics import MetricsWriter
from runner.train.observer import Observer
from runner.train.profiling import profile_window
from runner.train.resume_notes import log_notes, resume_noting_changes
from runner.train.stop import Diverged, Stopped, StopRequest, first_of_node

log = logging.getLogger(__name__)
OS_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EACCES: "permission denied",
    errno.EROFS: "the filesystem is read-only",
    errno.EDQUOT: "the disk quota is exceeded",
}


def train(cfg: DictConfig, run_dir: Path, engine: Engine, data: DataSource, task) -> dict[str, Any]:
    """Wire the loop to `engine` (the lead rank writes snapshots, metrics and the extra logger; the
    others write nothing), resume it if there is a snapshot, run it to the end, then test."""
    lead = engine.collectives.rank == 0
    start_history(cfg.trainer, engine.device)  # trainer.memory_snapshot
    manager = snapshot_manager(cfg, run_dir)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # plain data: snapshots load weights_only
    if lead:
        manager.remove_stale_temporaries()  # before any rank writes: the first save starts with a collective
    checkpointer = build_checkpointer(cfg, manager, lead, config, engine.device, engine)
    metrics = MetricsWriter(run_dir / METRICS_FILE) if lead else None
    logger = build_logger(cfg, run_dir) if lead else None
    stop = StopRequest(engine.collectives)
    observer = Observer.from_config(
        cfg.trainer,
        engine.device,
        profiler=profile_window(cfg.trainer, run_dir, engine.collectives.rank, engine.device),
    )
    checkpointer.save = observer.watched(checkpointer.save, "snapshot")  # writes and waits: time/snapshot
    checkpointer.wait = observer.watched(checkpointer.wait, "snapshot")
    loop = TrainLoop(cfg, config, engine, data, task, checkpointer, stop, metrics, logger, observer)
    try:
        watchdog.phase("loading a snapshot")
        loaded = find_resume_state(cfg, checkpointer, engine.collectives)
        if loaded is not None:
            entry, state = loaded
            if isinstance(entry, Version):  # one of this run's versions: retention never deletes it
                manager.pin(entry)
            notes = resume_noting_changes(loop, state, entry, config)  # loop.resume, and what changed since
            log.info(
                "resumed from %s: epoch %d, step %d, %d samples into the epoch%s",
                entry.get("file"),
                loop.epoch,
                loop.global_step,
                loop.samples_in_epoch,
                restart_note(),
            )
            log_notes(notes)
        elif lead:
            log.info(
                "starting from scratch: %d processes, %s, run directory %s%s",
                engine.processes,
                engine.device,
                run_dir,
                restart_note(),
            )
        watchdog.phase("training")
        summary = loop.fit()
        if cfg.trainer.test and data.test is not None:
            watchdog.phase("evaluating")  # the test split: no step moves the heartbeat meanwhile
            summary["test"] = run_test(loop, run_dir)
        watchdog.phase("finishing")
        if logger is not None:
            snapshot = summary.get("snapshot")
            logger.finish({**summary, "snapshot_path": str(manager.dir / snapshot) if snapshot else None})
        return summary
    finally:
        stop.restore()
        checkpointer.close()
        if logger is not None:
            logger.close()
        engine.close()


def run_test(loop: TrainLoop, run_dir: Path) -> dict[str, Any]:
    """Evaluate the best snapshot (else the model as training left it, which the final snapshot
    holds) on the test split; the lead writes results.json. The checkpointer decides who verifies
    the best version (with sharded snapshots the lead, once, and every rank takes its choice)."""
    collectives = loop.engine.collectives
    collectives.sum_(torch.zeros(1, dtype=torch.float64))  # the lead's manifest is complete
    loaded = loop.checkpointer.load_best(collectives)
    best = loaded[0] if loaded is not None else None
    state = None
    if best is not None:
        sharded = loaded[1].get(snap.SHARDED_KEY)
        state = sharded if sharded is not None else loaded[1][snap.MODEL_KEY]  # sharded: every rank reads its part
    metrics = loop.test(state)
    chosen = best or loop.checkpointer.last_entry or {}
    results = {
        **metrics,
        "snapshot": chosen.get("file"),
        "step": best["step"] if best else loop.global_step,
        "chosen_by": f"best {loop.watch.name}" if best else "final model",
    }
    if loop.lead:
        atomic_write(run_dir / RESULTS_FILE, json.dumps(results, indent=1), durable=False)
        log.info(
            "test: %s (%s, %s)",
            " ".join(f"{k} {v:.6g}" for k, v in metrics.items()),
            results["snapshot"],
            results["chosen_by"],
        )
    return results


def find_resume_state(cfg: DictConfig, checkpointer: Checkpointer, collectives):
    """(entry, state) to resume from: the run directory's newest valid snapshot wins, else a
    snapshot path given by the user, else None (start fresh)."""
    latest = checkpointer.load_latest(collectives)  # raises SnapshotError when versions exist but none is valid
    if latest is not None:
        return latest
    path = resume_path(cfg.snapshot.resume)
    return ({"file": str(path)}, load_path(path)) if path is not None else None


def restart_note() -> str:
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return f" (restart {restarts} after a worker failure)" if restarts else ""


def run_reported(train: Callable[[], dict[str, Any]], run_dir: Path, rank: int) -> Optional[dict[str, Any]]:
    """Run `train()` and turn each way it can end into what the driver reports."""
    try:
        return train()
    except Stopped as stopped:
        # Raised, not returned: a worker that returns a value waits for the agent to read it,
        # and an agent that is shutting down on the same signal never does.
        written = stopped.snapshot
        faults.record_stop(stopped.signum, stopped.step, rank)  # a stop, not a failure: the agent must not restart it
        if stopped.lead:  # the rank that writes snapshots knows whether this one was written
            stop_marker(run_dir).write_text(
                json.dumps(
                    {"file": written["file"] if written else None, "step": stopped.step, "signal": stopped.signum}
                )
            )
        if not stopped.lead:
            log.warning("%s at step %d", stopped, stopped.step, extra={"console": first_of_node()})
        elif written:
            log.warning("%s at step %d; its snapshot is on disk", stopped, stopped.step)
        else:
            log.warning(
                "%s at step %d; no snapshot of it was written (its weights are not finite)", stopped, stopped.step
            )
        raise
    except Diverged as diverged:
        log.error("stopping: %s (trainer.on_nonfinite=stop)", diverged)
        last = diverged.last_snapshot
        return {
            "status": "diverged",
            "step": diverged.step,
            "what": diverged.what,
            "last_snapshot": last["file"] if last else None,
        }
    except OSError as err:
        if err.errno in OS_ERRORS:
            log.error(
                "training failed on rank %d: %s (%s) writing %s",
                rank,
                os.strerror(err.errno),
                OS_ERRORS[err.errno],
                err.filename or "a file",
                exc_info=True,
                extra={"console": False},
            )
        _log_failure(err, run_dir, rank)
        raise
    except Exception as err:
        _log_failure(err, run_dir, rank)
        raise


def _log_failure(err: BaseException, run_dir: Path, rank: int) -> None:
    faults.record_failure(err, rank)  # first: the agent reads it as soon as this process has exited
    log.error("training failed on rank %d", rank, exc_info=True, extra={"console": False})
    if faults.lost_peer(err):  # a node or a worker went away: the agent says which, and restarts
        log.warning(
            "lost a peer after step %s (its process or node is gone; traceback in %s)",
            faults.current_step,
            rank_log_path(run_dir, rank),
            extra={"file": False},
        )
        traceback.clear_frames(err.__traceback__)
        return
    log.warning(
        "failed: %s: %s (traceback in %s)",
        type(err).__name__,
        str(err).splitlines()[0] if str(err) else "",
        rank_log_path(run_dir, rank),
        extra={"file": False},
    )
    if isinstance(err, torch.OutOfMemoryError):  # after the traceback: among the last lines the driver shows
        log.error("%s", describe_oom(run_dir, rank, faults.current_step))
    traceback.clear_frames(err.__traceback__)  # free what the frames hold (the DDP model) before exit
