"""Hyperparameter search: the objective each job returns, ranked results, resuming an interrupted search."""

from __future__ import annotations

import json
import signal
import time
from types import SimpleNamespace

import pytest
from conftest import QUIET, run_cli, start_cli
from omegaconf import OmegaConf

SEARCH = ["hparams_search=lr", "launch=local", "trainer.total_epochs=2", "optimizer=adamw", *QUIET]


def statuses(outputs):
    return {p.parent.name: json.loads(p.read_text()) for p in outputs.glob("*/status.json")}


@pytest.mark.slow
def test_search_returns_objectives_picks_the_best_and_resumes_only_what_is_missing(workdir):
    outputs = workdir / "outputs"
    proc = start_cli([*SEARCH, "hydra.sweeper.n_trials=4"], workdir)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if sum(s["status"] == "finished" for s in statuses(outputs).values()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the search is interrupted after two trials
    proc.communicate(timeout=60)
    before = statuses(outputs)
    finished_before = {name: s["updated"] for name, s in before.items() if s["status"] == "finished"}
    assert 2 <= len(finished_before) < 4

    res = run_cli([*SEARCH, "hydra.sweeper.n_trials=4"], workdir, timeout=300)
    assert res.returncode == 0, res.output
    assert f"{len(finished_before)} of 4 trials already done" in res.output
    after = statuses(outputs)
    assert len(after) == 4 and all(s["status"] == "finished" for s in after.values())
    for name, updated in finished_before.items():  # finished trials were not run again
        assert after[name]["updated"] == updated and not after[name].get("skipped")
    objectives = {name: s["objective"] for name, s in after.items()}
    results = OmegaConf.load(outputs / "optimization_results.yaml")
    assert results.best_value == pytest.approx(min(objectives.values()))
    assert results.complete == 4
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, "-m", "runner.report", str(outputs)], capture_output=True, text=True, cwd=workdir
    )
    rows = [line for line in table.stdout.splitlines()[1:] if " finished " in line]  # one per trial
    ranked = [float(line.split()[1]) for line in rows]  # run, objective, ...
    assert (
        ranked == pytest.approx(sorted(objectives.values()), rel=1e-3) and "objective" in table.stdout.splitlines()[0]
    )


def test_a_failed_or_diverged_trial_counts_as_failed_never_as_the_best():
    from hydra_plugins.runner_optuna_sweeper.resumable import _ResumableOptunaSweeper

    class Raising:
        @property
        def return_value(self):
            raise RuntimeError("job failed")

    assert _ResumableOptunaSweeper._value(SimpleNamespace(return_value=float("nan"))) is None  # diverged / failed run
    assert _ResumableOptunaSweeper._value(Raising()) is None
    assert _ResumableOptunaSweeper._value(SimpleNamespace(return_value=0.25)) == 0.25
