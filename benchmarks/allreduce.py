"""Time of one all-reduce between the workers of one machine: gloo vs the runner's shared memory.

    torchrun --standalone --nproc_per_node=2 benchmarks/allreduce.py

Rank 0 prints one JSON line per size: {"bytes", "gloo_ms", "shm_ms"} (medians over repetitions,
after checking that both give the same sums).
"""

import json
import statistics
import time

import torch
import torch.distributed as dist

from runner.train.shm_allreduce import SharedMemoryAllreduce

SIZES = (12, 256 << 10, 4 << 20, 25 << 20)  # 3 floats (the seed's gradients), ..., DDP's default bucket


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    shm = SharedMemoryAllreduce.create()
    for nbytes in SIZES:
        tensor = torch.randn(nbytes // 4)
        expected, got = tensor.clone(), tensor.clone()
        dist.all_reduce(expected)
        shm.all_reduce_(got)
        assert torch.allclose(expected, got), "the two all-reduces disagree"
        reps = 2000 if nbytes < 1 << 20 else 30
        row = {
            "bytes": nbytes,
            "gloo_ms": timed(lambda: dist.all_reduce(tensor), reps),
            "shm_ms": timed(lambda: shm.all_reduce_(tensor), reps),
        }
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
