"""A dataset that reports the process that builds it, for the start-method tests."""

import json
import os
import sys
from pathlib import Path

from runner.data import RegressionDataset

WATCHED = ("RUNNER_PROBE", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")


def probe_dataset(out: str, **kwargs) -> RegressionDataset:
    """The seed task's data; first writes <out>/<rank or driver>.json: pid, parent pid, whether
    torch._dynamo and the driver's preflight were imported already, and a few variables."""
    who = os.environ.get("RANK", "driver")
    record = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "dynamo": "torch._dynamo" in sys.modules,
        "preflight": "runner.driver.checks" in sys.modules,
        "env": {k: os.environ.get(k) for k in WATCHED},
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{who}.json").write_text(json.dumps(record))
    return RegressionDataset(**kwargs)
