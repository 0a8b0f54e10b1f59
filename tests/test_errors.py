"""Every user mistake: one short message naming the key, its value and the fix, nothing launched or written.

The table runs in-process: each command's config is composed as the CLI composes it and given to the
one validation entry point (runner.driver.checks.check), taking the run directory's lock as the CLI
does. What only a process shows stays end to end: the exit code, Hydra's own composing errors as the
user sees them, and a few refusals through the whole command.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from check_helpers import compose_command, make_finished_run, refusal
from conftest import WORKERS, run_cli
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

EXISTING = "existing"  # a finished run prepared by the fixture, for the resume mistakes
PLUGINS = Path(__file__).parent / "plugins"
NAME_TOO_LONG = "x" * 300  # longer than a file name may be

CASES = [
    # (overrides, the offending key, its value as shown, a phrase of the problem)
    (["trainer.total_epochs=0"], "trainer.total_epochs", 0, "must be at least 1"),
    (["trainer.batch_size=-4"], "trainer.batch_size", -4, "must be at least 1"),
    (["trainer.save_every=-1"], "trainer.save_every", -1, "must not be negative"),
    (["trainer.save_every_steps=-5"], "trainer.save_every_steps", -5, "must not be negative"),
    (["trainer.crash_at_step=0"], "trainer.crash_at_step", 0, "must be at least 1"),
    (["trainer.precision=16"], "trainer.precision", "16", "is not a precision"),
    (["trainer.accumulate=0"], "trainer.accumulate", 0, "must be at least 1"),
    (["trainer.clip_grad_norm=0"], "trainer.clip_grad_norm", 0, "must be positive"),
    (["trainer.early_stop.patience=3"], "trainer.early_stop.patience", 3, "snapshot.monitor, which is not set"),
    (["launch.nproc_per_node=many"], "launch.nproc_per_node", "many", "is not a worker count"),
    (["launch.nproc_per_node=0"], "launch.nproc_per_node", "0", "is not a worker count"),
    (
        ["launch=local", "launch.nproc_per_node=4"],
        "launch.nproc_per_node",
        "4",
        "launch=local runs exactly one process",
    ),
    (["launch.max_restarts=-1"], "launch.max_restarts", -1, "must not be negative"),
    (["launch.monitor_interval=0"], "launch.monitor_interval", 0, "must be positive"),
    (["launch.collective_timeout=0"], "launch.collective_timeout", 0, "must be positive"),
    (["launch=multinode"], "launch.rdzv_endpoint", None, "needs a rendezvous endpoint"),
    (
        ["launch=multinode", "launch.rdzv_endpoint=localhost:29400", "launch.nnodes=3:1"],
        "launch.nnodes",
        "3:1",
        "is not a node count",
    ),
    (
        ["launch=multinode", "launch.rdzv_endpoint=localhost:29400", "launch.cpu_allreduce=shm"],
        "launch.cpu_allreduce",
        "shm",
        "may place the workers on several machines",
    ),
    (["launch=rpc"], "launch.num_stages", 2, "torch.nn.Linear builds Linear"),  # a pipeline needs an nn.Sequential
    (["launch=rpc", "model=mlp", "scheduler=step"], "scheduler", "(set)", "schedulers are not supported"),
    (["launch=rpc", "model=mlp", "launch.nproc_per_node=5"], "launch.nproc_per_node", "5", "runs 3 processes"),
    (["launch=rpc", "model=mlp", "trainer.accumulate=2"], "trainer.accumulate", 2, "not supported with launch=rpc"),
    (["name=.."], "name", "..", "leaves no folder name"),  # would be outputs/ itself
    (["name=..."], "name", "...", "leaves no folder name"),
    (
        [f"name={NAME_TOO_LONG}"],
        "name",
        f"{NAME_TOO_LONG[:40]}... (300 characters)",
        "longer than this filesystem allows",
    ),
    (["snapshot.dir=../elsewhere"], "snapshot.dir", "../elsewhere", "one folder inside the run directory"),
    (["snapshot.keep_last=0"], "snapshot.keep_last", 0, "must keep at least one version"),
    (["snapshot.resume=/no/such/snapshot.pt"], "snapshot.resume", "/no/such/snapshot.pt", "no such snapshot file"),
    (["snapshot.resume=must"], "snapshot.resume", "must", "to resume from"),
    (
        [f"name={EXISTING}", "trainer.batch_size=16"],
        "snapshot.resume",
        "auto",  # batch size defines the run
        "different run; differing keys: trainer.batch_size: 32 -> 16",
    ),
    ([f"name={EXISTING}", "model=mlp"], "snapshot.resume", "auto", "model._target_"),  # snapshots of another model
    (["model._target_=torch.nn.Linearr"], "model._target_", "torch.nn.Linearr", "cannot be imported"),
    (["dataset._target_=no_such_module.Data"], "dataset._target_", "no_such_module.Data", "cannot be imported"),
    (["optimizer=adam", "optimizer.lr=-0.1"], "optimizer.lr", -0.1, "Adam rejects a negative lr"),
    (["model=mlp", "+model.hidden=3"], "model.hidden", 3, "unexpected keyword argument 'hidden'"),
    (["task=classification", "+task.smoothing=0.1"], "task.smoothing", 0.1, "unexpected keyword argument 'smoothing'"),
    (["dataset.size=0"], "dataset.size", 0, "at least one sample"),
    (["hydra.run.dir=/proc/runner-test"], "hydra.run.dir", Path("/proc/runner-test"), "cannot"),
    # Settings that do not exist compose with `+` and would silently do nothing.
    (["+trainer.nonsense=1"], "trainer.nonsense", 1, "is not a setting of trainer"),
    (["+trainer.num_workers=2"], "trainer.num_workers", 2, "is not a setting of trainer"),
    (["+data.workers=2"], "data.workers", 2, "is not a setting of data"),
    (["+snapshot.best=true"], "snapshot.best", True, "is not a setting of snapshot"),
    (["+trainer.early_stop.wait=3"], "trainer.early_stop.wait", 3, "is not a setting of trainer.early_stop"),
    (["data.val_fraction=1.5"], "data.val_fraction", 1.5, "must be in [0, 1)"),
    (["data.prefetch_factor=4"], "data.prefetch_factor", 4, "needs loader workers"),  # no loader workers
    (["snapshot.monitor=val/loss"], "snapshot.monitor", "val/loss", "no validation split"),
    (["snapshot.monitor=accuracy", "data.val_fraction=0.1"], "snapshot.monitor", "accuracy", "names no metric"),
    (["trainer.test=true"], "trainer.test", True, "no test split"),
    (["+data.collate_fn._target_=builtins.dict"], "data.collate_fn", "builtins.dict", "cannot be called"),
    (["scheduler=cosine", "scheduler.interval=batch"], "scheduler.interval", "batch", "is not a scheduler interval"),
    (
        ["dataset._target_=loaders.regression_loader"],
        "dataset._target_",
        "loaders.regression_loader",
        "builds a DataLoader",
    ),
    (
        ["+data.collate_fn._target_=loaders.broken_collate", "data.loader=dataloader"],
        "data.collate_fn",
        "loaders.broken_collate",
        "making the first batch failed: ValueError: masks need lengths",
    ),
]
if not torch.cuda.is_available():
    CASES += [
        (["launch.nproc_per_node=gpu"], "launch.nproc_per_node", "gpu", "no CUDA device is visible"),
        (["launch.backend=nccl"], "launch.backend", "nccl", "NCCL needs CUDA devices"),
    ]

# Refused by Hydra while composing (wrong type, unknown key or entry, a word that is not a choice).
COMPOSING_CASES = [
    (["trainer.total_epochs=ten"], "trainer.total_epochs"),
    (["trainer.progress=maybe"], "trainer.progress"),
    (["trainer.epochs=5"], "trainer.epochs"),  # misspelled key
    (["model=transformer"], "model/transformer"),  # unknown group entry
    (["launch.backend=mpi"], "launch.backend"),
    (["launch.cpu_allreduce=fast"], "launch.cpu_allreduce"),
    (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite"),
    (["launch.topology=ring"], "launch.topology"),
]


def tree_state(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A folder holding a finished run (outputs/existing), made in-process."""
    cwd = tmp_path_factory.mktemp("errors")
    make_finished_run(cwd, [f"name={EXISTING}", "launch=local", "trainer.total_epochs=1", "trainer.progress=false"])
    return cwd


