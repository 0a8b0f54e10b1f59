"""Per-job status for single runs and sweeps, and the table printed at the end of `--multirun`.

Every job that holds its run directory's lock writes `status.json` there (running, finished,
failed, diverged, stopped; `skipped` when a re-run found it complete), which
`python -m runner.report` reads later. In a sweep, each job also leaves its row in the sweep's own
folder, `<sweep dir>/.sweeps/<sweep id>/`, whichever process ran it (the basic launcher runs jobs
in the driver, hydra/launcher=joblib in worker processes): the closing table is built from those
rows. A job refused before it held its directory (a config mistake, a directory in use) has its
row there only, never in a run directory, which may hold another run's good status. A resumed
search adds the trials it read back, so the table lists every trial of the search. A failed job
does not stop the others; the command exits 1 if a job it ran failed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

from runner.fileio import atomic_write
from runner.layout import STATUS_FILE
from runner.tables import format_table

SWEEP_ID_ENV = "RUNNER_SWEEP_ID"  # set by the driver for the sweep; inherited by launcher workers
SWEEP_DIR_ENV = "RUNNER_SWEEP_DIR"  # the sweep's folder, where its jobs leave their rows
ROWS_DIR = ".sweeps"
_ended_failed = False  # whether a job of the sweep this process just ran failed
_rows_lock = None  # held on this sweep's rows folder while it runs


# A choice on the command line -> the plugin package it needs and the extra that installs it.
PLUGINS = {
    "hydra/launcher": {
        "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
        "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
        "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
        "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "joblib"),
    },
    "hydra/sweeper": {"optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "search")},
    "hparams_search": {"*": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "search")},
}
WITHOUT_PLUGIN = {
    "hydra/launcher": "hydra/launcher=basic (the default, one job after another), or an installed launcher plugin",
    "hydra/sweeper": "hydra/sweeper=basic (the default), or a sweeper whose plugin is installed",
    "hparams_search": "a search whose plugin is installed, or --multirun over listed values (optimizer.lr=0.1,0.01)",
}
SLURM_LAUNCHERS = ("slurm", "submitit_slurm")


def check_plugins(args: list[str]) -> None:
    """A launcher or sweeper plugin that is not installed, or the SLURM launcher where there is no
    SLURM, is refused before Hydra composes anything: Hydra would say only that a config is missing,
    and submitit would fail with a traceback once the sweep started."""
    import importlib.util
    import shutil as shell

    from runner.errors import UserError

    shows_only = any(
        a in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc") for a in args
    )  # prints the config or help: nothing is submitted
    for arg in args:
        group, _, choice = arg.lstrip("+~").partition("=")
        plugin = PLUGINS.get(group, {}).get("*" if group == "hparams_search" else choice)
        if plugin is None or choice == "null":
            continue
        module, package, extra = plugin
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise UserError(
                group,
                choice,
                f"needs the {package} package (a Hydra plugin), which is not installed",
                WITHOUT_PLUGIN[group],
                f'pip install "hydra-torch-runner[{extra}]"',
            )
        if group == "hydra/launcher" and choice in SLURM_LAUNCHERS and shell.which("sbatch") is None and not shows_only:
            raise UserError(
                group,
                choice,
                "submits every job to SLURM with sbatch, which is not on this machine's PATH (not a SLURM login node)",
                f"{group}={choice} where SLURM's commands are, submitit_local or joblib on this machine",
                "run the command on the cluster's login node, "
                "or pass hydra/launcher=submitit_local to run the same jobs here",
            )


def write_status(run_dir: Path, status: str, **fields: Any) -> dict[str, Any]:
    """The job's status in its run directory (the caller holds its lock), and its row in the sweep's table."""
    record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    if os.environ.get(SWEEP_ID_ENV):
        record["sweep_id"] = os.environ[SWEEP_ID_ENV]
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / STATUS_FILE, json.dumps(record, indent=1), durable=False)
    add_row(run_dir, record)
    return record


def write_refused(run_dir: Path, status: str, **fields: Any) -> None:
    """A sweep job refused before it held its run directory: a row in the sweep's table only."""
    add_row(run_dir, {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields})


def add_row(run_dir: Path, record: dict[str, Any]) -> None:
    """One job's row in the running sweep's table (nothing outside a sweep); `record` needs its `job_num`."""
    folder = _rows_folder()
    if folder is None or not isinstance(record.get("job_num"), int):
        return
    folder.mkdir(parents=True, exist_ok=True)
    row = {**record, "run_dir": str(Path(run_dir).absolute())}
    atomic_write(folder / f"{record['job_num']:06d}.json", json.dumps(row, indent=1), durable=False)


