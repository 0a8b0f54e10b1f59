"""`python -m runner <overrides>`: compose, validate, lock and prepare the run directory, launch, report.

The driver never trains (except with launch=local, where it is the only worker): it checks the
config before any worker starts, decides the runtime once, writes the resolved config for the
workers, hands them to the elastic agent, then prints a summary or the failing rank's error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from runner.config import LaunchMode, ResumeWord, Runtime, quote_path_overrides, register_schema, resume_path
from runner.driver import reports, sweep
from runner.driver.rundir import run_dir_name, write_run_files
from runner.errors import EXIT_TRAINING_FAILED, EXIT_USER_ERROR, UserError, full_errors_requested, report_user_error
from runner.launch.start import quiet_driver_cpp_warnings, stop_forkserver

log = logging.getLogger("runner")


def _run_dir_name_resolver(name, overrides) -> str:
    items = list(overrides) if isinstance(overrides, (list, ListConfig)) else []
    return run_dir_name(name, items)


def _sweep_dir_resolver(root, name) -> str:
    """A named sweep's jobs go under its name (each job then named from its own overrides)."""
    return os.path.join(str(root), run_dir_name(name, [])) if name else str(root)


register_schema()
OmegaConf.register_new_resolver("run_dir_name", _run_dir_name_resolver, replace=True)
OmegaConf.register_new_resolver("sweep_dir", _sweep_dir_resolver, replace=True)


class Driver:
    """One command: Hydra runs `task` once (or once per sweep job); `main` turns the outcome into
    the process's exit code."""

    def __init__(self) -> None:
        self.task_started = False

    def task(self, cfg: DictConfig) -> float:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        self.task_started = True
        try:
            code = run(cfg)
        except SignalException as err:  # a stop signal outside the agent's watch: still a stop, never "next job"
            code = reports.report_stopped(Path(HydraConfig.get().runtime.output_dir), int(err.sigval), cfg)
        if code and (HydraConfig.get().mode == RunMode.RUN or code >= 128):
            raise SystemExit(code)  # a single run's exit code; in a sweep, a stop (Ctrl-C, SIGTERM) ends the sweep
        # In a sweep, a failed job is reported and the next one starts. What the job returns is its
        # objective, for sweepers that search (hydra/sweeper=optuna): NaN marks a failed trial.
        status = sweep.read_status(Path(HydraConfig.get().runtime.output_dir)) or {}
        value = status.get("objective") if code == 0 else None
        return float(value) if isinstance(value, (int, float)) else float("nan")

    def main(self) -> None:
        """Console entry point. Hydra's own errors (unknown key, bad type) exit 2, like ours."""
        if not full_errors_requested():
            quiet_driver_cpp_warnings()
        _register_plugins()
        sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run directories' names hold = and ,
        try:
            sweep.check_plugins(sys.argv[1:])
        except UserError as err:
            if full_errors_requested():
                raise
            report_user_error(err)
            raise SystemExit(EXIT_USER_ERROR) from None
        try:
            try:
                hydra.main(version_base="1.3", config_path="pkg://runner.conf", config_name="config")(self.task)()
            except SystemExit as exit_:
                if exit_.code == 1 and not self.task_started:
                    raise SystemExit(EXIT_USER_ERROR) from None
                code = exit_.code if isinstance(exit_.code, int) else 1
            else:
                code = EXIT_TRAINING_FAILED if sweep.ended_sweep_failed() else 0
        finally:  # every worker has exited; a fork server still importing would outlive the command
            stop_forkserver(at_exit=True)
            sweep.remove_rows()  # a sweep stopped before its closing table leaves no rows behind
        if self.task_started and not full_errors_requested():
            _exit_now(code)
        raise SystemExit(code)


def _register_plugins() -> None:
    """Hydra finds sweepers by scanning installed `hydra_plugins` packages, which misses ours in an
    editable install; registering it by hand works in every install."""
    from runner.driver import completion

    completion.register()  # bash completion that also understands `python -m runner`
    try:
        from hydra.core.plugins import Plugins

        from hydra_plugins.runner_optuna_sweeper.resumable import ResumableOptunaSweeper
    except ImportError:  # hydra-optuna-sweeper not installed: there is nothing to register
        return
    Plugins.instance().register(ResumableOptunaSweeper)


