"""The data pipeline, schedules and best-snapshot retention, without launching anything."""

from __future__ import annotations

import math
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data._utils import signal_handling

from runner.train.batches import DataSource, TrainBatches, next_batch, to_device
from runner.train.schedules import WarmupCosine


class Augmented(Dataset):
    """Noise from torch's global RNG: only reproducible if the runner seeds every read."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.tensor([float(i)]) + torch.rand(1), torch.tensor(i)


def data_cfg(**over):
    base = dict(
        loader="auto",
        val_fraction=0.0,
        num_workers=0,
        pin_memory=None,
        persistent_workers=True,
        prefetch_factor=None,
        collate_fn=None,
        drop_last=False,
        eval_batch_size=None,
    )
    return OmegaConf.create({**base, **over})


def epoch_batches(batches: TrainBatches, epoch: int, start: int = 0) -> list:
    return [tuple(t.clone() for t in b) for b in batches.epoch(epoch, start)]


def test_augmentation_is_the_same_for_any_number_of_loader_workers_and_after_a_resume():
    device = torch.device("cpu")
    make = lambda workers, rank=0: TrainBatches(Augmented(), data_cfg(num_workers=workers), 4, rank, 2, 7, True, device)
    inline, workers = make(0), make(2)
    a, b = epoch_batches(inline, 3), epoch_batches(workers, 3)
    assert len(a) == len(b) == math.ceil(25 / 4)
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    resumed = epoch_batches(make(2), 3, start=2 * 4 * 2)  # two steps of 4 on 2 ranks were done
    for x, y in zip(a[2:], resumed):
        assert torch.equal(x[0], y[0])
    assert not torch.equal(epoch_batches(inline, 4)[0][0], a[0][0]), "another epoch draws other numbers"
    # The training process's own RNG is left alone by reads in it (num_workers=0).
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    epoch_batches(inline, 3)
    assert torch.equal(torch.rand(3), expected)


def test_tensor_datasets_take_the_fast_path_with_the_same_order_as_a_dataloader():
    x = torch.arange(40.0).unsqueeze(1)
    ds = TensorDataset(x, x * 2)
    fast = TrainBatches(ds, data_cfg(), 3, 1, 2, 0, True, torch.device("cpu"))
    loader = TrainBatches(ds, data_cfg(loader="dataloader"), 3, 1, 2, 0, True, torch.device("cpu"))
    assert fast.kind == "tensor" and loader.kind == "dataloader"
    for a, b in zip(epoch_batches(fast, 1), epoch_batches(loader, 1), strict=True):
        assert torch.equal(a[0], b[0])
    dropped = TrainBatches(ds, data_cfg(drop_last=True), 3, 1, 2, 0, True, torch.device("cpu"))
    assert dropped.batches_per_epoch() == 20 // 3 and len(epoch_batches(dropped, 1)) == 6


def test_val_fraction_splits_deterministically_and_every_rank_evaluates_its_own_shard():
    cfg = OmegaConf.create(
        {
            "dataset": {"_target_": "runner.data.RegressionDataset", "size": 103},
            "trainer": {"seed": 5, "batch_size": 8, "shuffle": True},
            "data": data_cfg(val_fraction=0.2),
        }
    )
    shards = [DataSource(cfg, rank, 3, torch.device("cpu")) for rank in range(3)]
    assert len(shards[0].train.dataset) == 82 and sum(len(s.val) for s in shards) == 21
    seen = torch.cat([torch.cat([b[0] for b in s.val]) for s in shards])
    assert len(torch.unique(seen, dim=0)) == 21, "each validation sample is evaluated exactly once"
    again = DataSource(cfg, 0, 3, torch.device("cpu"))
    assert torch.equal(again.train.tensors[0], shards[0].train.tensors[0])


def test_batches_of_any_shape_are_moved_recursively():
    batch = {"tokens": torch.ones(2, 3), "mask": [torch.zeros(2), (torch.ones(1), "label")]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["tokens"].device.type == "meta" and moved["mask"][1][0].device.type == "meta"
    assert moved["mask"][1][1] == "label"


def test_warmup_cosine_rises_linearly_then_decays_to_its_floor():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[9] == pytest_approx(0.1 + 0.9 * 0.5)
    assert lrs[14] == pytest_approx(0.1) and lrs[15] == pytest_approx(0.1)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-9)


def test_best_versions_are_kept_beyond_keep_last_and_named_in_the_manifest(tmp_path):
    from conftest import snapshot_state

    from runner.snapshot import SnapshotManager

    manager = SnapshotManager(tmp_path, keep_last=2, keep_best=1, mode="max")
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6), (5, None)]:
        monitor = None if acc is None else {"name": "val/accuracy", "value": acc}
        manager.save(snapshot_state(w=torch.full((2,), float(step))), step=step, epoch=step, monitor=monitor)
    files = [e["file"] for e in manager.entries()]
    assert files == ["snapshot-000000002.pt", "snapshot-000000004.pt", "snapshot-000000005.pt"]
    best = manager.best_entry()
    assert best["step"] == 2 and best["best"] is True
    assert torch.equal(manager.load_entry(best)["model"]["w"], torch.full((2,), 2.0))
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == files


def test_monitor_keeps_the_best_and_counts_validations_without_real_improvement():
    from runner.train.evaluation import Monitor

    watch = Monitor("val/accuracy", "max", patience=2, min_delta=0.01)
    assert watch.update({"val/accuracy": 0.5}, step=10) is True
    assert watch.update({"val/accuracy": 0.505}, step=20) is True  # a new best, but not by min_delta
    assert watch.bad_validations == 1 and watch.ended is None
    resumed = Monitor("val/accuracy", "max", patience=2, min_delta=0.01)
    resumed.load(watch.state())
    assert resumed.update({"val/accuracy": 0.4}, step=30) is False
    assert resumed.ended.startswith("early stop: val/accuracy") and "best 0.505 at step 20" in resumed.ended
    assert Monitor("val/loss", "min").update({"val/loss": float("nan")}, step=1) is False


def test_a_killed_loader_worker_is_named_whatever_error_reaches_the_rank_first():
    def reset_while_handing_over():  # what a rank sees when its worker dies mid-transfer of a tensor
        raise ConnectionResetError(104, "Connection reset by peer")
        yield

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker.send_signal(signal.SIGKILL)
    while open(f"/proc/{worker.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # dead, not yet reaped: as a loader worker is when the rank next asks for a batch
    signal_handling._set_worker_pids(id(worker), (worker.pid,))
    try:
        with pytest.raises(RuntimeError, match=f"DataLoader worker \\(pid {worker.pid}\\) is killed by signal") as err:
            next_batch(reset_while_handing_over())
        assert isinstance(err.value.__cause__, ConnectionResetError)

        def dataset_error():  # the dataset's own error, raised in a worker: never renamed
            raise ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback ...")
            yield

        with pytest.raises(ValueError, match="in DataLoader worker process 0"):
            next_batch(dataset_error())
    finally:
        signal_handling._remove_worker_pids(id(worker))
        worker.wait()
    with pytest.raises(ConnectionResetError):  # no dead worker: the error as it came
        next_batch(reset_while_handing_over())
    assert next_batch(iter([1])) == 1 and next_batch(iter([])) is None
