"""`python -m runner <overrides>`: compose, validate, lock and prepare the run directory, launch, report.

The driver never trains (except with launch=local, where it is the only worker): it checks the
config before any worker starts, decides the runtime once, writes the resolved config for the
workers, hands them to the elastic agent, then prints a summary or the failing rank's error.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from runner import sweep
from runner.config import LaunchMode, ResumeWord, quote_path_overrides, register_schema, resume_path
from runner.launch.start import stop_forkserver
from runner.errors import EXIT_TRAINING_FAILED, EXIT_USER_ERROR, UserError, full_errors_requested, report_user_error
from runner.rundir import run_dir_name, write_run_files
from runner.system import peak_rss_mb

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
            code = _report_stopped(Path(HydraConfig.get().runtime.output_dir), int(err.sigval), cfg)
        if code and (HydraConfig.get().mode == RunMode.RUN or code >= 128):
            raise SystemExit(code)  # a single run's exit code; in a sweep, a stop (Ctrl-C, SIGTERM) ends the sweep
        # In a sweep, a failed job is reported and the next one starts. What the job returns is its
        # objective, for sweepers that search (hydra/sweeper=optuna): NaN marks a failed trial.
        status = sweep.read_status(Path(HydraConfig.get().runtime.output_dir)) or {}
        value = status.get("objective") if code == 0 else None
        return float(value) if isinstance(value, (int, float)) else float("nan")

    def main(self) -> None:
        """Console entry point. Hydra's own errors (unknown key, bad type) exit 2, like ours."""
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
    from runner import completion

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
    from runner import preflight
    from runner.lock import RunDirInUse, RunDirLock

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).absolute()
    overrides = list(hydra_cfg.overrides.task)
    job = {"overrides": overrides, "job_num": int(hydra_cfg.job.get("num") or 0)}
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    lock = RunDirLock.held(run_dir) or RunDirLock(run_dir, shared=cfg.launch.mode == LaunchMode.multinode)
    try:
        if not lock.holding:  # single runs: the preflight callback checked and locked before Hydra made the directory
            preflight.preflight(cfg, run_dir, dict(hydra_cfg.runtime.choices), tuple(overrides), lock=lock.acquire)
    except UserError as err:
        lock.abandon()
        if full_errors_requested():
            raise
        report_user_error(err)
        if multirun:
            sweep.write_refused(run_dir, "in use" if isinstance(err, RunDirInUse) else "invalid config",
                                exit_code=EXIT_USER_ERROR, **job)
        _remove_if_empty(run_dir)
        return EXIT_USER_ERROR
    except BaseException:
        lock.abandon()
        raise
    try:
        lock.accepted()
        return _run_locked(cfg, run_dir, hydra_cfg, job)
    finally:
        lock.release()


def _run_locked(cfg: DictConfig, run_dir: Path, hydra_cfg, job: dict) -> int:
    finished = _finished_entry(cfg, run_dir)
    if finished is not None:
        if finished.get("ended"):
            where, advice = f"step {finished['step']}, ended early: {finished['ended']}", "Pass snapshot.resume=never to start over."
        elif cfg.trainer.max_steps:
            where, advice = (f"step {finished['step']} of {cfg.trainer.max_steps}",
                             "Raise trainer.max_steps to train on, or pass snapshot.resume=never to start over.")
        else:
            where, advice = (f"epoch {finished['epoch']} of {cfg.trainer.total_epochs}",
                             "Raise trainer.total_epochs to train on, or pass snapshot.resume=never to start over.")
        print(f"{_short(run_dir)}: already complete ({finished['file']}, {where}); nothing to run. {advice}")
        previous = sweep.read_status(run_dir) or {}
        sweep.write_status(run_dir, "finished", exit_code=0, skipped=True, epochs=finished["epoch"],
                           **{k: previous[k] for k in ("final_loss", "val", "best", "monitor", "objective") if k in previous}, **job)
        return 0
    from runner.logs import add_driver_log_file

    runtime = _prepare_run_dir(cfg, run_dir, hydra_cfg, job)
    handler = add_driver_log_file(run_dir)
    try:
        code, summary = _launch_and_report(cfg, run_dir, runtime)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    status = summary.get("status") if summary.get("status") == "diverged" else \
        ("finished" if code == 0 else ("stopped" if code >= 128 else "failed"))
    sweep.write_status(run_dir, status, exit_code=code, **job, **{k: summary.get(k) for k in ("epochs", "steps", "final_loss")},
                       objective=objective(summary) if status == "finished" else None,
                       **({"val": summary["val"]} if summary.get("val") else {}),
                       **({"best": summary["best"], "monitor": summary["monitor"]} if summary.get("best") is not None else {}))
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
    from runner.snapshot import SnapshotManager

    if cfg.snapshot.resume == ResumeWord.never:
        return None
    manager = SnapshotManager(run_dir / cfg.snapshot.dir)
    entry, _ = manager.newest_loadable_entry() if manager.manifest_path.exists() else (None, [])
    if entry is None:
        return None
    if entry.get("ended"):  # early stop: training is over whatever the limits say
        return entry
    if cfg.trainer.max_steps:
        return entry if entry["step"] >= cfg.trainer.max_steps else None
    return entry if entry["epoch"] >= cfg.trainer.total_epochs else None


