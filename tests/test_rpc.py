"""launch=rpc: gradients cross the RPC boundary exactly, resume is exact, the parameter server learns."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_weights, latest_snapshot, metrics, run_cli

from runner.models import MLP

pytestmark = pytest.mark.slow
# 512 samples / batch 32 = 16 steps per epoch; a snapshot every 8 steps, Adam so optimizer state matters.
TASK = [
    "model=mlp",
    "model.hidden_size=16",
    "dataset.size=512",
    "trainer.total_epochs=2",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "trainer.save_every_steps=5",
    "trainer.progress=false",
]


def test_pipeline_equals_single_process_and_resumes_exactly(workdir):
    local = run_cli([*TASK, "launch=local", "name=local"], workdir)
    assert local.returncode == 0, local.output
    pipe = run_cli([*TASK, "launch=rpc", "name=pipeline"], workdir)
    assert pipe.returncode == 0, pipe.output
    assert "3 workers" in pipe.output and "pipeline: 2 stages on stage0, stage1" in pipe.output
    single, split = latest_snapshot(workdir / "outputs" / "local"), latest_snapshot(workdir / "outputs" / "pipeline")
    # Same data order, same initial weights, same optimizer: the split model ends where the unsplit one does.
    for key in single["model"]:
        torch.testing.assert_close(split["model"][key], single["model"][key], rtol=0, atol=1e-6)
    assert [r["step"] for r in metrics(workdir / "outputs" / "pipeline")] == [16, 32]
    # The snapshot holds the whole model under its usual names: it loads into a plain MLP.
    MLP(2, 1, hidden_size=16).load_state_dict(split["model"])
    assert len(split["optimizer"]["per_owner"]) == 2 and split["optimizer"]["per_owner"][0]["state"]

    crashed = run_cli(
        [*TASK, "launch=rpc", "name=crashed", "trainer.crash_at_step=13", "trainer.crash_rank=0"], workdir
    )
    assert crashed.returncode == 0, crashed.output
    assert "resumed from snapshot-000000010.pt" in crashed.output
    resumed = latest_snapshot(workdir / "outputs" / "crashed")
    assert_same_weights(resumed["model"], split["model"])
    assert [r["train/loss"] for r in metrics(workdir / "outputs" / "crashed")] == [
        r["train/loss"] for r in metrics(workdir / "outputs" / "pipeline")
    ]


def test_parameter_server_with_two_trainers_reduces_the_loss(workdir):
    res = run_cli(
        [
            "launch=rpc",
            "launch.topology=parameter_server",
            "model=mlp",
            "trainer.total_epochs=3",
            "trainer.progress=false",
            "name=ps",
        ],
        workdir,
    )
    assert res.returncode == 0, res.output
    assert "3 workers" in res.output
    rows = metrics(workdir / "outputs" / "ps")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] / 10
    # 2048 samples split over 2 trainers of batch 32: 32 steps per trainer per epoch.
    assert rows[-1]["step"] == 3 * 32
    MLP(2, 1).load_state_dict(latest_snapshot(workdir / "outputs" / "ps")["model"])
    log = (workdir / "outputs" / "ps" / "train.log").read_text()
    assert "rpc worker ps (rank 0 of 3)" in log and "rpc worker trainer2 (rank 2 of 3)" in log
