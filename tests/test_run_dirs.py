"""Who writes a run directory: every sweep or search job its own (under the run's name when it has
one), only the command that holds the lock, nothing from a refused command; launcher mistakes
refused before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import FAST, cli_env, run_cli
from omegaconf import OmegaConf

SEARCH = [
    "hparams_search=lr",
    "experiment=digits",
    "hydra.sweeper.n_trials=3",
    "trainer.total_epochs=1",
    "data.num_workers=0",
    *FAST,
]


def status_files(root: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(root)): p.read_text() for p in root.rglob("status.json")}


def table_rows(output: str) -> list[str]:
    head = output.index("\nsweep: ")
    return [line for line in output[head:].splitlines()[3:] if line[:1].isdigit()]


@pytest.mark.slow
def test_a_named_search_gives_each_trial_its_run_directory_lists_every_trial_and_follows_snapshot_mode(workdir):
    # README's search over an experiment with a name: every trial under outputs/digits/, none refused.
    res = run_cli(SEARCH, workdir, timeout=300)
    assert res.returncode == 0, res.output
    root = workdir / "outputs" / "digits"
    trials = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/status.json")}
    assert len(trials) == 3 and all(s["status"] == "finished" for s in trials.values()), trials
    assert all("optimizer.lr=" in name for name in trials) and not (root / "status.json").exists()
    assert "sweep: 3 jobs, 0 failed" in res.output and len(table_rows(res.output)) == 3
    assert "holds snapshots of a different run" not in res.output and "Traceback" not in res.output
    # experiment=digits monitors val/accuracy with snapshot.mode=max: the search maximizes it.
    objectives = [s["objective"] for s in trials.values()]
    assert OmegaConf.load(root / "optimization_results.yaml").best_value == pytest.approx(max(objectives))

    # The same search again: nothing runs, and the closing table still lists every trial.
    before = status_files(root)
    res = run_cli(SEARCH, workdir, timeout=300)
    assert res.returncode == 0, res.output
    assert "3 of 3 trials already done" in res.output and "rank 0" not in res.output
    assert "sweep: 3 jobs, 0 failed (3 done by an earlier command)" in res.output
    assert [row.split()[1:3] for row in table_rows(res.output)] == [["finished", "(earlier)"]] * 3
    assert status_files(root) == before

    # A direction that disagrees with snapshot.mode is refused before the first trial.
    res = run_cli([*SEARCH, "hydra.sweeper.n_trials=4", "hydra.sweeper.direction=minimize"], workdir)
    assert res.returncode == 2, res.output
    assert "Error: hydra.sweeper.direction=minimize" in res.output and "snapshot.mode=max" in res.output
    assert "Traceback" not in res.output and "Launching" not in res.output
    assert status_files(root) == before


@pytest.mark.slow
def test_a_named_sweep_puts_each_job_under_the_name_and_a_single_run_keeps_the_name(workdir):
    res = run_cli(["--multirun", "name=x", "optimizer.lr=0.1,0.01", "trainer.total_epochs=1", *FAST], workdir)
    assert res.returncode == 0, res.output
    assert "sweep: 2 jobs, 0 failed (run directories under outputs/x/)" in res.output
    for job in ("optimizer.lr=0.1", "optimizer.lr=0.01"):
        assert json.loads((workdir / "outputs" / "x" / job / "status.json").read_text())["status"] == "finished"
    res = run_cli(["--multirun", "name=x", "optimizer.lr=0.1,0.01", "trainer.total_epochs=1", *FAST], workdir)
    assert res.returncode == 0 and res.output.count("already complete") == 2, res.output
    res = run_cli(["name=x", "trainer.total_epochs=1", *FAST], workdir)
    assert res.returncode == 0, res.output
    assert json.loads((workdir / "outputs" / "x" / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_a_refused_command_writes_nothing_into_a_run_directory_and_is_refused_before_the_slow_checks(workdir):
    from runner.driver.lock import RunDirLock

    run = ["optimizer.lr=0.1", *FAST]
    res = run_cli([*run, "trainer.total_epochs=1"], workdir)
    assert res.returncode == 0, res.output
    run_dir = workdir / "outputs" / "optimizer.lr=0.1"
    good = (run_dir / "status.json").read_text()
    assert json.loads(good)["status"] == "finished"

    # A sweep job with a config mistake, in that finished run's directory: listed, not written there.
    res = run_cli(["--multirun", *run, "trainer.log_every=-1"], workdir)
    assert res.returncode == 1, res.output
    assert "Error: trainer.log_every=-1" in res.output and "sweep: 1 jobs, 1 failed" in res.output
    assert table_rows(res.output)[0].split()[1:3] == ["invalid", "config"]
    assert (run_dir / "status.json").read_text() == good

    with RunDirLock(run_dir) as held:  # another command holds the run
        held.accepted()
        res = run_cli(["--multirun", *run, "trainer.total_epochs=2"], workdir)
        assert res.returncode == 1, res.output
        assert "sweep: 1 jobs, 1 failed" in res.output and table_rows(res.output)[0].split()[1:3] == ["in", "use"]
        # A single run whose data check would fail is refused for the lock first, before building anything.
        res = run_cli([*run, "trainer.test=true"], workdir)
        assert res.returncode == 2 and "is in use by pid" in res.output and "test split" not in res.output, res.output
    assert (run_dir / "status.json").read_text() == good

    # Refused in a new directory after the lock was taken: no trace is left, in a single run or a sweep.
    res = run_cli(["name=fresh", "trainer.test=true", *FAST], workdir)
    assert res.returncode == 2 and "the dataset has no test split" in res.output, res.output
    res = run_cli(["--multirun", "optimizer.lr=0.3,0.4", "trainer.test=true", *FAST], workdir)
    assert res.returncode == 1 and "sweep: 2 jobs, 2 failed" in res.output, res.output
    assert sorted(p.name for p in (workdir / "outputs").iterdir()) == ["multirun.yaml", "optimizer.lr=0.1"]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".hydra", ".lock"]


def test_a_command_waits_for_a_holder_still_checking_and_a_refused_one_leaves_the_lock_file_as_it_was(tmp_path):
    import threading
    import time

    from runner.driver.lock import RunDirInUse, RunDirLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text("{}")
    RunDirLock(run_dir).acquire().accepted().release()  # a finished run
    record = (run_dir / ".lock").read_bytes()
    checking = RunDirLock(run_dir).acquire()  # a command still checking its config...
    threading.Timer(0.3, checking.abandon).start()  # ...which is then refused
    started = time.monotonic()
    second = RunDirLock(run_dir).acquire()  # waits for it instead of being refused for it
    assert 0.2 < time.monotonic() - started < 10
    second.abandon()
    assert (run_dir / ".lock").read_bytes() == record
    running = RunDirLock(run_dir).acquire().accepted()
    started = time.monotonic()
    with pytest.raises(RunDirInUse, match=f"in use by pid {os.getpid()}"):
        RunDirLock(run_dir).acquire()  # an accepted holder: refused at once
    assert time.monotonic() - started < 1
    running.release()
    RunDirLock(tmp_path / "new" / "run").acquire().abandon()  # refused in a directory it created: no trace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


BLOCK_PLUGIN = """
import pkgutil, sys
blocked = sys.argv.pop(1)
walk = pkgutil.walk_packages
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
pkgutil.walk_packages = lambda *a, **k: (m for m in walk(*a, **k) if not m.name.startswith(blocked))
from runner.driver.cli import main
main()
"""


@pytest.mark.slow
def test_slurm_off_cluster_and_a_missing_launcher_plugin_are_one_paragraph_errors(workdir):
    with tempfile.TemporaryDirectory() as empty:  # a PATH with python and no SLURM commands
        env = {**cli_env(), "PATH": os.pathsep.join([os.path.dirname(sys.executable), empty])}
        res = run_cli(["--multirun", "hydra/launcher=slurm", "trainer.total_epochs=1"], workdir, env=env)
    assert res.returncode == 2, res.output
    assert res.output.startswith("Error: hydra/launcher=slurm:") and "sbatch" in res.output
    assert "hydra/launcher=submitit_local" in res.output and "Traceback" not in res.output
    assert not (workdir / "outputs").exists()

    # hydra-joblib-launcher as if it were not installed.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_PLUGIN,
            "hydra_plugins.hydra_joblib_launcher",
            "--multirun",
            "hydra/launcher=joblib",
            "optimizer.lr=0.1,0.01",
        ],
        cwd=workdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert output.startswith("Error: hydra/launcher=joblib: needs the hydra-joblib-launcher package")
    assert 'pip install "hydra-torch-runner[joblib]"' in output and "Could not find" not in output
    assert not (workdir / "outputs").exists()


def test_the_search_direction_follows_snapshot_mode_and_a_contrary_one_is_refused():
    from hydra_plugins.runner_optuna_sweeper.resumable import search_direction
    from runner.config import Mode
    from runner.errors import UserError

    assert search_direction(None, "val/accuracy", Mode.max) == "maximize"
    assert search_direction(None, "val/loss", Mode.min) == "minimize"
    assert search_direction(None, None, Mode.max) == "minimize"  # no monitor: the objective is the final loss
    assert search_direction("maximize", "val/accuracy", "max") == "maximize"
    with pytest.raises(UserError, match="snapshot.mode=max"):
        search_direction("minimize", "val/accuracy", Mode.max)
