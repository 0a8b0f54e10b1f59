"""Hydra callback that validates a single run before Hydra creates its output directory.

Hydra calls `on_run_start` after composing the config and before `run_job` makes the run
directory, so a rejected command leaves nothing behind. (Sweep jobs are validated by the task
itself, which writes their status for the sweep's table.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.errors import EXIT_USER_ERROR, UserError, full_errors_requested, report_user_error


class PreflightCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.preflight import preflight

        HydraConfig.instance().set_config(config)
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            preflight(task_cfg, run_dir, dict(config.hydra.runtime.choices), tuple(config.hydra.overrides.task))
        except UserError as err:
            if full_errors_requested():
                raise
            report_user_error(err)
            raise SystemExit(EXIT_USER_ERROR) from None
