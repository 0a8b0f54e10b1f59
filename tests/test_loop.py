"""The training loop's rules, run in this process (milliseconds a run): training rows, accumulation
windows, snapshot timing, stop and resume, non-finite losses, early stopping, max_steps. What only
processes show (signals between processes, restarts, bitwise resume across them) is in test_resume.py,
test_restarts.py and test_training_rows.py, which launch the CLI."""

from __future__ import annotations

import importlib
import json
import math
import signal
import warnings

import pytest
import torch
from conftest import manifest, metrics
from loop_helpers import SAMPLES, RecordingRegression, build_engine, config, samples, train

from runner.layout import stop_marker
from runner.snapshot import SnapshotWriter
from runner.train.batches import DataSource
from runner.train.collectives import CallbackCollectives
from runner.train.engine import Engine
from runner.train.evaluation import evaluate
from runner.train.loop import planned_steps
from runner.train.stop import Stopped

VOLATILE = ("time", "samples_per_s", "epoch_seconds", "tflops", "mfu")  # wall-clock numbers differ between runs
VOLATILE_FAMILIES = ("time/", "memory/")  # the step-time breakdown and memory


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE and not k.startswith(VOLATILE_FAMILIES)} for r in records]


def weighted_mean(losses: list[float], counts: list[int]) -> float:
    return sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)


def test_accumulation_windows_and_training_rows_every_log_every_steps(tmp_path):
    cfg = config("trainer.accumulate=3", "trainer.log_every=3")
    run = train(tmp_path, cfg)
    assert run.error is None, run.error
    # 10 batches an epoch in windows of 3: 3, 3, 3 and the rest, so 4 optimizer steps an epoch.
    assert run.spy.windows == [3, 3, 3, 1] * 2 and run.spy.samples == [12, 12, 12, 2] * 2
    assert run.summary["steps"] == 8 == planned_steps(cfg.trainer, 10) and run.summary["epochs"] == 2
    for epoch in range(2):  # every sample once an epoch
        seen = run.task.seen[10 * epoch : 10 * (epoch + 1)]
        assert sorted(i for batch in seen for i in batch) == list(range(SAMPLES))

    rows, epochs = metrics(tmp_path, steps=True), metrics(tmp_path)
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 3), (1, 6)]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 4), (2, 8)]
    losses, counts = run.spy.losses, run.spy.samples
    # A row is the sample-weighted mean since the previous row, across the epoch boundary (steps 4-6).
    assert rows[0]["train/loss"] == pytest.approx(weighted_mean(losses[0:3], counts[0:3]), rel=1e-12)
    assert rows[1]["train/loss"] == pytest.approx(weighted_mean(losses[3:6], counts[3:6]), rel=1e-12)
    assert epochs[1]["train/loss"] == pytest.approx(weighted_mean(losses[4:8], counts[4:8]), rel=1e-12)
    assert epochs[1]["train/loss"] == run.summary["final_loss"]
    assert [r["lr"] for r in epochs] == [0.05, 0.025]  # the per-epoch schedule halves it after epoch 1
    assert rows[0]["samples_per_s"] > 0 and {"scope", "time"} <= rows[0].keys()


def test_snapshots_every_save_every_steps_at_epoch_ends_and_at_the_end_once_per_step(tmp_path, monkeypatch):
    saved = []
    save = SnapshotWriter.save
    monkeypatch.setattr(
        SnapshotWriter,
        "save",
        lambda self, state, step, *a, **k: (saved.append(step), save(self, state, step, *a, **k)),
    )
    # 4 steps an epoch; an improving validation every 3 steps wants a snapshot at the steps save_every_steps does.
    run = train(
        tmp_path,
        config(
            "trainer.accumulate=3",
            "trainer.total_epochs=3",
            "trainer.save_every_steps=3",
            "trainer.save_every=1",
            "trainer.val_every_steps=3",
            "snapshot.monitor=val/loss",
            "snapshot.keep_best=100",
        ),
        dataset={"train": samples(), "val": samples(16, seed=2)},
    )
    assert run.error is None, run.error
    # Inside epochs every 3 steps; the ends of epochs 1 and 2 (4, 8); the end of the run (12).
    assert [e["step"] for e in manifest(tmp_path)["snapshots"]] == [3, 4, 6, 8, 9, 12]
    assert saved == [3, 4, 6, 8, 9, 12]  # one version per step, although two rules asked for 3, 6 and 9
    assert [e["epoch"] for e in manifest(tmp_path)["snapshots"]] == [0, 1, 1, 2, 2, 3]
    assert run.summary["snapshot"] == "snapshot-000000012.pt"


