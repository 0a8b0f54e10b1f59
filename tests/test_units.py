"""Unit tests of the pieces the end-to-end runs rely on: sampler, run naming, RNG, data."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from runner.data import RegressionDataset
from runner.driver.rundir import identity, identity_diff, run_dir_name
from runner.train import rng
from runner.train.sampler import ResumableDistributedSampler


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_matches_torch_distributed_sampler(world):
    data = list(range(23))
    for rank in range(world):
        ours, theirs = (
            ResumableDistributedSampler(data, world, rank, seed=7),
            DistributedSampler(data, world, rank, seed=7),
        )
        ours.set_epoch(4), theirs.set_epoch(4)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.parametrize("new_world", [2, 3])
def test_sampler_resumes_mid_epoch_without_repeating_or_skipping(new_world):
    data = list(range(50))
    world, batch, steps_done = 2, 4, 3
    full = [ResumableDistributedSampler(data, world, r, seed=1) for r in range(world)]
    for s in full:
        s.set_epoch(2)
    consumed = [i for s in full for i in list(s)[: steps_done * batch]]
    rest = []
    for r in range(new_world):
        s = ResumableDistributedSampler(data, new_world, r, seed=1)
        s.set_epoch(2)
        s.set_start(steps_done * batch * world)
        rest += list(s)
        assert len(s) == len(list(s))
    remaining = set(data) - set(consumed)
    assert remaining <= set(rest)  # nothing skipped...
    assert len(rest) - len(remaining) < new_world  # ...nothing repeated beyond DistributedSampler's padding
    if new_world == world:  # same world size: the remainder is exactly what each rank would have seen
        for r, s in enumerate(full):
            resumed = ResumableDistributedSampler(data, world, r, seed=1)
            resumed.set_epoch(2)
            resumed.set_start(steps_done * batch * world)
            assert list(resumed) == list(s)[steps_done * batch :]


def test_run_dir_name_is_stable_and_ignores_extend_only_overrides():
    a = run_dir_name(
        None, ["optimizer=adam", "model=mlp", "trainer.total_epochs=50", "launch=local", "snapshot.keep_last=9"]
    )
    b = run_dir_name(None, ["model=mlp", "optimizer=adam"])
    assert a == b == "model=mlp,optimizer=adam"
    assert run_dir_name(None, []) == "default"
    assert run_dir_name("my exp/1", ["model=mlp"]) == "my_exp_1"
    long = run_dir_name(None, [f"+model.k{i}=value{i}" for i in range(20)])
    assert len(long) <= 80 and long != run_dir_name(None, [f"+model.k{i}=value{i}" for i in range(19)])
    assert "/" not in run_dir_name(None, ["snapshot.resume=/a/b", "dataset.path=/data/x"])


def test_identity_ignores_total_epochs_but_not_the_model():
    from omegaconf import OmegaConf

    base = OmegaConf.create(
        {
            "trainer": {"total_epochs": 5, "seed": 0, "shuffle": True},
            "task": {"_target_": "T"},
            "model": {"_target_": "M", "n": 2},
            "dataset": {"_target_": "D"},
            "optimizer": {"_target_": "O", "lr": 0.1},
            "scheduler": {"_target_": "S", "T_max": "${trainer.total_epochs}"},
        }
    )
    longer = OmegaConf.merge(base, {"trainer": {"total_epochs": 50}})
    other = OmegaConf.merge(base, {"model": {"n": 3}, "optimizer": {"lr": 0.2}})
    assert identity_diff(identity(base), identity(longer)) == []
    assert identity_diff(identity(base), identity(other)) == ["model.n", "optimizer.lr"]


def test_rng_capture_restore_round_trip_survives_safe_loading(tmp_path):
    rng.seed_everything(3)
    state = rng.capture()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    rng.seed_everything(99)
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_regression_dataset_is_the_seed_task_and_deterministic():
    a, b = RegressionDataset(size=64, seed=5), RegressionDataset(size=64, seed=5)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert a.true_w.flatten().tolist() == pytest.approx([-2.0, 3.4]) and a.true_b == 4.2
    x, y = a.tensors
    residual = y - (x @ a.true_w + a.true_b)
    assert residual.std().item() == pytest.approx(0.01, rel=0.3)


def test_report_ranks_runs_by_objective_in_the_monitor_direction():
    from runner.report import rank_by_objective

    runs = [
        {"objective": 0.5, "maximize": False},
        {"objective": None, "maximize": False},
        {"objective": 0.1, "maximize": False},
        {"objective": float("nan"), "maximize": False},
    ]
    assert [r["objective"] for r in rank_by_objective(runs)][:2] == [0.1, 0.5]
    accuracy = [{"objective": 0.8, "maximize": True}, {"objective": 0.95, "maximize": True}]
    assert [r["objective"] for r in rank_by_objective(accuracy)] == [0.95, 0.8]


def test_gpu_worker_counts_resolve_as_torchrun_does_and_too_many_are_refused():
    from omegaconf import OmegaConf

    from runner.config import LaunchConfig
    from runner.driver.checks import check_gpu_count
    from runner.errors import UserError
    from runner.launch.runtime import resolve_runtime

    def runtime(nproc, backend="auto", gpus=("0", "1")):
        launch = OmegaConf.merge(OmegaConf.structured(LaunchConfig), {"nproc_per_node": nproc, "backend": backend})
        return resolve_runtime(launch, cuda_devices=list(gpus), cores=8)

    assert (runtime("gpu").nproc_per_node, runtime("gpu").backend, runtime("gpu").device) == (2, "nccl", "cuda")
    assert runtime("auto").nproc_per_node == 2 and runtime("1").nproc_per_node == 1
    assert (runtime("cpu").backend, runtime("cpu").device, runtime("cpu").nproc_per_node) == ("gloo", "cpu", 8)
    assert runtime("auto", gpus=()).device == "cpu"
    assert runtime("gpu").allreduce == "nccl"
    check_gpu_count(runtime("2"), 2, "2")
    with pytest.raises(UserError) as err:
        check_gpu_count(runtime("4"), 2, "4")
    assert "4 GPU workers need a GPU each, and 2 are visible" in str(err.value)
    check_gpu_count(runtime("4", backend="gloo"), 2, "4")  # CPU workers on a GPU machine


def test_fsdp_units_look_inside_containers_and_leave_tied_weights_to_the_root():
    from runner.examples.charlm import TinyGPT
    from runner.models import MLP
    from runner.train.engines.fsdp import shard_blocks

    def names(model, shard):
        named = {id(m): n for n, m in model.named_modules()}
        return [named[id(b)] for b in shard_blocks(model, shard)]

    gpt = TinyGPT(n_layer=2)
    # tok_emb and head share one weight: sharded apart they would hold it twice; the root keeps it.
    assert names(gpt, None) == ["pos_emb", "blocks.0", "blocks.1", "ln_f"]
    assert names(gpt, "Block") == names(gpt, "runner.examples.charlm.Block") == ["blocks.0", "blocks.1"]
    assert names(gpt, "ModuleList") == []  # a container without forward is never a unit
    assert names(MLP(2, 1, depth=2), None) == ["0", "2", "4"]  # activations hold no parameters


def test_meta_init_is_refused_where_nothing_would_initialise_a_parameter(caplog):
    import logging

    from runner.driver.checks import check_meta_init
    from runner.errors import UserError
    from runner.examples.charlm import TinyGPT
    from runner.models import MLP

    with torch.device("meta"):
        attention, mlp, gpt = torch.nn.MultiheadAttention(8, 2), MLP(2, 1), TinyGPT(n_layer=1)
    with pytest.raises(
        UserError, match="in_proj_weight"
    ) as err:  # MHA initialises in _reset_parameters, not reset_parameters
        check_meta_init(attention, "torch.nn.MultiheadAttention")
    assert "init_weights" in str(err.value)
    check_meta_init(mlp, "runner.models.MLP")  # Linear layers: reset_parameters covers every weight
    with caplog.at_level(logging.WARNING):
        check_meta_init(gpt, "TinyGPT")  # covered, but its own init (std 0.02, tying) is not replayed: said
    assert "not replayed" in caplog.text


def test_gpu_only_options_on_cpu_workers_warn_once_each(caplog):
    import logging

    from omegaconf import OmegaConf

    from runner.driver.checks import warn_gpu_options_on_cpu

    cfg = OmegaConf.create({"data": {"pin_memory": True}, "trainer": {"precision": "fp16"}})
    with caplog.at_level(logging.WARNING):
        warn_gpu_options_on_cpu(cfg, "cuda")
        assert caplog.records == []  # what they are for
        warn_gpu_options_on_cpu(cfg, "cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("data.pin_memory=true") and lines[1].startswith("trainer.precision=fp16")
    caplog.clear()
    warn_gpu_options_on_cpu(OmegaConf.create({"data": {"pin_memory": None}, "trainer": {"precision": "bf16"}}), "cpu")
    assert caplog.records == []
