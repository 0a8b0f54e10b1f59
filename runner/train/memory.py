"""Memory at a training row: this process's resident memory (always) and, on a GPU, the most the
caching allocator has held for tensors and reserved from the driver since the start. All are read
from counters the host keeps: no device sync. And what a CUDA out-of-memory error is told with: the
rank, the step, the peaks and (with `trainer.memory_snapshot=true`, which records the allocator's
history from the start) the largest live allocations and a snapshot file for pytorch.org/memory_viz."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from runner.system import peak_rss_mb

PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE_MB
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()


def memory_mb(device: torch.device) -> dict[str, float]:
    """{"memory/rss_mb", and on CUDA "memory/cuda_max_allocated_mb", "memory/cuda_max_reserved_mb"}."""
    out = {"memory/rss_mb": rss_mb()}
    if device.type == "cuda":
        out["memory/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["memory/cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


log = logging.getLogger(__name__)
HISTORY_ENTRIES = 100_000
_recording = False


def start_history(trainer_cfg, device: torch.device) -> None:
    """trainer.memory_snapshot: record every allocation's stack from now on (CUDA only; costs some speed)."""
    global _recording
    if trainer_cfg.get("memory_snapshot") and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)
        _recording = True


def _largest(snapshot: dict, count: int = 5) -> list[str]:
    """The largest live blocks of an allocator snapshot, with the innermost Python line that made each."""
    blocks = [
        b for seg in snapshot.get("segments", []) for b in seg.get("blocks", []) if b.get("state") == "active_allocated"
    ]
    shown = []
    for block in sorted(blocks, key=lambda b: -b.get("size", 0))[:count]:
        frames = [f for f in block.get("frames", []) if str(f.get("filename", "")).endswith(".py")]
        where = f" ({Path(frames[0]['filename']).name}:{frames[0]['line']})" if frames else ""
        shown.append(f"{block['size'] / 2**20:,.0f} MB{where}")
    return shown


def describe_oom(run_dir: Path, rank: int, step: Optional[int]) -> str:
    """One line for a CUDA out-of-memory error: who, when, the peaks, the largest allocations, the snapshot."""
    at = f"after step {step}" if step is not None else "before the first step"
    line = f"out of memory on rank {rank} {at}: host RSS {rss_mb():,.0f} MB"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory / 2**20
        line += (
            f"; GPU at most {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MB allocated, "
            f"{torch.cuda.max_memory_reserved(device) / 2**20:,.0f} MB reserved of {total:,.0f} MB"
        )
        if _recording:
            path = Path(run_dir) / "memory" / f"rank-{rank}.pickle"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.cuda.memory._dump_snapshot(str(path))
                largest = _largest(torch.cuda.memory._snapshot())
                line += f"; largest live: {', '.join(largest)}; snapshot {path} (open it in pytorch.org/memory_viz)"
            except Exception as err:  # noqa: BLE001 -- the OOM is the error to report, not this
                line += f"; no memory snapshot ({type(err).__name__}: {err})"
        else:
            line += "; trainer.memory_snapshot=true records the largest allocations for the next attempt"
    return line
