"""The shared-memory gradient all-reduce: same averages as gloo, the same bits on every rank, safe
buffer reuse under skew, big buckets in chunks, a dead peer detected fast, nothing left in /dev/shm,
mismatched calls across ranks reported on every rank instead of summed."""

import json
import os
import random
import shutil
import sys
import time
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runner.train import shm_allreduce
from runner.train.shm_allreduce import SharedMemoryAllreduce, shm_allreduce_hook

pytestmark = pytest.mark.skipif(
    shm_allreduce.unavailable_reason("cpu", True) is not None, reason=str(shm_allreduce.unavailable_reason("cpu", True))
)
WORLD = 3


def _ranks_agree(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _worker(rank: int, store_dir: str, out_dir: str, shm_dir: str) -> None:
    shm_allreduce.SHM_DIR = shm_dir  # this test's own folder in /dev/shm: other jobs' segments are not ours to count
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    report: dict = {}
    state = SharedMemoryAllreduce.create(max_bytes=64 << 10)
    report["slot_bytes"] = state.slot_bytes

    # 1. Averages equal gloo's and are bit-identical on every rank, for sizes and dtypes, with
    #    random skew between ranks so that fast ranks run ahead into the next buffer.
    gen = torch.Generator().manual_seed(rank)
    rnd = random.Random(rank)
    worst, agree = 0.0, True
    for call in range(60):
        dtype = (torch.float32, torch.float64, torch.bfloat16)[call % 3]
        slot = (64 << 10) // torch.tensor([], dtype=dtype).element_size()
        numel = (1, 3, 1000, slot, 2 * slot + 7)[call % 5]  # the last one: two chunks and a remainder
        mine = torch.randn(numel, generator=gen).to(dtype)
        expected = mine.double()
        dist.all_reduce(expected)
        expected /= WORLD
        if rnd.random() < 0.3:
            time.sleep(rnd.random() * 0.004)
        got = state.allreduce_mean_(mine.clone())
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        worst = max(worst, float(((got.double() - expected).abs() / (expected.abs() + 1)).max()) / tol)
        agree &= _ranks_agree(got)
    report["worst_error_over_tolerance"] = worst
    # The stop agreement (max of int64 flags) and the epoch loss (sum of float64) use it too.
    report["max"] = state.all_reduce_(torch.tensor([rank, 10 - rank], dtype=torch.int64), op="max").tolist()
    report["sum"] = state.all_reduce_(torch.tensor([[0.5 * rank], [1.0]], dtype=torch.float64)).flatten().tolist()
    report["ranks_agree"] = agree

    # 2. Through DDP: buckets larger than a slot go through in chunks; the trained weights match
    #    plain DDP (gloo) and agree across ranks.
    weights = {}
    for use_hook in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 160), torch.nn.Linear(160, 160), torch.nn.Linear(160, 1))
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.05)
        if use_hook:
            ddp.register_comm_hook(SharedMemoryAllreduce.create(max_bytes=64 << 10), shm_allreduce_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        data_gen = torch.Generator().manual_seed(100 + rank)
        for _ in range(20):
            x, y = torch.randn(16, 8, generator=data_gen), torch.randn(16, 1, generator=data_gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        weights[use_hook] = torch.cat([p.detach().flatten() for p in model.parameters()])
        report[f"ddp_agree_{use_hook}"] = _ranks_agree(weights[use_hook])
        del ddp  # a DDP model with a Python hook must not outlive the interpreter
    report["ddp_max_diff"] = float((weights[True] - weights[False]).abs().max())
    report["shm_files_while_running"] = sorted(os.listdir(shm_dir))

    # 3. A peer that dies: the others raise within a fraction of a second, naming it.
    dist.barrier()
    if rank == WORLD - 1:
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(report, f)
        os._exit(0)
    started = time.perf_counter()
    try:
        state.allreduce_mean_(torch.ones(4))
        report["dead_peer"] = "no error"
    except RuntimeError as err:
        report["dead_peer"] = str(err)
    report["dead_peer_seconds"] = time.perf_counter() - started
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(report, f)
    os._exit(0)  # the process group is broken (a peer is gone): no orderly teardown


@pytest.mark.slow
def test_shared_memory_allreduce(tmp_path):
    shm_dir = os.path.join(shm_allreduce.SHM_DIR, f"runner-test-{uuid.uuid4().hex}")
    os.mkdir(shm_dir)
    try:
        mp.start_processes(
            _worker, args=(str(tmp_path), str(tmp_path), shm_dir), nprocs=WORLD, start_method="spawn", join=True
        )
        left = os.listdir(shm_dir)
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    reports = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    for rank, rep in enumerate(reports):
        assert rep["slot_bytes"] == 64 << 10
        assert rep["worst_error_over_tolerance"] < 1, rep
        assert rep["ranks_agree"] and rep["ddp_agree_True"] and rep["ddp_agree_False"], rep
        assert rep["ddp_max_diff"] < 1e-5, rep
        assert rep["max"] == [WORLD - 1, 10] and rep["sum"] == [0.5 * sum(range(WORLD)), WORLD], rep
        assert rep["shm_files_while_running"] == [], "the segment is unlinked once every rank mapped it"
        if rank < WORLD - 1:
            assert f"rank {WORLD - 1}" in rep["dead_peer"] and "exited" in rep["dead_peer"], rep
            assert rep["dead_peer_seconds"] < 2.0, rep
    assert left == []


# Each case: (rank 0's call, rank 1's call) as (numel, dtype, op); every case must raise on both ranks.
SLOT = 64 << 10
MISMATCHES = {
    "size": ((8, torch.float32, "sum"), (4, torch.float32, "sum")),
    "dtype": ((8, torch.float32, "sum"), (8, torch.float64, "sum")),
    "op": ((8, torch.float32, "sum"), (8, torch.float32, "max")),
    # The first chunks are alike (a full slot each); the whole tensors' sizes tell them apart.
    "chunked_size": ((2 * SLOT // 4 + 7, torch.float32, "sum"), (2 * SLOT // 4, torch.float32, "sum")),
}


def _mismatch_worker(rank: int, store_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    report: dict = {}
    for case, calls in MISMATCHES.items():
        state = SharedMemoryAllreduce.create(max_bytes=SLOT)  # a fresh one: a mismatch leaves it unusable
        matched = state.all_reduce_(torch.full((5,), 1.0 + rank))  # a matching call first: it just works
        numel, dtype, op = calls[rank]
        try:
            state.all_reduce_(torch.ones(numel, dtype=dtype), op=op)
            report[case] = "no error"
        except RuntimeError as err:
            report[case] = str(err)
        report[f"{case}_matched"] = matched.tolist()
        del state
    dist.barrier()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_mismatched_calls_raise_on_every_rank(tmp_path):
    mp.start_processes(_mismatch_worker, args=(str(tmp_path), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    reports = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    expected = {
        "size": "rank 0 reduces 8 float32 elements (sum), rank 1 reduces 4 float32 elements (sum)",
        "dtype": "rank 0 reduces 8 float32 elements (sum), rank 1 reduces 8 float64 elements (sum)",
        "op": "rank 0 reduces 8 float32 elements (sum), rank 1 reduces 8 float32 elements (max)",
        "chunked_size": (
            f"rank 0 reduces {2 * SLOT // 4 + 7} float32 elements (sum), a chunk of {SLOT // 4} of them, "
            f"rank 1 reduces {2 * SLOT // 4} float32 elements (sum), a chunk of {SLOT // 4} of them"
        ),
    }
    for rank, rep in enumerate(reports):
        for case, calls in expected.items():
            message = rep[case]
            assert message.startswith("shared-memory all-reduce mismatch at call 2: "), (rank, case, message)
            assert calls in message and "same order" in message, (rank, case, message)
            assert rep[f"{case}_matched"] == [3.0] * 5, (rank, case, rep)


def test_too_little_room_in_dev_shm_is_a_reason(monkeypatch):
    class Tiny:  # 1 MiB free: a quarter of it cannot hold two ranks' double buffers of 64 KiB slots
        f_bavail, f_frsize = 256, 4096

    if shm_allreduce.unavailable_reason("cpu", True) is None:
        monkeypatch.setattr(shm_allreduce.os, "statvfs", lambda path: Tiny())
        assert shm_allreduce.unavailable_reason("cpu", True) == "too little free room in /dev/shm (1 MiB free)"
    assert shm_allreduce.unavailable_reason("cuda", True) == "the workers train on GPUs (NCCL is used)"


def test_auto_choice_follows_the_machine():
    from omegaconf import OmegaConf

    from runner.launch.runtime import gradient_allreduce

    def pick(mode="standalone", wanted="auto", device="cpu", nproc=2, cores=2):
        return gradient_allreduce(OmegaConf.create({"mode": mode, "cpu_allreduce": wanted}), device, nproc, cores)[0]

    works = shm_allreduce.unavailable_reason("cpu", single_host=True) is None
    assert pick() == ("shm" if works else "gloo")
    assert pick(nproc=4, cores=2) == "gloo"  # oversubscribed: waiting by spinning would hurt
    assert pick(nproc=4, cores=2, wanted="shm") == ("shm" if works else "gloo")  # asked for explicitly
    assert pick(wanted="gloo") == "gloo"
    assert pick(mode="multinode") == "gloo"
    assert pick(device="cuda") == "nccl"
    assert pick(nproc=1) == "gloo"
    reason = gradient_allreduce(OmegaConf.create({"mode": "multinode", "cpu_allreduce": "shm"}), "cpu", 2, 2)[1]
    assert "several machines" in reason  # the reason the preflight shows when shm was asked for


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
