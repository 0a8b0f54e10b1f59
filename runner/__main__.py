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

from runner import sweep
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
    from torch.distributed.elastic.multiprocessing.api import SignalException

    global _TASK_STARTED
    _TASK_STARTED = True
    try:
        code = run(cfg)
    except SignalException as err:  # a stop signal outside the agent's watch: still a stop, never "next job"
        code = _report_stopped(Path(HydraConfig.get().runtime.output_dir), int(err.sigval))
    if code and (HydraConfig.get().mode == RunMode.RUN or code >= 128):
        raise SystemExit(code)  # a single run's exit code; in a sweep, a stop (Ctrl-C, SIGTERM) ends the sweep
    return code  # in a sweep, a failed job is reported and the next one starts


def run(cfg: DictConfig) -> int:
    """One job: validate (unless the preflight callback did), prepare, launch, report. Returns an exit code."""
    from runner import callbacks, preflight

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).absolute()
    overrides = list(hydra_cfg.overrides.task)
    job = {"overrides": overrides, "job_num": int(hydra_cfg.job.get("num") or 0)}
    try:
        if str(run_dir) not in callbacks.VALIDATED:
            preflight.preflight(cfg, run_dir, dict(hydra_cfg.runtime.choices), tuple(overrides))
    except UserError as err:
        if full_errors_requested():
            raise
        report_user_error(err)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep's table lists the job
            sweep.write_status(run_dir, "invalid config", exit_code=EXIT_USER_ERROR, **job)
        else:
            _remove_if_empty(run_dir)
        return EXIT_USER_ERROR
    finished = _finished_entry(cfg, run_dir)
    if finished is not None:
        print(f"{_short(run_dir)}: already complete ({finished['file']}, epoch {finished['epoch']} of "
              f"{cfg.trainer.total_epochs}); nothing to run. Raise trainer.total_epochs to train on, "
              f"or pass snapshot.resume=never to start over.")
        previous = sweep.read_status(run_dir) or {}
        sweep.write_status(run_dir, "finished", exit_code=0, skipped=True, epochs=finished["epoch"],
                           final_loss=previous.get("final_loss"), **job)
        return 0
    from runner.logs import add_driver_log_file

    _prepare_run_dir(cfg, run_dir, hydra_cfg, job)
    handler = add_driver_log_file(run_dir)
    try:
        code, summary = _launch_and_report(cfg, run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    status = "finished" if code == 0 else ("stopped" if code >= 128 else "failed")
    sweep.write_status(run_dir, status, exit_code=code, **job, **{k: summary.get(k) for k in ("epochs", "steps", "final_loss")})
    if code - 128 in (signal.SIGUSR1, signal.SIGUSR2):
        _requeue_if_preempted(code - 128)
    return code


def _requeue_if_preempted(signum: int) -> None:
    """A preemption notice under submitit/SLURM: the snapshot is on disk; now let submitit requeue.

    The agent replaced submitit's handler while it ran and the runner restored it afterwards, so
    calling it here does what the signal would have done (checkpoint + requeue; it exits)."""
    handler = signal.getsignal(signum)
    if callable(handler) and any(k.startswith("SUBMITIT_") for k in os.environ):
        log.warning("preempted (%s): snapshot written, requeueing the job", signal.Signals(signum).name)
        handler(signum, None)


def _finished_entry(cfg: DictConfig, run_dir: Path):
    """The run's newest snapshot if it already covers trainer.total_epochs (re-invoking does nothing)."""
    from runner.snapshot import SnapshotManager

    if cfg.snapshot.resume == "never":
        return None
    manager = SnapshotManager(run_dir / cfg.snapshot.dir)
    entry, _ = manager.newest_valid_entry() if manager.manifest_path.exists() else (None, [])
    return entry if entry is not None and entry["epoch"] >= cfg.trainer.total_epochs else None


def _prepare_run_dir(cfg: DictConfig, run_dir: Path, hydra_cfg, job: dict) -> None:
    from runner import launch

    with open_dict(cfg):
        cfg.runtime = launch.resolve_runtime(cfg.launch, **_parallel_share(hydra_cfg))
        resume = str(cfg.snapshot.resume)
        if resume not in ("auto", "never", "must"):
            cfg.snapshot.resume = str(Path(resume).absolute())
    if cfg.snapshot.resume == "never":
        _archive_previous_run(run_dir, cfg.snapshot.dir)
    write_run_files(run_dir, cfg, hydra_cfg)
    sweep.write_status(run_dir, "running", exit_code=None, **job)


def _parallel_share(hydra_cfg) -> dict:
    """With hydra/launcher=joblib, jobs run side by side: each gets its share of cores and GPUs."""
    launcher = hydra_cfg.get("launcher") or {}
    if hydra_cfg.mode != RunMode.MULTIRUN or "joblib" not in str(launcher.get("_target_", "")):
        return {}
    n_jobs = int(launcher.get("n_jobs") or 1)
    from runner.launch import usable_cores

    parallel = usable_cores() if n_jobs < 1 else n_jobs  # joblib: -1 = one per core
    return {"parallel_jobs": parallel, "slot": int(hydra_cfg.job.get("num") or 0) % parallel}


def _launch_and_report(cfg: DictConfig, run_dir: Path) -> tuple[int, dict]:
    from runner import launch
    from runner.snapshot import SnapshotManager

    rt = cfg.runtime
    comm = f"{rt.backend}, gradients through shared memory" if rt.get("allreduce") == "shm" else rt.backend
    log.info("run directory %s: %s x %d (%s), launch=%s", _short(run_dir), rt.device, rt.nproc_per_node, comm, cfg.launch.mode)
    started = time.perf_counter()
    try:
        summary = launch.launch(cfg, run_dir) or {}
    except UserError as err:  # raised inside launch=local
        report_user_error(err)
        return EXIT_USER_ERROR, {}
    except BaseException as err:
        return _report_failure(err, cfg, run_dir), {}
    wall = time.perf_counter() - started
    _print_summary(run_dir, summary, wall, SnapshotManager(run_dir / cfg.snapshot.dir))
    return 0, summary


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
        (f"throughput    : {sps:,.0f} samples/s" if sps else "throughput    : n/a")
        + (" (gradients through shared memory)" if summary.get("allreduce") == "shm" else ""),
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
        code = exit_.code if isinstance(exit_.code, int) else 1
    else:
        code = EXIT_TRAINING_FAILED if sweep.any_failed() else 0
    if _TASK_STARTED and not full_errors_requested():
        _exit_now(code)
    raise SystemExit(code)


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch and the elastic agent (~0.4 s).

    Safe here: every job has finished, every snapshot was awaited, and logs are flushed below."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