@pytest.mark.parametrize("args,key,value,phrase", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_a_mistake_is_refused_naming_key_value_and_fix_and_changes_nothing(
    finished, monkeypatch, args, key, value, phrase
):
    monkeypatch.syspath_prepend(str(PLUGINS))
    before = tree_state(finished)
    err = refusal(args, finished)
    assert (err.key, err.value) == (key, value), err.render()
    assert phrase in err.problem, err.render()
    assert err.allowed, err.render()  # what would be accepted is always said
    text = err.render()
    assert text.startswith(f"Error: {key}=") and len(text.splitlines()) <= 3  # one short paragraph
    assert tree_state(finished) == before  # no run directory, snapshot, lock file or log created or touched


@pytest.mark.parametrize("args,key", COMPOSING_CASES, ids=[c[0][0] for c in COMPOSING_CASES])
def test_hydra_refuses_wrong_types_unknown_keys_and_words_while_composing(tmp_path, args, key):
    with pytest.raises((HydraException, OmegaConfBaseException)) as caught:
        compose_command(args, tmp_path)
    assert key in str(caught.value)


def test_every_snapshot_invalid_is_reported_not_a_fresh_start(tmp_path):
    run_dir = make_finished_run(tmp_path, [f"name={EXISTING}"])
    (snapshot,) = (run_dir / "snapshots").glob("snapshot-*.pt")
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    before = tree_state(tmp_path)
    err = refusal([f"name={EXISTING}", "trainer.total_epochs=2"], tmp_path)
    assert err.key == "snapshot.resume" and "invalid" in err.problem and snapshot.name in err.problem
    assert "snapshot.resume=never" in err.fix
    assert tree_state(tmp_path) == before


@pytest.mark.slow
def test_mistakes_through_the_command_exit_2_with_one_paragraph_and_write_nothing(tmp_path):
    """The process's view: exit code 2, the paragraph on stderr, no traceback, no worker, nothing written.
    Hydra's own composing errors get the same exit code as the runner's checks."""
    make_finished_run(tmp_path, [f"name={EXISTING}"])
    commands = [(args, key) for args, key in COMPOSING_CASES[:4]] + [
        (["trainer.total_epochs=0"], "trainer.total_epochs=0: must be at least 1"),  # a quick check
        ([f"name={EXISTING}", "trainer.batch_size=16"], "differing keys: trainer.batch_size"),  # after the lock
        (
            ["dataset._target_=loaders.regression_loader"],
            "dataset._target_=loaders.regression_loader: builds a DataLoader",
        ),
    ]
    before = tree_state(tmp_path)
    env = {"PYTHONPATH": str(PLUGINS)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda command: run_cli(command[0], tmp_path, env=env), commands))
    for (args, text), res in zip(commands, results):
        where = f"{args}: {res.output}"
        assert res.returncode == 2, where
        assert "Traceback" not in res.output, where
        assert text in res.stderr, where
        assert len(res.output.strip().splitlines()) <= 16, where  # Hydra lists a group's entries
        assert "rank 0" not in res.output, where  # no worker started
    assert tree_state(tmp_path) == before  # no run directory, snapshot or log created or touched


