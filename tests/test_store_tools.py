"""The tools that read a run's snapshots (`runner.export`, `runner.load_model`, `trainer.init_from`)
read them from an object store too: through the run directory whose snapshot.dir is a URL, or from
the URL alone on a machine that never saw the run (the manifest records the run's config)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import FAST, assert_same_weights, cli_env, run_cli

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from test_object_store import _manager, s3_env, url  # noqa: E402, F401 (fixtures: the S3 server)

from runner.errors import UserError  # noqa: E402
from runner.export import export_run, load_model, main  # noqa: E402

RUN = ["model=mlp", "dataset.size=512", "trainer.total_epochs=1", "launch.nproc_per_node=1", *FAST]


def _export_cli(args: list[str], cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner.export", *args],
        cwd=cwd,
        env={**cli_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_export_load_model_and_init_from_read_a_snapshot_url(s3_env, url, tmp_path):  # noqa: F811
    env, _ = s3_env
    trained = run_cli([*RUN, "name=cloud", f"snapshot.dir={url}"], tmp_path, env=env)
    assert trained.returncode == 0, trained.output
    _, state = _manager(url, tmp_path / "reader").load_latest()

    # A serving machine with the URL alone: no run directory, the model config from the manifest.
    serving = tmp_path / "serving"
    serving.mkdir()
    exported = _export_cli([url, "--format", "pt"], serving, env)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert f"snapshot : {url}/snapshot-" in exported.stdout
    weights = torch.load(serving / "export" / "model.pt", weights_only=True)
    assert_same_weights(weights, state["model"])
    assert f"run_dir: {url}" in (serving / "export" / "model.yaml").read_text()

    model = load_model(url)
    assert_same_weights(model.state_dict(), state["model"])
    run_dir = tmp_path / "outputs" / "cloud"
    assert_same_weights(load_model(run_dir).state_dict(), state["model"])  # the run directory: its URL
    from_run_dir = export_run(run_dir, tmp_path / "from_run.pt", fmt="pt")
    assert from_run_dir.source.snapshot_path.startswith(f"{url}/snapshot-")

    # A new run starts from the URL's weights (fine-tuning), its own snapshots local.
    tuned = run_cli([*RUN, "name=tuned", f"trainer.init_from={url}"], tmp_path, env=env)
    assert tuned.returncode == 0, tuned.output
    assert f"model initialised from {url}" in tuned.output


def test_a_url_without_snapshots_is_a_clear_error(s3_env, url, tmp_path, capsys):  # noqa: F811
    with pytest.raises(UserError, match="holds no manifest.json"):
        export_run(url)
    assert main([url]) == 2
    err = capsys.readouterr().err
    assert "run_dir" in err and url in err and "Traceback" not in err
    with pytest.raises(UserError, match="credentials"):
        load_model("s3://key:secret@bucket/run")
