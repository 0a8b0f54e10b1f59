"""Per-job status for single runs and sweeps, and the table printed at the end of `--multirun`.

Every job writes `status.json` into its run directory (running, finished, failed, diverged,
stopped, invalid config; `skipped` when a re-run found it complete), which `python -m runner.report`
reads later. In a sweep, the status also carries the sweep's id and the job's number, so the
end-of-sweep table is built from the files, whichever process ran the job (the basic launcher runs
jobs in the driver, hydra/launcher=joblib in worker processes). A failed job does not stop the
others; the command exits 1 if any failed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

from runner.fileio import atomic_write
from runner.tables import format_table

STATUS_FILE = "status.json"
SWEEP_ID_ENV = "RUNNER_SWEEP_ID"  # set by the driver for the sweep; inherited by launcher workers
SWEEP_DIR_ENV = "RUNNER_SWEEP_DIR"  # where the sweep's run directories are, for the driver's exit code


def write_status(run_dir: Path, status: str, **fields: Any) -> dict[str, Any]:
    record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    if os.environ.get(SWEEP_ID_ENV):
        record["sweep_id"] = os.environ[SWEEP_ID_ENV]
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / STATUS_FILE, json.dumps(record, indent=1), durable=False)
    return record


def read_status(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def sweep_jobs(root: Path, sweep_id: str) -> list[dict[str, Any]]:
    jobs = []
    for path in Path(root).glob(f"*/{STATUS_FILE}"):
        status = read_status(path.parent)
        if status and status.get("sweep_id") == sweep_id:
            jobs.append({**status, "run_dir": str(path.parent)})
    return sorted(jobs, key=lambda j: j.get("job_num", 0))


def _failed(job: dict[str, Any]) -> bool:
    return job.get("exit_code") not in (0, None)


def ended_sweep_failed() -> bool:
    """Whether a job of the sweep this process just ran failed (False when it ran no sweep)."""
    sweep_id, sweep_dir = os.environ.get(SWEEP_ID_ENV), os.environ.get(SWEEP_DIR_ENV)
    return bool(sweep_id and sweep_dir) and any(_failed(j) for j in sweep_jobs(Path(sweep_dir), sweep_id))


def validation_cell(job: dict[str, Any]) -> str:
    """The best monitored value when there is one, else the last validation's first metric."""
    if isinstance(job.get("best"), (int, float)):
        return f"{job['monitor']} {job['best']:.4g} (best)"
    val = job.get("val") or {}
    key = "val/loss" if "val/loss" in val else next(iter(val), None)
    return f"{key} {val[key]:.4g}" if key is not None else "-"


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    with_val = any(j.get("val") or j.get("best") is not None for j in jobs)
    rows = [(str(j.get("job_num", i)), j["status"] + (" (skipped)" if j.get("skipped") else ""),
             str(j["epochs"] if j.get("epochs") is not None else "-"),
             f"{j['final_loss']:.4g}" if isinstance(j.get("final_loss"), (int, float)) else "-",
             *((validation_cell(j),) if with_val else ()),
             " ".join(j.get("overrides") or []) or "(defaults)")
            for i, j in enumerate(jobs)]
    return format_table(("#", "status", "epochs", "final loss", *(("validation",) if with_val else ()), "overrides"), rows)


class SweepReport(Callback):
    def on_multirun_start(self, config, **kwargs: Any) -> None:
        os.environ[SWEEP_ID_ENV] = uuid.uuid4().hex
        os.environ[SWEEP_DIR_ENV] = str(Path(str(config.hydra.sweep.dir)).absolute())

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = sweep_jobs(sweep_dir, os.environ.get(SWEEP_ID_ENV, ""))
        if not jobs:
            return
        print(f"\nsweep: {len(jobs)} jobs, {sum(map(_failed, jobs))} failed (run directories under {sweep_dir}/)")
        print(format_jobs(jobs))
        print(f"details: python -m runner.report {sweep_dir}")
