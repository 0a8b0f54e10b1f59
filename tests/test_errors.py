"""Every user mistake: one short message naming the key, exit code 2, nothing launched or written."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import WORKERS, run_cli

EXISTING = "existing"  # a finished run prepared by the fixture, for the resume mistakes

CASES = [
    # (overrides, text the message must contain: the offending key)
    (["trainer.total_epochs=0"], "trainer.total_epochs"),
    (["trainer.batch_size=-4"], "trainer.batch_size"),
    (["trainer.save_every=-1"], "trainer.save_every"),
    (["trainer.save_every_steps=-5"], "trainer.save_every_steps"),
    (["trainer.crash_at_step=0"], "trainer.crash_at_step"),
    (["trainer.total_epochs=ten"], "trainer.total_epochs"),  # Hydra: wrong type
    (["trainer.progress=maybe"], "trainer.progress"),  # Hydra: wrong type
    (["trainer.epochs=5"], "trainer.epochs"),  # Hydra: misspelled key
    (["model=transformer"], "model/transformer"),  # Hydra: unknown group option
    (["launch.nproc_per_node=many"], "launch.nproc_per_node"),
    (["launch.nproc_per_node=0"], "launch.nproc_per_node"),
    (["launch=local", "launch.nproc_per_node=4"], "launch.nproc_per_node"),
    (["launch.backend=mpi"], "launch.backend"),
    (["launch.max_restarts=-1"], "launch.max_restarts"),
    (["launch.monitor_interval=0"], "launch.monitor_interval"),
    (["launch=multinode"], "launch.rdzv_endpoint"),
    (["launch=multinode", "launch.rdzv_endpoint=localhost:29400", "launch.nnodes=3:1"], "launch.nnodes"),
    (["launch.cpu_allreduce=fast"], "launch.cpu_allreduce"),
    (["launch.collective_timeout=0"], "launch.collective_timeout"),
    (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite"),
    (["launch.topology=ring"], "launch.topology"),
    (["name=.."], "name"),  # would be outputs/ itself
    (["name=..."], "name"),
    (["name=" + "x" * 300], "name"),  # longer than a file name may be
    ([f"name={EXISTING}", "trainer.batch_size=16"], "trainer.batch_size"),  # batch size defines the run
    (["snapshot.dir=../elsewhere"], "snapshot.dir"),
    (["launch=multinode", "launch.rdzv_endpoint=localhost:29400", "launch.cpu_allreduce=shm"], "launch.cpu_allreduce"),
    (["snapshot.keep_last=0"], "snapshot.keep_last"),
    (["snapshot.resume=/no/such/snapshot.pt"], "snapshot.resume"),
    (["snapshot.resume=must"], "snapshot.resume"),
    (["model._target_=torch.nn.Linearr"], "model._target_"),
    (["dataset._target_=no_such_module.Data"], "dataset._target_"),
    (["optimizer=adam", "optimizer.lr=-0.1"], "optimizer.lr"),
    (["model=mlp", "+model.hidden=3"], "model.hidden"),
    (["dataset.size=0"], "dataset.size"),
    (["hydra.run.dir=/proc/runner-test"], "hydra.run.dir"),
    ([f"name={EXISTING}", "model=mlp"], "model._target_"),  # snapshots of another model
    (["launch=rpc"], "launch.num_stages"),  # a pipeline needs an nn.Sequential
    (["launch=rpc", "model=mlp", "scheduler=step"], "scheduler"),
    (["launch=rpc", "model=mlp", "launch.nproc_per_node=5"], "launch.nproc_per_node"),
    # Settings that do not exist compose with `+` and would silently do nothing.
    (["+trainer.nonsense=1"], "trainer.nonsense"),
    (["+trainer.num_workers=2"], "trainer.num_workers"),
    (["+data.workers=2"], "data.workers"),
    (["+snapshot.best=true"], "snapshot.best"),
    (["+trainer.early_stop.wait=3"], "trainer.early_stop.wait"),
    (["task=classification", "+task.smoothing=0.1"], "task.smoothing"),
    (["trainer.precision=16"], "trainer.precision"),
    (["trainer.accumulate=0"], "trainer.accumulate"),
    (["trainer.clip_grad_norm=0"], "trainer.clip_grad_norm"),
    (["trainer.early_stop.patience=3"], "trainer.early_stop.patience"),  # no snapshot.monitor to watch
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["data.prefetch_factor=4"], "data.prefetch_factor"),  # no loader workers
    (["snapshot.monitor=val/loss"], "snapshot.monitor"),  # no validation split
    (["snapshot.monitor=accuracy", "data.val_fraction=0.1"], "snapshot.monitor"),
    (["trainer.test=true"], "trainer.test"),  # no test split
    (["+data.collate_fn._target_=builtins.dict"], "data.collate_fn"),  # dict() cannot batch samples
    (["scheduler=cosine", "scheduler.interval=batch"], "scheduler.interval"),
    (["launch=rpc", "model=mlp", "trainer.accumulate=2"], "trainer.accumulate"),
]
if not torch.cuda.is_available():
    CASES += [(["launch.nproc_per_node=gpu"], "launch.nproc_per_node"), (["launch.backend=nccl"], "launch.backend")]


def tree_state(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("errors")
    res = run_cli([f"name={EXISTING}", "launch=local", "trainer.total_epochs=1", "trainer.progress=false"], cwd)
    assert res.returncode == 0, res.output
    return cwd


@pytest.mark.slow
def test_bad_inputs_get_one_clear_message_and_change_nothing(project):
    before = tree_state(project)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: run_cli(case[0], project), CASES))
    for (args, key), res in zip(CASES, results):
        where = f"{args}: {res.output}"
        assert res.returncode == 2, where
        assert "Traceback" not in res.output, where
        assert key in res.output, where
        assert len(res.output.strip().splitlines()) <= 16, where  # Hydra lists a group's entries
        assert "rank 0" not in res.output, where  # no worker started
    assert tree_state(project) == before  # no run directory, snapshot or log created or touched


@pytest.mark.slow
def test_every_snapshot_invalid_is_reported_not_restarted(project, tmp_path):
    import shutil

    shutil.copytree(project / "outputs", tmp_path / "outputs")
    snaps = tmp_path / "outputs" / EXISTING / "snapshots"
    for f in snaps.glob("snapshot-*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    before = tree_state(tmp_path)
    res = run_cli([f"name={EXISTING}", "launch=local", "trainer.total_epochs=2"], tmp_path)
    assert res.returncode == 2, res.output
    assert "snapshot.resume" in res.output and "invalid" in res.output and "snapshot-000000064.pt" in res.output
    assert "snapshot.resume=never" in res.output and "Traceback" not in res.output
    assert tree_state(tmp_path) == before

    # The way out the message names: start over, keeping the damaged files in an archive.
    res = run_cli([f"name={EXISTING}", "launch=local", "trainer.total_epochs=1", "snapshot.resume=never"], tmp_path)
    assert res.returncode == 0, res.output
    archived = list((tmp_path / "outputs" / EXISTING / "archive").glob("*/snapshots/snapshot-000000064.pt"))
    assert len(archived) == 1 and archived[0].stat().st_size == 100


@pytest.mark.slow
def test_training_failure_names_rank_error_and_log(workdir):
    # A model whose input size does not match the data fails inside the workers, on every attempt.
    res = run_cli(["model.in_features=3", "launch.max_restarts=1", "trainer.progress=false", *WORKERS], workdir)
    assert res.returncode == 1, res.output
    assert "Error: training failed on rank" in res.stderr and "RuntimeError" in res.stderr
    assert "mat1 and mat2 shapes cannot be multiplied" in res.stderr
    assert "full logs: outputs/model.in_features=3/logs/rank-" in res.stderr
    report = res.stderr[res.stderr.index("Error: training failed"):]
    assert len(report.strip().splitlines()) <= 12, report
    assert "elastic/multiprocessing" not in res.stderr and "ChildFailedError" not in res.stderr  # no agent noise


@pytest.mark.slow
def test_a_dataloader_given_as_the_dataset_or_a_failing_collate_is_refused_before_launch(workdir):
    from pathlib import Path as _Path

    env = {"PYTHONPATH": str(_Path(__file__).parent / "plugins")}
    res = run_cli(["dataset._target_=loaders.regression_loader"], workdir, env=env)
    assert res.returncode == 2, res.output
    assert "dataset._target_=loaders.regression_loader: builds a DataLoader" in res.stderr and "Traceback" not in res.output
    res = run_cli(["+data.collate_fn._target_=loaders.broken_collate", "data.loader=dataloader"], workdir, env=env)
    assert res.returncode == 2, res.output
    assert "data.collate_fn=loaders.broken_collate: making the first batch failed: ValueError: masks need lengths" in res.stderr
    assert not (workdir / "outputs").exists()
