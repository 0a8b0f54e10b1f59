"""The CUDA path end to end, on one GPU: NCCL, exact resume, mixed precision, pinned async snapshots
and how GPU worker counts resolve.

Skipped (with the reason) where torch sees no CUDA device; the module imports without CUDA.
Every CLI run is pinned to one GPU (CUDA_VISIBLE_DEVICES = the first visible device), so the
numbers asserted do not depend on how many GPUs the machine has. `bash benchmarks/gpu_check.sh`
runs this file and the GPU benchmarks on a GPU machine.
"""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import QUIET, assert_same_weights, manifest, metrics, run_cli, start_cli, stop_when
from omegaconf import OmegaConf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False here)"
    ),
]


def first_visible_device() -> str:
    """The first device this process may use, as CUDA_VISIBLE_DEVICES names it (an index or a UUID)."""
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[0] if listed else "0"


ONE_GPU = {"CUDA_VISIBLE_DEVICES": first_visible_device()}
GPU = ["launch.nproc_per_node=gpu", *QUIET]  # one worker per visible GPU: one, with ONE_GPU
DEVICE_LINE = "cuda x 1 (nccl)"
TIMEOUT = 300  # seconds per CLI run (CUDA and NCCL start-up included)

# model=mlp on the seed task; the fp32 run every precision is compared with.
MLP = ["model=mlp", "trainer.total_epochs=5", *GPU]
# Exactness: 4096 samples / 32 = 128 steps per epoch, 1280 steps; snapshots every 20 steps, mid-epoch.
# Long enough that a SIGTERM sent once the first snapshot exists lands mid-run.
EXACT = [
    "model=mlp",
    "model.dropout=0.1",
    "dataset.size=4096",
    "trainer.total_epochs=10",
    "trainer.save_every_steps=20",
    "trainer.deterministic=true",
    *GPU,
]
EXACT_STEPS = 10 * 128


def cli(args: list[str], cwd: Path):
    return run_cli(args, cwd, timeout=TIMEOUT, env=ONE_GPU)


def snapshot_of(run_dir: Path) -> dict:
    """The newest snapshot, on the CPU whatever device its tensors were saved from."""
    entry = manifest(run_dir)["snapshots"][-1]
    return torch.load(run_dir / "snapshots" / entry["file"], map_location="cpu", weights_only=True)


def runtime_of(run_dir: Path):
    return OmegaConf.load(run_dir / "config.yaml").runtime


def console_first_line(res) -> str:
    """The driver's first console line (warnings printed by libraries before it are skipped)."""
    lines = [line for line in res.stderr.splitlines() if line.startswith("[")]
    assert lines, res.output
    return lines[0]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["epoch"], r["train/loss"]) for r in metrics(run_dir)]


def assert_weights_differ(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a), "the weights are bitwise equal"


@pytest.fixture(scope="module")
def mlp_fp32(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("mlp32")
    res = cli([*MLP, "name=mlp32"], cwd)
    assert res.returncode == 0, res.output
    run_dir = cwd / "outputs" / "mlp32"
    return res, run_dir, snapshot_of(run_dir), metrics(run_dir)


@pytest.fixture(scope="module")
def exact_reference(tmp_path_factory):
    """The uninterrupted deterministic run every interrupted one is compared with."""
    cwd = tmp_path_factory.mktemp("exact")
    res = cli([*EXACT, "name=reference"], cwd)
    assert res.returncode == 0, res.output
    run_dir = cwd / "outputs" / "reference"
    assert manifest(run_dir)["snapshots"][-1]["step"] == EXACT_STEPS
    return snapshot_of(run_dir), losses(run_dir)


def test_one_gpu_worker_trains_on_nccl(workdir, mlp_fp32):
    res = cli([*GPU, "name=seed"], workdir)  # the seed task: linear regression, 20 epochs
    assert res.returncode == 0, res.output
    assert DEVICE_LINE in console_first_line(res), res.output
    assert "epochs        : 20 (1280 steps, 1 worker)" in res.stdout, res.output
    assert "starting from scratch: 1 processes, cuda" in res.output
    run_dir = workdir / "outputs" / "seed"
    runtime = runtime_of(run_dir)
    assert (runtime.backend, runtime.device, runtime.nproc_per_node, runtime.allreduce) == ("nccl", "cuda", 1, "nccl")
    records = metrics(run_dir)
    assert len(records) == 20
    assert records[-1]["train/loss"] < 1e-3, records[-1]  # the noise floor is 1e-4 (noise 0.01)
    state = snapshot_of(run_dir)
    assert state["world_size"] == 1 and state["allreduce"] == "nccl"
    assert torch.allclose(state["model"]["weight"], torch.tensor([[-2.0, 3.4]]), atol=0.02), state["model"]
    assert torch.allclose(state["model"]["bias"], torch.tensor([4.2]), atol=0.02), state["model"]
    assert len(state["rng"]) == 1
    cuda_rng = state["rng"][0].get("cuda")
    assert cuda_rng, f"the snapshot holds no CUDA RNG state: {sorted(state['rng'][0])}"
    assert all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 and s.numel() > 0 for s in cuda_rng)

    res, run_dir, state, records = mlp_fp32
    assert DEVICE_LINE in console_first_line(res), res.output
    assert len(records) == 5
    assert all(math.isfinite(r["train/loss"]) for r in records)
    assert records[-1]["train/loss"] < records[0]["train/loss"], records
    assert all(t.dtype == torch.float32 for t in state["model"].values())
    assert state["scaler"] is None


