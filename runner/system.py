"""Facts about this process and machine that the driver and the workers both need (no torch import)."""

from __future__ import annotations

import os
import resource
import sys


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
