"""The profiler window (`trainer.profile`): torch.profiler over a few chosen steps on chosen ranks,
one Chrome trace per rank under the run directory (`profile/rank-N.json.gz`, which Perfetto and
TensorBoard's profiler open) and the top operators by their own time (`profile/rank-N.txt`, and the
summary). Outside the window nothing is recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from runner.layout import PROFILE_DIR, profile_trace

log = logging.getLogger(__name__)
TOP = 5


class ProfileWindow:
    """Profiles global steps `start_step` .. `start_step + steps - 1` (counted from 1, as in the rows)."""

    def __init__(self, profile_cfg, run_dir: Path, rank: int, device: torch.device) -> None:
        self.start, self.steps = int(profile_cfg.start_step), int(profile_cfg.steps)
        self.run_dir, self.rank, self.device = Path(run_dir), rank, device
        ranks = profile_cfg.ranks
        self.ranks = None if ranks is None else [int(r) for r in ranks]
        self.mine = self.ranks is None or rank in self.ranks  # every rank keeps the window; the ranks asked record
        self.record_shapes, self.profile_memory = bool(profile_cfg.record_shapes), bool(profile_cfg.profile_memory)
        self.position: Callable[[], int] = lambda: 0
        self.active: Optional[torch.profiler.profile] = None
        self.top: list[tuple[str, float]] = []
        self.written = self.passed = False

    def before_step(self) -> None:
        step = self.position() + 1
        if self.start <= step < self.start + self.steps:
            self.passed = True
        if self.mine and self.active is None and not self.written and self.start <= step < self.start + self.steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.active = torch.profiler.profile(
                activities=activities, record_shapes=self.record_shapes, profile_memory=self.profile_memory
            )
            self.active.__enter__()

    def after_step(self, global_step: int) -> None:
        if self.active is not None and global_step >= self.start + self.steps - 1:
            self._write()

    def _write(self) -> None:
        prof, self.active = self.active, None
        prof.__exit__(None, None, None)
        path = self.run_dir / profile_trace(self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        attr = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        (path.parent / f"rank-{self.rank}.txt").write_text(averages.table(sort_by=attr, row_limit=25))
        ranked = sorted(averages, key=lambda e: getattr(e, attr, 0.0), reverse=True)
        self.top = [(e.key, getattr(e, attr, 0.0) / 1000.0) for e in ranked[:TOP]]
        self.written = True
        log.info("profile of steps %d-%d written to %s", self.start, self.start + self.steps - 1, path)

    def close(self) -> None:
        """The run ended inside the window: write what was recorded."""
        if self.active is not None:
            self._write()

    def summary(self) -> dict[str, Any]:
        """The traces of every rank asked (relative to the run directory) and this rank's top operators."""
        if not self.passed:
            return {}
        traces = [profile_trace(r) for r in self.ranks] if self.ranks is not None else [f"{PROFILE_DIR}/rank-*.json.gz"]
        return {"profile_traces": traces, "profile_top": self.top}


def profile_window(trainer_cfg, run_dir: Path, rank: int, device: torch.device) -> Optional[ProfileWindow]:
    """The window (recording on the ranks asked only), or None when profiling is off."""
    cfg = trainer_cfg.get("profile")
    if cfg is None or cfg.start_step is None:
        return None
    return ProfileWindow(cfg, run_dir, rank, device)
