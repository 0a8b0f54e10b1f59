"""runner.export: bare weights (safetensors / pt) and model.yaml from a run directory, and load_model.

The run directories are built by hand (config.yaml + snapshots written by SnapshotManager), so
these tests do not train; only the exit-code test starts a subprocess (python -m runner.export).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, cli_env, snapshot_state
from hydra.utils import instantiate
from omegaconf import OmegaConf

from runner.errors import UserError
from runner.export import export, export_run, load_model, main, unshare
from runner.snapshot import SnapshotManager

safetensors_torch = pytest.importorskip("safetensors.torch")

MLP = {"_target_": "runner.models.MLP", "in_features": 3, "out_features": 2, "hidden_size": 5, "depth": 1}
TIED_MODULE = "runner_export_test_tied"  # written into tmp_path, importable through sys.path
TIED = {"_target_": f"{TIED_MODULE}.TiedLM", "vocab": 11, "dim": 4}


def make_run(
    root: Path, model_cfg: dict, snapshots: list[tuple[int, dict, dict | None]], keep_best: int = 0, mode: str = "min"
) -> Path:
    """A run directory as training leaves it: config.yaml, and one snapshot per (step, weights, monitor)."""
    run = root / "run"
    run.mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"model": model_cfg, "snapshot": {"dir": "snaps"}, "trainer": {"total_epochs": 2}}),
        run / "config.yaml",
    )
    manager = SnapshotManager(run / "snaps", keep_last=3, keep_best=keep_best, mode=mode)
    for step, weights, monitor in snapshots:
        manager.save(snapshot_state(**weights), step=step, epoch=step // 10, monitor=monitor)
    return run


def trained(model_cfg: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    return instantiate(OmegaConf.create(model_cfg)).state_dict()


def bare_model(yaml_path: Path) -> torch.nn.Module:
    """What a user without the runner does: the model from model.yaml's `model:` node."""
    return instantiate(OmegaConf.load(yaml_path).model)


