"""`python -m runner.report <dir>`: a table of the runs under a folder, and a plot of their losses;
with matplotlib also one PNG per metric family and a self-contained HTML page (runner.report_html).

Reads what each run directory already holds (metrics.jsonl, config.yaml, status.json and Hydra's
overrides.yaml), so it works on a finished sweep, a running one, or any outputs/ folder. The table
puts the numbers first and the overrides that differ between runs last, within 120 columns; runs
that count steps (`trainer.max_steps`) show steps, not epochs. The plot draws the per-step training
rows where metrics.jsonl has them, else the epoch rows, and needs matplotlib (optional).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from runner.config import Mode
from runner.driver.sweep import read_status
from runner.layout import METRICS_FILE
from runner.tables import format_table
from runner.train.metrics import read_number, train_loss

TABLE_WIDTH = 120  # a terminal's columns; long run names and overrides are cut to fit
_KEY_PREFIX = re.compile(r"(?<!\S)[+~]*(?:[\w/-]+\.)+(?=[\w-]+=)")  # `optimizer.` of `optimizer.lr=0.1`


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob(METRICS_FILE) if "archive" not in p.parts)


def load_run(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    for row in rows:  # a diverged epoch's loss is written as "nan"/"inf" (or null by other writers)
        row["loss"] = train_loss(row)
    # Per-step rows (every trainer.log_every steps) draw the loss curve; the epoch rows (epoch ends
    # and validations) give the final and best loss, the validation metrics and the wall time.
    step_rows = [r for r in rows if r.get("scope") == "step"]
    rows = [r for r in rows if r.get("scope") != "step"]
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    total, max_steps, mode = None, 0, "min"
    if (run_dir / "config.yaml").exists():
        cfg = OmegaConf.load(run_dir / "config.yaml")
        total, mode = cfg.trainer.total_epochs, str(OmegaConf.select(cfg, "snapshot.mode", default="min"))
        max_steps = int(OmegaConf.select(cfg, "trainer.max_steps", default=0) or 0)
    state = read_status(run_dir) or {}
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    val_rows = [r for r in rows if any(k.startswith("val/") for k in r)]
    last_val = {k: read_number(v) for k, v in val_rows[-1].items() if k.startswith("val/")} if val_rows else {}
    epochs = [r["epoch"] for r in rows if r["loss"] is not None]
    steps = [r["step"] for r in rows + step_rows if isinstance(r.get("step"), int)]
    done, target = (max(steps, default=0), max_steps) if max_steps else (epochs[-1] if epochs else 0, total)
    status = state.get("status") or ("finished" if target is not None and rows and done >= target else "partial")
    return {
        "val": last_val,
        "dir": run_dir,
        "overrides": overrides,
        "rows": rows,
        "step_rows": step_rows,
        "status": status,
        "epochs": epochs[-1] if epochs else 0,
        "total_epochs": total,
        "max_steps": max_steps,
        "progress": f"{done}/{target if target is not None else '?'} {'steps' if max_steps else 'epochs'}",
        "best": state.get("best"),
        "monitor": state.get("monitor"),
        "objective": state.get("objective"),
        # a search ranks by the monitored metric in its direction, else by the final loss (lower is better)
        "maximize": state.get("best") is not None and mode == Mode.max,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses, key=lambda x: (x != x, x)) if losses else None,
        "wall": sum(r.get("epoch_seconds") or 0 for r in rows),
    }


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


def table(runs: list[dict], width: int = TABLE_WIDTH) -> str:
    """One row per run, the numbers first and the overrides last, within `width` columns (long run
    names and overrides are cut in the middle); with objectives (a sweep or search), ranked by them."""
    header, rows = table_cells(runs)
    _fit(header, rows, width)
    return format_table(header, rows)


def table_cells(runs: list[dict]) -> tuple[tuple[str, ...], list[list[str]]]:
    """The table's header and rows, uncut (the HTML page shows them whole)."""
    with_objective = any(isinstance(r.get("objective"), (int, float)) for r in runs)
    if with_objective:
        runs = rank_by_objective(runs)
    labels = differing_overrides(runs)
    val_keys = sorted({k for r in runs for k in r["val"]})
    header = (
        "run",
        *(("objective",) if with_objective else ()),
        "final loss",
        "best loss",
        *val_keys,
        "progress",
        "train s",
        "status",
        "overrides",
    )
    rows = [
        [
            r["dir"].name,
            *((_num(r.get("objective")),) if with_objective else ()),
            _num(r["final_loss"]),
            _num(r["best_loss"]),
            *(_num(r["val"].get(k)) for k in val_keys),
            r["progress"],
            f"{r['wall']:.1f}",
            r["status"],
            label,
        ]
        for r, label in zip(runs, labels)
    ]
    return header, rows