@pytest.mark.parametrize("write_async", [False, True])
def test_stop_snapshots_and_resume_continues_with_the_next_batch_bitwise(tmp_path, write_async):
    # Windows of 2 batches, 5 steps an epoch, rows of 3 steps: the stop at step 4 is inside the row of steps 4-6.
    cfg = config("trainer.accumulate=2", "trainer.log_every=3", f"snapshot.async={write_async}")
    reference = train(tmp_path / "reference", cfg)
    assert reference.error is None, reference.error

    handler = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "run"
    stopped = train(run_dir, cfg, task=RecordingRegression(stop_at=7))  # SIGTERM during step 4's first micro-batch
    assert isinstance(stopped.error, Stopped) and stopped.error.step == 4, stopped.error
    assert signal.getsignal(signal.SIGTERM) == handler  # the run put the previous handler back
    assert len(stopped.task.seen) == 8  # the step finished, no further batch was read
    assert json.loads(stop_marker(run_dir).read_text()) == {
        "file": "snapshot-000000004.pt",
        "step": 4,
        "signal": signal.SIGTERM,
    }
    assert [e["step"] for e in manifest(run_dir)["snapshots"]] == [4]
    assert [r["step"] for r in metrics(run_dir, steps=True)] == [3]

    resumed = train(run_dir, cfg)
    assert resumed.error is None, resumed.error
    assert resumed.summary["resumed_from"] == {
        "file": "snapshot-000000004.pt",
        "epoch": 0,
        "step": 4,
        "samples_in_epoch": 32,
    }
    assert resumed.task.seen == reference.task.seen[8:]  # the very next batch, then the same order
    assert stable(metrics(run_dir, steps=True)) == stable(metrics(tmp_path / "reference", steps=True))
    assert stable(metrics(run_dir)) == stable(metrics(tmp_path / "reference"))
    for name, tensor in reference.weights().items():
        assert torch.equal(resumed.weights()[name], tensor), name
    assert resumed.summary["steps"] == reference.summary["steps"] == 10


def test_resume_after_max_steps_mid_epoch_continues_inside_the_epoch(tmp_path):
    first = train(tmp_path, config("trainer.max_steps=13"))
    assert first.error is None, first.error
    assert (first.summary["steps"], first.summary["epochs"]) == (13, 1)
    epochs = metrics(tmp_path)
    assert [(r["step"], r.get("partial_epoch", False)) for r in epochs] == [(10, False), (13, True)]
    assert [e["step"] for e in manifest(tmp_path)["snapshots"]] == [13]

    more = train(tmp_path, config("trainer.max_steps=16"))
    assert more.error is None, more.error
    assert more.summary["resumed_from"]["samples_in_epoch"] == 12 and more.summary["steps"] == 16
    assert len(more.task.seen) == 3 and more.spy.windows == [1, 1, 1]
    whole = train(tmp_path / "whole", config("trainer.max_steps=16"))
    assert first.task.seen + more.task.seen == whole.task.seen
    # Each end inside the epoch is recorded: where the first run ended, then where the second did.
    ends = [(r["step"], r.get("partial_epoch", False)) for r in metrics(tmp_path)]
    assert ends == [(10, False), (13, True), (16, True)]


BAD_SAMPLE = 18  # unshuffled, it is in batch 5: the loss of step 5 (and of step 15) is NaN


