"""The one validation entry point, in-process: its order around the lock, the runtime it resolves once
and hands on, and the config words compared as the schema's enums whether composed or read back."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from check_helpers import compose_command, compose_config
from conftest import WORKERS
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from runner.driver.checks import check
from runner.errors import EXIT_USER_ERROR, UserError
from runner.launch.runtime import resolve_runtime


def test_quick_checks_refuse_before_the_lock_and_only_its_holder_builds_anything(tmp_path):
    taken = []

    def lock():
        taken.append(True)

    for quick in (
        ["trainer.total_epochs=0"],
        ["+trainer.nonsense=1"],
        ["name=.."],
        ["launch=multinode", "launch.rdzv_endpoint=localhost:29400", "launch.cpu_allreduce=shm"],
    ):
        command = compose_command(quick, tmp_path)
        with pytest.raises(UserError):
            check(command.cfg, command.run_dir, lock=lock)
        assert taken == [], quick  # a mistake in the config alone costs no wait for the lock
    for slow in (
        ["dataset.size=0"],
        ["model=mlp", "+model.hidden=3"],
        ["snapshot.monitor=val/loss"],
        ["snapshot.resume=must"],
    ):
        command = compose_command(slow, tmp_path)
        with pytest.raises(UserError):
            check(command.cfg, command.run_dir, lock=lock)
        assert taken == [True], slow
        taken.clear()

    def in_use():
        raise UserError("hydra.run.dir", "outputs/x", "is in use")

    command = compose_command(["dataset._target_=no_such_module.Data"], tmp_path)
    with pytest.raises(UserError, match="is in use"):  # refused for the lock, before importing the dataset
        check(command.cfg, command.run_dir, lock=in_use)
    assert not (tmp_path / "outputs").exists()


@pytest.fixture
def recorded(monkeypatch):
    """Every resolve_runtime call (its keywords), and the runtime each job would launch with."""
    from runner.driver import cli
    from runner.launch import runtime as runtime_module

    calls, launched = [], []
    resolve = runtime_module.resolve_runtime
    monkeypatch.setattr(runtime_module, "resolve_runtime", lambda *a, **k: calls.append(k) or resolve(*a, **k))
    monkeypatch.setattr(cli, "_run_locked", lambda cfg, run_dir, hydra_cfg, job, runtime: launched.append(runtime) or 0)
    return calls, launched


def test_a_single_run_resolves_the_runtime_once_and_the_job_launches_with_it(tmp_path, monkeypatch, recorded):
    from runner.driver import cli
    from runner.driver.callbacks import PreflightCallback

    calls, launched = recorded
    monkeypatch.chdir(tmp_path)
    config = compose_config([*WORKERS, "name=once"])
    try:
        PreflightCallback().on_run_start(config)  # checks, locks, records the runtime as the config's `runtime:`
        assert len(calls) == 1
        assert cli.run(_job_config(config, tmp_path / "outputs" / "once")) == 0
    finally:
        HydraConfig.instance().cfg = None
    assert len(calls) == 1 and len(launched) == 1  # the job did not check or resolve again
    assert launched[0].nproc_per_node == 2 and launched[0].backend == "gloo"
    assert launched[0].as_dict() == OmegaConf.to_container(config.runtime)


def test_a_sweep_job_is_checked_for_its_share_of_the_machine_and_launches_with_that_runtime(tmp_path, recorded):
    from runner.driver import cli

    calls, launched = recorded
    config = compose_config(["launch.nproc_per_node=cpu", "launch.backend=gloo"])
    with read_write(config.hydra), open_dict(config.hydra):  # job 1 of a joblib sweep running 2 jobs side by side
        config.hydra.mode = RunMode.MULTIRUN
        config.hydra.launcher = {
            "_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
            "n_jobs": 2,
        }
        config.hydra.job.num = 1
    try:
        assert cli.run(_job_config(config, tmp_path / "job-1")) == 0
    finally:
        HydraConfig.instance().cfg = None
    assert calls == [{"parallel_jobs": 2, "slot": 1}]  # checked once, for the runtime the job gets
    assert launched == [resolve_runtime(config.launch, parallel_jobs=2, slot=1)]


def _job_config(config, run_dir: Path):
    """What Hydra's run_job hands the task: the config without `hydra`, once its output directory is set."""
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(config)
    job = copy.deepcopy(config)
    with read_write(job), open_dict(job):
        del job["hydra"]
    return job


