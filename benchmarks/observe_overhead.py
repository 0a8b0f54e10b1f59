"""What watching a run costs: samples/s with the step-time breakdown, TFLOP/s (FLOPs counted on the
first step), memory in the rows and the hang watchdog's heartbeat, against the same runner before
any of it existed (a git worktree of the commit before `runner/train/observer.py` was added).

    python benchmarks/observe_overhead.py              # ~4 minutes; prints the tables
    python benchmarks/observe_overhead.py --reps 9 --base <commit>
    python benchmarks/observe_overhead.py --reps 0     # without the CLI comparison (~1 minute)

First the hooks alone, in this process: what the loop calls per step (the timed step with its
staging wait, the step's end with the heartbeat) around an engine that does nothing, against
calling that engine directly; the difference is the cost per step, which does not depend on the
workload, so it can be set against any step time. Then the real loop in this process (one worker,
MLP regression, 32,768 samples x 2 epochs, a row every 50 steps) with the observer, and with one
whose hooks do nothing (the loop as it was), interleaved: the same load hits both. Then the CLI.

The workload is training_rows.py's: the default regression task with an MLP, 65,536 samples, 3
epochs, 2 CPU workers (gloo, shared-memory gradients), a row every 50 steps (the default), so a
step is ~0.3 ms and any per-step cost would show. Each command's summary line "throughput : N
samples/s" (training time only) is read; the two trees run interleaved, in an order that alternates
from one repetition to the next, and every figure is a median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_rows import samples_per_s  # noqa: E402  (one launcher for both benchmarks' runs)


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


def loop_with_and_without(reps: int, size: int = 32768, epochs: int = 2) -> dict[str, list[float]]:
    """samples/s of the real loop (session.train: one process, MLP regression, batch 32, a row every
    50 steps, the heartbeat on) with the Observer, and with one whose hooks do nothing; interleaved."""
    import contextlib
    import logging

    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import TensorDataset

    sys.path.insert(0, str(ROOT))
    from runner.config import RunnerConfig
    from runner.models import MLP
    from runner.tasks import Regression
    from runner.train import rng, session, watchdog
    from runner.train.batches import DataSource
    from runner.train.collectives import Collectives
    from runner.train.engines.ddp import DDPEngine
    from runner.train.observer import Observer

    class Unobserved(Observer):
        """The loop as it was: the engine's step called directly, no clock, no rows' extras, no heartbeat."""

        def train_step(self, engine, window, samples, wait_for_staging):
            return engine.train_step(window, wait_for_staging)

        def step_done(self, global_step):
            pass

        def phase(self, name):
            return contextlib.nullcontext()

        def watched(self, method, name):
            return method

        def start_row(self):
            pass

        def row_tensor(self, rank, world, device):
            return torch.zeros(0, dtype=torch.float64, device=device)

        def row_fields(self, reduced, world, samples, seconds):
            return {}

        def summary(self):
            return {}

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, 16, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    overrides = [f"trainer.total_epochs={epochs}", "trainer.progress=false", "snapshot.keep_last=1"]
    cfg = OmegaConf.merge(OmegaConf.structured(RunnerConfig), OmegaConf.from_dotlist(overrides))
    results: dict[str, list[float]] = {"without (hooks do nothing)": [], "with observability": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for name in list(results) if rep % 2 == 0 else list(results)[::-1]:
                run_dir = Path(tmp) / f"{rep}-{list(results).index(name)}"
                (run_dir / "logs").mkdir(parents=True)
                rng.seed_everything(0)
                model = MLP(16, 1, hidden_size=64, depth=2)
                task = Regression()
                engine = DDPEngine(
                    model,
                    torch.optim.SGD(model.parameters(), lr=0.01),
                    None,
                    task,
                    torch.device("cpu"),
                    Collectives(),
                    "gloo",
                )
                source = DataSource(cfg, 0, 1, engine.device, dataset=data)
                observed = name.startswith("with")
                session.Observer = Observer if observed else Unobserved
                if observed:
                    watchdog._current = watchdog.Heartbeat(watchdog.heartbeat_path(run_dir, 0))
                try:
                    summary = session.train(cfg, run_dir, engine, source, task)
                finally:
                    session.Observer = Observer
                    if watchdog._current is not None:
                        watchdog._current.close()
                        watchdog._current = None
                results[name].append(summary["samples_per_s"])
    logging.disable(logging.NOTSET)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--base", default=None, help="the commit to compare with (default: before the observer)")
    parser.add_argument("--inprocess", type=int, default=9, help="repetitions of the in-process loop (0: skip)")
    opts = parser.parse_args()
    bare, hooked = hook_cost()
    extra = (hooked - bare) * 1e6
    print(f"per step: bare call {bare * 1e6:.2f} us, with the hooks {hooked * 1e6:.2f} us: +{extra:.2f} us")
    if opts.inprocess > 0:
        _table("the loop in this process (1 process)", loop_with_and_without(opts.inprocess))
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
        # runner.conf is the package folder conf/ (pyproject's package-dir): an editable install of another
        # checkout would give its conf/ to this one's schema; a link makes the worktree read its own.
        (before / "runner" / "conf").symlink_to("../conf")
        try:
            trees = {f"before ({base})": before, "with observability (this tree)": ROOT}
            results: dict[str, list[float]] = {name: [] for name in trees}
            names = list(trees)
            for rep in range(opts.reps):
                for name in names if rep % 2 == 0 else names[::-1]:
                    cwd = Path(tmp) / "runs"
                    cwd.mkdir(exist_ok=True)
                    overrides = [f"dataset.size={opts.size}", f"trainer.total_epochs={opts.epochs}"]
                    env = {**os.environ, "PYTHONPATH": str(trees[name])}
                    value = samples_per_s([*overrides, f"name=bench-{names.index(name)}"], str(cwd), env)
                    results[name].append(value)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    _table("the CLI, 2 workers", results)


def _table(title: str, results: dict[str, list[float]]) -> None:
    names = list(results)
    reference = statistics.median(results[names[0]])
    print(f"\n{title}")
    print(f"{'setting':34} {'samples/s (median)':>19} {'min':>9} {'max':>9} {'vs first':>10}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:34} {median:>19,.0f} {min(values):>9,.0f} {max(values):>9,.0f} {median / reference:>10.3f}")
    print("all:", {name: [round(v) for v in values] for name, values in results.items()})


if __name__ == "__main__":
    main()
