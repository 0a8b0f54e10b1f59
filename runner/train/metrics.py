"""`metrics.jsonl`: one JSON object per epoch (and per validation inside an epoch), appended and
flushed at once, always valid JSON. Keys: `epoch`, `step`, `train/<name>` (the epoch's means,
`train/loss` first), `val/<name>` when the model was validated at that step, `lr`, throughput.
Files written before validation existed have `loss` instead of `train/loss`; `train_loss` reads both.

A diverged run has NaN or infinite losses, which JSON cannot hold (Python would write the
non-standard `NaN`); they are written as the strings "nan", "inf" and "-inf", which `read_number`
(and Python's `float()`) turn back into floats.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union

from runner.fileio import atomic_write


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def encode(record: dict[str, Any]) -> str:
    return json.dumps({k: _json_safe(v) for k, v in record.items()}, allow_nan=False)


def read_number(value: Union[float, int, str, None]) -> float | None:
    """A number from metrics.jsonl: null stays None, "nan"/"inf"/"-inf" become floats."""
    return None if value is None else float(value)


def train_loss(record: dict[str, Any]) -> float | None:
    """A record's training loss: `train/loss`, or `loss` in files written before validation existed."""
    return read_number(record.get("train/loss", record.get("loss")))


class MetricsWriter:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file with `records` (on resume: drop epochs that will be redone)."""
        atomic_write(self.path, "".join(encode(r) + "\n" for r in records), durable=False)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(encode(record) + "\n")
