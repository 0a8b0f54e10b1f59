"""GPU benchmarks: the runner against the hand-written torchrun script (benchmarks/gpu_seed.py), side by side.

    python benchmarks/gpu_bench.py                       # everything, 3 repetitions: table printed and written
    python benchmarks/gpu_bench.py --reps 5 --only throughput --out /tmp/gpu.md

Run on a machine with a CUDA GPU; without one it prints "no GPU present: nothing to benchmark" and
exits 0. Every command is pinned to one GPU (CUDA_VISIBLE_DEVICES = the first visible device): the
runner with `launch.nproc_per_node=gpu` (one NCCL worker), the seed script under
`python -m torch.distributed.run --standalone --nproc_per_node=1`. Each repetition runs all the
commands of a section, interleaved in a rotating order (same machine state for both); every figure
is the median over repetitions.

- throughput: the same MLP (input 1024, 3 hidden layers of 4096, ~38M parameters, SGD, MSE) on
  65,536 random samples, batch 512, fp32. Samples/s come from whole-command walls at 1 and N
  epochs: samples x (N-1) / (wall(N) - wall(1)), so start-up, data set-up and the final snapshot
  cancel out; each program's own figure (runner summary, seed JSON) is shown beside it.
- snapshots: a ~1 GiB state of CUDA tensors (weights and two Adam moments) through SnapshotWriter
  in this process: how long training is blocked with `snapshot.async=false` (torch.save of the
  CUDA tensors) and with `snapshot.async=true` (a copy into reused pinned buffers), beside a plain
  torch.save, and the time until the version is durable.
- restart: a run of the same MLP (2 epochs, 5 snapshots) with `trainer.crash_at_step`
  (rank 0 SIGKILLed, the group restarted, the snapshot reloaded) minus the same run uninterrupted.

Sizes are chosen so that the whole thing (3 repetitions) takes about 4 minutes on one H200 (about
40 s per throughput repetition, 35 s of snapshots, 30 s per restart repetition): what differs
between the two programs is per-step and per-run overhead (data pipeline, host syncs, launch,
snapshots), which a model of this size already shows; a bigger model would only add equal GPU time.
The in-process snapshot section uses this process's current CUDA device (the first visible one).
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "benchmarks" / "gpu_seed.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
RUNNER = [
    sys.executable,
    "-m",
    "runner",
    "launch.nproc_per_node=gpu",
    "trainer.progress=false",
    "snapshot.resume=never",
]

INPUT_DIM, HIDDEN, DEPTH = 1024, 4096, 3
FAILURES: dict[str, int] = {"seed": 0, "runner": 0}


def first_visible_device() -> str:
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[0] if listed else "0"


def command_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": first_visible_device()}


def parameters() -> int:
    sizes = [INPUT_DIM] + [HIDDEN] * DEPTH + [1]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def run(cmd: list[str], cwd: Path, who: str, attempts: int = 2) -> tuple[float, str]:
    """Wall time and output of a command; a failed attempt is counted and retried once."""
    for _ in range(attempts):
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=command_env())
        wall = time.perf_counter() - started
        if proc.returncode == 0:
            return wall, proc.stdout + proc.stderr
        FAILURES[who] += 1
        print(
            f"  {who} failed (exit {proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}",
            file=sys.stderr,
            flush=True,
        )
    raise RuntimeError(f"{' '.join(cmd)} failed {attempts} times")


def seed(args, epochs: int, cwd: Path) -> dict:
    snapshot = cwd / "seed-snapshot.pt"
    snapshot.unlink(missing_ok=True)  # the script resumes from it
    wall, out = run(
        [
            *TORCHRUN,
            str(SEED),
            "--input-dim",
            str(INPUT_DIM),
            "--hidden",
            str(HIDDEN),
            "--depth",
            str(DEPTH),
            "--size",
            str(args.size),
            "--batch-size",
            str(args.batch_size),
            "--total-epochs",
            str(epochs),
            "--save-every",
            "0",
            "--snapshot-path",
            str(snapshot),
        ],
        cwd,
        "seed",
    )
    line = next(text for text in out.splitlines() if text.startswith("{"))
    return {"wall": wall, **json.loads(line)}


def runner_args(args) -> list[str]:
    return [
        "model=mlp",
        f"model.hidden_size={HIDDEN}",
        f"model.depth={DEPTH}",
        "dataset=random",
        f"dataset.input_dim={INPUT_DIM}",
        f"dataset.size={args.size}",
        f"trainer.batch_size={args.batch_size}",
        "optimizer.lr=0.001",
    ]


def runner(extra: list[str], cwd: Path) -> dict:
    run_dir = cwd / "run"
    wall, out = run([*RUNNER, *extra, f"hydra.run.dir={run_dir}"], cwd, "runner")
    shutil.rmtree(run_dir, ignore_errors=True)
    shown = re.search(r"run directory \S+: (.+), launch=", out)  # the driver's first console line
    if shown is None or shown.group(1) != "cuda x 1 (nccl)":
        raise RuntimeError(
            f"the runner did not train on one GPU with NCCL: {shown.group(0) if shown else out[-2000:]!r}"
        )
    sps = float(re.search(r"throughput\s+: ([\d,.]+) samples/s", out).group(1).replace(",", ""))
    return {"wall": wall, "samples_per_s": sps, "output": out}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def bench_throughput(args, tmp: Path) -> list[tuple]:
    n = args.epochs
    walls: dict[tuple[str, int], list[dict]] = {("seed", 1): [], ("seed", n): [], ("runner", 1): [], ("runner", n): []}
    order = list(walls)
    for rep in range(args.reps):
        for who, epochs in order[rep % 4 :] + order[: rep % 4]:
            if who == "seed":
                row = seed(args, epochs, tmp)
            else:
                row = runner([*runner_args(args), f"trainer.total_epochs={epochs}"], tmp)
            walls[(who, epochs)].append(row)
            print(
                f"  throughput rep {rep + 1}/{args.reps}: {who} {epochs} epoch(s) {row['wall']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    samples = args.size * (n - 1)
    diff = {who: median(walls[(who, n)], "wall") - median(walls[(who, 1)], "wall") for who in ("seed", "runner")}
    sps = {who: samples / d if d > 0 else float("nan") for who, d in diff.items()}
    own = {who: median(walls[(who, n)], "samples_per_s") for who in ("seed", "runner")}
    label = f"{parameters() / 1e6:.1f}M-parameter MLP, {args.size} samples, batch {args.batch_size}, fp32"
    return [
        (
            f"throughput from walls at 1 and {n} epochs ({label})",
            f"{sps['seed']:,.0f} samples/s",
            f"{sps['runner']:,.0f} samples/s",
            sps["runner"] / sps["seed"],
        ),
        (
            f"  each program's own figure ({n} epochs)",
            f"{own['seed']:,.0f} samples/s",
            f"{own['runner']:,.0f} samples/s",
            own["runner"] / own["seed"],
        ),
        (
            f"  wall of the {n - 1} extra epochs",
            f"{diff['seed']:.2f} s",
            f"{diff['runner']:.2f} s",
            diff["runner"] / diff["seed"],
        ),
        (
            "wall of a 1-epoch command (start-up, data, 1 epoch, final save)",
            f"{median(walls[('seed', 1)], 'wall'):.2f} s",
            f"{median(walls[('runner', 1)], 'wall'):.2f} s",
            median(walls[("runner", 1)], "wall") / median(walls[("seed", 1)], "wall"),
        ),
    ]


def cuda_state(nbytes: int) -> dict:
    """A snapshot in the runner's format whose model and optimizer are CUDA tensors: weights and two
    Adam moments (three equal parts), ~`nbytes` in all."""
    from runner.snapshot import make_state

    n = nbytes // 4 // 3 // 4
    device = torch.device("cuda", torch.cuda.current_device())
    model = {f"layer{i}.weight": torch.randn(n, device=device) for i in range(4)}
    optimizer = {
        "state": {
            i: {
                "step": torch.tensor(10.0),
                "exp_avg": torch.randn(n, device=device),
                "exp_avg_sq": torch.rand(n, device=device),
            }
            for i in range(4)
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1, 2, 3]}],
    }
    return make_state(
        model=model,
        optimizer=optimizer,
        scheduler=None,
        train_state={"epoch": 1, "global_step": 10, "samples_in_epoch": 0},
        rng=[{"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}],
        config={},
        world_size=1,
        allreduce="nccl",
        metrics=[],
    )


def bench_snapshots(args, tmp: Path) -> list[tuple]:
    from runner.snapshot import SnapshotManager
    from runner.snapshot.writer import SnapshotWriter

    nbytes = args.snapshot_mb * 2**20
    state = cuda_state(nbytes)
    writers = {
        "sync": SnapshotWriter(SnapshotManager(tmp / "sync", keep_last=1), asynchronous=False),
        "async": SnapshotWriter(SnapshotManager(tmp / "async", keep_last=1), asynchronous=True),
    }
    durable: dict[str, list[float]] = {"sync": [], "async": []}
    plain: list[float] = []
    # Rotating order within each repetition; each timed write starts with no dirty pages pending.
    # Repetition 0 is a warm-up (first writes into fresh page cache; pinned buffers allocated).
    measures = ("plain", "sync", "async")
    for i in range(args.reps + 1):
        for measure in measures[i % 3 :] + measures[: i % 3]:
            os.sync()
            torch.cuda.synchronize()
            started = time.perf_counter()
            if measure == "plain":
                path = tmp / "plain.pt"
                torch.save(state, str(path))  # what the seed script does: CUDA tensors straight to a file
                seconds = time.perf_counter() - started
                path.unlink()
                if i:
                    plain.append(seconds)
                continue
            writer = writers[measure]
            writer.save(state, step=i, epoch=0)
            writer.wait()  # the stall alone is recorded by the writer
            if i:
                durable[measure].append(time.perf_counter() - started)
        print(f"  snapshots rep {i}/{args.reps} done", file=sys.stderr, flush=True)
    async_buffers = writers["async"]._buffers
    pinned = all(b.is_pinned() for b in async_buffers.values() if b.numel() >= 2**20)
    stall = {k: statistics.median(w.stall_seconds[1:]) for k, w in writers.items()}
    done = {k: statistics.median(v) for k, v in durable.items()}
    p = statistics.median(plain)
    size = f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes >> 20} MiB"
    del state
    torch.cuda.empty_cache()
    return [
        (
            f"snapshot {size} of CUDA tensors: training blocked, sync vs plain torch.save",
            f"{p:.3f} s",
            f"{stall['sync']:.3f} s",
            stall["sync"] / p,
        ),
        (
            f"snapshot {size}: training blocked, async vs sync (staging pinned: {pinned})",
            f"{stall['sync']:.3f} s sync",
            f"{stall['async']:.4f} s async",
            stall["async"] / stall["sync"],
        ),
        (
            f"snapshot {size}: until durable (hash+fsync+manifest), sync vs async",
            f"{done['sync']:.2f} s sync",
            f"{done['async']:.2f} s async",
            done["async"] / done["sync"],
        ),
    ]


def bench_restart(args, tmp: Path) -> list[tuple]:
    total = 2 * -(-args.size // args.batch_size)  # 2 epochs of steps (256 with the defaults)
    every = max(1, total // 5)  # snapshots (51 with the defaults)
    crash_step = min(total - 1, 3 * every + every // 2)  # mid-way between two snapshots (178)
    task = [*runner_args(args), "trainer.total_epochs=2", f"trainer.save_every_steps={every}"]
    crash = [f"trainer.crash_at_step={crash_step}", "trainer.crash_rank=0"]
    clean, crashed = [], []
    for rep in range(args.reps):
        pair = [("clean", []), ("crashed", crash)]
        for kind, extra in pair if rep % 2 == 0 else pair[::-1]:
            row = runner([*task, *extra], tmp)
            if kind == "crashed":
                # The newest committed snapshot: 3 x every, or 2 x every when that version (hash +
                # fsync in the background) was not committed yet when the worker was killed.
                if "restart 1 after a worker failure" not in row["output"]:
                    raise RuntimeError("the crashed run was not restarted:\n" + row["output"][-3000:])
                resumed = re.search(r"resumed from snapshot-(\d+)\.pt", row["output"])
                row["resumed"] = int(resumed.group(1)) if resumed else 0  # 0: no snapshot yet, from scratch
            (clean if kind == "clean" else crashed).append(row)
            print(f"  restart rep {rep + 1}/{args.reps}: {kind} {row['wall']:.2f} s", file=sys.stderr, flush=True)
    c, k = median(clean, "wall"), median(crashed, "wall")
    resumed = "/".join(str(s) for s in sorted({r["resumed"] for r in crashed}))
    return [
        (
            f"one SIGKILL of the GPU worker at step {crash_step} of {total}, snapshots every {every} steps "
            f"(restart, NCCL, reload from step {resumed}, steps redone)",
            f"{c:.2f} s clean",
            f"{k:.2f} s crashed",
            k / c,
        ),
        ("  restart cost (crashed minus clean)", "", f"{k - c:.2f} s", None),
    ]


def nccl_version() -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a build without NCCL
        return "none"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def header(args) -> str:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    smi = ""
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", first_visible_device()],
            capture_output=True,
            text=True,
        )
        smi = f", driver {q.stdout.strip()}" if q.returncode == 0 and q.stdout.strip() else ""
    return (
        f"GPU: {torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB{smi}), CUDA_VISIBLE_DEVICES="
        f"{first_visible_device()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"NCCL {nccl_version()}; python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores, {platform.platform()}\n"
        f"reps={args.reps} (medians), seed script = benchmarks/gpu_seed.py under torchrun --nproc_per_node=1, "
        f"runner = launch.nproc_per_node=gpu (NCCL), {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--only",
        nargs="*",
        default=["throughput", "snapshots", "restart"],
        choices=["throughput", "snapshots", "restart"],
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_results.md"), help="Markdown file to write")
    parser.add_argument("--size", type=int, default=65536, help="samples in the data set")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=11, help="N: throughput from walls at 1 and N epochs")
    parser.add_argument("--snapshot-mb", type=int, default=1024, help="size of the snapshot state, MiB")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU present: nothing to benchmark")
        return 0
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")
    tmp = Path(tempfile.mkdtemp(prefix="runner-gpu-bench-", dir=os.environ.get("BENCH_DIR")))
    rows: list[tuple] = []
    started = time.perf_counter()
    try:
        if "throughput" in args.only:
            rows += bench_throughput(args, tmp)
        if "snapshots" in args.only:
            rows += bench_snapshots(args, tmp)
        if "restart" in args.only:
            rows += bench_restart(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        header(args),
        "",
        "baseline: the seed script (throughput, start-up), plain torch.save or the synchronous writer "
        "(snapshots), the uninterrupted run (restart); ratio = runner / baseline",
        "",
        "| measure | baseline | runner | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {base} | {ours} | {'' if ratio is None else f'{ratio:.2f}x'} |"
        for label, base, ours, ratio in rows
    ]
    lines += [
        "",
        f"failed attempts (retried): seed {FAILURES['seed']}, runner {FAILURES['runner']}; "
        f"benchmark wall {time.perf_counter() - started:.0f} s",
    ]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
