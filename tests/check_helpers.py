"""Compose a command's config in-process, as `python -m runner <overrides>` would, and check it.

Hydra's compose API with the runner's own config package (pkg://runner.conf) and schema: what the
single-run preflight callback gets, without a process. `refusal` returns the UserError a command
gets; `make_finished_run` leaves a run directory with a verified snapshot, as a finished run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import runner.driver.cli  # noqa: F401  (registers the schema and the run-directory resolvers)
from runner.config import Runtime, quote_path_overrides
from runner.driver.checks import check
from runner.driver.lock import RunDirLock
from runner.errors import UserError


@dataclass
class Command:
    cfg: DictConfig  # the job's config, without `hydra`
    run_dir: Path
    choices: dict
    overrides: tuple


def compose_config(overrides: list[str]) -> DictConfig:
    """The whole config Hydra composes for `overrides`, its `hydra` node included."""
    with initialize_config_module("runner.conf", version_base="1.3"):
        return compose("config", overrides=quote_path_overrides(list(overrides)), return_hydra_config=True)


def compose_command(overrides: list[str], cwd: Path) -> Command:
    """The config Hydra composes for `overrides`, and the run directory it names (relative to `cwd`)."""
    full = compose_config(overrides)
    HydraConfig.instance().set_config(full)  # `hydra:` interpolations (the run directory's name)
    try:
        run_dir = cwd / str(OmegaConf.select(full, "hydra.run.dir"))
    finally:
        HydraConfig.instance().cfg = None
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    return Command(cfg, run_dir, dict(full.hydra.runtime.choices), tuple(full.hydra.overrides.task))


def check_command(overrides: list[str], cwd: Path) -> Runtime:
    """What the preflight callback does: check, taking the run directory's lock between the quick and
    the slow checks; a refused command gives the lock up and removes what taking it made."""
    command = compose_command(overrides, cwd)
    lock = RunDirLock(command.run_dir)
    try:
        return check(command.cfg, command.run_dir, command.choices, command.overrides, lock=lock.acquire)
    finally:
        lock.abandon()  # here also after a passing check: a test leaves nothing behind


def refusal(overrides: list[str], cwd: Path) -> UserError:
    with pytest.raises(UserError) as caught:
        check_command(overrides, cwd)
    return caught.value


def make_finished_run(cwd: Path, overrides: list[str], step: int = 64) -> Path:
    """A run directory holding one verified end-of-epoch snapshot of the run `overrides` define."""
    from conftest import snapshot_state

    from runner.driver.rundir import identity
    from runner.snapshot import SnapshotManager

    command = compose_command(overrides, cwd)
    lock = RunDirLock(command.run_dir).acquire().accepted()  # a finished run leaves its lock file's record
    try:
        manager = SnapshotManager(command.run_dir / command.cfg.snapshot.dir)
        manager.save(
            snapshot_state(weight=torch.zeros(1, 1)),
            step=step,
            epoch=1,
            config={"identity": identity(command.cfg)},
            end_of_epoch=True,
        )
    finally:
        lock.release()
    return command.run_dir