def test_sigkilled_gpu_worker_is_restarted_and_ends_bitwise_equal(workdir, exact_reference):
    res = cli([*EXACT, "name=crash", "trainer.crash_at_step=45", "trainer.crash_rank=0"], workdir)
    assert res.returncode == 0, res.output
    assert DEVICE_LINE in console_first_line(res), res.output
    # The newest committed version: step 40, or 20 when the step-40 file was still being hashed and
    # fsync'ed in the background when the worker was killed 5 (fast) steps later.
    resumed = re.search(r"resumed from snapshot-(\d+)\.pt", res.output)
    assert resumed and int(resumed.group(1)) in (20, 40), res.output
    run_dir = workdir / "outputs" / "crash"
    log = (run_dir / "train.log").read_text()
    assert "killing rank 0" in log and "restart 1 after a worker failure" in log
    ref_state, ref_losses = exact_reference
    state = snapshot_of(run_dir)
    assert state["train_state"]["global_step"] == EXACT_STEPS
    assert_same_weights(state["model"], ref_state["model"])
    assert state["optimizer"]["state"].keys() == ref_state["optimizer"]["state"].keys()
    # The random streams went on exactly (dropout draws from the CUDA generator).
    assert all(torch.equal(a, b) for a, b in zip(state["rng"][0]["cuda"], ref_state["rng"][0]["cuda"]))
    assert torch.equal(state["rng"][0]["torch"], ref_state["rng"][0]["torch"])
    # The epoch the crash interrupted is reported once, with the same loss as without the crash.
    assert losses(run_dir) == ref_losses


def test_sigterm_on_gpu_snapshots_and_reinvocation_ends_bitwise_equal(workdir, exact_reference):
    args = [*EXACT, "name=preempted"]
    run_dir = workdir / "outputs" / "preempted"
    proc = start_cli(args, workdir, env=ONE_GPU)
    out, err = stop_when(proc, lambda: (run_dir / "snapshots" / "manifest.json").exists(), timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "Stopped by SIGTERM" in err and "run the same command again to resume" in err
    stopped_at = manifest(run_dir)["snapshots"][-1]
    assert 0 < stopped_at["step"] < EXACT_STEPS, "the stop should land mid-run"

    res = cli(args, workdir)
    assert res.returncode == 0, res.output
    assert f"resumed from {stopped_at['file']}" in res.output
    ref_state, ref_losses = exact_reference
    state = snapshot_of(run_dir)
    assert state["train_state"]["global_step"] == EXACT_STEPS
    assert_same_weights(state["model"], ref_state["model"])
    assert all(torch.equal(a, b) for a, b in zip(state["rng"][0]["cuda"], ref_state["rng"][0]["cuda"]))
    assert losses(run_dir) == ref_losses


def test_bf16_and_fp16_train_and_fp16_keeps_its_scaler(workdir, mlp_fp32):
    _, _, state32, _ = mlp_fp32
    states = {}
    for precision in ("bf16", "fp16"):
        name = f"mlp-{precision}"
        res = cli([*MLP, f"trainer.precision={precision}", f"name={name}"], workdir)
        assert res.returncode == 0, res.output
        assert DEVICE_LINE in console_first_line(res), res.output
        run_dir = workdir / "outputs" / name
        assert str(OmegaConf.load(run_dir / "config.yaml").trainer.precision) == precision
        records = metrics(run_dir)
        assert len(records) == 5 and all(math.isfinite(r["train/loss"]) for r in records), records
        assert records[-1]["train/loss"] < records[0]["train/loss"], records
        state = states[precision] = snapshot_of(run_dir)
        # Autocast computes in low precision; weights (and so the snapshot) stay float32.
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state["model"].values())
        assert_weights_differ(state["model"], state32["model"])
    assert states["bf16"]["scaler"] is None
    scaler = states["fp16"]["scaler"]
    assert isinstance(scaler, dict) and scaler["scale"] > 0, scaler
    assert_weights_differ(states["bf16"]["model"], states["fp16"]["model"])


