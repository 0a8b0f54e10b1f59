"""A real workload side by side: `experiment=digits` in the runner, a hand-written DDP script and Lightning.

    python benchmarks/digits.py                     # 3 repetitions, 1 and 15 epochs, ~8 minutes; a Markdown table
    python benchmarks/digits.py --reps 5 --epochs 20

The same model (DigitsCNN), data (DigitsData(seed=0): 1,257 training images with random-shift
augmentation in `__getitem__`, 270 for validation), optimizer (AdamW lr 0.01, weight decay 0.01,
cosine per epoch), batch 64 per process, 2 CPU processes (gloo), 2 persistent DataLoader workers
per process, one thread per process, validation after every epoch, and the same checkpoints:
the best by val accuracy and the last:

- runner:    python -m runner experiment=digits trainer.total_epochs=E trainer.early_stop.patience=0
             trainer.test=false launch.nproc_per_node=2 launch.backend=gloo trainer.progress=false
             (a fresh run directory every time, so nothing resumes; it keeps its best snapshot by
             val/accuracy, as the experiment says, and the final one)
- script:    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/digits_ddp.py E
             (rank 0 saves best.pt and last.pt: model, optimizer, scheduler)
- Lightning: python benchmarks/digits_lightning.py E   (Trainer(strategy="ddp", devices=2),
             ModelCheckpoint(monitor="val/accuracy", mode="max", save_top_k=1, save_last=True))

Every figure comes from whole-command wall times, each the median over repetitions; the commands
run interleaved, in an order that rotates from one repetition to the next, so the machine's moods
land on all of them alike. Throughput = 1,257 x (N - 1) training samples / (wall(N) - wall(1)):
what N - 1 more epochs cost, startup excluded (validation after each epoch included).

Validation cost: the runner at N epochs without best snapshots (`snapshot.monitor=null`), with
validation after every epoch vs `trainer.val_every=0` (validated once, at the end): the
difference divided by the N - 1 validations saved, next to one
validation pass measured in this process (what `TrainLoop.evaluate` does on one rank: the model in
eval mode, no gradients, batch 64, over half the val split). The wall difference is small next to
the walls' noise, so the same difference is also read from inside the runs (metrics.jsonl: the
time between two epochs' records that is not training-loop time, with and without validation).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import FAILURES  # noqa: E402  (benchmarks/run.py: timed, retried commands)
from run import run as timed_run

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SAMPLES = 1257  # DigitsData(seed=0): 1,797 - 270 val - 270 test
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RUNNER = [
    sys.executable,
    "-m",
    "runner",
    "experiment=digits",
    "trainer.early_stop.patience=0",
    "trainer.test=false",
    "launch.nproc_per_node=2",
    "launch.backend=gloo",
    "trainer.progress=false",
]
TOOLS = ("runner", "script", "lightning")

# The validation cost is read from two more runner runs without best snapshots (which only exist
# when validating): validating every epoch, and only once at the end.
VARIANTS = {"runner_val": ("snapshot.monitor=null",), "runner_noval": ("snapshot.monitor=null", "trainer.val_every=0")}
for tool in (*TOOLS, *VARIANTS):
    FAILURES[tool] += 0  # listed in the report even when nothing crashed


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.count = tmp, 0

    def run(self, cmd: list[str], who: str, attempts: int = 3) -> tuple[float, str]:
        """Wall time and output of a command; a crashed attempt is counted (in FAILURES) and retried."""
        return timed_run(cmd, ROOT, who, attempts)

    def runner(self, epochs: int, extra: tuple = (), who: str = "runner") -> dict:
        self.count += 1
        run_dir = self.tmp / f"run-{self.count}"  # fresh: nothing to resume
        wall, out = self.run(
            [
                *RUNNER,
                f"trainer.total_epochs={epochs}",
                *extra,
                f"name=digits-bench-{os.getpid()}-{self.count}",
                f"hydra.run.dir={run_dir}",
            ],
            who,
        )
        status = json.loads((run_dir / "status.json").read_text())
        sps = re.search(r"throughput\s+: ([\d,.]+) samples/s", out)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        shutil.rmtree(run_dir, ignore_errors=True)
        return {
            "wall": wall,
            "val_accuracy": status["val"]["val/accuracy"],
            "samples_per_s": float(sps.group(1).replace(",", "")) if sps else float("nan"),
            "between_epochs": between_epochs(records),
        }

    def _fresh_dir(self, who: str) -> Path:
        self.count += 1
        path = self.tmp / f"{who}-{self.count}"  # its checkpoints land here, and nothing is reused
        path.mkdir()
        return path

    def script(self, epochs: int) -> dict:
        cwd = self._fresh_dir("script")
        wall, out = timed_run([*TORCHRUN, str(ROOT / "benchmarks" / "digits_ddp.py"), str(epochs)], cwd, "script")
        shutil.rmtree(cwd, ignore_errors=True)
        return {"wall": wall, **_json_line(out)}

    def lightning(self, epochs: int) -> dict:
        cwd = self._fresh_dir("lightning")
        wall, out = timed_run(
            [sys.executable, str(ROOT / "benchmarks" / "digits_lightning.py"), str(epochs)], cwd, "lightning"
        )
        shutil.rmtree(cwd, ignore_errors=True)
        return {"wall": wall, **_json_line(out)}


def between_epochs(records: list[dict]) -> dict:
    """Seconds per epoch spent outside the training loop, from the run's metrics.jsonl: the time
    between two epochs' records less the later epoch's own `epoch_seconds`. An epoch's record is
    written after its validation and before the best snapshot it may trigger, so each gap holds the
    later epoch's validation (when validating every epoch), the per-epoch bookkeeping, and the best
    snapshot (by val/accuracy) written when the earlier epoch improved. Means: over all gaps, over
    those without a snapshot, over those with one."""
    train = [r for r in records if "epoch_seconds" in r]
    best, improved = None, []
    for r in train:
        value = r.get("val/accuracy")
        improved.append(value is not None and (best is None or value > best))
        if value is not None and (best is None or value > best):
            best = value
    gaps = [(b["time"] - a["time"] - b["epoch_seconds"], wrote) for a, b, wrote in zip(train, train[1:], improved)]

    def mean(values: list[float]) -> float:
        return statistics.mean(values) if values else float("nan")

    return {
        "all": mean([g for g, _ in gaps]),
        "plain": mean([g for g, w in gaps if not w]),
        "snapshot": mean([g for g, w in gaps if w]),
    }


def _json_line(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def validation_pass_seconds(repeats: int = 200) -> float:
    """One rank's validation pass, as `TrainLoop.evaluate` runs it (tensor path, the task's metrics,
    sums kept as tensors, one host sync at the end; no collective): median seconds."""
    from runner.examples.digits import DigitsCNN, DigitsData
    from runner.tasks import Classification

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 workers runs
    try:
        torch.manual_seed(0)
        x, y = DigitsData(seed=0).val.tensors
        indices = torch.arange(0, len(y), 2)  # rank 0's shard
        model, task = DigitsCNN().eval(), Classification(top_k=[3])  # experiment=digits: task.top_k [3]

        def once() -> float:
            started = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            count = torch.zeros((), dtype=torch.float64)
            with torch.no_grad():
                for begin in range(0, len(indices), 64):
                    idx = indices[begin : begin + 64]
                    batch = (x.index_select(0, idx), y.index_select(0, idx))
                    for name, value in task.validation_step(model, batch).items():
                        sums.setdefault(name, torch.zeros((), dtype=torch.float64)).add_(value.double(), alpha=len(idx))
                    count += len(idx)
            torch.stack([count, *sums.values()]).tolist()
            return time.perf_counter() - started

        for _ in range(20):
            once()
        return statistics.median(once() for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)


def revision() -> str:
    """The commit measured, and whether runner/ differs from it (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", "runner", "conf"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{head}{' + uncommitted changes in runner/ or conf/' if dirty else ''}" if head else "n/a"
    except OSError:
        return "n/a"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--epochs",
        type=int,
        default=15,
        help="N: the long run (the short one is 1 epoch); 15 keeps the default run under ~8 minutes",
    )
    args = parser.parse_args()
    n = args.epochs
    if n < 2:
        parser.error("--epochs must be at least 2")
    tmp = Path(tempfile.mkdtemp(prefix="runner-digits-bench-", dir=os.environ.get("BENCH_DIR")))
    bench = Bench(tmp)
    load_before, commit = load(), revision()
    val_pass = validation_pass_seconds()
    measures = [(tool, e) for tool in TOOLS for e in (1, n)] + [(variant, n) for variant in VARIANTS]
    results: dict[tuple[str, int], list[dict]] = {m: [] for m in measures}
    started = time.perf_counter()
    try:
        for rep in range(args.reps):
            shift = rep % len(measures)
            for tool, epochs in measures[shift:] + measures[:shift]:
                if tool in VARIANTS:
                    r = bench.runner(epochs, VARIANTS[tool], who=tool)
                else:
                    r = getattr(bench, tool)(epochs)
                results[(tool, epochs)].append(r)
                print(
                    f"  rep {rep + 1}/{args.reps} {tool:<12} {epochs:>3} epochs: {r['wall']:6.2f} s, "
                    f"val/accuracy {r['val_accuracy']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - started

    def med(tool: str, epochs: int, key: str = "wall") -> float:
        return statistics.median(r[key] for r in results[(tool, epochs)])

    wall1 = {t: med(t, 1) for t in TOOLS}
    walln = {t: med(t, n) for t in TOOLS}
    sps = {t: TRAIN_SAMPLES * (n - 1) / (walln[t] - wall1[t]) for t in TOOLS}
    own = {t: med(t, n, "samples_per_s") for t in TOOLS}
    acc = {t: med(t, n, "val_accuracy") for t in TOOLS}

    def row(label: str, values: dict, fmt: str, ratios: bool = True) -> str:
        cells = [fmt.format(values[t]) for t in TOOLS]
        r = [f"{values['runner'] / values[t]:.2f}x" for t in ("script", "lightning")] if ratios else ["", ""]
        return f"| {label} | {' | '.join(cells)} | {' | '.join(r)} |"

    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}, commit {commit}, reps={args.reps} (medians), N={n} epochs; "
        f"load average before {load_before}, after {load()}; benchmark took {elapsed / 60:.1f} min\n"
    )
    print(
        "| measure | runner | DDP script | Lightning | runner / script | runner / Lightning |\n|---|---|---|---|---|---|"
    )
    print(row(f"throughput, 1,257 x {n - 1} samples / (wall({n}) - wall(1))", sps, "{:,.0f} samples/s"))
    print(row("wall time of a 1-epoch command", wall1, "{:.2f} s"))
    print(row(f"wall time of a {n}-epoch command", walln, "{:.2f} s"))
    print(row(f"  each one's own training-loop samples/s ({n} epochs, validation excluded)", own, "{:,.0f}"))
    print(row(f"final val accuracy ({n} epochs)", acc, "{:.4f}", ratios=False))
    val, noval = med("runner_val", n), med("runner_noval", n)
    per_val = (val - noval) / (n - 1)
    print(f"\n| validation cost (runner, {n} epochs, snapshot.monitor=null: no best snapshots) | seconds |\n|---|---|")
    print(f"| wall, validating every epoch / only at the end (trainer.val_every=0) | {val:.2f} s / {noval:.2f} s |")
    print(f"| difference per validation ({n - 1} fewer) | {per_val * 1e3:.1f} ms |")

    def gap(tool: str, kind: str = "all") -> float:
        return statistics.median(r["between_epochs"][kind] for r in results[(tool, n)]) * 1e3

    print(
        f"| in the run (metrics.jsonl), per epoch outside the training loop: validating / not | "
        f"{gap('runner_val'):.1f} ms / {gap('runner_noval'):.1f} ms |"
    )
    print(f"| difference per validation, in the run | {gap('runner_val') - gap('runner_noval'):.1f} ms |")
    print(f"| one validation pass in-process (1 rank: 135 images, batch 64, eval, no grad) | {val_pass * 1e3:.1f} ms |")
    print(
        f"| experiment=digits as is: per epoch outside the loop, without / with a best snapshot | "
        f"{gap('runner', 'plain'):.1f} ms / {gap('runner', 'snapshot'):.1f} ms |"
    )
    print("\ncrashed attempts (retried): " + ", ".join(f"{k} {v}" for k, v in FAILURES.items()))


if __name__ == "__main__":
    main()
