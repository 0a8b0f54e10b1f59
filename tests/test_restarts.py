"""Restarts and stops as the user sees them: what a restart can fix is restarted, a bug that
repeats is not restarted again, and a Ctrl-C or a snapshot is said once."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import FAST, run_cli, start_cli

pytestmark = pytest.mark.slow
PLUGINS = {"PYTHONPATH": str(Path(__file__).parent / "plugins")}
# 2048 samples / (2 workers x 32) = 32 steps per epoch; a snapshot every 20 steps.
RUN = ["model._target_=faulty.FaultyLinear", "trainer.total_epochs=3", "trainer.save_every_steps=20", *FAST]


@pytest.mark.parametrize("fail_after_step,resumed", [(0, None), (30, "snapshot-000000020.pt")])
def test_a_bug_that_repeats_is_restarted_once_then_reported(workdir, fail_after_step, resumed):
    started = time.perf_counter()
    res = run_cli([*RUN, "name=bug", f"+model.fail_after_step={fail_after_step}"], workdir, env=PLUGINS)
    wall = time.perf_counter() - started
    assert res.returncode == 1, res.output
    assert "Error: training failed on rank" in res.stderr
    assert "(not restarting: the same error after restart 1): KeyError: 'label'" in res.stderr, res.stderr
    assert "after 3 restarts" not in res.stderr
    log = (workdir / "outputs" / "bug" / "train.log").read_text()
    assert "(restart 1 after a worker failure)" in log and "restart 2" not in log  # two attempts, not four
    if resumed:  # the restart resumed from the snapshot and met the bug at the same step
        assert f"resumed from {resumed}" in log
    print(f"deterministic bug after step {fail_after_step}: reported in {wall:.1f} s")


def test_failures_that_a_restart_may_fix_are_restarted_and_counted(workdir):
    # Killed by SIGKILL at the same step in every attempt (a recurring OOM kill): restarted as
    # often as launch.max_restarts allows (3, as shipped), and the report counts them.
    killed = run_cli([*RUN, "name=killed", "+model.fail_after_step=30", "+model.kill_rank=1"], workdir, env=PLUGINS)
    assert killed.returncode == 1, killed.output
    assert "(after 3 restarts): " in killed.stderr, killed.stderr  # the killed rank, or its peer that lost it
    assert "not restarting" not in killed.stderr and "Terminating process" not in killed.stderr
    assert "(restart 3 after a worker failure)" in (workdir / "outputs" / "killed" / "train.log").read_text()
    # A failure that moves to another step is not the same error: restarted, up to the limit.
    moving = run_cli([*RUN, "name=moving", "+model.fail_at_call=30", "launch.max_restarts=1"], workdir, env=PLUGINS)
    assert moving.returncode == 1, moving.output
    assert "(after 1 restart): KeyError: 'label'" in moving.stderr, moving.stderr


def test_ctrl_c_of_the_process_group_is_said_once_and_each_version_once(workdir):
    # A terminal's Ctrl-C reaches every process of the group: the driver (agent) and each worker.
    # An improving validation and save_every_steps both land on every 10th step.
    args = [
        "name=ctrl-c",
        "dataset.size=20000",
        "data.val_fraction=0.05",
        "trainer.val_every_steps=10",
        "trainer.save_every_steps=10",
        "snapshot.monitor=val/loss",
        "trainer.total_epochs=50",
        *FAST,
    ]
    run_dir = workdir / "outputs" / "ctrl-c"
    proc = start_cli(args, workdir, new_session=True)
    deadline = time.time() + 120
    log = run_dir / "train.log"
    while (
        proc.poll() is None
        and time.time() < deadline
        and "snapshot-000000030.pt written" not in (log.read_text() if log.exists() else "")
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out + err
    assert err.count("received SIGINT") == 1, err  # one line for the group, not one per process
    assert "death signal" not in err and "[rank 1] stopped" not in err, err
    assert "Stopped by SIGINT: a snapshot of the last step" in err
    assert "received SIGINT" in (run_dir / "logs" / "rank-1.log").read_text()  # the other ranks keep it in their logs
    written = Counter(
        line.split("snapshot ")[1].split(" written")[0]
        for line in log.read_text().splitlines()
        if "written (epoch" in line
    )
    assert written and max(written.values()) == 1, written  # each version is written and logged once
    assert {"snapshot-000000010.pt", "snapshot-000000020.pt", "snapshot-000000030.pt"} <= set(written)
