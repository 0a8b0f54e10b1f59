"""The summary's lines about where the run's time and compute went: TFLOP/s and MFU (the mean and
the best training row), the step-time breakdown, GPU memory and the profiler's traces."""

from __future__ import annotations

from typing import Any


def _tflops(value: float) -> str:
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"


def compute_line(summary: dict[str, Any]) -> list[str]:
    mean, best = summary.get("tflops_mean"), summary.get("tflops_best")
    flops, rate, world = summary.get("flops_per_sample"), summary.get("samples_per_s"), summary.get("world_size")
    if mean is None and flops and rate and world:  # no training row: the run's own mean
        mean = flops * rate / world / 1e12
    if mean is None:
        return []
    line = f"compute       : {_tflops(mean)} TFLOP/s per worker" + (f" (best row {_tflops(best)})" if best else "")
    peak = summary.get("peak_tflops")
    if peak:
        line += f", MFU {100 * mean / peak:.1f}%" + (f" (best {100 * best / peak:.1f}%)" if best else "")
        line += f" of {peak:g} TFLOP/s"
    else:
        line += ", MFU n/a (no peak known for this device: trainer.peak_tflops)"
    return [line]


def time_line(summary: dict[str, Any]) -> list[str]:
    """Each phase's share of the timed work, largest first: "the loader is the bottleneck" at a glance."""
    phases = {k: v for k, v in (summary.get("time_breakdown") or {}).items() if v > 0}
    total = sum(phases.values())
    if not total:
        return []
    shown = ", ".join(f"{name.replace('_', ' ')} {100 * secs / total:.0f}%" for name, secs in phases.items())
    return [f"time          : {shown} (of {total:.1f} s, rank 0)"]


def memory_line(summary: dict[str, Any]) -> list[str]:
    peak = summary.get("memory_peak") or {}
    if "memory/cuda_max_allocated_mb" not in peak:
        return []
    return [
        f"gpu memory    : {peak['memory/cuda_max_allocated_mb']:,.0f} MB allocated at most, "
        f"{peak.get('memory/cuda_max_reserved_mb', 0):,.0f} MB reserved (the most of any rank)"
    ]


def profile_lines(summary: dict[str, Any], run_dir: str) -> list[str]:
    traces = summary.get("profile_traces")
    if not traces:
        return []
    shown = ", ".join(f"{run_dir}/{t}" for t in traces[:4]) + (", ..." if len(traces) > 4 else "")
    lines = [f"profile       : {shown}"]
    top = summary.get("profile_top") or []
    if top:
        lines.append("top operators : " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in top))
    return lines


def observed_lines(summary: dict[str, Any], run_dir: str = ".") -> list[str]:
    """`run_dir`: as the summary shows it, to name the traces."""
    return compute_line(summary) + time_line(summary) + memory_line(summary) + profile_lines(summary, run_dir)
