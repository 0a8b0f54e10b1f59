"""launch=multinode: two "nodes" (two agents on localhost) meet through one c10d endpoint."""

from __future__ import annotations

import pytest

from conftest import assert_same_weights, latest_snapshot, metrics, run_cli, start_cli
from runner.launch.elastic import _free_port

pytestmark = pytest.mark.slow
TASK = ["trainer.total_epochs=4", "trainer.save_every_steps=20", "trainer.progress=false", "model=mlp", "launch.backend=gloo"]


def test_two_nodes_train_like_one_and_a_dead_node_is_restarted(workdir):
    # Reference: the same 2 workers on one node.
    ref = run_cli([*TASK, "name=single", "launch.nproc_per_node=2"], workdir)
    assert ref.returncode == 0, ref.output

    port = _free_port()
    node = [*TASK, "name=two-nodes", "launch=multinode", "launch.nnodes=2", "launch.nproc_per_node=1",
            f"launch.rdzv_endpoint=127.0.0.1:{port}", "launch.rdzv_id=test-job",
            "trainer.crash_at_step=50", "trainer.crash_rank=1"]  # the worker of the second node dies once
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
    assert [r["train/loss"] for r in metrics(run_dir)] == [r["train/loss"] for r in metrics(workdir / "outputs" / "single")]