def _prepare_run_dir(cfg: DictConfig, run_dir: Path, hydra_cfg, job: dict):
    from runner.launch.runtime import resolve_runtime

    runtime = resolve_runtime(cfg.launch, **_parallel_share(hydra_cfg))
    with open_dict(cfg):
        cfg.runtime = runtime.as_dict()
        path = resume_path(cfg.snapshot.resume)
        if path is not None:
            cfg.snapshot.resume = str(path.absolute())
    if cfg.snapshot.resume == ResumeWord.never:
        _archive_previous_run(run_dir, cfg.snapshot.dir)
    write_run_files(run_dir, cfg, hydra_cfg)
    sweep.write_status(run_dir, "running", exit_code=None, **job)
    return runtime


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
    from runner.train.session import stop_marker

    started = "" if cfg.launch.mode == LaunchMode.local else f", workers by {runtime.start_method}"
    log.info("run directory %s: %s, launch=%s%s", _short(run_dir), runtime.describe(cfg.trainer.strategy),
             cfg.launch.mode, started)
    log.info("training: %s", training_setup(cfg, runtime))
    stop_marker(run_dir).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        summary = launch(cfg, run_dir, runtime) or {}
    except UserError as err:  # raised inside launch=local
        report_user_error(err)
        return EXIT_USER_ERROR, {}
    except BaseException as err:
        return _report_failure(err, cfg, run_dir), {}
    if summary.get("status") == "diverged":
        return _report_diverged(summary, cfg, run_dir), summary
    _print_summary(run_dir, summary, time.perf_counter() - started, cfg)
    return 0, summary


