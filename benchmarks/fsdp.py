"""FSDP against DDP, and sharded snapshots against single files, on a ~200 MB model with 2 CPU workers.

    python benchmarks/fsdp.py                # 3 repetitions, prints a Markdown table
    python benchmarks/fsdp.py --reps 1 --hidden 2048

The model is `model=mlp` with 5 hidden layers of `--hidden` units (3,500: 49 M parameters, 196 MB in
float32), trained with Adam (two float32 moments per parameter), so the state a worker must hold is
parameters + gradients + 2 moments = 4x 196 MB under DDP, and about a quarter of that under FSDP
with 2 workers (plus one gathered layer at a time). Each configuration is one real run of the CLI
(`--steps` optimizer steps, a snapshot every `--every` steps); what is reported comes from the run
itself: every rank's peak resident memory, the time the training loop waited for each snapshot
(its stall: the write for a synchronous snapshot, the copy for an asynchronous one), the time the
commit took behind it (hash, fsync, manifest), and the training throughput.
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

CONFIGS = {  # name: overrides
    "ddp, one file": ["trainer.strategy=ddp", "snapshot.format=file"],
    "ddp, one file, async": ["trainer.strategy=ddp", "snapshot.format=file", "snapshot.async=true"],
    "ddp, dcp shards": ["trainer.strategy=ddp", "snapshot.format=dcp"],
    "fsdp, dcp shards": ["trainer.strategy=fsdp"],
    "fsdp, dcp shards, async": ["trainer.strategy=fsdp", "snapshot.async=true"],
}


def run_once(overrides: list[str], args, cwd: Path) -> dict:
    """One run of the CLI; its figures, read from its summary and its manifest."""
    name = f"run{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        "-m",
        "runner",
        "model=mlp",
        f"model.hidden_size={args.hidden}",
        "model.depth=5",
        "optimizer=adam",
        "optimizer.lr=1e-4",
        "dataset.size=4096",
        f"trainer.max_steps={args.steps}",
        f"trainer.save_every_steps={args.every}",
        "launch.nproc_per_node=2",
        "launch.backend=gloo",
        "trainer.progress=false",
        "snapshot.keep_last=1",
        f"name={name}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    run_dir = cwd / "outputs" / name
    ranks = [float(x) for x in re.search(r"ranks ([\d, ]+) MB", out).group(1).split(",")]
    waited, count = re.search(r"training waited ([\d.]+) s for (\d+) snapshot", out).groups()
    manifest = json.loads((run_dir / "snapshots" / "manifest.json").read_text())
    newest = manifest["snapshots"][-1]
    throughput = float(re.search(r"throughput\s+: ([\d,]+) samples/s", out).group(1).replace(",", ""))
    shutil.rmtree(run_dir)
    return {
        "peak_mb": max(ranks),
        "stall_s": float(waited) / int(count),
        "commit_s": newest["commit_seconds"],
        "snapshot_mb": newest["size"] / 1e6,
        "samples_per_s": throughput,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=3500)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    params = 2 * args.hidden + args.hidden + 4 * (args.hidden * args.hidden + args.hidden) + args.hidden + 1
    cwd = Path(tempfile.mkdtemp(prefix="runner-fsdp-", dir=os.environ.get("BENCH_DIR")))
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    try:
        for rep in range(args.reps):
            names = list(CONFIGS)
            for name in (
                names[rep % len(names) :] + names[: rep % len(names)]
            ):  # rotate: the machine's moods land on all alike
                results[name].append(run_once(CONFIGS[name], args, cwd))
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}; model: MLP, "
        f"{params / 1e6:.1f} M parameters ({params * 4 / 1e6:.0f} MB), Adam, 2 CPU workers (gloo), "
        f"{args.steps} steps, a snapshot every {args.every}; medians of {args.reps}\n"
    )
    print(
        "| configuration | peak memory per worker | loop waits per snapshot | commit behind it | snapshot size | samples/s |"
    )
    print("|---|---|---|---|---|---|")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    for name, m in med.items():
        print(
            f"| {name} | {m['peak_mb']:.0f} MB | {m['stall_s']:.3f} s | {m['commit_s']:.3f} s | {m['snapshot_mb']:.0f} MB "
            f"| {m['samples_per_s']:,.0f} |"
        )
    ddp, fsdp = med["ddp, one file"], med["fsdp, dcp shards"]
    print(f"\nfsdp / ddp peak memory per worker: {fsdp['peak_mb'] / ddp['peak_mb']:.2f}x")
    print(
        f"dcp / one file, loop wait for the same state (ddp): {med['ddp, dcp shards']['stall_s'] / ddp['stall_s']:.2f}x"
    )
    print(
        f"async / sync loop wait: ddp one file {med['ddp, one file, async']['stall_s'] / ddp['stall_s']:.2f}x, "
        f"fsdp dcp {med['fsdp, dcp shards, async']['stall_s'] / fsdp['stall_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
