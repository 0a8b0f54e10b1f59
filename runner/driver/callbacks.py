"""Hydra callback that validates a single run before Hydra creates its output directory.

Hydra calls `on_run_start` after composing the config and before `run_job` makes the run
directory. The quick checks run first; then the run directory's lock is taken (creating the
directory for its lock file), then the slow checks (objects, data, snapshots), so a second command
on a run in use is refused before it builds anything. A refused command gives the lock up and
removes what taking it created: it leaves no trace. The job (runner.driver.cli.run) keeps the lock,
and gets the runtime the checks resolved as the config's `runtime:` (what the workers read back).
(Sweep jobs are validated and locked by the task itself.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from runner.config import LaunchMode
from runner.errors import EXIT_USER_ERROR, UserError, full_errors_requested, report_user_error


class PreflightCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.driver.checks import check_holding
        from runner.driver.lock import RunDirLock

        HydraConfig.instance().set_config(config)
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        try:
            placed(config, hydra_logging=True)  # launch=auto made concrete first: the lock and checks see what runs
        except UserError as err:
            if full_errors_requested():
                raise
            report_user_error(err)
            raise SystemExit(EXIT_USER_ERROR) from None
        task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        lock = RunDirLock(run_dir, shared=task_cfg.launch.mode == LaunchMode.multinode)
        choices, overrides = dict(config.hydra.runtime.choices), tuple(config.hydra.overrides.task)
        try:
            runtime = check_holding(task_cfg, run_dir, choices, overrides, lock)
        except UserError as err:
            if full_errors_requested():
                raise
            report_user_error(err)
            raise SystemExit(EXIT_USER_ERROR) from None
        with open_dict(config):
            config.runtime = runtime.as_dict()


def placed(cfg: DictConfig, hydra_logging: bool = False) -> None:
    """launch=auto: the scheduler's environment decides launch.mode and the rendezvous
    (runner.launch.schedulers), and the console's first line says what was detected and why.
    `hydra_logging`: called before Hydra set up the job's logging; the line looks like the job's."""
    import logging
    import os
    import sys
    import time

    from runner.launch.schedulers import resolve_launch

    line = resolve_launch(cfg, os.environ)
    if line and hydra_logging:
        print(f"[{time.strftime('%H:%M:%S')}][runner][INFO] - {line}", file=sys.stderr, flush=True)
    elif line:
        logging.getLogger("runner").info(line)
