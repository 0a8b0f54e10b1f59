"""trainer.init_from (fine-tuning: a new run from another run's weights), the refusal of a
snapshot.resume=<path> that would train nothing, and the line a resume prints about what changed.

The fine-tuned runs train with optimizer.lr=0, so their snapshot must hold the source's weights
bitwise: that is what shows the weights were loaded (and nothing else was, such as the step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, assert_same_weights, manifest, run_cli, snapshot_state
from omegaconf import OmegaConf

from runner.config import quote_path_overrides
from runner.errors import UserError
from runner.export import export
from runner.train.init_from import check_resume_target, fitted, mismatch, read_source

MLP = ["model=mlp", "model.hidden_size=16"]
FROZEN = ["optimizer.lr=0", "trainer.max_steps=3"]  # SGD with lr 0: the weights stay what they were loaded as


def snapshot_weights(run_dir: Path, file: str | None = None) -> dict:
    """The model of one version (the newest by default), read as an export reads it (verified; sharded gathered)."""
    from runner.snapshot import SHARDED_KEY, SnapshotManager
    from runner.snapshot.sharded import full_model

    manager = SnapshotManager(run_dir / "snapshots")
    entry = next(e for e in manager.entries() if e["file"] == file) if file else manager.entries()[-1]
    state = manager.load_entry(entry)
    return full_model(state[SHARDED_KEY]) if state.get(SHARDED_KEY) else state["model"]


def log_text(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_fine_tune_from_a_run_directory_a_snapshot_file_and_exported_weights(tmp_path):
    base = tmp_path / "outputs" / "base"
    res = run_cli(
        [
            "name=base",
            *MLP,
            "trainer.max_steps=6",
            "trainer.save_every_steps=2",
            "data.val_fraction=0.25",
            "trainer.val_every_steps=2",
            "snapshot.monitor=val/loss",
            "snapshot.keep_best=1",
            *FAST,
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.output
    best_file = manifest(base)["best"]
    best = snapshot_weights(base, best_file)

    # A run directory gives its best version; the new run starts at step 0 with a fresh optimizer.
    res = run_cli([*MLP, *FROZEN, "trainer.init_from=outputs/base", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    tuned = tmp_path / "outputs" / "model.hidden_size=16,model=mlp,optimizer.lr=0,trainer.init_from=outputs_base"
    assert tuned.is_dir(), sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert f"model initialised from {base} (best snapshot {best_file} by val/loss=" in res.output
    assert "starting from scratch" in res.output
    assert [e["step"] for e in manifest(tuned)["snapshots"]] == [3]
    assert_same_weights(snapshot_weights(tuned), best)
    saved = OmegaConf.load(tuned / "config.yaml")
    assert saved.trainer.init_from == str(base) and saved.identity["trainer.init_from"] == str(base)

    # Its own snapshots win: re-running resumes (the source is not applied again), and says what changed.
    res = run_cli([*MLP, "optimizer.lr=0", "trainer.max_steps=5", "trainer.init_from=outputs/base", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    assert "resumed from snapshot-000000003.pt" in res.output and "model initialised" not in res.output
    assert "not applied: the run resumes from its own snapshots" in log_text(tuned)
    assert "changed since the snapshot: trainer.max_steps 3 -> 5" in res.output

    # Another source in the same run directory is another run: refused before launch.
    res = run_cli([*MLP, *FROZEN, "trainer.init_from=outputs/base", "name=tuned", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    res = run_cli([*MLP, *FROZEN, f"trainer.init_from={base}/snapshots/{best_file}", "name=tuned", *FAST], tmp_path)
    assert res.returncode == 2 and "differing keys: trainer.init_from" in res.stderr, res.output

    # A snapshot file (verified against the manifest beside it): its weights, not its step. Its path holds
    # = and , (a run directory's name), which Hydra would read as syntax unquoted.
    snapshot = tuned / "snapshots" / "snapshot-000000005.pt"
    res = run_cli([*MLP, *FROZEN, f"trainer.init_from={snapshot}", "name=from_file", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    assert "(snapshot snapshot-000000005.pt, step 5)" in res.output
    assert [e["step"] for e in manifest(tmp_path / "outputs" / "from_file")["snapshots"]] == [3]
    assert_same_weights(snapshot_weights(tmp_path / "outputs" / "from_file"), best)

    # Exported weights (python -m runner.export), named relative to the current directory.
    weights = export(base, out=tmp_path / "exported" / "model.safetensors", best=True)
    res = run_cli([*MLP, *FROZEN, "trainer.init_from=exported/model.safetensors", "name=from_export", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    best_step = next(e["step"] for e in manifest(base)["snapshots"] if e["file"] == best_file)
    assert f"model initialised from {weights} (exported weights, step {best_step})" in res.output
    assert_same_weights(snapshot_weights(tmp_path / "outputs" / "from_export"), best)

    # Weights of another model: one error listing the keys, before anything starts.
    res = run_cli(["model=linear", "trainer.init_from=outputs/base", "name=wrong", *FAST], tmp_path)
    assert res.returncode == 2, res.output
    assert res.stderr.startswith(f"Error: trainer.init_from={base}: its weights (best snapshot {best_file}")
    assert (
        "do not fit the model torch.nn.Linear builds: missing (2): weight, bias; unexpected (6): 0.weight, 0.bias"
        in res.stderr
    )
    assert not (tmp_path / "outputs" / "wrong").exists()


@pytest.mark.slow
def test_fine_tune_from_a_sharded_fsdp_run(tmp_path):
    fsdp = ["trainer.strategy=fsdp"]
    res = run_cli(["name=sharded", *MLP, *fsdp, "trainer.max_steps=4", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    source = tmp_path / "outputs" / "sharded"
    folder = manifest(source)["snapshots"][-1]["file"]
    assert folder.startswith("step-") and (source / "snapshots" / folder).is_dir()
    weights = snapshot_weights(source)

    # From the run directory into a DDP run, and from the step-* folder into an FSDP run (loaded before sharding).
    res = run_cli([*MLP, *FROZEN, "trainer.init_from=outputs/sharded", "name=ddp_from_fsdp", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    assert f"(newest snapshot {folder}, step 4)" in res.output
    assert_same_weights(snapshot_weights(tmp_path / "outputs" / "ddp_from_fsdp"), weights)
    res = run_cli(
        [*MLP, *FROZEN, *fsdp, f"trainer.init_from=outputs/sharded/snapshots/{folder}", "name=fsdp_from_fsdp", *FAST],
        tmp_path,
    )
    assert res.returncode == 0, res.output
    assert f"(sharded snapshot {folder}, step 4)" in res.output
    assert_same_weights(snapshot_weights(tmp_path / "outputs" / "fsdp_from_fsdp"), weights)

    # meta_init has no memory to load into: refused before launch.
    res = run_cli(
        [*MLP, *fsdp, "trainer.fsdp.meta_init=true", "trainer.init_from=outputs/sharded", "name=meta", *FAST], tmp_path
    )
    assert res.returncode == 2, res.output
    assert "Error: trainer.fsdp.meta_init=True: builds the model without memory" in res.stderr


@pytest.mark.slow
def test_resume_from_a_snapshot_past_the_target_is_refused_and_a_resume_names_its_stale_schedule(tmp_path):
    cosine = ["scheduler=warmup_cosine", "scheduler.warmup_steps=1"]
    res = run_cli(["name=cos", *cosine, "trainer.max_steps=5", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    source = tmp_path / "outputs" / "cos"
    snapshot = source / "snapshots" / manifest(source)["snapshots"][-1]["file"]

    # snapshot.resume=<path> restores step 5: a run of 3 steps would train nothing and exit 0.
    res = run_cli([f"snapshot.resume={snapshot}", "trainer.max_steps=3", "name=trap", *FAST], tmp_path)
    assert res.returncode == 2, res.output
    assert (
        "which is at step 5, already at or past this run's end (trainer.max_steps=3): nothing would be trained"
        in res.stderr
    )
    assert f"pass trainer.init_from={snapshot} instead" in res.stderr
    assert not (tmp_path / "outputs" / "trap").exists()

    # Raising max_steps resumes with the cosine planned for 5 steps: said, with what to do instead.
    res = run_cli(["name=cos", *cosine, "trainer.max_steps=8", *FAST], tmp_path)
    assert res.returncode == 0, res.output
    assert "changed since the snapshot: trainer.max_steps 5 -> 8" in res.output
    assert (
        "scheduler: WarmupCosine was planned for 5 steps (total_steps) when the run began, and the run now has 8: "
        "the rate stays at its floor after step 5"
    ) in res.output
    assert "snapshot.resume=never" in res.output
    assert res.output.count("changed since the snapshot") == 1


# ---- without a launch ------------------------------------------------------------------------
def test_sources_that_hold_no_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        read_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no run and no snapshot"):
        read_source(tmp_path / "empty")
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="holds no model weights"):
        read_source(tmp_path / "other.pt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {_target_: torch.nn.Linear}\n")
    with pytest.raises(UserError, match="has no snapshot yet"):
        read_source(tmp_path / "run")


def test_a_plain_state_dict_loads_and_a_wrapper_prefix_is_taken_off(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "model.pt")
    source = read_source(tmp_path / "model.pt")
    assert source.which == "exported weights" and source.step is None
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 2)
    assert mismatch(meta, fitted(meta, source.weights)) is None
    assert (
        mismatch(torch.nn.Linear(3, 4), model.state_dict())
        == "other shapes (2): weight [2, 3] for [4, 3], bias [2] for [4]"
    )


def test_existing_paths_with_hydra_syntax_are_quoted_for_hydra(tmp_path):
    run = tmp_path / "model=mlp,optimizer=adam"
    run.mkdir()
    args = [
        f"trainer.init_from={run}",
        f"snapshot.resume={tmp_path}/a=b,c",
        "dataset.path=x=y",
        "trainer.init_from='q=r'",
    ]
    assert quote_path_overrides(args) == [f"trainer.init_from='{run}'", *args[1:]]  # only the existing path


def test_a_resume_path_before_the_end_is_accepted(tmp_path):
    state = snapshot_state(w=torch.zeros(1))
    state["train_state"] = {"global_step": 4, "epoch": 2}
    torch.save(state, tmp_path / "loose.pt")
    cfg = OmegaConf.create({"trainer": {"max_steps": 0, "total_epochs": 3}})
    check_resume_target(cfg, tmp_path / "loose.pt")  # epoch 2 of 3: something left to train
    cfg.trainer.total_epochs = 2
    with pytest.raises(UserError, match=r"at epoch 2 \(step 4\), already at or past this run's end"):
        check_resume_target(cfg, tmp_path / "loose.pt")
