"""Models, data and tasks from other libraries, run as users run them: a torchvision ResNet with
torchvision transforms in the loader workers, a Hugging Face BERT from a tiny config with dict
batches, a padding collate and a Task of its own, and PyTorch's word-level Transformer example,
whose positional-encoding buffer is a transposed view. The models and datasets live in
tests/plugins/third_party.py; the configs are written into a config folder of the user's own
(`--config-dir`), as a user adds them."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUIET, WORKERS, assert_same_weights, latest_snapshot, manifest, metrics, run_cli

PLUGINS = Path(__file__).parent / "plugins"
ENV = {"PYTHONPATH": str(PLUGINS)}

CONFIGS = {
    "model/resnet18.yaml": "_target_: third_party.resnet18\nnum_classes: 10\n",
    "dataset/digit_images.yaml": "_target_: third_party.digit_images\nsize: 16\ntrain: 256\nval: 0\n",
    "model/tiny_bert.yaml": "_target_: third_party.tiny_bert\nvocab_size: 100\nhidden_size: 32\nlayers: 2\n",
    "dataset/token_sequences.yaml": "_target_: third_party.token_splits\nsize: 512\nval_size: 128\n",
    "task/sequence_classification.yaml": "_target_: third_party.SequenceClassification\n",
    "model/tutorial_transformer.yaml": "_target_: third_party.TransformerModel\nntoken: 128\nninp: 32\nnhead: 2\n"
    "nhid: 64\nnlayers: 2\ndropout: 0.1\n",
}


@pytest.fixture
def user_conf(tmp_path: Path) -> list[str]:
    """A config folder of the user's own beside the runner's, as `--config-dir` arguments."""
    for name, text in CONFIGS.items():
        path = tmp_path / "conf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return ["--config-dir", str(tmp_path / "conf")]


def run(args: list[str], cwd: Path, timeout: float = 300):
    return run_cli(args, cwd, timeout=timeout, env=ENV)


def finite_losses(run_dir: Path) -> list[float]:
    losses = [r["train/loss"] for r in metrics(run_dir) if "train/loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), losses
    return losses


# ResNet-18: 256 training images / (2 workers x 16) = 8 steps per epoch, two loader workers per rank
# drawing torchvision's RandomCrop and RandomHorizontalFlip. The progress bar stays on (no validation).
RESNET = [
    "model=resnet18",
    "dataset=digit_images",
    "task=classification",
    "optimizer=adamw",
    "optimizer.lr=0.003",
    "trainer.batch_size=16",
    "trainer.total_epochs=2",
    "trainer.save_every_steps=4",
    "data.num_workers=2",
    *WORKERS,
]


@pytest.mark.slow
def test_torchvision_resnet_with_v2_transforms_in_loader_workers_resumes_bitwise(tmp_path, user_conf):
    ref = run([*user_conf, *RESNET, "name=ref"], tmp_path)
    assert ref.returncode == 0, ref.output
    ref_dir = tmp_path / "outputs" / "ref"
    assert [e["step"] for e in manifest(ref_dir)["snapshots"]][-2:] == [12, 16]
    losses = finite_losses(ref_dir)
    assert losses[-1] < losses[0], "two epochs of training lower the loss"
    crash = run([*user_conf, *RESNET, "name=crash", "trainer.crash_at_step=14", "trainer.crash_rank=1"], tmp_path)
    assert crash.returncode == 0, crash.output
    assert "resumed from snapshot-000000012.pt" in crash.output
    crash_dir = tmp_path / "outputs" / "crash"
    a, b = latest_snapshot(ref_dir), latest_snapshot(crash_dir)
    assert any("running_mean" in key for key in a["model"])  # BatchNorm statistics travel in the snapshot
    assert_same_weights(a["model"], b["model"])
    assert finite_losses(crash_dir) == finite_losses(ref_dir)


# BERT from a tiny config: 512 variable-length sequences / (2 workers x 16 x 2 micro-batches) = 8
# steps per epoch; dict batches padded by the user's collate, the loss computed by the model.
BERT = [
    "model=tiny_bert",
    "dataset=token_sequences",
    "task=sequence_classification",
    "+data.collate_fn._target_=third_party.pad_collate",
    "data.num_workers=1",
    "optimizer=adamw",
    "optimizer.lr=0.003",
    "trainer.batch_size=16",
    "trainer.accumulate=2",
    "trainer.clip_grad_norm=1.0",
    "trainer.total_epochs=4",
    *QUIET,
    *WORKERS,
]


@pytest.mark.slow
def test_tiny_bert_with_dict_batches_a_custom_collate_and_task(tmp_path, user_conf):
    res = run([*user_conf, *BERT, "name=bert"], tmp_path)
    assert res.returncode == 0, res.output
    run_dir = tmp_path / "outputs" / "bert"
    rows = [r for r in metrics(run_dir) if "val/accuracy" in r]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["val/loss"] < rows[0]["val/loss"]
    assert rows[-1]["val/accuracy"] > 0.7  # the label is the first token's half of the vocabulary
    finite_losses(run_dir)
    model = latest_snapshot(run_dir)["model"]
    assert "bert.embeddings.word_embeddings.weight" in model and model["classifier.weight"].shape == (2, 32)


# PyTorch's word-level Transformer example on characters: its `pe` buffer is (5000, 1, 32) with the
# strides of a transposed view, which DDP's buffer broadcast refused even in one process.
TUTORIAL = [
    "model=tutorial_transformer",
    "dataset=charlm",
    "dataset.block_size=32",
    "dataset.max_chars=20000",
    "task=language_model",
    "trainer.batch_size=8",
    *QUIET,
]


@pytest.mark.slow
def test_tutorial_transformer_with_a_transposed_buffer_trains_on_two_workers_and_on_one(tmp_path, user_conf):
    ddp_options = ["trainer.ddp.bucket_cap_mb=1", "trainer.ddp.gradient_as_bucket_view=true"]
    res = run([*user_conf, *TUTORIAL, "trainer.max_steps=6", *ddp_options, *WORKERS], tmp_path)
    assert res.returncode == 0, res.output
    (run_dir,) = (tmp_path / "outputs").iterdir()
    assert "ddp" not in run_dir.name, "trainer.ddp.* say how, not what: they do not name the run"
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "bucket_cap_mb=1, gradient_as_bucket_view=True" in log  # what DDP itself was given
    sys.path.insert(0, str(PLUGINS))
    try:
        from third_party import PositionalEncoding
    finally:
        sys.path.remove(str(PLUGINS))
    assert torch.equal(latest_snapshot(run_dir)["model"]["pos_encoder.pe"], PositionalEncoding(32).pe)
    # The same run continued in one process (launch=local): no DDP wrapper at all.
    local = run([*user_conf, *TUTORIAL, "trainer.max_steps=12", *ddp_options, "launch=local"], tmp_path)
    assert local.returncode == 0, local.output
    assert "resumed from snapshot-000000006.pt" in local.output
    assert manifest(run_dir)["snapshots"][-1]["step"] == 12
    both = (run_dir / "logs" / "rank-0.log").read_text()
    assert "rank 0 of 1 up" in both and both.count("DistributedDataParallel:") == 1  # the first run's only
    finite_losses(run_dir)


@pytest.mark.slow
def test_ddp_options_are_refused_where_they_cannot_work(tmp_path):
    cases = [
        (
            ["trainer.strategy=fsdp", "trainer.ddp.find_unused_parameters=true"],
            "trainer.ddp.find_unused_parameters=True: is read only with trainer.strategy=ddp",
        ),
        (
            ["trainer.ddp.static_graph=true", "trainer.accumulate=2"],
            "trainer.ddp.static_graph=True: cannot be combined",
        ),
        (["trainer.ddp.bucket_cap_mb=0"], "trainer.ddp.bucket_cap_mb=0.0: must be positive"),
        (["+trainer.ddp.sync_bn=true"], "trainer.ddp.sync_bn"),
    ]
    for overrides, message in cases:
        res = run_cli([*overrides, "launch=local", *QUIET], tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.output, res.output
        assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_the_first_line_says_how_gradients_are_averaged():
    from runner.config import Runtime

    shm = Runtime("gloo", "cpu", 2, 1, "shm", "CPU workers on one machine")
    assert shm.describe("ddp") == "cpu x 2 (gloo, gradients through shared memory)"
    assert "shared memory" not in shm.describe("fsdp") and "reduce-scattered by gloo" in shm.describe("fsdp")
    assert Runtime("nccl", "cuda", 4, None, "nccl", "GPUs").describe("ddp") == "cuda x 4 (nccl)"
