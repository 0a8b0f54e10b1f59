"""`python -m runner <overrides>`: compose, validate, prepare the run directory, launch, report.

The driver never trains (except with launch=local, where it is the only worker): it checks the
config before any worker starts, writes the resolved config for the workers, hands them to the
elastic agent, then prints a summary or the failing rank's error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from runner.config import register_schema
from runner.errors import EXIT_TRAINING_FAILED, EXIT_USER_ERROR, UserError, full_errors_requested, report_user_error
from runner.rundir import run_dir_name, write_run_files
from runner.worker import peak_rss_mb

log = logging.getLogger("runner")
_TASK_STARTED = False


def _run_dir_name_resolver(name, overrides) -> str:
    items = list(overrides) if isinstance(overrides, (list, ListConfig)) else []
    return run_dir_name(name, items)


register_schema()
OmegaConf.register_new_resolver("run_dir_name", _run_dir_name_resolver, replace=True)


@hydra.main(version_base="1.3", config_path="pkg://runner.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> int:
    global _TASK_STARTED
    _TASK_STARTED = True
    code = run(cfg)
    if HydraConfig.get().mode == RunMode.RUN and code:
        raise SystemExit(code)
    return code


def run(cfg: DictConfig) -> int:
    """One job: validate (unless the preflight callback did), prepare, launch, report. Returns an exit code."""
    from runner import callbacks, launch, preflight
    from runner.snapshot import SnapshotManager

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).absolute()
    try:
        if str(run_dir) not in callbacks.VALIDATED:
            preflight.preflight(cfg, run_dir, dict(hydra_cfg.runtime.choices), tuple(hydra_cfg.overrides.task))
    except UserError as err:
        _remove_if_empty(run_dir)
        if full_errors_requested():
            raise
        report_user_error(err)
        return EXIT_USER_ERROR

    with open_dict(cfg):
        cfg.runtime = launch.resolve_runtime(cfg.launch)
        resume = str(cfg.snapshot.resume)
        if resume not in ("auto", "never", "must"):
            cfg.snapshot.resume = str(Path(resume).absolute())
    if cfg.snapshot.resume == "never":
        _archive_previous_run(run_dir, cfg.snapshot.dir)
    write_run_files(run_dir, cfg, hydra_cfg)
    from runner.logs import add_driver_log_file

    add_driver_log_file(run_dir)
    rt = cfg.runtime
    log.info("run directory %s: %s x %d (%s), launch=%s", _short(run_dir), rt.device, rt.nproc_per_node, rt.backend, cfg.launch.mode)
    started = time.perf_counter()
    try:
        summary = launch.launch(cfg, run_dir) or {}
    except UserError as err:  # raised inside launch=local
        report_user_error(err)
        return EXIT_USER_ERROR
    except BaseException as err:
        return _report_failure(err, cfg, run_dir)
    wall = time.perf_counter() - started
    _print_summary(run_dir, summary, wall, SnapshotManager(run_dir / cfg.snapshot.dir))
    return 0


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _remove_if_empty(run_dir: Path) -> None:
    try:
        run_dir.rmdir()  # only succeeds when Hydra created it empty for this rejected job
    except OSError:
        pass


def _archive_previous_run(run_dir: Path, snapshot_dir: str) -> None:
    """snapshot.resume=never: start over, but keep (never delete) the previous snapshots and metrics."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in (snapshot_dir, "metrics.jsonl"):
        src = run_dir / name
        if src.exists():
            dst = run_dir / "archive" / stamp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved.append(str(dst))
    if moved:
        log.info("snapshot.resume=never: previous snapshots and metrics moved to %s", _short(run_dir / "archive" / stamp))


def _print_summary(run_dir: Path, summary: dict, wall: float, manager) -> None:
    if not summary:
        print(f"done: this node's workers finished; rank 0's node reports the summary ({_short(run_dir)})")
        return
    loss = summary.get("final_loss")
    sps = summary.get("samples_per_s")
    resumed = summary.get("resumed_from")
    lines = [
        f"run directory : {_short(run_dir)}",
        f"epochs        : {summary.get('epochs')} ({summary.get('steps')} steps, {summary.get('world_size')} workers)"
        + (f", resumed from {resumed['file']} at epoch {resumed['epoch']} step {resumed['step']}" if resumed else ""),
        f"final loss    : {loss:.6g}" if loss is not None else "final loss    : n/a",
        f"throughput    : {sps:,.0f} samples/s" if sps else "throughput    : n/a",
        f"wall time     : {wall:.1f} s",
        f"peak memory   : driver {peak_rss_mb():.0f} MB, rank 0 {summary.get('peak_rss_mb', 0):.0f} MB",
        f"snapshot      : {_short(manager.dir / summary['snapshot'])}" if summary.get("snapshot") else "snapshot      : none written",
    ]
    print("\n".join(lines))


def _report_stopped(run_dir: Path, signum) -> int:
    name = signal.Signals(signum).name if signum else "a signal"
    print(f"Stopped by {name}: a snapshot of the last step is in {_short(run_dir)}; "
          f"run the same command again to resume.", file=sys.stderr)
    return 128 + (signum or 15)


def _report_failure(err: BaseException, cfg: DictConfig, run_dir: Path) -> int:
    """Training failed: the failing rank, its exception and the tail of its log, not agent noise."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from runner.logs import TRAIN_LOG, rank_log_path, tail

    from runner.stop import Stopped

    if isinstance(err, Stopped):  # launch=local: the driver itself was the worker
        return _report_stopped(run_dir, err.signum)
    if isinstance(err, (SignalException, KeyboardInterrupt)):
        signum = getattr(err, "sigval", None)
        return _report_stopped(run_dir, int(signum) if signum is not None else signal.SIGINT)
    if full_errors_requested():
        import traceback

        traceback.print_exception(err)
    if isinstance(err, ChildFailedError):
        rank, failure = err.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", str(message))
        text = str(message).strip().splitlines()
        what = text[0] if text else f"exit code {failure.exitcode}"
        if failure.exitcode < 0 and "Signal" not in what:
            what = f"killed by signal {-failure.exitcode}"
    else:
        rank, what = 0, f"{type(err).__name__}: {err}"
    restarts = cfg.launch.max_restarts
    log_path = rank_log_path(run_dir, rank)
    lines = [f"Error: training failed on rank {rank}" + (f" (after {restarts} restarts)" if restarts and cfg.launch.mode != "local" else "")
             + f": {what}"]
    last = [line for line in tail(log_path, 60) if line.strip()][-8:]
    if last:
        lines.append(f"  last lines of {_short(log_path)}:")
        lines += [f"    {line[:300]}" for line in last]
    lines.append(f"  full logs: {_short(log_path)} (all ranks: {_short(run_dir / TRAIN_LOG)})")
    print("\n".join(lines), file=sys.stderr)
    return EXIT_TRAINING_FAILED


def main() -> None:
    """Console entry point. Hydra's own errors (unknown key, bad type) exit 2, like ours."""
    try:
        _hydra_main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _TASK_STARTED:
            raise SystemExit(EXIT_USER_ERROR) from None
        raise


if __name__ == "__main__":
    main()
