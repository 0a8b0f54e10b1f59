"""What watching a run costs: samples/s with the step-time breakdown, TFLOP/s (FLOPs counted on the
first step), memory in the rows and the hang watchdog's heartbeat, against the same runner before
any of it existed (a git worktree of the commit before `runner/train/observer.py` was added).

    python benchmarks/observe_overhead.py              # 5 repetitions, ~3 minutes; prints the tables
    python benchmarks/observe_overhead.py --reps 9 --base <commit>
    python benchmarks/observe_overhead.py --reps 0     # the per-step cost of the hooks alone (seconds)

First the hooks alone, in this process: what the loop calls per step (the timed step with its
staging wait, the step's end with the heartbeat) around an engine that
does nothing, against calling that engine directly; the difference is the cost per step, which
does not depend on the workload, so it can be set against any step time.

The workload is training_rows.py's: the default regression task with an MLP, 65,536 samples, 3
epochs, 2 CPU workers (gloo, shared-memory gradients), a row every 50 steps (the default), so a
step is ~0.3 ms and any per-step cost would show. Each command's summary line "throughput : N
samples/s" (training time only) is read; the two trees run interleaved, in an order that alternates
from one repetition to the next, and every figure is a median.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def base_commit() -> str:
    """The commit before the one that added the observer (the loop without any of it)."""
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "runner/train/observer.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not added:
        raise SystemExit("runner/train/observer.py has no history here: pass --base <commit>")
    return added[-1] + "^"


def samples_per_s(tree: Path, size: int, epochs: int, cwd: str, name: str) -> float:
    args = [
        sys.executable,
        "-m",
        "runner",
        "model=mlp",
        f"dataset.size={size}",
        f"trainer.total_epochs={epochs}",
        "trainer.progress=false",
        "launch.nproc_per_node=2",
        "launch.backend=gloo",
        "snapshot.resume=never",
        f"name={name}",
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"throughput\s*:\s*([\d,]+) samples/s", out).group(1).replace(",", ""))


def hook_cost(steps: int = 20000, rounds: int = 15) -> tuple[float, float]:
    """(seconds per step of the bare call, of the call with every per-step hook), medians of `rounds`."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))  # this tree's runner, whatever is installed
    from runner.train import watchdog
    from runner.train.observer import Observer

    class Idle:
        def train_step(self, window, wait):
            wait()
            return None

    with tempfile.TemporaryDirectory() as folder:
        watchdog._current = watchdog.Heartbeat(watchdog.heartbeat_path(Path(folder), 0))  # as under an agent
        watchdog.phase("training")
        observer, engine, window = Observer(torch.device("cpu")), Idle(), [None]
        observer.throughput.counting = False  # counted once, on the first step: not a per-step cost

        def nothing() -> None:
            pass

        def bare() -> float:
            started = time.perf_counter()
            for _ in range(steps):
                engine.train_step(window, nothing)
            return (time.perf_counter() - started) / steps

        def hooked() -> float:
            started = time.perf_counter()
            for step in range(steps):
                observer.train_step(engine, window, 32, nothing)
                observer.step_done(step + 1)
            return (time.perf_counter() - started) / steps

        times = [(bare(), hooked()) for _ in range(rounds)]
        watchdog._current.close()
        watchdog._current = None
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--base", default=None, help="the commit to compare with (default: before the observer)")
    opts = parser.parse_args()
    bare, hooked = hook_cost()
    extra = (hooked - bare) * 1e6
    print(f"per step: bare call {bare * 1e6:.2f} us, with the hooks {hooked * 1e6:.2f} us: +{extra:.2f} us")
    if opts.reps <= 0:
        return
    base = subprocess.run(
        ["git", "rev-parse", "--short=12", opts.base or base_commit()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), base], cwd=ROOT, check=True)
        try:
            trees = {f"before ({base})": before, "with observability (this tree)": ROOT}
            results: dict[str, list[float]] = {name: [] for name in trees}
            names = list(trees)
            for rep in range(opts.reps):
                for name in names if rep % 2 == 0 else names[::-1]:
                    cwd = Path(tmp) / "runs"
                    cwd.mkdir(exist_ok=True)
                    value = samples_per_s(trees[name], opts.size, opts.epochs, str(cwd), f"bench-{names.index(name)}")
                    results[name].append(value)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    reference = statistics.median(results[names[0]])
    print(f"{'tree':34} {'samples/s (median)':>19} {'min':>9} {'max':>9} {'vs before':>10}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:34} {median:>19,.0f} {min(values):>9,.0f} {max(values):>9,.0f} {median / reference:>10.3f}")
    print("all:", {name: [round(v) for v in values] for name, values in results.items()})


if __name__ == "__main__":
    main()
