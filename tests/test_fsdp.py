"""trainer.strategy=fsdp end to end: it trains like DDP, restarts bitwise exactly, resumes on another
number of workers, falls back past a torn shard, and exports one plain file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import pytest
import torch
from conftest import FAST, QUIET, metrics, run_cli, start_cli, stop_when

pytestmark = pytest.mark.slow
# 4096 samples / (2 workers x 32) = 64 steps per epoch; sharded snapshots every 20 steps, mid-epoch.
RUN = [
    "model=mlp",
    "model.dropout=0.1",
    "optimizer=adam",
    "dataset.size=4096",
    "trainer.total_epochs=3",
    "trainer.save_every_steps=20",
    *FAST,
]
FSDP = [*RUN, "trainer.strategy=fsdp"]


def versions(run_dir) -> list[dict]:
    return json.loads((run_dir / "snapshots" / "manifest.json").read_text())["snapshots"]


def newest_model(run_dir) -> dict:
    """The whole model of the newest version, read as an export reads it (verified, no process group)."""
    from runner.snapshot import SHARDED_KEY, SnapshotManager
    from runner.snapshot.sharded import full_model

    manager = SnapshotManager(run_dir / "snapshots")
    return full_model(manager.load_entry(manager.entries()[-1])[SHARDED_KEY])


def newest_optimizer_state(run_dir) -> dict:
    """{parameter name: {exp_avg, exp_avg_sq, step}} of the newest version, whole (no process group)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    folder = run_dir / "snapshots" / versions(run_dir)[-1]["file"]
    return _load_state_dict_from_keys(checkpoint_id=str(folder))["optimizer"]["state"]


def newest_loop_state(run_dir) -> dict:
    return torch.load(run_dir / "snapshots" / versions(run_dir)[-1]["file"] / "loop.pt", weights_only=True)


def run_ok(args, cwd):
    res = run_cli(args, cwd)
    assert res.returncode == 0, res.output
    return res


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fsdp")
    run_ok([*FSDP, "name=reference"], cwd)
    return cwd / "outputs" / "reference"


def test_fsdp_trains_like_ddp_and_snapshots_in_shards(tmp_path, fsdp_reference):
    run_ok([*RUN, "name=ddp"], tmp_path)
    ddp_dir = tmp_path / "outputs" / "ddp"
    fsdp_losses = [r["train/loss"] for r in metrics(fsdp_reference)]
    ddp_losses = [r["train/loss"] for r in metrics(ddp_dir)]
    assert len(fsdp_losses) == 3 and fsdp_losses == pytest.approx(ddp_losses, rel=1e-5)
    ddp_model = torch.load(ddp_dir / "snapshots" / versions(ddp_dir)[-1]["file"], weights_only=True)["model"]
    fsdp_model = newest_model(fsdp_reference)
    assert fsdp_model.keys() == ddp_model.keys()  # plain parameter names: no FSDP prefixes
    for name, tensor in ddp_model.items():
        torch.testing.assert_close(fsdp_model[name], tensor, rtol=1e-4, atol=1e-5)
    newest = versions(fsdp_reference)[-1]
    assert newest["file"] == "step-000000192" and newest["kind"] == "dcp"
    assert {f["name"] for f in newest["files"]} == {".metadata", "__0_0.distcp", "__1_0.distcp", "loop.pt"}
    loop = newest_loop_state(fsdp_reference)
    assert loop["world_size"] == 2 and len(loop["rng"]) == 2 and loop["allreduce"] == "fsdp-gloo"


def test_sigkilled_worker_restarts_and_ends_bitwise_equal(tmp_path, fsdp_reference):
    res = run_ok(
        [*FSDP, "name=crash", "trainer.crash_at_step=45", "trainer.crash_rank=1", "snapshot.async=true"], tmp_path
    )
    # The version of step 40 counts once every rank's shards are durable; a rank killed 5 steps later
    # may not have finished its background write, and then step 20 is the newest complete version.
    assert re.search(r"resumed from step-0000000[24]0", res.output), res.output
    assert "restart 1 after a worker failure" in res.output
    run_dir = tmp_path / "outputs" / "crash"
    reference = newest_model(fsdp_reference)
    restarted = newest_model(run_dir)
    assert all(torch.equal(restarted[k], reference[k]) for k in reference)
    assert [r["train/loss"] for r in metrics(run_dir)] == [r["train/loss"] for r in metrics(fsdp_reference)]
    a, b = newest_optimizer_state(run_dir), newest_optimizer_state(fsdp_reference)
    assert a.keys() == b.keys() and all(
        torch.equal(a[p][k], b[p][k]) for p in b for k in b[p]
    )  # Adam's moments and step too


