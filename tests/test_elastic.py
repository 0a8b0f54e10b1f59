"""A launch through the elastic agent leaves the driver process as it found it (a sweep runs several
jobs in one driver), while the agent and the workers see the settings the job needs."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys

import pytest
from loop_helpers import config

from runner.config import Runtime
from runner.launch import elastic

AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")


def process_settings() -> dict:
    return {
        "env": dict(os.environ),
        "warnoptions": list(sys.warnoptions),
        "levels": {
            name: logging.getLogger(name).level
            for name in logging.root.manager.loggerDict
            if name.startswith(AGENT_LOGGERS)
        },
        "start_method": multiprocessing.get_start_method(allow_none=True),
        "handlers": {sig: signal.getsignal(sig) for sig in elastic.FORWARDED_SIGNALS},
    }


def fake_agent(seen: list, fail: bool):
    """elastic_launch as far as the process is concerned: it notes what the workers would get and
    installs its own signal handlers, as torch's agent does."""

    def launch(config, entrypoint):
        def run(run_dir, driver_env):
            seen.append(
                {
                    "driver_env": dict(driver_env),
                    "env": dict(os.environ),
                    "warnoptions": list(sys.warnoptions),
                    "level": logging.getLogger("torch.distributed.elastic.agent.server.api").level,
                }
            )
            signal.signal(signal.SIGTERM, lambda *_: None)
            if fail:
                raise RuntimeError("a worker failed")
            return {0: {"epochs": 1}, 1: None}

        return run

    return launch


@pytest.mark.parametrize("fail", [False, True])
def test_a_launch_leaves_the_driver_process_as_it_found_it(tmp_path, monkeypatch, fail):
    import torch.distributed.launcher.api as launcher_api

    for name in ("HYDRA_FULL_ERROR", "RUNNER_DEBUG", "CUDA_VISIBLE_DEVICES", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    agent_log = logging.getLogger("torch.distributed.elastic.agent.server.api")
    monkeypatch.setattr(agent_log, "level", logging.INFO)  # a level of its own, as torch gives it
    seen: list = []
    monkeypatch.setattr(launcher_api, "elastic_launch", fake_agent(seen, fail))
    runtime = Runtime("gloo", "cpu", 2, 3, "gloo", "", cuda_visible_devices="1", start_method="spawn")
    before = process_settings()
    if fail:
        with pytest.raises(RuntimeError, match="a worker failed"):
            elastic.launch(config(), tmp_path, runtime)
    else:
        assert elastic.launch(config(), tmp_path, runtime) == {"epochs": 1}
    assert process_settings() == before
    # While the agent ran, it and the workers had the job's settings.
    during = seen[0]
    job = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "3"}
    assert {k: during["env"].get(k) for k in job} == job
    assert {k: during["driver_env"].get(k) for k in job} == job
    assert during["level"] == logging.CRITICAL  # the agent's own records are the driver's to report
