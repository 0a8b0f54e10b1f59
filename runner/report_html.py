"""The report to look at: one PNG per metric family and one self-contained HTML page.

Runs are grouped by experiment (the `experiment=` override, else the dataset and model they train),
so that runs of different experiments are never drawn on one axis or ranked together. For each
group, `<root>/report/<group>-<family>.png` for the families its runs logged: loss (train/loss and
val/loss over steps), val (the other validation metrics), lr, throughput (samples/s, TFLOP/s),
time (each run's step-time breakdown, summed over its training rows) and memory. The page
(`<root>/report.html`) holds each group's table and its plots inline (base64), so it opens from the
file system, with no server and nothing fetched.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from runner.report import curves, differing_overrides, rank_by_objective, table_cells
from runner.train.metrics import read_number

REPORT_DIR = "report"


def group_name(run: dict) -> str:
    """The run's experiment: its `experiment=` override, else `<dataset>-<model>` from its config."""
    for override in run["overrides"]:
        if override.startswith("experiment="):
            return override.split("=", 1)[1]
    path = run["dir"] / "config.yaml"
    if path.exists():
        cfg = OmegaConf.load(path)
        parts = [OmegaConf.select(cfg, f"{k}._target_", default=None) for k in ("dataset", "model")]
        parts = [str(p).rsplit(".", 1)[-1] for p in parts if p]
        if parts:
            return "-".join(parts)
    return "runs"


def groups(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run in runs:
        out.setdefault(group_name(run), []).append(run)
    return dict(sorted(out.items()))


def _series(run: dict, key: str, steps_only: bool = False) -> tuple[list[float], list[float]]:
    rows = run["step_rows"] if steps_only else run["step_rows"] + run["rows"]
    points = sorted(
        (r["step"], read_number(r[key])) for r in rows if isinstance(r.get("step"), int) and r.get(key) is not None
    )
    return [p[0] for p in points], [p[1] for p in points]


def families(runs: list[dict]) -> dict[str, list[str]]:
    """Each family the runs logged and its metric names."""
    keys = {k for run in runs for r in run["rows"] + run["step_rows"] for k in r}
    val = sorted(k for k in keys if k.startswith("val/") and k != "val/loss")
    out = {"loss": ["train/loss", *(["val/loss"] if "val/loss" in keys else [])]}
    if val:
        out["val"] = val
    if "lr" in keys:
        out["lr"] = ["lr"]
    out["throughput"] = [k for k in ("samples_per_s", "tokens_per_s", "tflops", "mfu") if k in keys]
    out["time"] = sorted(k for k in keys if k.startswith("time/"))
    out["memory"] = sorted(k for k in keys if k.startswith("memory/"))
    return {name: metrics for name, metrics in out.items() if metrics}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_family(runs: list[dict], labels: list[str], family: str, metrics: list[str], path: Path) -> None:
    plt = _pyplot()
    if family == "time":
        _plot_time(plt, runs, labels, metrics, path)
        return
    panels = metrics if family in ("val", "throughput", "memory") else [None]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for ax, metric in zip(axes[:, 0], panels):
        shown = [metric] if metric else metrics
        for i, (run, label) in enumerate(zip(runs, labels)):
            for j, key in enumerate(shown):
                if key == "train/loss":
                    x_name, lines = curves([run])
                    x, y = lines[0][1], lines[0][2]
                else:
                    x, y = _series(run, key, steps_only=family in ("throughput", "memory"))
                if x:
                    style = "-" if j == 0 else "--"
                    name = label if len(shown) == 1 else f"{label} {key}"
                    ax.plot(x, y, style, color=f"C{i % 10}", label=name, marker="." if len(x) < 3 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric or family)
        if family == "loss":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _time_totals(run: dict, metrics: list[str]) -> dict[str, float]:
    return {k[5:]: sum(read_number(r.get(k)) or 0.0 for r in run["step_rows"]) for k in metrics}


def _plot_time(plt, runs: list[dict], labels: list[str], metrics: list[str], path: Path) -> None:
    """One horizontal bar per run, its phases stacked: seconds summed over its training rows."""
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(runs)))
    phases = [k[5:] for k in metrics]
    totals = [_time_totals(run, metrics) for run in runs]
    left = [0.0] * len(runs)
    for j, phase in enumerate(phases):
        widths = [t.get(phase, 0.0) for t in totals]
        ax.barh(range(len(runs)), widths, left=left, color=f"C{j % 10}", label=phase)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(runs)), [x if len(x) <= 32 else x[:14] + "..." + x[-15:] for x in labels])
    ax.set_xlabel("seconds (training rows)")
    ax.legend(fontsize="small", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "runs"


def write(runs: list[dict], root: Path, page: Optional[Path] = None) -> tuple[Path, list[Path]]:
    """The PNGs under <root>/report/ and the page; returns (page, PNGs)."""
    root = Path(root)
    folder = root / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    page = Path(page) if page else root / "report.html"
    pngs: list[Path] = []
    sections = []
    for name, members in groups(runs).items():
        ranked = rank_by_objective(members) if any(r.get("objective") is not None for r in members) else members
        labels = [x if x != "(same)" else r["dir"].name for x, r in zip(differing_overrides(ranked), ranked)]
        images = []
        for family, metrics in families(ranked).items():
            path = folder / f"{_slug(name)}-{family}.png"
            plot_family(ranked, labels, family, metrics, path)
            pngs.append(path)
            images.append((family, path))
        sections.append(_section(name, ranked, images))
    page.write_text(_page(root, sections))
    return page, pngs


def _section(name: str, runs: list[dict], images: list[tuple[str, Path]]) -> str:
    header, rows = table_cells(runs)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    figures = "".join(
        f'<figure><img alt="{html.escape(name)} {family}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{family}</figcaption></figure>'
        for family, path in images
    )
    return (
        f"<section><h2>{html.escape(name)}</h2><p>{len(runs)} run{'s' if len(runs) != 1 else ''}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{figures}</section>"
    )


def _page(root: Path, sections: list[str]) -> str:
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}th{background:#f3f3f3}"
        "figure{display:inline-block;margin:0.5em}figcaption{text-align:center;color:#555}img{max-width:100%}"
    )
    title = f"runs under {html.escape(str(root))}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body><h1>{title}</h1>{''.join(sections)}</body></html>\n"
    )


def summary_of(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{name} ({len(members)})" for name, members in groups(runs).items())