def test_stopped_run_resumes_on_one_and_on_three_workers(tmp_path):
    args = [*FSDP, "model.dropout=0.0", "name=preempted"]
    run_dir = tmp_path / "outputs" / "preempted"
    proc = start_cli(args, tmp_path)
    out, err = stop_when(proc, lambda: metrics(run_dir))
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    stopped = versions(run_dir)[-1]
    assert 64 <= stopped["step"] < 3 * 64, "the stop should land mid-run"
    saved, saved_optimizer = newest_model(run_dir), newest_optimizer_state(run_dir)
    position = newest_loop_state(run_dir)["train_state"]
    for workers in (1, 3):
        copy = tmp_path / "outputs" / f"on{workers}"
        shutil.copytree(run_dir, copy)
        # One more optimizer step than the snapshot holds: the next version is the loaded state plus one step.
        res = run_ok(
            [
                *args[:-1],
                f"name=on{workers}",
                f"launch.nproc_per_node={workers}",
                f"trainer.max_steps={stopped['step'] + 1}",
            ],
            tmp_path,
        )
        assert (
            f"resumed from {stopped['file']}: epoch {position['epoch']}, step {stopped['step']}, "
            f"{position['samples_in_epoch']} samples into the epoch"
        ) in res.output
        assert f"written by 2 processes, this run has {workers}" in res.output  # random streams reseeded, said once
        assert res.output.count("random streams are reseeded") == 1
        resumed = versions(copy)[-1]
        assert resumed["step"] == stopped["step"] + 1
        assert {f["name"] for f in resumed["files"]} == {
            ".metadata",
            "loop.pt",
            *(f"__{r}_0.distcp" for r in range(workers)),
        }
        after = newest_model(copy)
        for name, tensor in saved.items():  # one Adam step of lr 0.01 moves a weight by about 0.01 at most
            assert (after[name] - tensor).abs().max() < 0.02, name
            assert not torch.equal(after[name], tensor), name
        optimizer = newest_optimizer_state(copy)
        assert optimizer.keys() == saved_optimizer.keys()
        assert {float(s["step"]) for s in optimizer.values()} == {stopped["step"] + 1.0}  # Adam's state was resharded
        samples = newest_loop_state(copy)["train_state"]["samples_in_epoch"]
        assert samples == position["samples_in_epoch"] + 32 * workers  # the epoch goes on where it stood


def test_torn_shard_falls_back_to_the_previous_version(tmp_path, fsdp_reference):
    run_dir = tmp_path / "outputs" / "reference"
    shutil.copytree(fsdp_reference, run_dir)
    newest = versions(run_dir)[-1]
    shard = run_dir / "snapshots" / newest["file"] / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)  # one rank's file torn
    previous = versions(run_dir)[-2]["file"]
    res = run_ok([*FSDP, "name=reference", "trainer.total_epochs=4"], tmp_path)
    assert f"skipping snapshot {newest['file']}" in res.output and "truncated or torn" in res.output
    assert f"resumed from {previous}" in res.output
    assert versions(run_dir)[-1]["file"] == "step-000000256"


def test_export_of_a_sharded_snapshot_loads_into_the_bare_model(tmp_path, fsdp_reference):
    from safetensors.torch import load_file

    from runner.export import export_run
    from runner.models import MLP

    out = export_run(fsdp_reference, tmp_path / "model.safetensors")
    model = MLP(2, 1, dropout=0.1)
    model.load_state_dict(load_file(out.path), strict=True)
    reference = newest_model(fsdp_reference)
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    assert out.source.entry["file"] == "step-000000192"


