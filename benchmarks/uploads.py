"""Snapshots in an object store with background uploads (snapshot.upload=async), against a local
S3-compatible server (moto's, in a process of its own on 127.0.0.1). Prints a table.

The server runs at the lowest priority (nice 19): a real store's CPU is not the training
machine's, and on a 2-core machine moto parsing every uploaded byte in Python would otherwise be
counted as the uploader's cost.

1. The loop's wait per snapshot: the time the training thread spends in `save()` and in the wait
   for the staged copy before the optimizer step, with the versions uploaded in the background
   vs kept on local disk only (both with snapshot.async=true). Also the mean step time of the same
   loops: the upload's share of the CPU shows there, not in the wait. Goal: wait at most 1.05x.
2. Upload throughput of the background uploader (verify the cached copy, upload under its own
   name, read back size + sha256, publish the manifest) vs a plain s3fs `put_file` of the same
   bytes. Goal: >= 0.9x.

    python benchmarks/uploads.py --reps 3
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import _Trainee  # noqa: E402  (the same Linear+AdamW model the async snapshot figures use)

BUCKET = "bench"


def start_server() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    os.environ.update(env)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, env


def loop_wait(nbytes: int, reps: int, tmp: Path, fs) -> list[tuple]:
    """Median wait per snapshot and mean step time, local-only async vs async + background upload."""
    from runner.snapshot import SnapshotManager
    from runner.snapshot.cached import CachedManager
    from runner.snapshot.object_store import ObjectStore
    from runner.snapshot.writer import SnapshotWriter

    trainee = _Trainee(nbytes)
    started = time.perf_counter()
    for _ in range(5):
        trainee.forward_backward()
        trainee.optimizer.step()
    step = (time.perf_counter() - started) / 5
    # Snapshots as far apart as twice an upload takes (at ~40 MB/s here): the store keeps up, as
    # it must in a real run (one that snapshots faster than it uploads only queues versions up).
    every, snapshots = max(10, math.ceil(2 * nbytes / (40 * 2**20) / step)), 4
    waits: dict[str, list[float]] = {"local": [], "store": []}
    steps: dict[str, list[float]] = {"local": [], "store": []}
    for rep in range(reps + 1):
        for kind in ("local", "store") if rep % 2 else ("store", "local"):
            folder = tmp / f"{kind}-{rep}"
            if kind == "local":
                manager = SnapshotManager(folder / "snapshots", keep_last=1)
            else:
                remote = SnapshotManager(
                    None, keep_last=1, store=ObjectStore(f"s3://{BUCKET}/{rep}", folder / "st", fs)
                )
                manager = CachedManager(folder / "snapshot-cache", remote)
            writer = SnapshotWriter(manager, asynchronous=True)
            started = time.perf_counter()
            for step in range(1, every * snapshots + 1):
                if step % every == 0:
                    writer.save(trainee.state(), step=step, epoch=0)
                trainee.forward_backward()
                writer.wait_staged()
                trainee.optimizer.step()
            elapsed = time.perf_counter() - started
            writer.wait()
            manager.finish_uploads(600)
            manager.close()
            if rep:  # repetition 0 warms up (buffers, page cache, the server)
                waits[kind].extend(writer.stall_seconds)
                steps[kind].append(elapsed / (every * snapshots))
    label = f"{nbytes / 2**20:.0f} MB"
    lw, sw = statistics.median(waits["local"]), statistics.median(waits["store"])
    ls, ss = statistics.median(steps["local"]), statistics.median(steps["store"])
    return [
        (
            f"{label}: loop wait per snapshot, store (async upload) vs local only",
            f"{lw * 1e3:.2f} ms",
            f"{sw * 1e3:.2f} ms",
            sw / lw,
        ),
        (
            f"{label}:   mean step time, snapshot every {every} steps",
            f"{ls * 1e3:.1f} ms",
            f"{ss * 1e3:.1f} ms",
            ss / ls,
        ),
    ]


def throughput(nbytes: int, reps: int, tmp: Path, fs) -> list[tuple]:
    """MB/s of a plain s3fs put_file vs the uploader's whole upload of one cached version."""
    from runner.snapshot import SnapshotManager
    from runner.snapshot.object_store import ObjectStore
    from runner.snapshot.upload import Uploader

    local = SnapshotManager(tmp / "cache", keep_last=1)
    version = local.save({"blob": torch.randint(0, 255, (nbytes,), dtype=torch.uint8)}, step=1, epoch=0)
    path = tmp / "cache" / version.file
    remote = SnapshotManager(None, keep_last=1, store=ObjectStore(f"s3://{BUCKET}/tp", tmp / "st", fs))
    uploader = Uploader(local, remote)
    plain, ours = [], []
    for rep in range(reps + 1):
        for kind in ("plain", "ours") if rep % 2 else ("ours", "plain"):
            if fs.exists(f"{BUCKET}/tp"):
                fs.rm(f"{BUCKET}/tp", recursive=True)  # nothing listed: each upload is a real one
            started = time.perf_counter()
            if kind == "plain":
                fs.put_file(str(path), f"{BUCKET}/plain/{rep}")
            else:
                uploader.upload(version, None, new=True)  # as for a version this process wrote
            seconds = time.perf_counter() - started
            if rep:  # repetition 0 warms up
                (plain if kind == "plain" else ours).append(nbytes / 2**20 / seconds)
    uploader.close()
    p, o = statistics.median(plain), statistics.median(ours)
    label = f"{nbytes / 2**20:.0f} MB"
    return [(f"{label}: upload throughput, uploader vs plain s3fs put_file", f"{p:.0f} MB/s", f"{o:.0f} MB/s", o / p)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    torch.set_num_threads(1)
    proc, _ = start_server()
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for mb in args.sizes_mb:
                rows += loop_wait(mb * 2**20, args.reps, Path(tmp) / f"wait-{mb}", fs)
            for mb in args.sizes_mb:
                rows += throughput(mb * 2**20, args.reps, Path(tmp) / f"tp-{mb}", fs)
    finally:
        proc.terminate()
        proc.wait()
    print("| measure | baseline | ours | ratio |\n|---|---|---|---|")
    for name, base, ours, ratio in rows:
        print(f"| {name} | {base} | {ours} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