def _rows_folder() -> Optional[Path]:
    sweep_id, sweep_dir = os.environ.get(SWEEP_ID_ENV), os.environ.get(SWEEP_DIR_ENV)
    return Path(sweep_dir) / ROWS_DIR / sweep_id if sweep_id and sweep_dir else None


def read_status(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def sweep_jobs() -> list[dict[str, Any]]:
    """The rows of the running sweep, by job number."""
    folder = _rows_folder()
    jobs = []
    for path in sorted(folder.glob("*.json")) if folder is not None else []:
        try:
            jobs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(jobs, key=lambda j: j.get("job_num", 0))


def _failed(job: dict[str, Any]) -> bool:
    return job.get("exit_code") not in (0, None)


def ended_sweep_failed() -> bool:
    """Whether a job of the sweep this process just ran failed (False when it ran no sweep)."""
    return _ended_failed


def validation_cell(job: dict[str, Any]) -> str:
    """The best monitored value when there is one, else the last validation's first metric."""
    if isinstance(job.get("best"), (int, float)):
        return f"{job['monitor']} {job['best']:.4g} (best)"
    val = job.get("val") or {}
    key = "val/loss" if "val/loss" in val else next(iter(val), None)
    return f"{key} {val[key]:.4g}" if key is not None else "-"


def _status_cell(job: dict[str, Any]) -> str:
    return job["status"] + (" (skipped)" if job.get("skipped") else "") + (" (earlier)" if job.get("earlier") else "")


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    with_val = any(j.get("val") or j.get("best") is not None for j in jobs)
    rows = [
        (
            str(j.get("job_num", i)),
            _status_cell(j),
            str(j["epochs"] if j.get("epochs") is not None else "-"),
            f"{j['final_loss']:.4g}" if isinstance(j.get("final_loss"), (int, float)) else "-",
            *((validation_cell(j),) if with_val else ()),
            " ".join(j.get("overrides") or []) or "(defaults)",
        )
        for i, j in enumerate(jobs)
    ]
    return format_table(
        ("#", "status", "epochs", "final loss", *(("validation",) if with_val else ()), "overrides"), rows
    )


class SweepReport(Callback):
    def on_multirun_start(self, config, **kwargs: Any) -> None:
        global _ended_failed
        _ended_failed = False
        os.environ[SWEEP_ID_ENV] = uuid.uuid4().hex
        os.environ[SWEEP_DIR_ENV] = str(Path(str(config.hydra.sweep.dir)).absolute())
        _hold_rows()

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        global _ended_failed
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = sweep_jobs()
        remove_rows()
        if not jobs:
            return
        _ended_failed = any(_failed(j) for j in jobs if not j.get("earlier"))
        earlier = sum(1 for j in jobs if j.get("earlier"))
        print(
            f"\nsweep: {len(jobs)} jobs, {sum(map(_failed, jobs))} failed"
            + (f" ({earlier} done by an earlier command)" if earlier else "")
            + f" (run directories under {sweep_dir}/)"
        )
        print(format_jobs(jobs))
        print(f"details: python -m runner.report {sweep_dir}")


def _hold_rows() -> None:
    """Lock this sweep's rows folder while it runs, and remove the folders of sweeps that ended
    without their table (killed): nobody holds their lock any more."""
    from runner.driver.lock import RunDirInUse, RunDirLock

    global _rows_lock
    folder = _rows_folder()
    try:
        _rows_lock = RunDirLock(folder).acquire(wait=False).accepted()
        for other in folder.parent.iterdir():
            if other != folder and other.is_dir():
                try:
                    stale = RunDirLock(other).acquire(wait=False)
                except RunDirInUse:
                    continue  # a sweep that is still running
                shutil.rmtree(other, ignore_errors=True)
                stale.release()
    except OSError:
        pass  # the rows then go without the lock; the closing table is the same


def remove_rows() -> None:
    """The rows serve the closing table only; the run directories keep each job's status."""
    global _rows_lock
    folder = _rows_folder()
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    if _rows_lock is not None:
        _rows_lock.release()
        _rows_lock = None
    try:
        folder.parent.rmdir()  # .sweeps/ goes once no other sweep is using it
    except OSError:
        pass
