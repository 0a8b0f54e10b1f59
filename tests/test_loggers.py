"""Experiment trackers: every record once (across restarts and resumes), failures never fatal."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import FAST, QUIET, metrics, run_cli

pytestmark = pytest.mark.slow


def test_csv_and_tensorboard_at_once_and_a_failing_logger_only_warns(workdir):
    res = run_cli(
        ["launch=local", "logger=many", "trainer.total_epochs=3", "data.val_fraction=0.2", "name=many", *QUIET], workdir
    )
    assert res.returncode == 0, res.output
    run_dir = workdir / "outputs" / "many"
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # An epoch's mean under train/loss_epoch, the training rows (every trainer.log_every steps) under train/loss.
    epochs = [r for r in rows if r.get("train/loss_epoch")]
    assert [float(r["train/loss_epoch"]) for r in epochs] == pytest.approx([r["train/loss"] for r in metrics(run_dir)])
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [50, 100, 150]  # 64 steps per epoch
    assert [float(r["train/loss"]) for r in rows if r.get("train/loss")] == pytest.approx(
        [r["train/loss"] for r in metrics(run_dir, steps=True)]
    )
    assert all(r["val/loss"] for r in epochs)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    broken = run_cli(
        [
            "launch=local",
            "logger=csv",
            "logger.log_dir=/proc/no-such-dir",
            "trainer.total_epochs=3",
            "name=broken",
            *QUIET,
        ],
        workdir,
    )
    assert broken.returncode == 0, broken.output
    assert broken.output.count("logger CSVLogger failed") == 1 and "training goes on" in broken.output


def test_mlflow_holds_every_epoch_once_across_a_restart_and_a_resume(workdir):
    from mlflow.tracking import MlflowClient

    args = ["logger=mlflow", "trainer.save_every=1", "trainer.log_every=16", "name=tracked", *FAST]
    first = run_cli([*args, "trainer.total_epochs=2", "trainer.crash_at_step=50"], workdir, timeout=300)
    assert first.returncode == 0 and "restart 1 after a worker failure" in first.output, first.output
    second = run_cli([*args, "trainer.total_epochs=3"], workdir, timeout=300)  # extend: resume
    assert second.returncode == 0, second.output
    client = MlflowClient(f"sqlite:///{workdir / 'outputs' / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert len(runs) == 1, "the resumed run continues the same MLflow run"
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "train/loss_epoch")
    assert [m.step for m in history] == [32, 64, 96]  # 2048 samples / (2 workers x 32) per epoch, each once
    assert [m.value for m in history] == pytest.approx(
        [r["train/loss"] for r in metrics(workdir / "outputs" / "tracked")]
    )
    rows = client.get_metric_history(
        run.info.run_id, "train/loss"
    )  # every 16 steps, each once across restart and resume
    assert sorted(m.step for m in rows) == [16, 32, 48, 64, 80, 96]
    assert [m.value for m in sorted(rows, key=lambda m: m.step)] == pytest.approx(
        [r["train/loss"] for r in metrics(workdir / "outputs" / "tracked", steps=True)]
    )
    assert run.data.params["optimizer.lr"] == "0.01" and run.data.params["trainer.batch_size"] == "32"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts and "snapshots" in artifacts and run.info.status == "FINISHED"


def test_wandb_offline_run_resumes_the_same_run_id(workdir):
    args = ["launch=local", "logger=wandb", "name=wb", *QUIET]
    assert run_cli([*args, "trainer.total_epochs=1"], workdir, timeout=300).returncode == 0
    run_dir = workdir / "outputs" / "wb"
    run_id = (run_dir / "wandb" / "run_id").read_text()
    res = run_cli([*args, "trainer.total_epochs=2"], workdir, timeout=300)
    assert res.returncode == 0, res.output
    offline = sorted((run_dir / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    assert any(p.suffix == ".wandb" for p in offline[-1].iterdir())
    # Every record once: 2 epochs and the training rows of steps 50 and 100 (64 steps per epoch).
    assert (
        json.loads((run_dir / "logs" / "loggers.json").read_text())["sent"]
        == 4
        == len(metrics(run_dir)) + len(metrics(run_dir, steps=True))
    )
