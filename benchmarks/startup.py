"""Start-up, restarts and sweeps, side by side with the seed script and Lightning, in one run.

    python benchmarks/startup.py                  # 3 repetitions, ~6 minutes; prints the tables
    python benchmarks/startup.py --reps 5 --epochs 80

The seed task (2,048 samples, 2 features, Linear, SGD lr 1e-3, batch 32 per worker, 2 CPU workers,
gloo, a checkpoint every 10 epochs) as whole commands, each run at 1 and at N epochs:

- seed script: python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/seed_baseline.py
- Lightning:   python benchmarks/seed_lightning.py E    (Trainer(strategy="ddp", devices=2))
- runner:      python -m runner trainer.total_epochs=E trainer.batch_size=32 optimizer.lr=0.001
               trainer.save_every=10 launch.nproc_per_node=2 launch.backend=gloo ...
               (its default start method, and again with launch.start_method=spawn)
- the floor:   torchrun of a script that only joins a process group (benchmarks/join_only.py)

Throughput = 2,048 x (N - 1) / (wall(N) - wall(1)): what N - 1 more epochs cost, start-up excluded.
Restart: the runner's 20-epoch run with one injected SIGKILL of a worker (trainer.crash_at_step)
against the same run without, the difference being what the crash cost (restart, reload, steps
redone since the last snapshot). Sweep: `--multirun` of 8 one-epoch jobs (trainer.seed=1..8)
against the same 8 jobs as separate commands. Every figure is a median over repetitions; the
commands run interleaved in an order that rotates from one repetition to the next.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BASELINE, FAILURES, TORCHRUN, run  # noqa: E402  (benchmarks/run.py)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 2048
RUNNER = [
    sys.executable,
    "-m",
    "runner",
    "launch.nproc_per_node=2",
    "launch.backend=gloo",
    "trainer.progress=false",
    "trainer.batch_size=32",
    "optimizer.lr=0.001",
    "trainer.save_every=10",
]
SWEEP_JOBS = 8

for who in ("script", "lightning", "runner", "runner_spawn", "join", "crash", "sweep", "separate"):
    FAILURES[who] += 0  # listed in the report even when nothing crashed


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.count = tmp, 0

    def fresh(self, who: str) -> Path:
        self.count += 1
        path = self.tmp / f"{who}-{self.count}"
        path.mkdir()
        return path

    def timed(self, cmd: list[str], who: str) -> float:
        cwd = self.fresh(who)
        wall, _ = run(cmd, cwd, who)
        shutil.rmtree(cwd, ignore_errors=True)
        return wall

    def script(self, epochs: int) -> float:
        return self.timed([*TORCHRUN, str(BASELINE), "--total-epochs", str(epochs), "--batch_size", "32"], "script")

    def lightning(self, epochs: int) -> float:
        return self.timed([sys.executable, str(ROOT / "benchmarks" / "seed_lightning.py"), str(epochs)], "lightning")

    def runner(self, epochs: int, *extra: str, who: str = "runner") -> float:
        return self.timed([*RUNNER, f"trainer.total_epochs={epochs}", *extra, "hydra.run.dir=run"], who)

    def join(self) -> float:
        return self.timed([*TORCHRUN, str(ROOT / "benchmarks" / "join_only.py")], "join")

    def sweep(self) -> float:
        seeds = ",".join(str(s) for s in range(1, SWEEP_JOBS + 1))
        return self.timed(
            [
                *RUNNER[:3],
                "--multirun",
                *RUNNER[3:],
                f"trainer.seed={seeds}",
                "trainer.total_epochs=1",
                "hydra.sweep.dir=sweep",
            ],
            "sweep",
        )

    def separate(self) -> float:
        cwd = self.fresh("separate")
        total = sum(
            run([*RUNNER, f"trainer.seed={s}", "trainer.total_epochs=1", f"hydra.run.dir=run-{s}"], cwd, "separate")[0]
            for s in range(1, SWEEP_JOBS + 1)
        )
        shutil.rmtree(cwd, ignore_errors=True)
        return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=80, help="N, the long run (the short one is 1 epoch)")
    args = parser.parse_args()
    n = args.epochs
    tmp = Path(tempfile.mkdtemp(prefix="runner-startup-bench-", dir=os.environ.get("BENCH_DIR")))
    bench = Bench(tmp)
    crash = ("trainer.save_every_steps=50", "trainer.crash_at_step=300", "trainer.crash_rank=1")
    measures = {
        ("script", 1): lambda: bench.script(1),
        ("script", n): lambda: bench.script(n),
        ("lightning", 1): lambda: bench.lightning(1),
        ("lightning", n): lambda: bench.lightning(n),
        ("runner", 1): lambda: bench.runner(1),
        ("runner", n): lambda: bench.runner(n),
        ("runner_spawn", 1): lambda: bench.runner(1, "launch.start_method=spawn", who="runner_spawn"),
        ("join", 1): bench.join,
        ("clean", 20): lambda: bench.runner(20, "trainer.save_every_steps=50"),
        ("crash", 20): lambda: bench.runner(20, *crash, who="crash"),
        ("sweep", 1): bench.sweep,
        ("separate", 1): bench.separate,
    }
    keys = list(measures)
    walls: dict[tuple, list[float]] = {k: [] for k in keys}
    started = time.perf_counter()
    try:
        for rep in range(args.reps):
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                walls[key].append(measures[key]())
                print(
                    f"  rep {rep + 1}/{args.reps} {key[0]:<13} {key[1]:>3} epochs: {walls[key][-1]:6.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    elapsed = time.perf_counter() - started

    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, python "
        f"{platform.python_version()}, reps={args.reps} (medians), N={n}; benchmark took {elapsed / 60:.1f} min\n"
    )
    print(
        f"| command | 1-epoch wall | {n}-epoch wall | samples/s, {SAMPLES:,} x {n - 1} / wall difference |\n|---|---|---|---|"
    )
    for tool, label in [
        ("script", "seed script under torchrun --standalone"),
        ("lightning", "PyTorch Lightning Trainer, ddp, 2 CPU processes"),
        ("runner", "runner (workers forked from the preloaded fork server)"),
    ]:
        sps = SAMPLES * (n - 1) / (med[(tool, n)] - med[(tool, 1)])
        print(f"| {label} | {med[(tool, 1)]:.2f} s | {med[(tool, n)]:.2f} s | {sps:,.0f} |")
    print(
        f"| runner, launch.start_method=spawn (as torchrun starts workers) | {med[('runner_spawn', 1)]:.2f} s |  |  |"
    )
    print(f"| torchrun of a script that only joins a process group | {med[('join', 1)]:.2f} s |  |  |")

    runner_sps = SAMPLES * (n - 1) / (med[("runner", n)] - med[("runner", 1)])
    script_sps = SAMPLES * (n - 1) / (med[("script", n)] - med[("script", 1)])
    extra = med[("crash", 20)] - med[("clean", 20)]
    sweep, separate = med[("sweep", 1)], med[("separate", 1)]
    print("\n| target | figure | met? |\n|---|---|---|")
    rows = [
        (
            "1-epoch command <= 0.75x the seed script's",
            f"{med[('runner', 1)] / med[('script', 1)]:.2f}x",
            med[("runner", 1)] <= 0.75 * med[("script", 1)],
        ),
        (
            "1-epoch command <= torchrun of a join-only script",
            f"{med[('runner', 1)]:.2f} s vs {med[('join', 1)]:.2f} s",
            med[("runner", 1)] <= med[("join", 1)],
        ),
        (
            "a worker crash costs <= one such start-up",
            f"+{extra:.2f} s ({med[('crash', 20)]:.2f} vs {med[('clean', 20)]:.2f} s) vs {med[('join', 1)]:.2f} s",
            extra <= med[("join", 1)],
        ),
        (
            f"--multirun of {SWEEP_JOBS} one-epoch jobs <= 0.6x {SWEEP_JOBS} separate commands",
            f"{sweep:.2f} s vs {separate:.2f} s = {sweep / separate:.2f}x",
            sweep <= 0.6 * separate,
        ),
        ("throughput >= 2x the seed script's", f"{runner_sps / script_sps:.2f}x", runner_sps >= 2 * script_sps),
    ]
    for label, figure, met in rows:
        print(f"| {label} | {figure} | {'yes' if met else '**no**'} |")
    print("\ncrashed attempts (retried): " + ", ".join(f"{k} {v}" for k, v in FAILURES.items()))


if __name__ == "__main__":
    main()
