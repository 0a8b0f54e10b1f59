"""Per-job status for single runs and sweeps, and the table printed at the end of `--multirun`.

Every job writes `status.json` into its run directory (running, finished, failed, stopped,
invalid config; `skipped` when a re-run found it complete), which `python -m runner.report` reads later. In a sweep, the
status also carries the sweep's id and the job's number, so the end-of-sweep table can be built
from the files, whichever process ran the job (the basic launcher runs jobs in the driver,
hydra/launcher=joblib in worker processes). A failed job does not stop the others; the command
exits 1 if any failed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

STATUS_FILE = "status.json"
SWEEP_ID_ENV = "RUNNER_SWEEP_ID"  # set by the driver for the sweep; inherited by launcher workers
SWEEP_JOBS: list[dict[str, Any]] = []  # the jobs of the sweep that just ended, in job order


def write_status(run_dir: Path, status: str, **fields: Any) -> dict[str, Any]:
    record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    if os.environ.get(SWEEP_ID_ENV):
        record["sweep_id"] = os.environ[SWEEP_ID_ENV]
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATUS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, run_dir / STATUS_FILE)
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


def any_failed() -> bool:
    return any(job.get("exit_code") not in (0, None) for job in SWEEP_JOBS)


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    header = ("#", "status", "epochs", "final loss", "overrides")
    rows = [(str(j.get("job_num", i)), j["status"] + (" (skipped)" if j.get("skipped") else ""), str(j["epochs"] if j.get("epochs") is not None else "-"),
             f"{j['final_loss']:.4g}" if j.get("final_loss") is not None else "-", " ".join(j.get("overrides") or []) or "(defaults)")
            for i, j in enumerate(jobs)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


class SweepReport(Callback):
    def on_multirun_start(self, config, **kwargs: Any) -> None:
        os.environ[SWEEP_ID_ENV] = uuid.uuid4().hex

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        SWEEP_JOBS[:] = sweep_jobs(sweep_dir, os.environ.get(SWEEP_ID_ENV, ""))
        if not SWEEP_JOBS:
            return
        failed = sum(job.get("exit_code") not in (0, None) for job in SWEEP_JOBS)
        print(f"\nsweep: {len(SWEEP_JOBS)} jobs, {failed} failed (run directories under {sweep_dir}/)")
        print(format_jobs(SWEEP_JOBS))
        print(f"details: python -m runner.report {sweep_dir}")