def _fit(header: tuple[str, ...], rows: list[list[str]], width: int) -> None:
    """Shorten the overrides (last) column, then the run names (first), until the table fits: first the
    overrides' keys to their last part (`optimizer.lr=0.1` -> `lr=0.1`), then cut in the middle."""

    def total() -> int:
        return sum(max(len(line[c]) for line in (header, *rows)) for c in range(len(header))) + 2 * (len(header) - 1)

    if total() > width:
        for row in rows:
            row[-1] = _KEY_PREFIX.sub("", row[-1])
    for column, floor in ((-1, 24), (0, 24)):
        excess = total() - width
        if excess <= 0:
            return
        longest = max(len(line[column]) for line in (header, *rows))
        keep = max(floor, longest - excess, len(header[column]))
        if column == 0:
            _elide_names(rows, keep)
        for row in rows:
            row[column] = _elide(row[column], keep)


def _elide_names(rows: list[list[str]], keep: int) -> None:
    """Run names (first column) that share a long start (a search's `hparams_search=lr,optimizer.lr=0.0`)
    keep their first letters and where they start to differ, cut at the end."""
    names = [row[0] for row in rows]
    common = len(os.path.commonprefix(names)) if len(names) > 1 else 0
    if common <= 8:
        return
    for row in rows:
        if len(row[0]) > keep:
            shown = row[0][:5] + "..." + row[0][common - 3 :]
            row[0] = shown if len(shown) <= keep else shown[: keep - 3] + "..."


def _elide(text: str, keep: int) -> str:
    """`text` in at most `keep` characters: its head and tail around '...' (a name's tail is often its hash)."""
    if len(text) <= keep:
        return text
    tail = (keep - 3) // 2
    return text[: keep - 3 - tail] + "..." + text[len(text) - tail :]


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def curves(runs: list[dict]) -> tuple[str, list[tuple[str, list[float], list[float]]]]:
    """The x axis' name and one (label, x, loss) curve per run: the per-step rows where a run has them,
    else its epoch rows; optimizer steps on the x axis when any run counts steps or logged per-step rows."""
    by_step = any(run["max_steps"] or run["step_rows"] for run in runs) and all(
        "step" in r for run in runs for r in run["step_rows"] or run["rows"]
    )
    out = []
    for run, label in zip(runs, differing_overrides(runs)):
        rows = [r for r in run["step_rows"] or run["rows"] if r["loss"] is not None]
        out.append(
            (
                label if label != "(same)" else run["dir"].name,
                [r["step" if by_step else "epoch"] for r in rows],
                [r["loss"] for r in rows],
            )
        )
    return ("optimizer step" if by_step else "epoch"), out


def plot(runs: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x_name, lines = curves(runs)
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, x, loss in lines:
        ax.plot(x, loss, label=label)
    ax.set_xlabel(x_name)
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
    parser.add_argument("--html", default=None, help="the page's path (default: <root>/report.html)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    runs = [load_run(d) for d in find_runs(root)]
    if not runs:
        print(f"no runs (metrics.jsonl) under {root}", file=sys.stderr)
        return 2
    from runner import report_html

    grouped = report_html.groups(runs)
    for name, members in grouped.items():  # runs of different experiments are never ranked together
        if len(grouped) > 1:
            print(f"\n{name}:")
        print(table(members))
    png = Path(args.plot) if args.plot else root / "losses.png"
    if plot(runs, png):
        print(f"loss curves: {png}")
        page, pngs = report_html.write(runs, root, Path(args.html) if args.html else None)
        print(f"plots: {len(pngs)} PNGs in {root / report_html.REPORT_DIR}; page: {page}")
    else:
        print("loss curves: install matplotlib (pip install 'hydra-torch-runner[report]') for a PNG plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
