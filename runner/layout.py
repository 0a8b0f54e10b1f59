"""The run directory's layout: the name of every file the driver and the workers share.

Both sides import this module, so neither reaches into the other for a file name:

    outputs/<run>/
      config.yaml       the resolved config the workers read (written by the driver)
      status.json       how the job ended (driver; sweeps and runner.report read it)
      metrics.jsonl     training rows, epochs and validations (rank 0)
      results.json      test metrics (trainer.test)
      train.log         every rank's log, and the driver's
      logs/rank-N.log   one rank's log;  logs/stopped.json  the workers' stop snapshot
      snapshots/        versions and manifest.json (runner.snapshot)
      profile/rank-N.json.gz  torch.profiler traces (trainer.profile); rank-N.txt  their top operators
      .snapshot-staging/  with snapshot.dir=<URL>: versions written here, then uploaded
      snapshot-cache/   with snapshot.upload=async: versions (and a manifest) kept until uploaded
      .lock             one driver per directory (runner.driver.lock)
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
TRAIN_LOG = "train.log"
LOG_DIR = "logs"
STOP_MARKER = "stopped.json"
LOCK_FILE = ".lock"
PROFILE_DIR = "profile"


def rank_log_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOG_DIR / f"rank-{rank}.log"


def stop_marker(run_dir: Path) -> Path:
    """Written by the workers when they stopped on a signal after their snapshot; read by the driver."""
    return Path(run_dir) / LOG_DIR / STOP_MARKER


def profile_trace(rank: int) -> str:
    """A rank's profiler trace, relative to the run directory (Perfetto and TensorBoard open it)."""
    return f"{PROFILE_DIR}/rank-{rank}.json.gz"
