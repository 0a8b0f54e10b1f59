"""Memory at a training row: this process's resident memory (always) and, on a GPU, the most the
caching allocator has held for tensors and reserved from the driver since the start. All are read
from counters the host keeps: no device sync."""

from __future__ import annotations

import os

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