def run(cfg: DictConfig) -> int:
    """One job: validate and lock (unless the preflight callback did), prepare, launch, report. Returns an exit code.

    Only the holder of the run directory's lock writes into it. A refused sweep job leaves its row
    in the sweep's table instead (the directory may hold another run's good status.json), and the
    empty job directory Hydra made for it is removed."""
    from runner.driver import checks
    from runner.driver.callbacks import placed
    from runner.driver.lock import RunDirInUse, RunDirLock

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).absolute()
    overrides = list(hydra_cfg.overrides.task)
    job = {"overrides": overrides, "job_num": int(hydra_cfg.job.get("num") or 0)}
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        placed(cfg)  # a sweep job (the preflight callback placed a single run already)
    except UserError as err:
        if full_errors_requested():
            raise
        report_user_error(err)
        return EXIT_USER_ERROR
    lock = RunDirLock.held(run_dir) or RunDirLock(run_dir, shared=cfg.launch.mode == LaunchMode.multinode)
    try:
        if lock.holding and cfg.get("runtime"):  # a single run: the preflight callback checked, locked and resolved
            runtime = Runtime.from_config(cfg.runtime)
        else:
            choices = dict(hydra_cfg.runtime.choices)
            runtime = checks.check_holding(cfg, run_dir, choices, tuple(overrides), lock, **_parallel_share(hydra_cfg))
    except UserError as err:
        if full_errors_requested():
            raise
        report_user_error(err)
        if multirun:
            sweep.write_refused(
                run_dir,
                "in use" if isinstance(err, RunDirInUse) else "invalid config",
                exit_code=EXIT_USER_ERROR,
                **job,
            )
        _remove_if_empty(run_dir)
        return EXIT_USER_ERROR
    try:
        lock.accepted()
        return _run_locked(cfg, run_dir, hydra_cfg, job, runtime)
    finally:
        lock.release()


def _run_locked(cfg: DictConfig, run_dir: Path, hydra_cfg, job: dict, runtime: Runtime) -> int:
    finished = _finished_entry(cfg, run_dir)
    if finished is not None:
        if finished.get("ended"):
            where, advice = (
                f"step {finished['step']}, ended early: {finished['ended']}",
                "Pass snapshot.resume=never to start over.",
            )
        elif cfg.trainer.max_steps:
            where, advice = (
                f"step {finished['step']} of {cfg.trainer.max_steps}",
                "Raise trainer.max_steps to train on, or pass snapshot.resume=never to start over.",
            )
        else:
            where, advice = (
                f"epoch {finished['epoch']} of {cfg.trainer.total_epochs}",
                "Raise trainer.total_epochs to train on, or pass snapshot.resume=never to start over.",
            )
        print(f"{reports.short(run_dir)}: already complete ({finished['file']}, {where}); nothing to run. {advice}")
        previous = sweep.read_status(run_dir) or {}
        sweep.write_status(
            run_dir,
            "finished",
            exit_code=0,
            skipped=True,
            epochs=finished["epoch"],
            **{k: previous[k] for k in ("final_loss", "val", "best", "monitor", "objective") if k in previous},
            **job,
        )
        return 0
    from runner.logs import add_driver_log_file

    _prepare_run_dir(cfg, run_dir, hydra_cfg, job, runtime)
    handler = add_driver_log_file(run_dir)
    try:
        code, summary = _launch_and_report(cfg, run_dir, runtime)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    status = (
        summary.get("status")
        if summary.get("status") == "diverged"
        else ("finished" if code == 0 else ("stopped" if code >= 128 else "failed"))
    )
    sweep.write_status(
        run_dir,
        status,
        exit_code=code,
        **job,
        **{k: summary.get(k) for k in ("epochs", "steps", "final_loss")},
        objective=reports.objective(summary) if status == "finished" else None,
        **({"val": summary["val"]} if summary.get("val") else {}),
        **({"best": summary["best"], "monitor": summary["monitor"]} if summary.get("best") is not None else {}),
    )
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