def training_setup(cfg: DictConfig, runtime) -> str:
    """Strategy, precision, accumulation and the global batch: what decides the numbers a run produces."""
    from runner.config import parse_nnodes

    t = cfg.trainer
    precision = {"32": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler"}.get(str(t.precision), str(t.precision))
    if cfg.launch.mode == LaunchMode.rpc:
        return f"{cfg.launch.topology} over RPC, precision {precision}"
    nodes = (parse_nnodes(cfg.launch.nnodes) or (1, 1))[0] if cfg.launch.mode == LaunchMode.multinode else 1
    workers = int(runtime.nproc_per_node) * nodes
    accumulate = int(t.accumulate)
    strategy = "one process (no DDP)" if workers == 1 and str(t.strategy) == "ddp" else f"strategy {t.strategy}"
    parts = [f"{t.batch_size} per worker", f"{workers} worker{'s' if workers > 1 else ''}"]
    if accumulate > 1:
        parts.append(f"{accumulate} micro-batches")
    return (f"{strategy}, precision {precision}, global batch {int(t.batch_size) * workers * accumulate} "
            f"({' x '.join(parts)})")


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
    for name in (snapshot_dir, "metrics.jsonl", "metrics.csv", "results.json", "logs/loggers.json", "logs/mlflow_run_id", "wandb"):
        src = run_dir / name
        if src.exists():
            dst = run_dir / "archive" / stamp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved.append(str(dst))
    if moved:
        log.info("snapshot.resume=never: previous snapshots and metrics moved to %s", _short(run_dir / "archive" / stamp))


def objective(summary: dict) -> Optional[float]:
    """What a search optimises: the best value of snapshot.monitor, else the final training loss."""
    value = summary.get("best") if summary.get("best") is not None else summary.get("final_loss")
    return float(value) if isinstance(value, (int, float)) else None


def _worker_memory(summary: dict) -> str:
    """Every rank's peak (what decides whether a model fits: FSDP spreads it over the workers)."""
    ranks = summary.get("peak_rss_mb_per_rank") or [summary.get("peak_rss_mb", 0)]
    if len(ranks) == 1:
        return f"rank 0 {ranks[0]:.0f} MB"
    shown = ", ".join(f"{mb:.0f}" for mb in ranks[:8]) + (", ..." if len(ranks) > 8 else "")
    return f"ranks {shown} MB"


def _print_summary(run_dir: Path, summary: dict, wall: float, cfg: DictConfig) -> None:
    if not summary:
        print(f"done: this node's workers finished; rank 0's node reports the summary ({_short(run_dir)})")
        return
    loss = summary.get("final_loss")
    sps = summary.get("samples_per_s")
    resumed = summary.get("resumed_from")
    snapshot = summary.get("snapshot")
    lines = [
        f"run directory : {_short(run_dir)}",
        f"epochs        : {summary.get('epochs')} ({summary.get('steps')} steps, {summary.get('world_size')} "
        + ("worker)" if summary.get("world_size") == 1 else "workers)")
        + (f", resumed from {resumed['file']} at epoch {resumed['epoch']} step {resumed['step']}" if resumed else ""),
        f"final loss    : {loss:.6g}" if loss is not None else "final loss    : n/a",
        (f"throughput    : {sps:,.0f} samples/s" if sps else "throughput    : n/a")
        + (" (gradients through shared memory)" if summary.get("allreduce") == "shm" else ""),
        f"wall time     : {wall:.1f} s",
        f"peak memory   : driver {peak_rss_mb():.0f} MB, " + _worker_memory(summary),
        f"snapshot      : {_short(run_dir / cfg.snapshot.dir / snapshot)}" if snapshot else "snapshot      : none written",
    ]
    stalls = summary.get("snapshot_stall_seconds") or []
    if snapshot and stalls:
        lines[-1] += f" (training waited {sum(stalls):.2f} s for {len(stalls)} snapshot{'s' if len(stalls) > 1 else ''})"
    unit = next((k for k in summary if k.endswith("_per_s") and k != "samples_per_s" and summary[k]), None)
    if unit:
        lines[3] += f", {summary[unit]:,.0f} {unit[:-6]}/s"
    extra = []
    if summary.get("val"):
        extra.append("validation    : " + _metrics_line(summary["val"]) + f" (step {summary.get('steps')})")
    if summary.get("best") is not None:
        extra.append(f"best          : {summary['monitor']} {summary['best']:.6g} at step {summary['best_step']}")
    if summary.get("test"):
        test = summary["test"]
        extra.append("test          : " + _metrics_line({k: v for k, v in test.items() if k.startswith("test/")})
                     + f" ({test.get('chosen_by')}, {test.get('snapshot')}; results.json)")
    if summary.get("ended"):
        extra.append(f"ended early   : {summary['ended']}")
    lines[3:3] = extra
    if summary.get("skipped_steps"):
        lines.insert(3, f"skipped steps : {summary['skipped_steps']} (non-finite loss or gradients, trainer.on_nonfinite=skip)")
    print("\n".join(lines))


def _metrics_line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def _newest_snapshot(cfg: DictConfig, run_dir: Path) -> Optional[dict]:
    from runner.snapshot import SnapshotError, SnapshotManager

    try:
        return SnapshotManager(run_dir / cfg.snapshot.dir).newest_valid_entry()[0]
    except SnapshotError:
        return None


def _resume_point(cfg: Optional[DictConfig], run_dir: Path) -> str:
    entry = _newest_snapshot(cfg, run_dir) if cfg is not None else None
    if entry is None:
        return "there is no snapshot yet: it starts from scratch"
    return f"it resumes from {entry['file']} (epoch {entry['epoch']}, step {entry['step']})"


def _report_stopped(run_dir: Path, signum, cfg: Optional[DictConfig] = None, aborted: bool = False) -> int:
    """Say what is on disk: the stop's own snapshot only when the workers wrote it."""
    import json

    from runner.train.session import stop_marker

    try:
        written = json.loads(stop_marker(run_dir).read_text())
    except (OSError, ValueError):
        written = None
    signum = (written or {}).get("signal") or signum  # the signal that stopped the job, maybe on another node
    name = signal.Signals(signum).name if signum else "a signal"
    if written and written.get("file"):
        print(f"Stopped by {name}: a snapshot of the last step ({written['file']}, step {written['step']}) is in "
              f"{_short(run_dir)}; run the same command again to resume.", file=sys.stderr)
    elif written:
        print(f"Stopped by {name} at step {written['step']} without a snapshot of it (its weights are not finite); "
              f"run the same command again: {_resume_point(cfg, run_dir)}.", file=sys.stderr)
    elif aborted:
        print(f"Aborted by a second {name}: no snapshot of the last step was written; run the same command again: "
              f"{_resume_point(cfg, run_dir)}.", file=sys.stderr)
    else:
        timeout = f" within launch.stop_timeout={cfg.launch.stop_timeout} s" if cfg is not None else ""
        print(f"Stopped by {name}: the workers did not write a snapshot after the signal (they did not reach a step "
              f"boundary{timeout}); run the same command again: {_resume_point(cfg, run_dir)}.", file=sys.stderr)
    return 128 + (signum or 15)


def _report_diverged(summary: dict, cfg: DictConfig, run_dir: Path) -> int:
    last = summary.get("last_snapshot")
    kept = f"the last finite snapshot is {last}" if last else f"no snapshot of this attempt was written; {_resume_point(cfg, run_dir)}"
    print(f"Error: training diverged: {summary.get('what')} is not finite at step {summary.get('step')} "
          f"(trainer.on_nonfinite=stop); {kept}.\n"
          f"  fix: lower optimizer.lr (now {cfg.optimizer.get('lr', '?')}), or pass trainer.on_nonfinite=skip to skip "
          f"such steps; snapshot.resume=never starts over", file=sys.stderr)
    return EXIT_TRAINING_FAILED


def _report_failure(err: BaseException, cfg: DictConfig, run_dir: Path) -> int:
    """Training failed: the failing rank, its exception and the tail of its log, not agent noise."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from runner.logs import TRAIN_LOG, rank_log_path, tail
    from runner.train.session import stop_marker
    from runner.train.stop import Stopped

    if isinstance(err, Stopped):  # launch=local: the driver itself was the worker
        return _report_stopped(run_dir, err.signum, cfg)
    if isinstance(err, SignalException):
        return _report_stopped(run_dir, int(err.sigval), cfg)
    stop = getattr(err, "stop_request", None)  # the workers stopped on request; the signal may have gone elsewhere
    if stop is not None and stop.get("signal") is None and not stop_marker(run_dir).exists():
        print(f"Stopped at step {stop.get('step')}: another node was asked to stop, and rank 0 writes the snapshot on "
              f"its node; run the same command again on every node to resume.", file=sys.stderr)
        return 128 + signal.SIGTERM
    if isinstance(err, KeyboardInterrupt) and cfg.launch.mode != LaunchMode.local:  # before the agent took signals
        print(f"Stopped by SIGINT while the workers were starting; run the same command again: "
              f"{_resume_point(cfg, run_dir)}.", file=sys.stderr)
        return 128 + signal.SIGINT
    if isinstance(err, KeyboardInterrupt):  # launch=local: a second signal while the first was being handled
        return _report_stopped(run_dir, signal.SIGINT, cfg, aborted=True)
    if full_errors_requested():
        import traceback

        traceback.print_exception(err)
    rank = 0
    if isinstance(err, ChildFailedError):
        rank, failure = err.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", str(message))
        text = str(message).strip().splitlines()
        what = text[0] if text else f"exit code {failure.exitcode}"
        if failure.exitcode < 0 and "Signal" not in what:
            what = f"killed by signal {-failure.exitcode}"
    elif isinstance(err, OSError) and err.strerror:
        what = f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    else:
        what = f"{type(err).__name__}: {err}"
    full = _disk_full(run_dir)
    if full and "No space left on device" not in what:
        what = f"No space left on device: {full} (then: {what})"
    restarts = getattr(err, "restarts_done", 0)  # set by runner.launch.elastic: the restarts that ran
    if getattr(err, "repeated_failure", None):
        after = f" (not restarting: the same error after restart {restarts})"
    else:
        after = f" (after {restarts} restart{'s' if restarts > 1 else ''})" if restarts else ""
    log_path = rank_log_path(run_dir, rank)
    lines = [f"Error: training failed on rank {rank}{after}: {what}"]
    last = [line for line in tail(log_path, 60) if line.strip()][-8:]
    if last:
        lines.append(f"  last lines of {_short(log_path)}:")
        lines += [f"    {line[:300]}" for line in last]
    lines.append(f"  full logs: {_short(log_path)} (all ranks: {_short(run_dir / TRAIN_LOG)})")
    print("\n".join(lines), file=sys.stderr)
    return EXIT_TRAINING_FAILED


def _disk_full(run_dir: Path) -> Optional[str]:
    """The run directory's filesystem when it has (almost) no room left: the likeliest cause of a
    failure whose own report could not be written (torch's error file is empty on a full disk)."""
    try:
        return f"the filesystem of {_short(run_dir)} has {shutil.disk_usage(run_dir).free >> 10} KiB free" \
            if shutil.disk_usage(run_dir).free < (1 << 20) else None
    except OSError:
        return None


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch and the elastic agent (~0.4 s).

    Safe here: every job has finished, every snapshot was awaited, and logs are flushed below."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    Driver().main()
