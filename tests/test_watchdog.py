"""The hang watchdog: the heartbeat and its limit, where a stack says a rank is, and end to end a
rank stuck in forward, a rank that never joins, and slow steps that must not trip it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FAST, metrics, run_cli, start_cli

from runner.launch import hangs
from runner.launch.hangs import HangWatch, where_stuck
from runner.train import watchdog

PLUGINS = {
    "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "plugins"), os.environ.get("PYTHONPATH")]))
}

DUMP = """Thread 0x00007f01 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f02 (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/autograd/graph.py", line 841 in _engine_run_backward
  File "/venv/lib/python3.11/site-packages/torch/_tensor.py", line 625 in backward
  File "/src/runner/train/engines/base.py", line 110 in train_step
  File "/src/runner/train/loop.py", line 290 in _run_epoch
"""


def test_where_stuck_names_the_main_threads_line_and_the_runs_own_caller():
    assert where_stuck(DUMP) == "in _engine_run_backward, autograd/graph.py:841 (from train_step, engines/base.py:110)"
    mine = 'Current thread 0x1 (most recent call first):\n  File "/x/models.py", line 42 in forward\n'
    assert where_stuck(mine) == "in forward, x/models.py:42"
    assert where_stuck("Fatal Python error: ...") == "no Python frame (stuck in native code)"


def test_heartbeats_and_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_FAILURE_RECORDS", str(tmp_path))
    beats = watchdog.Heartbeat(watchdog.heartbeat_path(tmp_path, 0))
    workers = [SimpleNamespace(global_rank=0, id=1), SimpleNamespace(global_rank=1, id=2)]  # rank 1: no heartbeat
    watch = HangWatch(tmp_path, tmp_path, hang_timeout=0.3, collective_timeout=5.0)
    clock = [100.0]
    monkeypatch.setattr(hangs.time, "monotonic", lambda: clock[0])

    def tick(seconds: float, step=None, phase=None):
        clock[0] += seconds
        if phase is not None:
            beats.phase = watchdog.PHASES.index(phase)
            beats.write()
        if step is not None:
            beats.step = step
            beats.write()
        return watch.check(workers)

    assert watchdog.read(watchdog.heartbeat_path(tmp_path, 1)) is None
    assert tick(0.0, phase="training") is None
    assert tick(0.2, step=1) is None and tick(0.2, step=2) is None  # each move resets the clock
    assert watch.slowest == pytest.approx(0.2)
    assert tick(0.25) is None  # 0.25 s idle, under the 0.3 s floor
    assert tick(0.6, step=3) is None and watch.slowest == pytest.approx(0.85)  # a slow step raises the limit
    assert watch.limit(["training"]) == pytest.approx(8.5)
    hang = tick(8.6)
    assert hang is not None and hang.seconds == pytest.approx(8.6) and hang.limit == pytest.approx(8.5)
    assert watchdog.read(watchdog.heartbeat_path(tmp_path, 0))[1:] == (3, "training")
    assert watch.limit(["training", "evaluating"]) == pytest.approx(8.5)  # long phases wait collective_timeout at least
    assert HangWatch(tmp_path, tmp_path, 0.3, 20.0).limit(["evaluating"]) == 20.0
    # A new attempt (other pids) starts afresh; the slowest step seen stays.
    workers[0].id = 3
    assert tick(0.0) is None and watch.slowest == pytest.approx(0.85)
    beats.close()


@pytest.mark.slow
def test_a_rank_stuck_in_forward_ends_the_attempt_with_a_table_of_where_each_rank_is(workdir):
    note = workdir / "hanging"
    args = [
        "name=stuck",
        "model._target_=hanging.HangingLinear",
        "+model.hang_at=12",
        "+model.hang_rank=1",
        f"+model.hang_note={note}",
        "launch.hang_timeout=3",
        "launch.max_restarts=0",
        *FAST,
    ]
    proc = start_cli(args, workdir, env=PLUGINS)
    while not Path(f"{note}.1").exists() and proc.poll() is None:
        time.sleep(0.05)
    hung_at = time.monotonic()
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - hung_at
    assert proc.returncode == 1, out + err
    assert took < 3 + 10, took  # the limit, the stack dump (1 s) and the kill; never the 600 s collective timeout
    table = (out + err).split("Where each rank is:")[1]
    lines = [line.split() for line in table.splitlines()[1:4]]
    assert lines[0] == ["rank", "phase", "after", "step", "where"]
    assert lines[1][:3] == ["0", "training", "11"] and "shm_allreduce.py" in " ".join(lines[1])
    assert lines[2][:3] == ["1", "training", "11"] and "in forward, plugins/hanging.py:" in " ".join(lines[2])
    assert "no rank finished a step or a phase for" in out + err
    assert "Error: training failed on rank" in err and "hung: no rank moved for" in err, err
    log1 = (workdir / "outputs" / "stuck" / "logs" / "rank-1.log").read_text()
    assert "Current thread 0x" in log1 and 'hanging.py", line' in log1 and "in _bootstrap" in log1  # every thread


@pytest.mark.slow
def test_a_rank_that_never_joins_is_named_and_a_restart_with_slow_steps_finishes(workdir):
    args = [
        "name=late",
        "model._target_=hanging.HangingLinear",
        "+model.step_s=0.4",  # every step slower than the floor's tenth: the limit grows past the slow ones
        "+model.slow_every=5",
        "+model.slow_s=2.5",  # a step of ~3 s, above launch.hang_timeout
        "trainer.max_steps=11",
        "trainer.log_every=0",
        "launch.hang_timeout=2",
        *FAST,
    ]
    res = run_cli(args, workdir, env={**PLUGINS, watchdog.HANG_BEFORE_JOIN: "1"}, timeout=240)
    assert res.returncode == 0, res.output
    table = res.output.split("Where each rank is:")
    assert len(table) == 2, res.output  # one hang (the first attempt); the slow steps after it never trip it
    rows = [line.split() for line in table[1].splitlines()[2:4]]
    assert rows[0][:3] == ["0", "rendezvous", "0"], rows
    assert rows[1][:3] == ["1", "rendezvous", "0"] and "train/watchdog.py" in " ".join(rows[1]), rows
    assert "(restart 1 after a worker failure)" in res.output
    assert metrics(workdir / "outputs" / "late")[-1]["step"] == 11
