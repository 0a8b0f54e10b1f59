"""What the training rows cost: samples/s with a row every `trainer.log_every` steps against none.

    python benchmarks/training_rows.py              # 5 repetitions, ~2 minutes; prints the table
    python benchmarks/training_rows.py --reps 9 --size 131072

A row is one small all-reduce and one host sync (the means since the previous row), then a line in
metrics.jsonl; between rows a step only adds its loss to a tensor the loop holds. The workload is
the runner's default regression task with an MLP (2 CPU workers, gloo, shared-memory gradients),
so a step is short and any per-step cost would show. Each command's summary line "throughput : N
samples/s" (training time only: start-up excluded) is read; the settings run interleaved, in an
order that rotates from one repetition to the next, and every figure is a median.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

SETTINGS = {"no rows (log_every=0)": 0, "a row every 50 steps (default)": 50, "a row every step": 1}


def samples_per_s(overrides: list[str], cwd: str, env: Optional[dict] = None) -> float:
    """The samples/s a fresh 2-worker mlp run with `overrides` reports (`python -m runner`, as users run it)."""
    args = [
        sys.executable,
        "-m",
        "runner",
        "model=mlp",
        "trainer.progress=false",
        "launch.nproc_per_node=2",
        "launch.backend=gloo",
        "snapshot.resume=never",
        *overrides,
    ]
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"throughput\s*:\s*([\d,]+) samples/s", out).group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--epochs", type=int, default=3)
    opts = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    with tempfile.TemporaryDirectory() as cwd:
        for rep in range(opts.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                every = SETTINGS[name]
                overrides = [f"dataset.size={opts.size}", f"trainer.total_epochs={opts.epochs}"]
                overrides += [f"trainer.log_every={every}", f"name=rows-{every}"]
                results[name].append(samples_per_s(overrides, cwd))
    base = statistics.median(results[names[0]])
    print(f"{'setting':34} {'samples/s (median)':>19} {'min':>9} {'max':>9} {'vs no rows':>10}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:34} {median:>19,.0f} {min(values):>9,.0f} {max(values):>9,.0f} {median / base:>10.3f}")


if __name__ == "__main__":
    main()
