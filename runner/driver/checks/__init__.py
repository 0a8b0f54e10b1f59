"""Every check of a command, run in the driver before any worker starts: a mistake costs milliseconds, not a launch.

`check(cfg, run_dir, ...)` is the one entry point, over the composed config and the objects it names.
It raises UserError (key, value, what is allowed, the fix) for the first problem, and returns the
runtime it resolved for this machine, which the driver then passes on to the launch. In order:

- quick, the config alone and the machine: unknown keys and ranges (ranges.py), the run name, CUDA,
  worker start and shared memory (machine.py), a writable run directory for the lock file;
- then `lock()` (taking the run directory's lock): a command whose run is in use is refused in
  milliseconds, and only the holder builds anything or reads the snapshots;
- slow: the objects (objects.py: imports, constructor arguments, the model built on the meta device),
  the data (data.py: the dataset built and one batch made), the disk for snapshots, the snapshots
  (snapshots.py: resume and init_from mistakes); a snapshot.dir URL is checked with the config
  (store.py: scheme, backend package) and reached before the objects are built.

Nothing here writes to disk (taking the lock aside).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from runner.config import Runtime
from runner.driver.checks.data import check_data
from runner.driver.checks.machine import (
    check_gpu_count,
    check_run_dir,
    check_start_method,
    resolve_machine,
    warn_gpu_options_on_cpu,
)
from runner.driver.checks.objects import check_meta_init, check_objects
from runner.driver.checks.ranges import check_ranges, check_unknown_keys
from runner.driver.checks.snapshots import check_init_from, check_resume
from runner.driver.checks.store import check_store_config, check_store_reachable
from runner.driver.rundir import check_name
from runner.launch.schedulers import resolve_launch

__all__ = ["check", "check_gpu_count", "check_meta_init", "check_start_method", "warn_gpu_options_on_cpu"]


def check(
    cfg: DictConfig,
    run_dir: Path,
    choices: Optional[dict[str, str]] = None,
    overrides: tuple = (),
    lock: Optional[Callable[[], object]] = None,
    parallel_jobs: int = 1,
    slot: int = 0,
) -> Runtime:
    """Validate one job; return the runtime resolved for it.

    `choices`: the config file picked per group (Hydra's runtime.choices), `overrides`: the command
    line (both only for the messages); `lock`: called between the quick checks and the slow ones;
    `parallel_jobs`/`slot`: this job's share of the machine when sweep jobs run side by side."""
    choices = choices or {}
    resolve_launch(cfg, os.environ)  # launch=auto: the driver placed it already (and said so); callers in-process
    check_config(cfg, run_dir)
    runtime = resolve_machine(cfg, parallel_jobs, slot)
    check_run_dir(run_dir, 0)  # the lock file needs a writable directory
    if lock is not None:
        lock()
    param_bytes = check_objects(cfg, choices, tuple(overrides))
    check_store_reachable(cfg, run_dir)
    check_init_from(cfg, run_dir)
    check_data(cfg, runtime, choices.get("dataset"))
    check_run_dir(run_dir, param_bytes)
    check_resume(cfg, run_dir)
    return runtime


def check_holding(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str], overrides: tuple, lock, **share: int
) -> Runtime:
    """`check` with the run directory's lock (runner.driver.lock.RunDirLock) taken at its place in
    the order; when a check fails, the lock is given up (`abandon`: no trace) before the error is raised."""
    try:
        return check(cfg, run_dir, choices, overrides, lock=lock.acquire, **share)
    except BaseException:
        lock.abandon()
        raise


def check_config(cfg: DictConfig, run_dir: Path) -> None:
    """The checks of the config alone (no machine, no file read): unknown keys, ranges, the run's name."""
    check_unknown_keys(cfg)
    check_ranges(cfg)
    check_name(cfg.get("name"), run_dir.parent)
    check_store_config(cfg)
