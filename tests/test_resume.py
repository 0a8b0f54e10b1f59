"""Exact resume: a run that is killed or stopped and resumed ends bitwise equal to one that was not."""

from __future__ import annotations

import signal

import pytest
from conftest import FAST, assert_same_weights, latest_snapshot, manifest, metrics, run_cli, start_cli, stop_when

pytestmark = pytest.mark.slow
# 4096 samples / (2 workers x 32) = 64 steps per epoch; snapshots every 20 steps, mid-epoch.
RUN = [
    "model=mlp",
    "model.dropout=0.1",
    "dataset.size=4096",
    "trainer.total_epochs=6",
    "trainer.save_every_steps=20",
    *FAST,
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted run is compared with."""
    cwd = tmp_path_factory.mktemp("reference")
    res = run_cli([*RUN, "name=reference"], cwd)
    assert res.returncode == 0, res.output
    run_dir = cwd / "outputs" / "reference"
    return latest_snapshot(run_dir), metrics(run_dir)


@pytest.mark.parametrize("crash_rank,crash_step,write_async", [(1, 45, False), (0, 150, True)])
def test_sigkilled_worker_is_restarted_and_ends_bitwise_equal(workdir, reference, crash_rank, crash_step, write_async):
    res = run_cli(
        [
            *RUN,
            "name=crash",
            f"trainer.crash_at_step={crash_step}",
            f"trainer.crash_rank={crash_rank}",
            f"snapshot.async={str(write_async).lower()}",
        ],
        workdir,
    )
    assert res.returncode == 0, res.output
    run_dir = workdir / "outputs" / "crash"
    # The newest snapshot before the kill. An asynchronous one may still be in flight when the worker
    # dies (it never counts until committed): then the one before it, and the result is the same.
    newest = crash_step // 20 * 20
    committed = (newest, newest - 20) if write_async else (newest,)
    assert any(f"resumed from snapshot-{step:09d}.pt" in res.output for step in committed), res.output
    log = (run_dir / "train.log").read_text()
    assert "killing rank" in log and "restart 1 after a worker failure" in log
    state = latest_snapshot(run_dir)
    ref_state, ref_metrics = reference
    assert_same_weights(state["model"], ref_state["model"])
    assert state["optimizer"]["state"].keys() == ref_state["optimizer"]["state"].keys()
    # The epoch the crash interrupted is reported once, with the same loss as without the crash.
    assert [(r["epoch"], r["train/loss"]) for r in metrics(run_dir)] == [
        (r["epoch"], r["train/loss"]) for r in ref_metrics
    ]


def test_sigterm_snapshots_and_reinvocation_ends_bitwise_equal(workdir, reference):
    args = [*RUN, "name=preempted"]
    run_dir = workdir / "outputs" / "preempted"
    proc = start_cli(args, workdir)
    out, err = stop_when(proc, lambda: metrics(run_dir))
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "Stopped by SIGTERM" in err and "run the same command again to resume" in err
    stopped_at = manifest(run_dir)["snapshots"][-1]
    assert 0 < stopped_at["step"] < 6 * 64, "the stop should land mid-run"

    res = run_cli(args, workdir)
    assert res.returncode == 0, res.output
    assert f"resumed from {stopped_at['file']}" in res.output
    ref_state, ref_metrics = reference
    assert_same_weights(latest_snapshot(run_dir)["model"], ref_state["model"])
    assert [r["train/loss"] for r in metrics(run_dir)] == [r["train/loss"] for r in ref_metrics]
