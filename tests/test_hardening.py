"""What an unlucky user or an attacker can do to a run: a second invocation, a diverging loss, a
full disk, a hung worker at stop time, a tampered manifest, repeated signals."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, manifest, metrics, process_tree, run_cli, running, snapshot_state, start_cli

from runner import report
from runner.snapshot import SnapshotManager

PLUGINS = {"PYTHONPATH": str(Path(__file__).parent / "plugins")}


def wait_for(condition, timeout: float = 120, proc=None) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        assert proc is None or proc.poll() is None, proc.communicate()
        time.sleep(0.05)


def status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "status.json").read_text())["status"]
    except (OSError, ValueError):
        return ""


@pytest.mark.slow
def test_one_driver_per_run_directory_and_a_dead_holder_never_blocks(workdir):
    args = ["name=locked", "trainer.total_epochs=200", *FAST]
    run_dir = workdir / "outputs" / "locked"
    first = start_cli(args, workdir)
    try:
        wait_for(lambda: metrics(run_dir), proc=first)  # training, with snapshots of epochs done
        second = run_cli(args, workdir)
        assert second.returncode == 2, second.output
        assert f"is in use by pid {first.pid} on " in second.output and "Traceback" not in second.output
        assert len(second.output.strip().splitlines()) <= 4, second.output
    finally:
        workers = process_tree(first.pid)  # the fork server and the workers, which die with the driver
        first.send_signal(signal.SIGKILL)  # the driver dies without any cleanup; its lock file stays
        first.wait()
    assert (run_dir / ".lock").exists()
    assert len(workers) >= 2, workers
    wait_for(lambda: not running(workers), timeout=60)
    third = run_cli([*args[:1], "trainer.total_epochs=1", *FAST], workdir)  # the stale lock is no obstacle
    assert third.returncode == 0 and "in use" not in third.output, third.output


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_step_and_never_snapshots_non_finite_weights(workdir):
    # lr=1e30: the first step is finite, its update makes the weights huge, the second step's loss is inf.
    res = run_cli(["name=diverged", "optimizer.lr=1e30", "trainer.save_every_steps=1", *FAST], workdir)
    assert res.returncode == 1, res.output
    assert "Error: training diverged" in res.stderr and "not finite at step 2" in res.stderr, res.stderr
    assert "the last finite snapshot is snapshot-000000001.pt" in res.stderr and "Traceback" not in res.output
    run_dir = workdir / "outputs" / "diverged"
    assert [e["step"] for e in manifest(run_dir)["snapshots"]] == [1]
    for entry in manifest(run_dir)["snapshots"]:
        state = torch.load(run_dir / "snapshots" / entry["file"], weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert "restart" not in (run_dir / "train.log").read_text()  # a divergence is not retried
    assert json.loads((run_dir / "status.json").read_text())["status"] == "diverged"

    # Without step snapshots it stops at the first training row (trainer.log_every=50), recorded first.
    res = run_cli(["name=diverged-row", "optimizer.lr=1e30", "launch=local", "trainer.progress=false"], workdir)
    assert res.returncode == 1 and "not finite at step 50" in res.stderr, res.output
    rows = metrics(workdir / "outputs" / "diverged-row", steps=True)
    assert [r["step"] for r in rows] == [50] and rows[0]["train/loss"] in ("nan", "inf")

    # Without training rows, at the end of epoch 1; metrics.jsonl stays strict JSON.
    res = run_cli(
        ["name=diverged-epoch", "optimizer.lr=1e30", "launch=local", "trainer.progress=false", "trainer.log_every=0"],
        workdir,
    )
    assert res.returncode == 1 and "not finite at step 64" in res.stderr, res.output
    assert "no snapshot of this attempt was written" in res.stderr
    rows = metrics(workdir / "outputs" / "diverged-epoch")  # parse_constant refuses NaN/Infinity
    assert len(rows) == 1 and rows[0]["train/loss"] in ("nan", "inf")
    assert math.isnan(report.load_run(workdir / "outputs" / "diverged-epoch")["final_loss"]) or math.isinf(
        report.load_run(workdir / "outputs" / "diverged-epoch")["final_loss"]
    )

    # trainer.on_nonfinite=skip: steps with non-finite gradients are skipped, the run finishes finite.
    res = run_cli(
        [
            "name=skipped",
            "optimizer.lr=1e30",
            "launch=local",
            "trainer.on_nonfinite=skip",
            "trainer.total_epochs=2",
            "trainer.progress=false",
        ],
        workdir,
    )
    assert res.returncode == 0, res.output
    assert "skipped steps : 127" in res.stdout  # every step but the first
    assert [r["train/loss"] for r in metrics(workdir / "outputs" / "skipped")][1] == "nan"  # epoch 2: no step counted
    state = torch.load(next((workdir / "outputs" / "skipped" / "snapshots").glob("snapshot-*.pt")), weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.slow
def test_a_stop_that_could_not_snapshot_says_so_and_where_the_run_resumes(workdir):
    # Every worker hangs inside its 25th forward pass: the stop can never reach a step boundary.
    note = workdir / "hanging"
    args = [
        "name=hung",
        "model._target_=hanging.HangingLinear",
        "+model.hang_at=25",
        f"+model.hang_note={note}",
        "trainer.save_every_steps=10",
        "launch.stop_timeout=2",
        *FAST,
    ]
    run_dir = workdir / "outputs" / "hung"
    proc = start_cli(args, workdir, env=PLUGINS)
    wait_for(lambda: all(Path(f"{note}.{rank}").exists() for rank in (0, 1)), proc=proc)  # both workers hang
    # the version of step 20 is committed by the writer's thread, which goes on while forward hangs
    wait_for(lambda: manifest(run_dir)["snapshots"][-1]["step"] == 20, proc=proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "did not write a snapshot after the signal" in err and "launch.stop_timeout=2 s" in err, err
    assert "it resumes from snapshot-000000020.pt (epoch 0, step 20)" in err, err
    assert "a snapshot of the last step" not in err


@pytest.mark.slow
def test_a_full_disk_is_reported_as_a_full_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the ENOSPC translation is unit-tested below")
    try:
        # ~3.2 MB per snapshot (MLP of 264k weights + Adam), one per step, kept: the disk fills mid-run.
        res = run_cli(
            [
                "name=full",
                "model=mlp",
                "model.hidden_size=512",
                "optimizer=adam",
                "trainer.save_every_steps=1",
                "snapshot.keep_last=100",
                "launch.nproc_per_node=1",
                "launch.backend=gloo",
                "launch.max_restarts=0",
                "trainer.progress=false",
            ],
            mount,
        )
        assert res.returncode == 1, res.output
        assert "No space left on device" in res.stderr, res.stderr
        report_text = res.stderr[res.stderr.index("Error: training failed") :]
        assert "JSONDecodeError" not in res.output and len(report_text.strip().splitlines()) <= 12, res.stderr
        assert "Logging error" not in res.stderr  # a log file on the full disk does not spam tracebacks
        manager = SnapshotManager(mount / "outputs" / "full" / "snapshots")
        entry, state = manager.load_latest()  # every listed version is complete and verified
        assert entry["step"] >= 1 and state["train_state"]["global_step"] == entry["step"]
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_failed_snapshot_write_on_a_full_disk_raises_enospc(tmp_path, monkeypatch):
    """torch reports a full disk as "unexpected pos ..."; the manager names the real cause."""

    class Full:
        f_bavail, f_frsize = 0, 4096

    def failing_save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(OSError) as caught:
        SnapshotManager(tmp_path).write(snapshot_state(w=torch.ones(2)), step=1)
    assert caught.value.errno == errno.ENOSPC and "No space left on device" in str(caught.value)
    assert not list(tmp_path.iterdir())  # the torn temporary is gone


@pytest.mark.slow
def test_a_tampered_manifest_cannot_delete_or_fake_a_finished_run(workdir):
    args = ["name=tampered", "launch=local", "trainer.total_epochs=1", "trainer.progress=false", "snapshot.keep_last=1"]
    assert run_cli(args, workdir).returncode == 0
    run_dir = workdir / "outputs" / "tampered"
    victim = workdir / "victim.txt"
    victim.write_text("precious")
    data = manifest(run_dir)
    for name in ("../../../victim.txt", str(victim)):
        data["snapshots"].insert(
            0,
            {
                "file": name,
                "step": 0,
                "epoch": 99,
                "size": victim.stat().st_size,
                "sha256": hashlib.sha256(victim.read_bytes()).hexdigest(),
            },
        )
    (run_dir / "snapshots" / "manifest.json").write_text(json.dumps(data))
    res = run_cli([*args[:-3], "trainer.total_epochs=3", "trainer.progress=false", "snapshot.keep_last=1"], workdir)
    assert res.returncode == 0, res.output
    assert "already complete" not in res.output and "resumed from snapshot-000000064.pt" in res.output
    assert victim.read_text() == "precious"  # retention ran twice and deleted nothing outside
    # keep_last=1, and the version this run resumed from, which the run that resumed from it never deletes.
    assert [e["file"] for e in manifest(run_dir)["snapshots"]] == ["snapshot-000000064.pt", "snapshot-000000192.pt"]


def test_one_event_delivering_a_signal_twice_is_one_stop_request():
    from runner.train.collectives import Collectives
    from runner.train.stop import SAME_CAUSE_SECONDS, StopRequest

    stop = StopRequest(Collectives())
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. the parent-death signal, once per thread of the agent
        assert stop.signal == signal.SIGTERM and stop.should_stop(1)
        time.sleep(SAME_CAUSE_SECONDS + 0.1)
        with pytest.raises(KeyboardInterrupt):  # a second request, later: abort now
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.restore()
