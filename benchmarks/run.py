"""Benchmark the runner against the hand-written torchrun script, and its snapshots against torch.save.

    python benchmarks/run.py                 # everything, 3 repetitions, prints a Markdown table
    python benchmarks/run.py --reps 5 --only throughput startup

Baseline and runner run alternately in the same invocation (same machine state), on the same
task, 2 CPU workers (gloo). Each figure is the median over repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks" / "seed_baseline.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RUNNER = [sys.executable, "-m", "runner", "launch.nproc_per_node=2", "trainer.progress=false", "snapshot.resume=never"]

SEED_TASK = {
    "baseline": ["--total-epochs", "20", "--batch_size", "32"],
    "runner": ["trainer.total_epochs=20", "trainer.batch_size=32", "trainer.save_every=10", "optimizer.lr=0.001"],
}
LARGE_TASK = {
    "baseline": [
        "--total-epochs",
        "3",
        "--batch_size",
        "256",
        "--size",
        "65536",
        "--input-dim",
        "64",
        "--model",
        "mlp",
        "--save-every",
        "1",
    ],
    "runner": [
        "trainer.total_epochs=3",
        "trainer.batch_size=256",
        "dataset.size=65536",
        "dataset.input_dim=64",
        "model=mlp",
        "model.hidden_size=64",
        "optimizer.lr=0.001",
        "trainer.save_every=1",
    ],
}
ONE_EPOCH = {"baseline": ["--total-epochs", "1"], "runner": ["trainer.total_epochs=1", "optimizer.lr=0.001"]}


FAILURES: Counter = Counter()  # crashed (and retried) attempts per tool


def run(cmd: list[str], cwd: Path, who: str, attempts: int = 3, before_attempt=lambda: None) -> tuple[float, str]:
    """Wall time and output of a command; a crashed attempt is counted and retried."""
    for _ in range(attempts):
        before_attempt()
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - started
        if proc.returncode == 0:
            return wall, proc.stdout + proc.stderr
        FAILURES[who] += 1
    raise RuntimeError(f"{' '.join(cmd)} failed {attempts} times:\n{proc.stdout}\n{proc.stderr}")


def baseline(task: dict, cwd: Path) -> dict:
    snapshot = cwd / "snapshot.pt"  # removed before every attempt: the script resumes from it
    wall, out = run(
        [*TORCHRUN, str(BASELINE), *task["baseline"], "--snapshot-path", str(snapshot)],
        cwd,
        "baseline",
        before_attempt=lambda: snapshot.unlink(missing_ok=True),
    )
    snapshot.unlink(missing_ok=True)
    line = next(text for text in out.splitlines() if text.startswith("{"))
    return {"wall": wall, **json.loads(line)}


def runner(task: dict, cwd: Path, extra: tuple = ()) -> dict:
    wall, out = run([*RUNNER, *task["runner"], *extra, f"hydra.run.dir={cwd / 'run'}"], cwd, "runner")
    sps = float(re.search(r"throughput\s+: ([\d,]+) samples/s", out).group(1).replace(",", ""))
    mem = re.search(r"peak memory\s+: driver (\d+) MB, rank 0 (\d+) MB", out)
    shutil.rmtree(cwd / "run", ignore_errors=True)
    return {"wall": wall, "samples_per_s": sps, "driver_mb": float(mem.group(1)), "worker_mb": float(mem.group(2))}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def bench_training(reps: int, tmp: Path) -> list[tuple]:
    out = []
    for label, task, metric in [
        ("throughput, seed task (2048 x 2, linear, batch 32)", SEED_TASK, "samples_per_s"),
        ("throughput, large task (65536 x 64, mlp, batch 256)", LARGE_TASK, "samples_per_s"),
        ("wall time of a 1-epoch command (startup)", ONE_EPOCH, "wall"),
    ]:
        b, r, g = [], [], []
        for _ in range(reps):
            b.append(baseline(task, tmp))
            r.append(runner(task, tmp))
            if metric == "samples_per_s":  # where the speed comes from: the same runner with gloo's all-reduce
                g.append(runner(task, tmp, ("launch.cpu_allreduce=gloo",)))
        mb, mr = median(b, metric), median(r, metric)
        unit = "samples/s" if metric == "samples_per_s" else "s"
        out.append((label, f"{mb:,.1f} {unit}", f"{mr:,.1f} {unit}", mr / mb))
        if g:
            out.append(
                (
                    "  same, runner with launch.cpu_allreduce=gloo",
                    "",
                    f"{median(g, metric):,.1f} {unit}",
                    median(g, metric) / mb,
                )
            )
        if metric == "wall":
            out.append(
                (
                    "peak RSS, driver / rank-0 worker",
                    "",
                    f"{median(r, 'driver_mb'):.0f} MB / {median(r, 'worker_mb'):.0f} MB",
                    None,
                )
            )
    return out


def bench_crash(reps: int, tmp: Path) -> list[tuple]:
    task = {"runner": ["model=mlp", "dataset.size=16384", "trainer.total_epochs=4", "trainer.save_every_steps=50"]}
    clean, crashed = [], []
    for _ in range(reps):
        clean.append(runner(task, tmp))
        crashed.append(runner(task, tmp, ("trainer.crash_at_step=300", "trainer.crash_rank=1")))
    extra = median(crashed, "wall") - median(clean, "wall")
    return [
        (
            "one injected SIGKILL mid-run (restart + reload)",
            f"{median(clean, 'wall'):.2f} s clean",
            f"{median(crashed, 'wall'):.2f} s crashed",
            median(crashed, "wall") / median(clean, "wall"),
        ),
        ("  extra wall time of the crash", "", f"{extra:.2f} s", None),
    ]


def bench_allreduce(reps: int, tmp: Path) -> list[tuple]:
    """One all-reduce between 2 local workers: gloo over TCP vs the runner's shared memory."""
    runs = []
    for _ in range(reps):
        _, out = run([*TORCHRUN, str(ROOT / "benchmarks" / "allreduce.py")], tmp, "runner")
        runs.append({r["bytes"]: r for r in (json.loads(text) for text in out.splitlines() if text.startswith("{"))})
    rows = []
    for nbytes in runs[0]:
        gloo = statistics.median(r[nbytes]["gloo_ms"] for r in runs)
        shm = statistics.median(r[nbytes]["shm_ms"] for r in runs)
        size = f"{nbytes} B" if nbytes < 1024 else f"{nbytes >> 10} KB" if nbytes < 1 << 20 else f"{nbytes >> 20} MB"
        rows.append(
            (f"all-reduce of {size}, 2 workers: gloo vs shared memory", f"{gloo:.3f} ms", f"{shm:.3f} ms", shm / gloo)
        )
    return rows


