"""How workers start: forked from the preloaded fork server (default on Linux), from the driver, or
spawned; every way trains the same bits, and the workers see the driver's environment."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, assert_same_weights, latest_snapshot, run_cli

from runner.launch import start

PLUGINS = {"PYTHONPATH": str(Path(__file__).parent / "plugins")}
RUN = [
    "model=mlp",
    "model.dropout=0.1",
    "dataset._target_=probe.probe_dataset",
    "dataset.size=512",
    "trainer.total_epochs=2",
    *FAST,
]


def test_workers_adopt_the_drivers_environment_and_keep_their_own(monkeypatch):
    inherited = {"KEPT": "same", "CHANGED": "old", "REMOVED": "x"}
    monkeypatch.setattr(start, "INHERITED_ENV", {**dict(os.environ), **inherited})
    for key, value in {**inherited, "RANK": "1", "MASTER_PORT": "2345"}.items():  # the agent set RANK, MASTER_PORT
        monkeypatch.setenv(key, value)
    driver = {
        **{k: v for k, v in os.environ.items() if k not in ("REMOVED", "RANK", "MASTER_PORT")},
        "CHANGED": "new",
        "ADDED": "y",
        "RANK": "driver's",
    }
    start.adopt_driver_environment(driver)
    assert (os.environ["KEPT"], os.environ["CHANGED"], os.environ.get("ADDED"), "REMOVED" in os.environ) == (
        "same",
        "new",
        "y",
        False,
    )
    assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("1", "2345")  # the rank's own values win
    monkeypatch.delenv("ADDED")


def test_warm_up_is_skipped_where_the_driver_starts_no_workers_of_its_own():
    skipped = [
        "launch=local",
        "launch.start_method=spawn",
        "launch.start_method=fork",
        "hydra/launcher=joblib",
        "--cfg",
        "-h",
    ]
    assert all(start.NO_WARM_UP.match(arg) for arg in skipped)
    assert not any(
        start.NO_WARM_UP.match(arg) for arg in ["launch=multinode", "launch.start_method=forkserver", "model=mlp"]
    )


def _probes(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="fork servers are the default on Linux only")
def test_start_methods_train_the_same_bits_and_workers_see_the_drivers_environment(workdir):
    finals = {}
    for method in ("auto", "spawn", "fork"):
        out = workdir / f"probe-{method}"
        res = run_cli(
            [
                *RUN,
                f"launch.start_method={method}",
                f"name={method}",
                f"+dataset.out={out}",
                "+hydra.job.env_set.RUNNER_PROBE=from-the-command-line",
            ],
            workdir,
            env=PLUGINS,
        )
        assert res.returncode == 0, res.output
        finals[method] = latest_snapshot(workdir / "outputs" / method)["model"]
        probes = _probes(out)
        driver, workers = probes.pop("driver"), probes
        assert sorted(workers) == ["0", "1"]
        for w in workers.values():
            # hydra.job.env_set and what the driver sets at launch reach every worker, however it started
            assert w["env"] == {"RUNNER_PROBE": "from-the-command-line", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, (
                method
            )
            if method == "auto":  # forked from the fork server, which had torch._dynamo loaded already
                assert w["ppid"] != driver["pid"] and w["dynamo"] and not w["preflight"]
            elif method == "fork":  # forked from the driver: everything it imported is there
                assert w["ppid"] == driver["pid"] and w["preflight"]
            else:  # a fresh interpreter, which imports what it needs itself
                assert w["ppid"] == driver["pid"] and not w["dynamo"] and not w["preflight"]
    assert_same_weights(finals["auto"], finals["spawn"])
    assert_same_weights(finals["auto"], finals["fork"])


def test_fork_is_refused_for_cuda_workers_and_unknown_methods_for_the_platform():
    from omegaconf import OmegaConf

    from runner.config import Runtime
    from runner.driver.checks import check_start_method
    from runner.errors import UserError

    launch = OmegaConf.create({"mode": "standalone", "start_method": "fork"})
    cuda = Runtime("nccl", "cuda", 2, None, "nccl", "", None, "fork")
    with pytest.raises(UserError, match="CUDA does not survive fork") as caught:
        check_start_method(launch, cuda)
    assert caught.value.key == "launch.start_method"
    check_start_method(launch, Runtime("gloo", "cpu", 2, 1, "gloo", "", None, "fork"))  # CPU workers may fork
    with pytest.raises(UserError, match="cannot start processes that way"):
        check_start_method(launch, Runtime("gloo", "cpu", 2, 1, "gloo", "", None, "teleport"))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="fork servers are the default on Linux only")
def test_sigterm_to_the_whole_process_group_still_gets_the_stop_snapshot(workdir):
    """`timeout`, SLURM's preemption notice and a terminal hang-up signal the whole group: the fork
    server is in it and must not die, or the workers' stop snapshot would be lost."""
    import signal

    from conftest import manifest, metrics, start_cli

    args = ["model=mlp", "dataset.size=4096", "trainer.total_epochs=400", "name=group", *FAST]
    run_dir = workdir / "outputs" / "group"
    proc = start_cli(args, workdir, new_session=True)
    try:
        deadline = time.time() + 60
        while not metrics(run_dir) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "Stopped by SIGTERM" in err and "did not write a snapshot" not in err, err
    latest = manifest(run_dir)["snapshots"][-1]
    assert f"a snapshot of the last step ({latest['file']}, step {latest['step']})" in err, (
        err
    )  # written after the signal


def test_a_changed_import_time_variable_means_a_new_server_and_launch_time_ones_do_not():
    server = {"TORCH_LOGS": "", "OMP_NUM_THREADS": "2", "PATH": "/bin"}
    launch = {**server, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PATH": "/usr/bin"}
    assert start._import_time_env(server) == start._import_time_env(
        launch
    )  # the driver's own settings, PATH: same server
    assert start._import_time_env(server) != start._import_time_env({**launch, "TORCH_LOGS": "recompiles"})
