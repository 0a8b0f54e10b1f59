"""Real workloads end to end: validation, best snapshots, early stop, the DataLoader path, the
training options, and the two examples."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import FAST, QUIET, assert_same_weights, latest_snapshot, manifest, metrics, run_cli, start_cli, stop_when

pytestmark = pytest.mark.slow

# Digits: ~1,257 training images / (2 workers x 64) = 10 steps per epoch, two loader workers per rank
# with random-shift augmentation in them.
DIGITS = [
    "experiment=digits",
    "trainer.total_epochs=3",
    "trainer.early_stop.patience=0",
    "trainer.save_every_steps=4",
    *FAST,
]


def test_digits_example_validates_keeps_the_best_and_tests(workdir):
    res = run_cli([*DIGITS, "name=digits"], workdir, timeout=300)
    assert res.returncode == 0, res.output
    run_dir = workdir / "outputs" / "digits"
    rows = metrics(run_dir)
    epochs = [r for r in rows if "train/loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert all("val/accuracy" in r and "val/loss" in r and "val/top3_accuracy" in r for r in epochs)
    assert epochs[-1]["val/accuracy"] > 0.8  # chance is 0.1
    m = manifest(run_dir)
    best = [e for e in m["snapshots"] if e.get("best")]
    assert len(best) == 1 and m["best"] == best[0]["file"]
    assert best[0]["monitor"]["name"] == "val/accuracy"
    assert best[0]["monitor"]["value"] == max(r["val/accuracy"] for r in epochs)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["snapshot"] == m["best"] and results["test/accuracy"] > 0.8
    assert "validation    : val/accuracy" in res.stdout and "test          : test/accuracy" in res.stdout
    assert "best          : val/accuracy" in res.stdout


def test_digits_with_loader_workers_killed_mid_epoch_ends_bitwise_equal(workdir):
    ref = run_cli([*DIGITS, "trainer.test=false", "name=ref"], workdir, timeout=300)
    assert ref.returncode == 0, ref.output
    crash = run_cli(
        [*DIGITS, "trainer.test=false", "name=crash", "trainer.crash_at_step=15", "trainer.crash_rank=1"],
        workdir,
        timeout=300,
    )
    assert crash.returncode == 0, crash.output
    assert "resumed from snapshot-000000012.pt" in crash.output  # step 12: mid-epoch 2
    a, b = latest_snapshot(workdir / "outputs" / "ref"), latest_snapshot(workdir / "outputs" / "crash")
    assert_same_weights(a["model"], b["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k.startswith(("train/", "val/"))} for r in rows]
    assert strip(metrics(workdir / "outputs" / "crash")) == strip(metrics(workdir / "outputs" / "ref"))


# 8192 samples / (2 workers x 32 x 4 micro-batches) = 32 optimizer steps per epoch.
ACCUMULATE = [
    "model=mlp",
    "model.dropout=0.1",
    "dataset.size=8192",
    "trainer.total_epochs=4",
    "trainer.accumulate=4",
    *FAST,
]


def test_accumulation_stopped_by_sigterm_resumes_bitwise_equal(workdir):
    ref = run_cli([*ACCUMULATE, "name=acc_ref"], workdir)
    assert ref.returncode == 0, ref.output
    assert metrics(workdir / "outputs" / "acc_ref")[-1]["step"] == 4 * 32
    run_dir = workdir / "outputs" / "acc_stop"
    proc = start_cli([*ACCUMULATE, "name=acc_stop"], workdir)
    out, err = stop_when(proc, lambda: metrics(run_dir))
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    stopped = torch.load(run_dir / "snapshots" / manifest(run_dir)["snapshots"][-1]["file"], weights_only=True)
    position = stopped["train_state"]["samples_in_epoch"]
    assert position % (4 * 32 * 2) == 0, "a snapshot is only taken on an optimizer-step boundary"
    res = run_cli([*ACCUMULATE, "name=acc_stop"], workdir)
    assert res.returncode == 0, res.output
    assert_same_weights(latest_snapshot(run_dir)["model"], latest_snapshot(workdir / "outputs" / "acc_ref")["model"])
    assert [r["train/loss"] for r in metrics(run_dir)] == [
        r["train/loss"] for r in metrics(workdir / "outputs" / "acc_ref")
    ]


def test_precision_clipping_and_step_schedules_do_what_they_say(workdir):
    base = ["launch=local", "trainer.total_epochs=2", "model=mlp", *QUIET]
    plain = run_cli([*base, "name=plain"], workdir)
    bf16 = run_cli([*base, "name=bf16", "trainer.precision=bf16"], workdir)
    clipped = run_cli(
        [*base, "name=clipped", "trainer.clip_grad_norm=0.001", "optimizer=sgd", "optimizer.lr=0.01"], workdir
    )
    sched = run_cli(
        [*base, "name=sched", "scheduler=warmup_cosine", "scheduler.warmup_steps=10", "trainer.max_steps=100"], workdir
    )
    fp16 = run_cli([*base, "name=fp16", "trainer.precision=fp16"], workdir)
    compiled = run_cli([*base, "name=compiled", "trainer.compile=true"], workdir, timeout=300)
    for res in (plain, bf16, clipped, sched, fp16, compiled):
        assert res.returncode == 0, res.output
    out = workdir / "outputs"
    w_plain, w_bf16 = latest_snapshot(out / "plain")["model"], latest_snapshot(out / "bf16")["model"]
    assert any(not torch.equal(w_plain[k], w_bf16[k]) for k in w_plain), "bf16 autocast changed nothing"
    assert metrics(out / "bf16")[-1]["train/loss"] < metrics(out / "bf16")[0]["train/loss"]
    rows = metrics(out / "clipped")
    assert "train/grad_norm" in rows[0] and rows[0]["train/grad_norm"] > 0.001  # the norm before clipping is logged
    # SGD steps of at most lr x 0.001 in norm: 128 steps move the weights by at most 128 x 1e-5.
    start = latest_snapshot(out / "clipped")["model"]
    moved = torch.sqrt(sum(((start[k] - w) ** 2).sum() for k, w in _initial_mlp().items()))
    assert moved <= 128 * 0.01 * 0.001 * 1.01
    scaler = latest_snapshot(out / "fp16")["scaler"]
    assert scaler is not None and scaler["scale"] > 0  # the gradient scaler's state is in the snapshot
    w_compiled = latest_snapshot(out / "compiled")["model"]
    assert w_compiled.keys() == w_plain.keys()  # no _orig_mod. prefixes
    assert metrics(out / "compiled")[-1]["train/loss"] < metrics(out / "compiled")[0]["train/loss"]
    srows = metrics(out / "sched")
    assert srows[-1]["step"] == 100 and srows[-1].get("partial_epoch") is True
    state = latest_snapshot(out / "sched")
    assert state["scheduler"]["last_epoch"] == 100  # stepped once per optimizer step
    assert (
        "already complete"
        in run_cli(
            [*base, "name=sched", "scheduler=warmup_cosine", "scheduler.warmup_steps=10", "trainer.max_steps=100"],
            workdir,
        ).stdout
    )


def _initial_mlp() -> dict:
    from runner.models import MLP
    from runner.train import rng

    rng.seed_everything(0)
    return MLP(2, 1).state_dict()


def test_early_stop_ends_the_run_as_finished_and_reinvocation_does_nothing(workdir):
    args = [
        "launch=local",
        "trainer.total_epochs=20",
        "data.val_fraction=0.2",
        "snapshot.monitor=val/loss",
        "trainer.early_stop.patience=2",
        "trainer.early_stop.min_delta=1000",
        "name=early",
        *QUIET,
    ]
    res = run_cli(args, workdir)
    assert res.returncode == 0, res.output
    run_dir = workdir / "outputs" / "early"
    rows = metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1].get("early_stop") is True
    assert "ended early   : early stop: val/loss has not improved by more than 1000 in 2 validations" in res.stdout
    assert manifest(run_dir)["snapshots"][-1]["ended"].startswith("early stop")
    again = run_cli(args, workdir)
    assert again.returncode == 0 and "already complete" in again.stdout and "ended early" in again.stdout
    assert len(metrics(run_dir)) == 3


def test_charlm_example_trains_and_samples(workdir):
    res = run_cli(
        [
            "experiment=charlm",
            "trainer.max_steps=12",
            "trainer.val_every_steps=6",
            "data.eval_batch_size=8",
            "dataset.max_chars=40000",
            "name=charlm",
            "launch=local",
            *QUIET,
        ],
        workdir,
        timeout=300,
    )
    assert res.returncode == 0, res.output
    run_dir = workdir / "outputs" / "charlm"
    vals = [r for r in metrics(run_dir) if "val/perplexity" in r]
    assert [r["step"] for r in vals] == [6, 12]
    assert "tokens/s" in res.stdout
    import subprocess
    import sys

    sample = subprocess.run(
        [sys.executable, "-m", "runner.sample", str(run_dir), "--prompt", "def ", "--tokens", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("def ") and len(sample.stdout.rstrip("\n")) >= 20