def test_nonfinite_loss_stops_the_run_with_its_last_finite_snapshot(tmp_path):
    run = train(
        tmp_path,
        config("trainer.shuffle=false", "trainer.log_every=1", "trainer.save_every_steps=2"),
        dataset=samples(nan_at=BAD_SAMPLE),
    )
    assert run.error is None and run.summary == {
        "status": "diverged",
        "step": 5,
        "what": "the loss",
        "last_snapshot": "snapshot-000000004.pt",
    }
    rows = metrics(tmp_path, steps=True)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["train/loss"] == "nan"  # the file shows where
    assert [e["step"] for e in manifest(tmp_path)["snapshots"]] == [2, 4]
    state = torch.load(tmp_path / "snapshots" / "snapshot-000000004.pt", weights_only=True)
    assert all(t.isfinite().all() for t in state["model"].values())


def test_nonfinite_steps_are_skipped_with_on_nonfinite_skip(tmp_path):
    run = train(
        tmp_path, config("trainer.shuffle=false", "trainer.on_nonfinite=skip"), dataset=samples(nan_at=BAD_SAMPLE)
    )
    assert run.error is None and run.summary["status"] == "finished", run.error
    assert run.summary["skipped_steps"] == 2 and run.summary["steps"] == 20
    assert [i for i, loss in enumerate(run.spy.losses) if loss is None] == [4, 14]  # steps 5 and 15
    epochs = metrics(tmp_path)
    assert [r["skipped_steps"] for r in epochs] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in epochs)
    # The epoch's mean leaves the skipped step out: weighted over the other steps' samples.
    kept = [(loss, n) for loss, n in zip(run.spy.losses[10:], run.spy.samples[10:]) if loss is not None]
    assert epochs[1]["train/loss"] == pytest.approx(weighted_mean(*zip(*kept)), rel=1e-12)
    assert all(t.isfinite().all() for t in run.weights().values())
    assert [e["step"] for e in manifest(tmp_path)["snapshots"]] == [20]


def test_nonfinite_weights_with_on_nonfinite_warn_train_on_but_are_never_snapshotted(tmp_path):
    run = train(
        tmp_path,
        config("trainer.shuffle=false", "trainer.on_nonfinite=warn", "trainer.save_every_steps=2"),
        dataset=samples(nan_at=BAD_SAMPLE),
    )
    assert run.error is None and run.summary["status"] == "finished", run.error
    assert run.summary["steps"] == 20 and math.isnan(run.summary["final_loss"])
    assert [e["step"] for e in manifest(tmp_path)["snapshots"]] == [2, 4]  # none after the weights became NaN
    assert run.summary["snapshot"] == "snapshot-000000004.pt"


def test_early_stop_ends_mid_epoch_and_a_rerun_trains_no_further(tmp_path):
    cfg = config(
        "trainer.val_every_steps=2",
        "snapshot.monitor=val/loss",
        "trainer.early_stop.patience=1",
        "trainer.early_stop.min_delta=1e9",
    )  # no improvement is big enough: the second validation ends it
    data = {"train": samples(), "val": samples(16, seed=2)}
    run = train(tmp_path, cfg, dataset=data)
    assert run.error is None, run.error
    assert run.summary["steps"] == 4 and run.summary["ended"].startswith("early stop: val/loss has not improved")
    records = metrics(tmp_path)
    assert [(r["step"], "val/loss" in r, r.get("early_stop"), r.get("partial_epoch")) for r in records] == [
        (2, True, None, None),
        (4, True, True, None),
        (4, False, None, True),
    ]
    entry = manifest(tmp_path)["snapshots"][-1]
    assert entry["step"] == 4 and entry["ended"] == run.summary["ended"]

    again = train(tmp_path, cfg, dataset=data)
    assert again.error is None and again.spy.windows == [] and again.summary["steps"] == 4
    assert len(metrics(tmp_path)) == 3