def test_the_preflight_callback_exits_2_with_one_paragraph_and_leaves_no_trace(tmp_path, monkeypatch, capsys):
    from runner.driver.callbacks import PreflightCallback

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("RUNNER_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    config = compose_config(["dataset.size=0"])  # refused after the lock was taken
    try:
        with pytest.raises(SystemExit) as exit_:
            PreflightCallback().on_run_start(config)
    finally:
        HydraConfig.instance().cfg = None
    assert exit_.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("Error: dataset.size=0: a dataset needs at least one sample") and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3
    assert list(tmp_path.iterdir()) == []  # the lock file and the directories made for it are gone
    assert "runtime" not in config


def test_config_words_mean_the_same_composed_or_read_back_from_yaml(tmp_path):
    """Workers and reports read config.yaml back as plain strings; the checks get the schema's enums."""
    from runner.config import Runtime, SnapshotFormat, snapshot_format
    from runner.driver.checks.ranges import check_ranges
    from runner.driver.reports import training_setup

    def both(overrides):
        composed = compose_command(overrides, tmp_path).cfg
        return composed, OmegaConf.create(OmegaConf.to_yaml(composed))

    for cfg in both(["trainer.strategy=fsdp"]):
        assert snapshot_format(cfg) == SnapshotFormat.dcp
    for overrides, key in (
        (["trainer.strategy=fsdp", "trainer.precision=fp16"], "trainer.precision"),
        (["launch=rpc", "model=mlp", "trainer.strategy=fsdp"], "trainer.strategy"),
        (["trainer.fsdp.meta_init=true"], "trainer.fsdp.meta_init"),
        (["trainer.strategy=fsdp", "trainer.ddp.static_graph=true"], "trainer.ddp.static_graph"),
    ):
        for cfg in both(overrides):
            with pytest.raises(UserError) as caught:
                check_ranges(cfg)
            assert caught.value.key == key, (overrides, type(cfg.trainer.strategy))
    one = Runtime("gloo", "cpu", 1, 1, "gloo", "", None, "spawn")
    for cfg in both(["launch=local"]):
        assert training_setup(cfg, one).startswith("one process (no DDP), precision float32")


def test_a_failure_report_names_the_rank_that_failed_first_not_the_one_that_waited(tmp_path, capsys):
    """The agent can stop the group having seen only the rank that waited for a peer that had died
    (the peer's exit reaches it later); the report then takes the cause from the peer's own record."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from runner.driver.reports import report_failure
    from runner.errors import EXIT_TRAINING_FAILED

    cfg = compose_command([], tmp_path).cfg
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank-1.log").write_text("Traceback ...\nOutOfMemoryError: CUDA out of memory.\n")
    waited = "RuntimeError: rank 1 (pid 7) exited while this rank waited for it in a shared-memory all-reduce"
    error_file = tmp_path / "error.json"
    error_file.write_text(json.dumps({"message": {"message": waited, "extraInfo": {"timestamp": "1"}}}))
    err = ChildFailedError("train", {0: ProcessFailure(0, 8, 1, str(error_file))})
    err.recorded_failures = [
        {"rank": 0, "text": waited},
        {"rank": 1, "text": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."},
    ]
    assert report_failure(err, cfg, tmp_path) == EXIT_TRAINING_FAILED
    report = capsys.readouterr().err
    assert "Error: training failed on rank 1: OutOfMemoryError: CUDA out of memory. Tried to allocate" in report
    assert "rank-1.log" in report and "exited while this rank waited" not in report.splitlines()[0]
    err.recorded_failures = []  # no record (a worker killed outright): the agent's own view, as before
    report_failure(err, cfg, tmp_path)
    assert f"Error: training failed on rank 0: {waited}" in capsys.readouterr().err