@pytest.fixture
def tied_module(tmp_path, monkeypatch):
    """A model whose head.weight IS its embedding's weight, in a module importable by _target_."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / f"{TIED_MODULE}.py").write_text(
        textwrap.dedent("""
        import torch

        class TiedLM(torch.nn.Module):
            def __init__(self, vocab, dim):
                super().__init__()
                self.emb = torch.nn.Embedding(vocab, dim)
                self.norm = torch.nn.LayerNorm(dim)
                self.head = torch.nn.Linear(dim, vocab, bias=False)
                self.head.weight = self.emb.weight

            def forward(self, tokens):
                return self.head(self.norm(self.emb(tokens)))
    """)
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, TIED_MODULE, raising=False)
    return folder


def test_safetensors_export_loads_into_the_bare_model(tmp_path, capsys):
    weights = trained(MLP, seed=1)
    run = make_run(tmp_path, MLP, [(10, trained(MLP, seed=0), None), (20, weights, None)])
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    path = run / "export" / "model.safetensors"
    assert str(path) in out and "4 tensors" in out and "32 parameters" in out  # 3*5+5 + 5*2+2
    assert "snapshot-000000020.pt" in out and "newest" in out

    model = bare_model(run / "export" / "model.yaml")
    model.load_state_dict(safetensors_torch.load_file(path), strict=True)
    assert_same_weights(model.state_dict(), weights)  # the newest snapshot's weights, exactly

    config = OmegaConf.load(run / "export" / "model.yaml")
    assert OmegaConf.to_container(config.model) == MLP
    assert config.export.snapshot == "snapshot-000000020.pt" and config.export.step == 20 and config.export.epoch == 2
    assert config.export.run_dir == str(run.resolve()) and config.export.format == "safetensors"
    with safetensors_torch.safe_open(str(path), "pt") as f:  # the provenance travels inside the file too
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["snapshot"] == "snapshot-000000020.pt" and meta["step"] == "20"
    assert json.loads(meta["model"]) == MLP


def test_pt_export_loads_into_the_bare_model(tmp_path):
    weights = trained(MLP, seed=2)
    run = make_run(tmp_path, MLP, [(10, weights, None)])
    path = export(run, fmt="pt")
    assert path == run / "export" / "model.pt" and (run / "export" / "model.yaml").exists()
    state = torch.load(path, weights_only=True)
    assert set(state) == set(weights)  # the bare state dict, nothing of the snapshot around it
    model = bare_model(path.with_suffix(".yaml"))
    model.load_state_dict(state, strict=True)
    assert_same_weights(model.state_dict(), weights)
    assert OmegaConf.load(path.with_suffix(".yaml")).export.format == "pt"


def test_out_path_decides_the_format_and_conflicts_are_user_errors(tmp_path):
    run = make_run(tmp_path, MLP, [(10, trained(MLP, seed=0), None)])
    assert export(run, out=tmp_path / "w.pt") == tmp_path / "w.pt" and (tmp_path / "w.yaml").exists()
    (tmp_path / "folder").mkdir()
    assert export(run, out=tmp_path / "folder") == tmp_path / "folder" / "model.safetensors"
    with pytest.raises(UserError, match="names a .pt file"):
        export(run, out=tmp_path / "x.pt", fmt="safetensors")
    with pytest.raises(UserError, match="not an export format"):
        export(run, fmt="onnx")


def test_load_model_picks_the_manifests_best_not_the_newest(tmp_path):
    best, newest = trained(MLP, seed=3), trained(MLP, seed=4)
    run = make_run(
        tmp_path,
        MLP,
        [
            (10, trained(MLP, seed=5), {"name": "val/accuracy", "value": 0.2}),
            (20, best, {"name": "val/accuracy", "value": 0.9}),
            (30, newest, {"name": "val/accuracy", "value": 0.5}),
        ],
        keep_best=1,
        mode="max",
    )
    manager = SnapshotManager(run / "snaps")
    assert manager.best_entry()["step"] == 20 and manager.entries()[-1]["step"] == 30

    model = load_model(run)  # best=True by default
    assert not model.training and isinstance(model, torch.nn.Module)
    assert_same_weights(model.state_dict(), best)
    assert_same_weights(load_model(run, best=False).state_dict(), newest)

    exported = export_run(run, best=True)
    assert exported.source.entry["step"] == 20 and exported.source.chosen_by == "best"
    assert OmegaConf.to_container(OmegaConf.load(exported.config_path).export.monitor) == {
        "name": "val/accuracy",
        "value": 0.9,
    }
    assert export_run(run).source.entry["step"] == 30  # the CLI's default: the newest


def test_best_without_a_monitored_run_falls_back_to_the_newest(tmp_path):
    newest = trained(MLP, seed=7)
    run = make_run(tmp_path, MLP, [(10, trained(MLP, seed=6), None), (20, newest, None)])
    assert_same_weights(load_model(run, best=True).state_dict(), newest)
    assert any("no best snapshot" in note for note in export_run(run, best=True).notes)


def test_load_model_reports_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no config.yaml"):
        load_model(tmp_path)
    run = make_run(tmp_path, MLP, [])
    with pytest.raises(UserError, match="has no snapshot to export"):
        load_model(run)
    other = {**MLP, "hidden_size": 7}  # a config that does not match the snapshot's weights
    run2 = make_run(tmp_path / "b", other, [(10, trained(MLP, seed=0), None)])
    with pytest.raises(UserError, match="do not fit the model"):
        load_model(run2)


def test_run_without_snapshots_exits_2_with_one_paragraph(tmp_path):
    run = make_run(tmp_path, MLP, [])
    proc = subprocess.run(
        [sys.executable, "-m", "runner.export", str(run)],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith(f"Error: run_dir={run}: has no snapshot to export") and "fix:" in err
    assert "Traceback" not in proc.stderr and "\n\n" not in err and proc.stdout == ""
    assert not (run / "export").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_tied_weights_export_and_reload(tmp_path, tied_module, fmt):
    torch.manual_seed(8)
    trained_model = instantiate(OmegaConf.create(TIED))
    with torch.no_grad():
        trained_model.emb.weight.mul_(3.0)  # "trained": no longer the initial values
    state = trained_model.state_dict()
    run = make_run(tmp_path, TIED, [(10, state, None)])
    snapshot_weights = SnapshotManager(run / "snaps").load_latest()[1]["model"]
    # The snapshot keeps the tie (one storage), which is what safetensors refuses to save as is.
    assert snapshot_weights["head.weight"].data_ptr() == snapshot_weights["emb.weight"].data_ptr()

    exported = export_run(run, fmt=fmt)
    assert exported.parameters == 11 * 4 + 2 * 4  # the tied matrix once, and the norm
    loaded = (
        safetensors_torch.load_file(exported.path)
        if fmt == "safetensors"
        else torch.load(exported.path, weights_only=True)
    )
    assert set(loaded) == {"emb.weight", "norm.weight", "norm.bias", "head.weight"}
    model = bare_model(exported.config_path)
    model.load_state_dict(loaded, strict=True)
    assert model.head.weight is model.emb.weight  # the constructor's tie survives the load
    assert_same_weights(model.state_dict(), state)
    if fmt == "safetensors":
        assert exported.shared == {"head.weight": "emb.weight"}
        with safetensors_torch.safe_open(str(exported.path), "pt") as f:
            assert json.loads(f.metadata()["shared"]) == {"head.weight": "emb.weight"}
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.eval()(tokens), trained_model.eval()(tokens))


def test_unshare_copies_only_what_shares_memory():
    base = torch.arange(6.0)
    tensors, shared = unshare({"a": base, "b": base, "c": torch.ones(2), "d": base.view(2, 3).t()})
    assert shared == {"b": "a", "d": "a"}
    assert tensors["a"] is not None and tensors["b"].data_ptr() != tensors["a"].data_ptr()
    assert all(t.is_contiguous() for t in tensors.values()) and torch.equal(tensors["d"], base.view(2, 3).t())


def test_import_runner_stays_cheap_and_exports_load_model():
    code = (
        "import sys, runner; assert 'torch' not in sys.modules and 'hydra' not in sys.modules; "
        "from runner import load_model; import runner.export; assert load_model is runner.export.load_model"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_exported_weights_get_the_permissions_of_the_runs_other_files(tmp_path, fmt):
    """safetensors creates its files 0600: a weights file that a group sharing the run cannot read."""
    run = make_run(tmp_path, MLP, [(10, trained(MLP, seed=4), None)])
    path = export(run, fmt=fmt)
    snapshot = next((run / "snaps").glob("snapshot-*.pt"))
    mode_of = lambda p: oct(p.stat().st_mode & 0o777)  # noqa: E731
    assert mode_of(path) == mode_of(snapshot) == mode_of(path.with_suffix(".yaml")) == mode_of(run / "config.yaml")