def _tensor_paths(obj, path: tuple = ()) -> dict[tuple, torch.Tensor]:
    """Every tensor of a nested state by the path SnapshotWriter keys its buffers with."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    found: dict[tuple, torch.Tensor] = {}
    for key, value in items:
        found.update(_tensor_paths(value, path + (key,)))
    return found


def test_async_snapshot_stages_cuda_tensors_in_reused_pinned_buffers(tmp_path):
    from runner.snapshot import SnapshotManager, make_state
    from runner.snapshot.writer import SnapshotWriter

    cuda = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=cuda).manual_seed(0)
    model = {
        "0.weight": torch.randn(512, 256, device=cuda, generator=gen),
        "0.bias": torch.randn(512, device=cuda, generator=gen),
        "2.weight": torch.randn(1, 512, device=cuda, generator=gen),
        "2.bias": torch.zeros(1, device=cuda),
        "norm.num_batches_tracked": torch.tensor(7, device=cuda),
    }
    optimizer = {
        "state": {0: {"momentum_buffer": torch.randn(512, 256, device=cuda, generator=gen)}},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1, 2, 3]}],
    }
    # A real snapshot's RNG entry: CPU tensors beside the CUDA ones.
    rng = [{"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}]

    def state_now(step: int) -> dict:
        return make_state(
            model=model,
            optimizer=optimizer,
            scheduler=None,
            train_state={"epoch": 0, "global_step": step, "samples_in_epoch": step * 32},
            rng=rng,
            config={},
            world_size=1,
            allreduce="nccl",
            metrics=[],
        )

    writer = SnapshotWriter(SnapshotManager(tmp_path), asynchronous=True)
    expected, pointers = {}, []
    for step in (1, 2):
        state = state_now(step)
        sources = _tensor_paths(state)
        expected[step] = {path: t.detach().cpu().clone() for path, t in sources.items()}
        writer.save(state, step=step, epoch=0)
        for t in model.values():  # training goes on and changes the live tensors; the snapshot is a copy
            t.add_(1)
        writer.wait()
        buffers = writer._buffers
        assert buffers.keys() == sources.keys()
        for path, source in sources.items():
            buf = buffers[path]
            assert buf.device.type == "cpu", path
            if source.is_cuda:
                assert buf.is_pinned(), f"{path}: the staging buffer of a CUDA tensor is not pinned"
        pointers.append({path: buf.data_ptr() for path, buf in buffers.items()})
    assert pointers[0] == pointers[1], "the second save did not reuse the staging buffers"
    assert any(t.is_cuda for t in _tensor_paths(state_now(0)).values())

    manager = SnapshotManager(tmp_path)
    entries = manager.entries()
    assert [e["step"] for e in entries] == [1, 2]
    for entry in entries:
        loaded = manager.load_entry(entry)  # verified against the manifest, weights_only
        got = _tensor_paths(loaded)
        assert got.keys() == expected[entry["step"]].keys()
        for path, want in expected[entry["step"]].items():
            assert got[path].device.type == "cpu" and torch.equal(got[path], want), path
        assert loaded["train_state"]["global_step"] == entry["step"]
        assert loaded["optimizer"]["param_groups"] == optimizer["param_groups"]


def test_gpu_worker_counts_resolve_against_the_visible_gpus(workdir):
    res = cli(["launch.nproc_per_node=2", "trainer.total_epochs=1", *QUIET, "name=two"], workdir)
    assert res.returncode == 2, res.output
    assert "2 GPU workers need a GPU each, and 1 is visible" in res.output
    assert "Traceback" not in res.output
    assert not (workdir / "outputs" / "two").exists(), "a refused command leaves no run directory"

    res = cli(["launch.nproc_per_node=auto", "trainer.total_epochs=1", *QUIET, "name=auto"], workdir)
    assert res.returncode == 0, res.output
    assert DEVICE_LINE in console_first_line(res), res.output
    assert "epochs        : 1 (64 steps, 1 worker)" in res.stdout, res.output
    runtime = runtime_of(workdir / "outputs" / "auto")
    assert (runtime.backend, runtime.device, runtime.nproc_per_node) == ("nccl", "cuda", 1)


def test_fsdp_on_the_gpu_writes_pinned_async_shards_and_resumes(tmp_path):
    """FSDP2 over a one-GPU NCCL mesh with bf16 compute, asynchronous sharded snapshots staged
    into pinned memory, a resume, and an export gathered on the CPU."""
    args = [
        "model=mlp",
        "optimizer=adam",
        "dataset.size=4096",
        "trainer.save_every_steps=20",
        "trainer.strategy=fsdp",
        "trainer.fsdp.param_dtype=bf16",
        "trainer.fsdp.reduce_dtype=32",
        "snapshot.async=true",
        "name=fsdp",
        *GPU,
    ]
    res = cli([*args, "trainer.total_epochs=1"], tmp_path)
    assert res.returncode == 0 and DEVICE_LINE in res.output, res.output
    res = cli([*args, "trainer.total_epochs=2"], tmp_path)
    assert res.returncode == 0 and "resumed from step-000000128" in res.output, res.output
    run_dir = tmp_path / "outputs" / "fsdp"
    newest = manifest(run_dir)["snapshots"][-1]
    assert newest["kind"] == "dcp" and newest["file"] == "step-000000256"
    losses = [r["train/loss"] for r in metrics(run_dir)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0]
    from runner.export import load_model

    model = load_model(run_dir)
    assert next(model.parameters()).device.type == "cpu" and all(torch.isfinite(p).all() for p in model.parameters())