def _finished_entry(cfg: DictConfig, run_dir: Path) -> Optional[dict]:
    """The run's newest snapshot if it loads and already covers trainer.total_epochs (or max_steps), or
    training ended there for good (early stop): re-invoking does nothing."""
    from runner.snapshot.location import snapshot_manager

    if cfg.snapshot.resume == ResumeWord.never:
        return None
    manager = snapshot_manager(cfg, run_dir)
    entry, _ = manager.newest_loadable_entry() if manager.published() else (None, [])
    if entry is None:
        return None
    if cfg.trainer.max_steps:
        done = entry["step"] >= cfg.trainer.max_steps
    else:
        done = entry["epoch"] >= cfg.trainer.total_epochs
    if not (done or entry.get("ended")):  # early stop: training is over whatever the limits say
        return None
    try:  # versions a stopped run kept only on this machine (its store was down) go up now
        manager.finish_uploads(0.75 * float(cfg.launch.stop_timeout))
    finally:
        manager.close()
    return entry


def _prepare_run_dir(cfg: DictConfig, run_dir: Path, hydra_cfg, job: dict, runtime: Runtime) -> None:
    """Write the config the workers read (with the runtime the checks resolved) and the job's status."""
    with open_dict(cfg):
        cfg.runtime = runtime.as_dict()
        path = resume_path(cfg.snapshot.resume)
        if path is not None:
            cfg.snapshot.resume = str(path.absolute())
    if cfg.snapshot.resume == ResumeWord.never:
        _archive_previous_run(run_dir, cfg.snapshot.dir)
    write_run_files(run_dir, cfg, hydra_cfg)
    sweep.write_status(run_dir, "running", exit_code=None, **job)


def _parallel_share(hydra_cfg) -> dict:
    """With hydra/launcher=joblib, jobs run side by side: each gets its share of cores and GPUs."""
    launcher = hydra_cfg.get("launcher") or {}
    if hydra_cfg.mode != RunMode.MULTIRUN or "joblib" not in str(launcher.get("_target_", "")):
        return {}
    n_jobs = int(launcher.get("n_jobs") or 1)
    from runner.system import usable_cores

    parallel = usable_cores() if n_jobs < 1 else n_jobs  # joblib: -1 = one per core
    return {"parallel_jobs": parallel, "slot": int(hydra_cfg.job.get("num") or 0) % parallel}


def _launch_and_report(cfg: DictConfig, run_dir: Path, runtime) -> tuple[int, dict]:
    from runner.launch.elastic import launch
    from runner.layout import stop_marker

    started = "" if cfg.launch.mode == LaunchMode.local else f", workers by {runtime.start_method}"
    log.info(
        "run directory %s: %s, launch=%s%s",
        reports.short(run_dir),
        runtime.describe(cfg.trainer.strategy),
        cfg.launch.mode,
        started,
    )
    log.info("training: %s", reports.training_setup(cfg, runtime))
    stop_marker(run_dir).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        summary = launch(cfg, run_dir, runtime) or {}
    except UserError as err:  # raised inside launch=local
        report_user_error(err)
        return EXIT_USER_ERROR, {}
    except BaseException as err:
        return reports.report_failure(err, cfg, run_dir), {}
    if summary.get("status") == "diverged":
        return reports.report_diverged(summary, cfg, run_dir), summary
    reports.print_summary(run_dir, summary, time.perf_counter() - started, cfg)
    return 0, summary


def _remove_if_empty(run_dir: Path) -> None:
    try:
        run_dir.rmdir()  # only succeeds when Hydra created it empty for this rejected job
    except OSError:
        pass


def _archive_previous_run(run_dir: Path, snapshot_dir: str) -> None:
    """snapshot.resume=never: start over, but keep (never delete) the previous snapshots and metrics."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in (
        snapshot_dir,
        "metrics.jsonl",
        "metrics.csv",
        "results.json",
        "logs/loggers.json",
        "logs/mlflow_run_id",
        "wandb",
    ):
        src = run_dir / name
        if src.exists():
            dst = run_dir / "archive" / stamp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved.append(str(dst))
    if moved:
        log.info(
            "snapshot.resume=never: previous snapshots and metrics moved to %s",
            reports.short(run_dir / "archive" / stamp),
        )


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch and the elastic agent (~0.4 s).

    Safe here: every job has finished, every snapshot was awaited, and logs are flushed below."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    Driver().main()