def test_the_test_split_is_evaluated_with_the_best_snapshot(tmp_path):
    # mode=max calls the highest validation loss best: the best snapshot is one from the middle of the run.
    cfg = config(
        "trainer.test=true",
        "snapshot.monitor=val/loss",
        "snapshot.mode=max",
        "trainer.val_every_steps=3",
        "trainer.total_epochs=3",
    )
    run = train(tmp_path, cfg, dataset={"train": samples(), "val": samples(16, seed=2), "test": samples(12, seed=3)})
    assert run.error is None, run.error
    results = json.loads((tmp_path / "results.json").read_text())
    best = run.summary["best_step"]
    assert results["chosen_by"] == "best val/loss" and results["step"] == best == run.summary["test"]["step"]
    assert 0 < best < run.summary["steps"]
    assert results["snapshot"] == f"snapshot-{best:09d}.pt" and results["test/loss"] > 0
    # The numbers are those of the best snapshot's weights, not of the weights training ended with.
    engine = build_engine(cfg, RecordingRegression())
    test = DataSource(cfg, 0, 1, engine.device, dataset={"train": samples(), "test": samples(12, seed=3)}).test

    def test_loss(snapshot: str) -> float:
        engine.load_model_state(torch.load(tmp_path / "snapshots" / snapshot, weights_only=True)["model"])
        return evaluate(engine, engine.task, test)["loss"]

    assert test_loss(results["snapshot"]) == results["test/loss"] != test_loss(run.summary["snapshot"])


# ---- the engine seam -------------------------------------------------------------------------------
ENGINES = [
    "ddp.DDPEngine",
    "fsdp.FSDPEngine",
    "rpc.pipeline.PipelineEngine",
    "rpc.parameter_server.ParameterServerEngine",
]
# launch=rpc refuses snapshot.format=dcp before any worker starts: the loop never asks them for shards.
NOT_ASKED = {"PipelineEngine": ["sharded_state"], "ParameterServerEngine": ["sharded_state"]}


@pytest.mark.parametrize("name", ENGINES)
def test_every_engine_has_what_the_loop_asks_of_it(name):
    module, _, cls = name.rpartition(".")
    with warnings.catch_warnings():  # torch.distributed.rpc's import warns about TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        engine = getattr(importlib.import_module(f"runner.train.engines.{module}"), cls)
    methods = sorted(n for n, v in vars(Engine).items() if callable(v) and not n.startswith("_"))
    assert [m for m in methods if not callable(getattr(engine, m, None))] == NOT_ASKED.get(cls, [])
    assert isinstance(engine.shared_state, bool) and isinstance(engine.lockstep_evaluation, bool)


def test_the_one_process_engine_has_every_attribute_of_the_protocol(tmp_path):
    run = train(tmp_path, config("trainer.max_steps=1"))
    assert [a for a in Engine.__annotations__ if not hasattr(run.engine, a)] == []
    assert run.engine.processes == run.engine.collectives.world_size == 1
    assert run.engine.wrapped is None  # the session closed the engine (a DDP comm hook must not outlive it)


class CountingRegression(RecordingRegression):
    def __init__(self) -> None:
        super().__init__()
        self.evaluated = 0

    def validation_step(self, model, batch):
        self.evaluated += 1
        return super().validation_step(model, batch)


def test_lockstep_evaluation_repeats_the_last_batch_as_often_as_the_busiest_rank_needs(tmp_path):
    cfg = config()
    task = CountingRegression()
    engine = build_engine(cfg, task)
    splits = {"train": samples(), "val": samples(10, seed=2)}
    val = DataSource(cfg, 0, 1, engine.device, dataset=splits).val  # 3 batches of 4, 4 and 2
    plain = evaluate(engine, task, val)
    assert task.evaluated == 3
    # Rank 0 of two, where rank 1 has 5 batches; its sums are rank 0's alone (rank 1 adds zeros).
    engine.collectives = CallbackCollectives(0, 2, lambda values, op: [5.0] if op == "max" else values)
    engine.lockstep_evaluation = False
    assert evaluate(engine, task, val) == plain and task.evaluated == 6
    engine.lockstep_evaluation = True
    assert evaluate(engine, task, val) == plain and task.evaluated == 6 + 5  # two repeats, not counted
