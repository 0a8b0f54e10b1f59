"""Time to resume a large state from an object store against from local disk.

    python benchmarks/store_resume.py                 # 500 MB state, 3 repetitions; prints the table
    python benchmarks/store_resume.py --mb 100 --reps 5

One version of a `--mb` MB state (an MLP-shaped state dict of float32 tensors) is written once to a
local snapshot folder and once to an S3 bucket served by moto's S3 server on 127.0.0.1 (the same
server the tests use; a real bucket adds the network's latency and bandwidth). A resume is what a
worker does: the manager's newest-loadable walk, which reads the manifest, downloads the listed
object, checks its size and sha256 and unpickles it weights-only. "plain s3fs get" is the floor: the
same object read by one `cat_file` with no verification and no unpickling. Every figure is a median.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.snapshot import SnapshotManager, make_state  # noqa: E402
from runner.snapshot.object_store import ObjectStore  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(mb: int) -> dict:
    """Weights and Adam's two moments of square layers: `mb` MB in all."""
    side = 1024
    layers = max(1, round(mb * 2**20 / (3 * side * side * 4)))
    model = {f"layer{i}.weight": torch.randn(side, side) for i in range(layers)}
    moments = {i: {"exp_avg": torch.randn(side, side), "exp_avg_sq": torch.rand(side, side)} for i in range(layers)}
    optimizer = {"state": moments, "param_groups": []}
    return make_state(
        model=model,
        optimizer=optimizer,
        scheduler=None,
        train_state={},
        rng=[],
        config={},
        world_size=1,
        allreduce="gloo",
        metrics=[],
    )


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request lines

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    state = _state(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        local = SnapshotManager(Path(tmp) / "snapshots")
        remote = SnapshotManager(None, store=ObjectStore("s3://bench/run", Path(tmp) / "staging"))
        version = local.save(state, step=1, epoch=0)
        remote_version = remote.save(state, step=1, epoch=0)
        size = version.size / 1e6
        key = f"bench/run/{remote_version.object}"
        rows = {"local disk (verified load)": [], "object store (verified load)": [], "plain s3fs get": []}
        for _ in range(args.reps):
            rows["local disk (verified load)"].append(
                _timed(lambda: SnapshotManager(Path(tmp) / "snapshots").load_latest())
            )
            fresh = SnapshotManager(None, store=ObjectStore("s3://bench/run", Path(tmp) / "staging"))
            rows["object store (verified load)"].append(_timed(fresh.load_latest))
            rows["plain s3fs get"].append(_timed(lambda: fs.cat_file(key)))
    server.stop()
    print(f"resume of one {size:.0f} MB version, median of {args.reps}")
    print(f"{'source':32} {'seconds':>8} {'MB/s':>8}")
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"{name:32} {median:8.2f} {size / median:8.0f}")


if __name__ == "__main__":
    main()
