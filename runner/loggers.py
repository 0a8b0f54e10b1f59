"""Optional metric loggers beside metrics.jsonl, chosen with `logger=<name>` (conf/logger/).

A logger is any object built from `_target_` with `log_dir` (resolved inside the run directory)
that has `log(record: dict)` and `close()`; rank 0 calls it with every record that goes into
metrics.jsonl (one per epoch, one per validation inside an epoch). Writing another one (W&B, MLflow) is a class and a YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLogger:
    """Scalars of every record (train/loss, val/accuracy, lr, samples_per_s, ...) at its optimizer step."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(Path(log_dir)))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key not in ("epoch", "step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_logger(cfg, run_dir: Path):
    """The configured logger, with its log_dir placed inside the run directory; None if none."""
    from hydra.utils import instantiate

    node = cfg.get("logger")
    if not node:
        return None
    log_dir = Path(node.get("log_dir") or "logs")
    return instantiate(node, log_dir=str(log_dir if log_dir.is_absolute() else run_dir / log_dir))
