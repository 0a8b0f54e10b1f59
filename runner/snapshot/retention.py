"""Which versions a run keeps: the newest `keep_last`, every milestone, the `keep_best` best by
the monitored metric, and the version the run resumed from (so a resume never loses its base). Pure decisions over typed versions; the store deletes what is dropped, and
only after the manifest that no longer lists it is published."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from runner.snapshot.versions import Version


@dataclass(frozen=True)
class Retention:
    keep_last: int = 3
    milestone_every: int = 0  # every version at the end of an epoch divisible by it is kept
    keep_best: int = 0  # versions with the best monitored values, kept beyond keep_last
    mode: str = "min"

    def is_milestone(self, epoch: int, end_of_epoch: bool) -> bool:
        return bool(end_of_epoch and self.milestone_every and epoch % self.milestone_every == 0)

    def best_first(self, versions: list[Version]) -> list[Version]:
        """Versions with a monitored value, best first (ties: the earlier step)."""
        scored = [v for v in versions if v.monitor is not None and math.isfinite(v.monitor.value)]
        sign = -1 if self.mode == "max" else 1
        return sorted(scored, key=lambda v: (sign * v.monitor.value, v.step))

    def apply(self, versions: list[Version], pinned: Collection[str] = ()) -> tuple[list[Version], list[Version]]:
        """(kept, dropped) of `versions` (oldest first); the kept ones marked `best` where they are.
        `pinned`: files kept whatever the rules say (the version the run resumed from)."""
        older = versions[: max(len(versions) - self.keep_last, 0)]
        best = {v.file for v in self.best_first(versions)[: self.keep_best]}
        drop = {v.file for v in older if not v.milestone and v.file not in best and v.file not in pinned}
        kept = [v.replace(best=True if v.file in best else None) for v in versions if v.file not in drop]
        return kept, [v for v in versions if v.file in drop]