@pytest.mark.slow
def test_starting_over_archives_invalid_snapshots(tmp_path):
    """The way out the invalid-snapshots message names: start over, keeping the damaged files in an archive."""
    run_dir = make_finished_run(tmp_path, [f"name={EXISTING}", "launch=local"])
    (snapshot,) = (run_dir / "snapshots").glob("snapshot-*.pt")
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    res = run_cli([f"name={EXISTING}", "launch=local", "trainer.total_epochs=1", "trainer.progress=false"], tmp_path)
    assert res.returncode == 2 and "invalid" in res.stderr, res.output
    res = run_cli(
        [
            f"name={EXISTING}",
            "launch=local",
            "trainer.total_epochs=1",
            "trainer.progress=false",
            "snapshot.resume=never",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.output
    archived = list((run_dir / "archive").glob(f"*/snapshots/{snapshot.name}"))
    assert len(archived) == 1 and archived[0].stat().st_size == 100


@pytest.mark.slow
def test_training_failure_names_rank_error_and_log(workdir):
    # A model whose input size does not match the data fails inside the workers, on every attempt.
    res = run_cli(["model.in_features=3", "launch.max_restarts=1", "trainer.progress=false", *WORKERS], workdir)
    assert res.returncode == 1, res.output
    assert "Error: training failed on rank" in res.stderr and "RuntimeError" in res.stderr
    assert "mat1 and mat2 shapes cannot be multiplied" in res.stderr
    assert "full logs: outputs/model.in_features=3/logs/rank-" in res.stderr
    report = res.stderr[res.stderr.index("Error: training failed") :]
    assert len(report.strip().splitlines()) <= 12, report
    assert "elastic/multiprocessing" not in res.stderr and "ChildFailedError" not in res.stderr  # no agent noise
