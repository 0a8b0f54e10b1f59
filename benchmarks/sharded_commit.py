"""The lead's commit time of a sharded snapshot as the ranks grow (CPU, gloo, small shards).

    python benchmarks/sharded_commit.py                     # 2, 4 and 8 ranks, 16 MB per rank
    python benchmarks/sharded_commit.py --ranks 2 4 --mb 32 --reps 5

Each rank holds `--mb` MB of its own tensors and saves them `--reps` times through the runner's
sharded writer (`ShardedSnapshotWriter`, synchronous, as snapshot.format=dcp does). Reported, as
medians: each rank's write time (the loop's stall: DCP's write of its own file, and with digests
its hashing and fsync) and the lead's commit time as the manifest records it (`commit_seconds`:
from every rank's files on disk to the published manifest). Before shard digests, the lead hashed
and fsync'ed every rank's file there, so its commit grew with the ranks; now it reads none.
Run it with PYTHONPATH pointing at another checkout to measure that checkout's code.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: int, mb: int, reps: int, folder: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from runner.snapshot import SnapshotManager
    from runner.snapshot import format as snap
    from runner.snapshot.sharded import ShardedSnapshotWriter

    manager = SnapshotManager(folder, keep_last=1)
    writer = ShardedSnapshotWriter(manager, lead=rank == 0)
    numel = mb * 2**20 // 4
    shards = {"model": {f"rank{rank}.w": torch.randn(numel)}, "optimizer": {}}  # one tensor of its own per rank
    state = {snap.FORMAT_KEY: snap.FORMAT_VERSION, "train_state": {}, "rng": [], "metrics": []}
    writes, commits = [], []
    for step in range(1, reps + 1):
        dist.barrier()
        writer.save(state if rank == 0 else None, step, 0, shards=shards, tag=f"bench{step}")
        writer.wait()
        writes.append(writer.stall_seconds[-1])
        if rank == 0:
            commits.append(writer.last_entry["commit_seconds"])
    writer.close()
    out.put((rank, writes, commits))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, mb: int, reps: int) -> tuple[float, float, float]:
    """(median commit of the lead, median write of the median rank, slowest rank's median write)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        procs = [
            ctx.Process(target=worker, args=(r, world, port, mb, reps, str(Path(folder) / "snaps"), out))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
    writes = sorted(statistics.median(w) for _, w, _ in results)
    commits = next(c for r, _, c in results if r == 0)
    return statistics.median(commits), writes[len(writes) // 2], writes[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--mb", type=int, default=16, help="MB each rank writes")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import runner

    print(
        f"runner from {Path(runner.__file__).parent.parent}, torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.mb} MB per rank, median of {args.reps}"
    )
    print("| ranks | bytes in all | lead's commit | rank's write (median rank) | slowest rank's write |")
    print("|---:|---:|---:|---:|---:|")
    for world in args.ranks:
        commit, write, slowest = measure(world, args.mb, args.reps)
        print(
            f"| {world} | {world * args.mb} MB | {commit * 1e3:.1f} ms | {write * 1e3:.0f} ms | {slowest * 1e3:.0f} ms |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