def test_fsdp_mistakes_are_refused_before_launch(tmp_path):
    cases = [
        (["trainer.strategy=fsdp", "trainer.precision=fp16"], "trainer.precision"),
        (["trainer.strategy=fsdp", "trainer.fsdp.param_dtype=float8"], "trainer.fsdp.param_dtype"),
        (["trainer.strategy=fsdp", "snapshot.format=file"], "snapshot.format"),
        (["trainer.strategy=fsdp", "model=mlp", "trainer.fsdp.shard=Conv2d"], "trainer.fsdp.shard"),
        (["trainer.strategy=fsdp", "launch.backend=gloo", "trainer.fsdp.cpu_offload=true"], "trainer.fsdp.cpu_offload"),
        (["trainer.strategy=fsdp", "launch=rpc"], "trainer.strategy"),
        (["trainer.fsdp.param_dtype=bf16"], "trainer.fsdp.param_dtype"),
    ]  # read only by fsdp: refused with ddp
    for overrides, key in cases:
        launch = [] if any(o.startswith("launch=") for o in overrides) else ["launch=local"]
        res = run_cli([*overrides, *launch, *QUIET], tmp_path)
        assert res.returncode == 2 and key in res.stderr and "Traceback" not in res.stderr, res.output


def test_a_ddp_run_continues_as_fsdp_with_uneven_evaluation(tmp_path):
    """The strategy does not name the run: a DDP run's single-file snapshot resumes under FSDP and
    trains on exactly as DDP would. 409 validation samples in batches of 51 give the ranks 205 and
    204 samples, 5 and 4 batches, which FSDP's collective forwards must still meet."""
    val = ["data.val_fraction=0.1", "data.eval_batch_size=51"]
    run_ok([*RUN, *val, "name=switch", "trainer.total_epochs=1"], tmp_path)
    res = run_ok([*RUN, *val, "name=switch", "trainer.total_epochs=2", "trainer.strategy=fsdp"], tmp_path)
    assert "resumed from snapshot-000000058.pt" in res.output
    run_ok([*RUN, *val, "name=plain", "trainer.total_epochs=2"], tmp_path)
    switched, plain = metrics(tmp_path / "outputs" / "switch"), metrics(tmp_path / "outputs" / "plain")
    for key in ("train/loss", "val/loss"):
        assert [r[key] for r in switched] == pytest.approx([r[key] for r in plain], rel=1e-5)
    assert versions(tmp_path / "outputs" / "switch")[-1]["file"] == "step-000000116"


def test_meta_init_builds_no_whole_model_and_trains(tmp_path):
    res = run_ok(
        [*FSDP, "model.dropout=0.0", "trainer.fsdp.meta_init=true", "trainer.total_epochs=2", "name=meta"], tmp_path
    )
    run_dir = tmp_path / "outputs" / "meta"
    assert "initialised shard by shard" in (run_dir / "train.log").read_text()
    losses = [r["train/loss"] for r in metrics(run_dir)]
    assert len(losses) == 2 and losses[1] < losses[0] / 10, res.output


def test_fsdp_tests_the_best_version_whether_a_ddp_file_or_its_own_shards(tmp_path):
    """trainer.test evaluates the best version: a single file the DDP part of the run wrote (whole
    weights, which every FSDP rank shards), and the sharded version of an FSDP run."""
    base = ["experiment=digits", "data.num_workers=0", "trainer.early_stop.patience=0", *FAST]
    run_dir = tmp_path / "outputs" / "digits"
    run_ok([*base, "trainer.total_epochs=1", "trainer.test=false"], tmp_path)
    # mode=min: the second epoch's better accuracy is no "best", so the best stays the DDP file.
    res = run_ok([*base, "trainer.total_epochs=2", "trainer.strategy=fsdp", "snapshot.mode=min"], tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["snapshot"] == "snapshot-000000010.pt" and results["test/accuracy"] > 0.5, res.output
    res = run_ok([*base, "trainer.total_epochs=1", "trainer.strategy=fsdp", "name=sharded"], tmp_path)
    results = json.loads((tmp_path / "outputs" / "sharded" / "results.json").read_text())
    assert results["snapshot"] == "step-000000010" and results["test/accuracy"] > 0.5, res.output
