"""SLURM-style preemption through hydra-submitit-launcher, with submitit's local executor (no cluster).

The job gets submitit's preemption signal mid-run: the workers finish their step and snapshot,
submitit requeues the job, and the requeued job resumes from that snapshot and finishes.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import WORKERS, metrics, process_tree, start_cli

from runner.driver.sweep import read_status


@pytest.mark.slow
def test_preempted_job_snapshots_requeues_and_resumes(workdir):
    args = [
        "--multirun",
        "hydra/launcher=submitit_local",
        "name=preempt",
        "model=mlp",
        "dataset.size=65536",
        "trainer.total_epochs=6",
        "trainer.progress=false",
        *WORKERS,
    ]
    run_dir = workdir / "outputs" / "preempt" / "dataset.size=65536,model=mlp"  # a named sweep's job: under the name
    # SLURM jobs are usually given SIGUSR1 (`--signal=USR1@120`); tell submitit so.
    proc = start_cli(args, workdir, env={"SUBMITIT_PREEMPT_SIGNAL": "USR1"})
    deadline = time.time() + 120
    while not metrics(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    # The job process submitit started (the one running Hydra's job, i.e. the runner's driver).
    pids = [pid for (pid, _), command in process_tree(proc.pid).items() if "submitit.core._submit" in command]
    assert pids, "the submitit job is not running"
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out + err
    log = (run_dir / "train.log").read_text()
    assert "received SIGUSR1: finishing the current step, then writing a snapshot" in log
    assert "resumed from snapshot-" in log
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert read_status(run_dir)["status"] == "finished"
    assert "sweep: 1 jobs, 0 failed" in out


def test_slurm_recipe_composes_one_agent_per_node_with_an_early_preemption_signal(workdir):
    from conftest import run_cli
    from omegaconf import OmegaConf

    res = run_cli(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"], workdir)
    assert res.returncode == 0, res.output
    launcher = OmegaConf.create(res.stdout).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == 1 and launcher.signal_delay_s >= 60 and launcher.max_num_timeout > 0
