"""launch=multinode: two "nodes" (two agents on localhost) meet through one c10d endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_same_weights, latest_snapshot, metrics, run_cli, start_cli

from runner.launch.elastic import _free_port

pytestmark = pytest.mark.slow
TASK = [
    "trainer.total_epochs=4",
    "trainer.save_every_steps=20",
    "trainer.progress=false",
    "model=mlp",
    "launch.backend=gloo",
]


def listening(port: int) -> bool:
    """A socket listens on `port` of this machine (the rendezvous store), read from /proc/net (Linux)."""
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        rows = [line.split() for line in table.read_text().splitlines()[1:]] if table.exists() else []
        if any(row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port for row in rows):  # 0A: LISTEN
            return True
    return False


def test_two_nodes_train_like_one_and_a_dead_node_is_restarted(workdir):
    # Reference: the same 2 workers on one node.
    ref = run_cli([*TASK, "name=single", "launch.nproc_per_node=2"], workdir)
    assert ref.returncode == 0, ref.output

    port = _free_port()
    node = [
        *TASK,
        "name=two-nodes",
        "launch=multinode",
        "launch.nnodes=2",
        "launch.nproc_per_node=1",
        f"launch.rdzv_endpoint=127.0.0.1:{port}",
        "launch.rdzv_id=test-job",
        "trainer.crash_at_step=50",
        "trainer.crash_rank=1",
    ]  # the worker of the second node dies once
    nodes = [start_cli(node, workdir) for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in nodes]
    for proc, (out, err) in zip(nodes, outputs):
        assert proc.returncode == 0, out + err
    run_dir = workdir / "outputs" / "two-nodes"
    log = (run_dir / "train.log").read_text()
    assert "killing rank 1" in log and "resumed from snapshot-000000040.pt" in log
    assert "(restart 1 after a worker failure)" in log
    # Two nodes of one worker each, with a crash and a restart, end exactly where one node of two ends.
    assert_same_weights(latest_snapshot(run_dir)["model"], latest_snapshot(workdir / "outputs" / "single")["model"])
    assert [r["train/loss"] for r in metrics(run_dir)] == [
        r["train/loss"] for r in metrics(workdir / "outputs" / "single")
    ]


def test_a_node_says_what_it_waits_for_and_a_stop_of_the_rendezvous_host_is_a_stop_everywhere(workdir):
    import json
    import signal
    import time

    port = _free_port()
    node = [
        *TASK,
        "trainer.total_epochs=200",
        "dataset.size=20000",
        "trainer.save_every_steps=50",
        "name=stopped",
        "launch=multinode",
        "launch.nnodes=2",
        "launch.nproc_per_node=1",
        f"launch.rdzv_endpoint=127.0.0.1:{port}",
    ]
    run_dir = workdir / "outputs" / "stopped"
    host = start_cli(node, workdir)  # the first node hosts the rendezvous store
    deadline = time.time() + 120
    while not listening(port) and time.time() < deadline and host.poll() is None:
        time.sleep(0.05)
    assert listening(port), host.communicate(timeout=60) if host.poll() is not None else "no rendezvous store"
    other = start_cli(node, workdir)
    log = run_dir / "train.log"
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and host.poll() is None
        and not (log.exists() and "snapshot-000000050.pt written" in log.read_text())
    ):
        time.sleep(0.05)
    host.send_signal(signal.SIGTERM)
    (_, host_err), (_, other_err) = host.communicate(timeout=120), other.communicate(timeout=120)
    waiting = (
        f"waiting for 1 of 2 nodes at 127.0.0.1:{port}, rendezvous id stopped, timeout 900 s (launch.rdzv_timeout)"
    )
    assert waiting in host_err, host_err
    assert host.returncode == other.returncode == 128 + signal.SIGTERM, host_err + other_err
    for err in (host_err, other_err):  # the other node reports the same stop, not a failure and its C++ stack
        assert "Stopped by SIGTERM: a snapshot of the last step" in err, err
        assert "failed" not in err and "frame #" not in err and "restart" not in err, err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped" and status["exit_code"] == 128 + signal.SIGTERM, status
