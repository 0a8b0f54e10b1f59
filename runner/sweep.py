"""Per-job status for single runs and sweeps, and the table printed at the end of `--multirun`.

Every job writes `status.json` into its run directory (running, finished, complete, failed,
stopped), which `python -m runner.report` reads later. In a sweep, a failed job does not stop the
others; `SweepReport.on_multirun_end` prints one line per job and the command exits 1 if any failed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

STATUS_FILE = "status.json"
JOBS: list[dict[str, Any]] = []  # the jobs this process ran, in order


def write_status(run_dir: Path, status: str, **fields: Any) -> dict[str, Any]:
    record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    tmp = run_dir / f".{STATUS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, run_dir / STATUS_FILE)
    return record


def read_status(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def record_job(run_dir: Path, overrides: list[str], status: str, exit_code: int, summary: Optional[dict] = None) -> None:
    summary = summary or {}
    JOBS.append({"run_dir": str(run_dir), "overrides": " ".join(overrides) or "(defaults)", "status": status,
                 "exit_code": exit_code, "final_loss": summary.get("final_loss"), "epochs": summary.get("epochs")})


def any_failed() -> bool:
    return any(job["exit_code"] != 0 for job in JOBS)


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    header = ("#", "status", "epochs", "final loss", "overrides")
    rows = [(str(i), j["status"], str(j["epochs"] if j["epochs"] is not None else "-"),
             f"{j['final_loss']:.4g}" if j["final_loss"] is not None else "-", j["overrides"]) for i, j in enumerate(jobs)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


class SweepReport(Callback):
    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if not JOBS:
            return
        failed = sum(job["exit_code"] != 0 for job in JOBS)
        print(f"\nsweep: {len(JOBS)} jobs, {failed} failed (run directories under {config.hydra.sweep.dir}/)")
        print(format_jobs(JOBS))
        print("details: python -m runner.report " + str(config.hydra.sweep.dir))
