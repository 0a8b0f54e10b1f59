"""Sweeps with --multirun: one run directory per job, resumable, failures reported, and the report."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from conftest import WORKERS, metrics, run_cli, start_cli
from omegaconf import OmegaConf

from runner import report
from runner.system import usable_cores

pytestmark = pytest.mark.slow
SWEEP = [
    "--multirun",
    "optimizer=sgd,adam",
    "optimizer.lr=0.05,0.01",
    "trainer.total_epochs=2",
    "trainer.progress=false",
    *WORKERS,
]
JOB_DIRS = [
    "optimizer.lr=0.05,optimizer=sgd",
    "optimizer.lr=0.01,optimizer=sgd",
    "optimizer.lr=0.05,optimizer=adam",
    "optimizer.lr=0.01,optimizer=adam",
]


def statuses(root):
    out = {}
    for name in JOB_DIRS:
        path = root / "outputs" / name / "status.json"
        out[name] = json.loads(path.read_text())["status"] if path.exists() else None
    return out


def test_sweep_interrupted_then_resumed_then_skipped_and_reported(workdir):
    # 1. Start a 4-job sweep and stop it (SIGTERM) once two jobs are done.
    proc = start_cli(SWEEP, workdir)
    deadline = time.time() + 120
    while list(statuses(workdir).values()).count("finished") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    first = statuses(workdir)
    assert list(first.values())[:2] == ["finished", "finished"], first
    assert first[JOB_DIRS[3]] is None, "the sweep should stop at the job that was interrupted"

    # 2. Re-invoke: finished jobs are skipped, the rest run; one summary table.
    res = run_cli(SWEEP, workdir)
    assert res.returncode == 0, res.output
    assert res.output.count("already complete") == 2
    assert "sweep: 4 jobs, 0 failed" in res.output
    assert not (workdir / "outputs" / ".sweeps").exists(), "the stopped sweep's table rows are not left behind"
    assert all(s == "finished" for s in statuses(workdir).values()), statuses(workdir)
    for name in JOB_DIRS:
        rows = metrics(workdir / "outputs" / name)
        assert [r["epoch"] for r in rows] == [1, 2]
        assert (workdir / "outputs" / name / "snapshots" / "snapshot-000000064.pt").exists()

    # 3. Re-invoke again: nothing runs.
    res = run_cli(SWEEP, workdir)
    assert res.returncode == 0 and res.output.count("already complete") == 4, res.output
    assert "rank 0" not in res.output

    # 4. The report: one row per run, numbers from metrics.jsonl, only the differing overrides, a PNG.
    runs = [report.load_run(workdir / "outputs" / name) for name in JOB_DIRS]
    text = report.table(runs)
    assert len(text.splitlines()) == 5 and max(len(line) for line in text.splitlines()) <= 120, text
    for name, run in zip(JOB_DIRS, runs):
        line = report.table([run]).splitlines()[1]  # alone: its name is not cut to fit beside the others
        assert line.startswith(name), line
        assert (
            f"{metrics(workdir / 'outputs' / name)[-1]['train/loss']:.4g}" in line
            and "2/2" in line
            and "finished" in line
        )
    assert report.differing_overrides(runs)[3] == "optimizer=adam optimizer.lr=0.01"
    assert report.main([str(workdir / "outputs")]) == 0
    assert (workdir / "outputs" / "losses.png").stat().st_size > 1000


def test_a_failing_job_does_not_stop_the_sweep(workdir):
    res = run_cli(
        [
            "--multirun",
            "launch=local",
            "model.in_features=2,3",
            "+model.bias=true,false",
            "trainer.total_epochs=1",
            "trainer.progress=false",
        ],
        workdir,
    )
    assert res.returncode == 1, res.output
    assert "sweep: 4 jobs, 2 failed" in res.output
    assert res.output.count("Error: training failed on rank 0") == 2
    lines = [line for line in res.output.splitlines() if re.match(r"\d+\s+(finished|failed)\s", line)]
    assert len(lines) == 4 and sum("failed" in line for line in lines) == 2
    # In-process jobs log only into their own run directory, each line once.
    for log in (workdir / "outputs").glob("*/train.log"):
        assert log.read_text().count("starting from scratch") == 1, log


def test_parallel_sweep_with_joblib_shares_the_machine(workdir):
    res = run_cli(
        [
            "--multirun",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "optimizer=sgd,adam",
            "trainer.total_epochs=2",
            "trainer.progress=false",
            "launch.nproc_per_node=cpu",
            "launch.backend=gloo",
        ],
        workdir,
    )
    assert res.returncode == 0, res.output
    assert "sweep: 2 jobs, 0 failed" in res.output
    for name in ("optimizer=sgd", "optimizer=adam"):
        run_dir = workdir / "outputs" / name
        assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]
        runtime = OmegaConf.load(run_dir / "config.yaml").runtime
        cores_per_job = max(1, usable_cores() // 2)  # the cores this process may use, shared by the 2 jobs
        assert runtime.nproc_per_node == cores_per_job and runtime.omp_num_threads == 1
