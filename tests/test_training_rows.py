"""What a user watches while a run trains: the progress bar in a terminal (with validation), a training
row every `trainer.log_every` steps in metrics.jsonl and on the console, and the first lines."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import FAST, WORKERS, cli_env, metrics, run_cli

pytestmark = pytest.mark.slow


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 180) -> tuple[int, str]:
    """`python -m runner ARGS` with a pseudo-terminal of 120 columns as stdout and stderr, as a user
    runs it: the progress bar is on. Returns (exit code, everything it printed)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: every process that held it has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


def test_progress_bar_with_validation_shows_train_and_val_loss(workdir):
    # The shortest repro of a crash every run with validation hit in a terminal.
    code, out = run_in_terminal(
        ["data.val_fraction=0.1", "trainer.log_every=5", "trainer.total_epochs=3", *WORKERS], workdir
    )
    assert code == 0, out
    assert "got multiple values for keyword argument" not in out
    bar = [line for line in out.replace("\r", "\n").splitlines() if "step/s" in line]
    assert bar and "train/loss=" in bar[-1] and "val/loss=" in bar[-1] and "epoch=3/3" in bar[-1], bar[-3:]
    assert "train/loss " not in out  # the bar shows the rows: no log line per row on a terminal
    rows = metrics(workdir / "outputs" / "data.val_fraction=0.1", steps=True)
    assert [r["step"] for r in rows] == list(range(5, 88, 5))  # 29 steps per epoch (1843 samples / 64)


def test_training_rows_every_log_every_steps_resume_bitwise(workdir):
    args = [
        "trainer.max_steps=40",
        "trainer.log_every=7",
        "trainer.clip_grad_norm=1.0",
        "trainer.accumulate=2",
        "trainer.save_every_steps=10",
        "name=rows",
        *FAST,
    ]
    ref = run_cli([*args, "name=ref"], workdir)
    assert ref.returncode == 0, ref.output
    # The first lines say how the numbers are made: strategy, precision and the global batch.
    assert (
        "training: strategy ddp, precision float32, global batch 128 (32 per worker x 2 workers x 2 micro-batches)"
        in ref.output
    )
    # Without a progress bar, one log line per row.
    assert "epoch 0 step 7 train/loss" in ref.output and "train/grad_norm" in ref.output and "samples/s" in ref.output
    rows = metrics(workdir / "outputs" / "ref", steps=True)
    assert [r["step"] for r in rows] == [7, 14, 21, 28, 35]
    assert {"scope", "epoch", "step", "train/loss", "train/grad_norm", "lr", "samples_per_s", "time"} <= rows[0].keys()
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert [r["step"] for r in metrics(workdir / "outputs" / "ref")] == [16, 32, 40]  # epochs of 16 steps, then the end

    # A worker killed at step 23 restarts from the snapshot of step 20, inside the row of steps 15-21:
    # the resumed run writes the same rows, bit for bit.
    crashed = run_cli([*args, "trainer.crash_at_step=23", "trainer.crash_rank=1"], workdir, timeout=300)
    assert crashed.returncode == 0 and "restart 1 after a worker failure" in crashed.output, crashed.output
    assert "leaked semaphore" not in crashed.output  # the killed worker's semaphores are cleaned up, quietly
    again = metrics(workdir / "outputs" / "rows", steps=True)
    assert [(r["step"], r["train/loss"], r["train/grad_norm"], r["lr"]) for r in again] == [
        (r["step"], r["train/loss"], r["train/grad_norm"], r["lr"]) for r in rows
    ]

    # Resumed on one worker: the global batch halves, and the run says so.
    more = run_cli([*args, "trainer.max_steps=44", "launch.nproc_per_node=1", "launch.backend=gloo"], workdir)
    assert more.returncode == 0, more.output
    assert "the global batch changes from 128 to 64 samples per optimizer step" in more.output
    assert "one process (no DDP)" in more.output or "strategy ddp" in more.output


def test_language_model_rows_count_tokens(workdir):
    res = run_cli(
        [
            "dataset=charlm",
            "dataset.max_chars=20000",
            "model=tiny_gpt",
            "task=language_model",
            "trainer.max_steps=6",
            "trainer.log_every=3",
            "trainer.batch_size=8",
            "name=lm",
            *FAST,
        ],
        workdir,
        timeout=300,
    )
    assert res.returncode == 0, res.output
    rows = metrics(workdir / "outputs" / "lm", steps=True)
    assert [r["step"] for r in rows] == [3, 6] and all(r["tokens_per_s"] > 0 for r in rows)
    assert "tokens/s" in res.output