class _Trainee:
    """A model of Linear layers and its AdamW state, sized so that a snapshot (weights + two Adam
    moments) holds about `nbytes`, with one training step (batch 32) to run beside a snapshot."""

    def __init__(self, nbytes: int) -> None:
        width = 1024
        layers = max(1, round(nbytes / 3 / 4 / (width * width)))
        self.model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(32, width)
        self.forward_backward()
        self.optimizer.step()  # the moments exist: the state has its full size

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.x).square().mean().backward()

    def state(self) -> dict:
        return {
            "format_version": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_state": {"epoch": 1, "global_step": 10},
        }


def bench_snapshots(reps: int, tmp: Path) -> list[tuple]:
    from runner.snapshot import SnapshotManager
    from runner.snapshot.writer import SnapshotWriter

    out = []
    for label, nbytes in [("10 MB", 10 * 2**20), ("500 MB", 500 * 2**20)]:
        trainee = _Trainee(nbytes)
        state = trainee.state()
        sync_writer = SnapshotWriter(SnapshotManager(tmp / "sync", keep_last=1), asynchronous=False)
        async_writer = SnapshotWriter(SnapshotManager(tmp / "async", keep_last=1), asynchronous=True)
        durable_mgr = SnapshotManager(tmp / "snaps", keep_last=1)
        times: dict[str, list[float]] = {"plain": [], "plain_fsync": [], "durable": [], "step": [], "async_step": []}

        def plain(path: Path, fsync: bool) -> float:
            started = time.perf_counter()
            torch.save(state, str(path))  # a path, as people write it (a file object is slower)
            if fsync:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            seconds = time.perf_counter() - started
            path.unlink()
            return seconds

        def durable(step: int) -> float:
            started = time.perf_counter()
            durable_mgr.save(state, step=step, epoch=0)
            return time.perf_counter() - started

        def training_step(writer=None, step: int = 0) -> float:
            """One step as the loop runs it, with an asynchronous snapshot taken right before it
            when `writer` is given: the copy runs beside forward and backward, and the step waits
            for it only before the optimizer changes the weights (as the engine does)."""
            started = time.perf_counter()
            if writer is not None:
                writer.save(state, step=step, epoch=0)
            trainee.forward_backward()
            if writer is not None:
                writer.wait_staged()
            trainee.optimizer.step()
            return time.perf_counter() - started

        # The measures alternate within each repetition, in a rotating order, so that the disk's
        # and the host's moods land on all of them alike (on a VM whose freed memory goes back to
        # the host, the same 500 MB torch.save takes 0.2 s or 0.9 s depending on what was freed
        # just before). Each timed write starts with no dirty pages pending (os.sync). Repetition
        # 0 is a warm-up (first writes into fresh page cache; staging buffers allocated).
        measures = ("plain", "sync", "async", "plain_fsync", "durable", "step")
        for i in range(reps + 1):
            for measure in measures[i % len(measures) :] + measures[: i % len(measures)]:
                os.sync()
                if measure == "sync":
                    sync_writer.save(state, step=i, epoch=0)
                    sync_writer.wait()  # the stall alone is recorded by the writer, not this wait
                    continue
                if measure == "async":
                    seconds = training_step(async_writer, i)
                    async_writer.wait()
                elif measure == "step":
                    seconds = training_step()
                else:
                    seconds = (
                        plain(tmp / "plain.pt", measure == "plain_fsync") if measure.startswith("plain") else durable(i)
                    )
                if i:
                    times["async_step" if measure == "async" else measure].append(seconds)
        stall_sync, stall_async = sync_writer.stall_seconds[1:], async_writer.stall_seconds[1:]
        p, ps, d, ss, sa, st, ast = (
            statistics.median(x)
            for x in (
                times["plain"],
                times["plain_fsync"],
                times["durable"],
                stall_sync,
                stall_async,
                times["step"],
                times["async_step"],
            )
        )
        out.append(
            (f"snapshot {label}: training blocked (sync) vs plain torch.save", f"{p:.3f} s", f"{ss:.3f} s", ss / p)
        )
        out.append(
            (
                f"snapshot {label}: until durable (hash+fsync+manifest) vs torch.save+fsync",
                f"{ps:.3f} s",
                f"{d:.3f} s",
                d / ps,
            )
        )
        out.append(
            (f"snapshot {label}: training blocked, async vs sync", f"{ss:.3f} s sync", f"{sa:.4f} s async", sa / ss)
        )
        out.append(
            (
                "  the training step with the async snapshot vs without (Linear layers, batch 32)",
                f"{st:.4f} s",
                f"{ast:.4f} s",
                ast / st,
            )
        )
        for folder in ("snaps", "sync", "async"):
            shutil.rmtree(tmp / folder, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--only",
        nargs="*",
        default=["training", "allreduce", "snapshots", "crash"],
        help="sections: training (throughput, startup, memory), allreduce, snapshots, crash",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="runner-bench-", dir=os.environ.get("BENCH_DIR")))
    rows: list[tuple] = []
    try:
        if "training" in args.only:
            rows += bench_training(args.reps, tmp)
        if "allreduce" in args.only:
            rows += bench_allreduce(args.reps, tmp)
        if "snapshots" in args.only:
            rows += bench_snapshots(args.reps, tmp)
        if "crash" in args.only:
            rows += bench_crash(args.reps, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}, reps={args.reps} (medians)\n"
    )
    print("| measure | baseline | runner | ratio |\n|---|---|---|---|")
    for label, base, ours, ratio in rows:
        print(f"| {label} | {base} | {ours} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    print(f"\ncrashed attempts (retried): baseline {FAILURES['baseline']}, runner {FAILURES['runner']}")


if __name__ == "__main__":
    main()
