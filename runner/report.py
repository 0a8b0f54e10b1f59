"""`python -m runner.report <dir>`: a table of the runs under a folder, and a plot of their losses.

Reads what each run directory already holds (metrics.jsonl, config.yaml, status.json and Hydra's
overrides.yaml), so it works on a finished sweep, a running one, or any outputs/ folder. The table
shows only the overrides that differ between runs. The plot needs matplotlib (optional).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from runner.sweep import read_status
from runner.tables import format_table
from runner.train.metrics import METRICS_FILE, read_number, train_loss


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob(METRICS_FILE) if "archive" not in p.parts)


def load_run(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    for row in rows:  # a diverged epoch's loss is written as "nan"/"inf" (or null by other writers)
        row["loss"] = train_loss(row)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    total, mode = None, "min"
    if (run_dir / "config.yaml").exists():
        cfg = OmegaConf.load(run_dir / "config.yaml")
        total, mode = cfg.trainer.total_epochs, str(OmegaConf.select(cfg, "snapshot.mode", default="min"))
    state = read_status(run_dir) or {}
    status = state.get("status") or ("finished" if rows and rows[-1]["epoch"] == total else "partial")
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    val_rows = [r for r in rows if any(k.startswith("val/") for k in r)]
    last_val = {k: read_number(v) for k, v in val_rows[-1].items() if k.startswith("val/")} if val_rows else {}
    epochs = [r["epoch"] for r in rows if r["loss"] is not None]
    return {"val": last_val, "dir": run_dir, "overrides": overrides, "rows": rows, "status": status,
            "epochs": epochs[-1] if epochs else 0, "total_epochs": total,
            "best": state.get("best"), "monitor": state.get("monitor"), "objective": state.get("objective"),
            # a search ranks by the monitored metric in its direction, else by the final loss (lower is better)
            "maximize": state.get("best") is not None and mode == "max",
            "final_loss": losses[-1] if losses else None, "best_loss": min(losses, key=lambda x: (x != x, x)) if losses else None,
            "wall": sum(r.get("epoch_seconds") or 0 for r in rows)}


def rank_by_objective(runs: list[dict]) -> list[dict]:
    """Runs with an objective first, best first (failed runs have none and come last)."""
    def key(run: dict):
        value = run.get("objective")
        if not isinstance(value, (int, float)) or value != value:
            return (1, 0.0)
        return (0, -value if run["maximize"] else value)
    return sorted(runs, key=key)


def differing_overrides(runs: list[dict]) -> list[str]:
    """Per run, the overrides whose key is not set identically in every run."""
    parsed = [dict(o.split("=", 1) for o in r["overrides"] if "=" in o) for r in runs]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    return [" ".join(f"{k}={p[k]}" for k in varying if k in p) or "(same)" for p in parsed]


def table(runs: list[dict]) -> str:
    """One row per run; with objectives (a sweep or search), ranked by them, best first."""
    with_objective = any(isinstance(r.get("objective"), (int, float)) for r in runs)
    if with_objective:
        runs = rank_by_objective(runs)
    labels = differing_overrides(runs)
    val_keys = sorted({k for r in runs for k in r["val"]})
    header = ("run", "overrides", *(("objective",) if with_objective else ()), "final loss", "best loss", *val_keys,
              "epochs", "train s", "status")
    return format_table(header, [(r["dir"].name, label, *((_num(r.get("objective")),) if with_objective else ()),
             _num(r["final_loss"]), _num(r["best_loss"]),
             *(_num(r["val"].get(k)) for k in val_keys),
             f"{r['epochs']}/{r['total_epochs'] if r['total_epochs'] is not None else '?'}", f"{r['wall']:.1f}", r["status"])
            for r, label in zip(runs, labels)])


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def plot(runs: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, label in zip(runs, differing_overrides(runs)):
        rows = [r for r in run["rows"] if r["loss"] is not None]
        ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], label=label if label != "(same)" else run["dir"].name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="outputs", help="a sweep or outputs folder (default: outputs)")
    parser.add_argument("--plot", default=None, help="PNG path (default: <root>/losses.png)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    runs = [load_run(d) for d in find_runs(root)]
    if not runs:
        print(f"no runs (metrics.jsonl) under {root}", file=sys.stderr)
        return 2
    print(table(runs))
    png = Path(args.plot) if args.plot else root / "losses.png"
    if plot(runs, png):
        print(f"loss curves: {png}")
    else:
        print("loss curves: install matplotlib (pip install 'runner[report]') for a PNG plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
