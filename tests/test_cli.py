"""End-to-end runs of `python -m runner` on CPU: what a user sees, checked many ways per launch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, QUIET, latest_snapshot, manifest, metrics, run_cli
from omegaconf import OmegaConf

from runner.config import LaunchConfig
from runner.launch.runtime import resolve_runtime

pytestmark = pytest.mark.slow
# What launch.cpu_allreduce=auto picks for FAST's 2 CPU workers on this machine (shm needs Linux
# x86-64 and a core per worker).
SHM_WORKS = resolve_runtime(OmegaConf.structured(LaunchConfig(nproc_per_node="2")), cuda_devices=[]).allreduce == "shm"


def test_two_workers_train_regression_resume_and_extend(workdir):
    args = ["model=linear", "trainer.save_every=10", "optimizer.lr=0.05", *FAST]
    res = run_cli(args, workdir)
    assert res.returncode == 0, res.output
    run_dir = workdir / "outputs" / "model=linear,optimizer.lr=0.05"
    assert "run directory : outputs/model=linear,optimizer.lr=0.05" in res.stdout
    assert "2 workers" in res.stdout and "final loss" in res.stdout and "samples/s" in res.stdout
    assert ("(gradients through shared memory)" in res.stdout) == SHM_WORKS  # launch.cpu_allreduce=auto

    # metrics.jsonl: one line per epoch with the documented fields, loss at the noise floor.
    rows = metrics(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, 21))
    assert {"epoch", "step", "train/loss", "lr", "samples_per_s", "epoch_seconds", "time"} <= rows[0].keys()
    assert rows[-1]["step"] == 20 * 2048 // (2 * 32)
    assert rows[-1]["train/loss"] < 3e-4 < rows[0]["train/loss"]  # noise variance is 1e-4

    # The final snapshot holds the bare module: it loads into a plain nn.Linear and shows w and b.
    state = latest_snapshot(run_dir)
    linear = torch.nn.Linear(2, 1)
    linear.load_state_dict(state["model"])
    assert torch.allclose(linear.weight, torch.tensor([[-2.0, 3.4]]), atol=0.01)
    assert torch.allclose(linear.bias, torch.tensor([4.2]), atol=0.01)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["allreduce"] == ("shm" if SHM_WORKS else "gloo")  # recorded: it fixes the summation order
    assert "sampler" not in state and "steps_in_epoch" not in state["train_state"]  # nothing unread is written
    assert state["train_state"]["epoch"] == 20 and state["config"]["model"]["_target_"] == "torch.nn.Linear"
    assert [e["step"] for e in manifest(run_dir)["snapshots"]] == [320, 640]

    # The run directory has Hydra's record, the resolved config and the logs.
    assert (run_dir / ".hydra" / "overrides.yaml").exists()
    resolved = OmegaConf.load(run_dir / "config.yaml")
    assert resolved.model.in_features == 2 and resolved.runtime.backend == "gloo"
    assert resolved.runtime.allreduce == ("shm" if SHM_WORKS else "gloo")
    log = (run_dir / "train.log").read_text()
    assert "[rank 0]" in log and "[rank 1]" in log
    assert (run_dir / "logs" / "rank-1.log").exists()

    # Re-running the same command finds the run complete and launches nothing.
    again = run_cli(args, workdir)
    assert again.returncode == 0, again.output
    assert "already complete (snapshot-000000640.pt, epoch 20 of 20)" in again.output
    assert "rank 0" not in again.output and len(metrics(run_dir)) == 20
    assert torch.equal(latest_snapshot(run_dir)["model"]["weight"], state["model"]["weight"])

    # More epochs continue the same run directory from epoch 20 (here with gloo's all-reduce:
    # how gradients travel does not define the run).
    more = run_cli([*args, "trainer.total_epochs=22", "launch.cpu_allreduce=gloo"], workdir)
    assert more.returncode == 0, more.output
    assert "shared memory" not in more.output
    assert "resumed from snapshot-000000640.pt at epoch 20 step 640" in more.output
    assert [r["epoch"] for r in metrics(run_dir)] == list(range(1, 23))
    assert manifest(run_dir)["snapshots"][-1]["step"] == 22 * 32


def test_local_mode_trains_in_one_process(workdir):
    res = run_cli(["launch=local", "optimizer.lr=0.05", *QUIET], workdir)
    assert res.returncode == 0, res.output
    assert "1 worker)" in res.stdout
    run_dir = workdir / "outputs" / "optimizer.lr=0.05"  # launch.* does not name the run
    state = latest_snapshot(run_dir)
    assert state["world_size"] == 1
    assert torch.allclose(state["model"]["weight"], torch.tensor([[-2.0, 3.4]]), atol=0.01)
    assert torch.allclose(state["model"]["bias"], torch.tensor([4.2]), atol=0.01)
    assert metrics(run_dir)[-1]["train/loss"] < 3e-4
    assert not (run_dir / "logs" / "elastic").exists()  # no agent involved


def test_swapping_optimizer_and_model_needs_no_code(workdir):
    res = run_cli(
        [
            "launch=local",
            "optimizer=adam",
            "model=mlp",
            "model.hidden_size=16",
            "scheduler=cosine",
            "trainer.total_epochs=5",
            *QUIET,
        ],
        workdir,
    )
    assert res.returncode == 0, res.output
    run_dir = next((workdir / "outputs").iterdir())
    rows = metrics(run_dir)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] / 5
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine decays
    state = latest_snapshot(run_dir)
    assert "0.weight" in state["model"] and state["model"]["0.weight"].shape == (16, 2)
    assert "exp_avg" in json.dumps(list(state["optimizer"]["state"][0].keys()))


def test_cfg_job_prints_composed_config(workdir):
    res = run_cli(["--cfg", "job", "model=mlp", "optimizer=adamw"], workdir)
    assert res.returncode == 0, res.output
    cfg = OmegaConf.create(res.stdout)
    assert cfg.model._target_ == "runner.models.MLP"
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.launch.mode == "auto" and cfg.snapshot.keep_last == 3
    assert not (workdir / "outputs").exists()


def test_tensorboard_logger_writes_the_same_scalars_as_metrics_jsonl(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_cli(["launch=local", "logger=tensorboard", "trainer.total_epochs=3", *QUIET], workdir)
    assert res.returncode == 0, res.output
    run_dir = workdir / "outputs" / "default"  # the logger does not change what the run is
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss_epoch")]
    assert [e.step for e in events.Scalars("train/loss_epoch")] == [
        64,
        128,
        192,
    ]  # optimizer steps: 2048 / 32 per epoch
    assert losses == pytest.approx([r["train/loss"] for r in metrics(run_dir)], rel=1e-6)
    rows = events.Scalars("train/loss")  # a training row every trainer.log_every (50) steps
    assert [e.step for e in rows] == [50, 100, 150]
    assert [e.value for e in rows] == pytest.approx([r["train/loss"] for r in metrics(run_dir, steps=True)], rel=1e-6)
    assert "lr" in events.Tags()["scalars"] and "samples_per_s" in events.Tags()["scalars"]
