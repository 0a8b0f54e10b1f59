"""Experiment trackers beside metrics.jsonl, chosen with `logger=<name>` (conf/logger/):
`tensorboard`, `csv`, `mlflow`, `wandb`, or several at once (`logger=many`).

A logger is any object built from `_target_` with `log_dir` (resolved inside the run directory)
and `run_dir`, that has `log(record: dict)` and `close()`, and optionally `finish(summary)` (the
run finished: upload what it produced). Rank 0 alone logs, every record that goes into
metrics.jsonl (a training row every `trainer.log_every` steps, one record per epoch and per
validation), keyed by `step`; `tracked` says under which names.

`Loggers` wraps them for the loop: a record already sent (before a worker restart or a resume,
which redo the records after the snapshot with bitwise the same values) is not sent again, and a
logger that fails (tracking server down, disk full) is warned about once while training goes on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from runner.fileio import atomic_write

log = logging.getLogger(__name__)

SENT_FILE = "loggers.json"  # in the run's logs/: how many records the loggers have been sent


def numeric_items(record: dict[str, Any]) -> dict[str, float]:
    """The record's metrics: numbers other than the position and the wall-clock time."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in ("epoch", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def tracked(record: dict[str, Any]) -> dict[str, Any]:
    """A record as trackers get it. Training rows (every trainer.log_every steps) carry `train/<name>`,
    `lr` and throughput; an epoch's end carries the epoch's means, which trackers get as
    `train/<name>_epoch` and `samples_per_s_epoch`, so that one name never holds two quantities at one step."""
    if record.get("scope") == "step" or not any(k.startswith("train/") for k in record):
        return record
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "lr":
            continue  # the training rows carry it, at every row's step
        out[f"{key}_epoch" if key.startswith("train/") or key.endswith("_per_s") else key] = value
    return out


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as {dotted.key: str(value)} (tracking servers store parameters as strings)."""
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list):
        return {prefix[:-1]: json.dumps(node)} if prefix else {}
    return {prefix[:-1]: str(node)} if prefix else {}


def load_config(run_dir: Optional[Path]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml" if run_dir else None
    return OmegaConf.to_container(OmegaConf.load(path)) if path and path.exists() else {}


class TensorBoardLogger:
    """Scalars of every record (train/loss, val/accuracy, lr, samples_per_s, ...) at its optimizer step."""

    def __init__(self, log_dir: str, run_dir: Optional[str] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(Path(log_dir)))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in numeric_items(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CSVLogger:
    """`metrics.csv`: one row per record, a column per key. Rows are appended; the file is rewritten
    only when a record brings a new column (a validation metric's first value, say)."""

    def __init__(self, log_dir: str, run_dir: Optional[str] = None, name: str = "metrics.csv") -> None:
        self.path = Path(log_dir) / name
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        if self.path.exists():  # a resumed run: the rows logged before it
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.rows = list(reader)
                self.columns = list(reader.fieldnames or [])

    def log(self, record: dict[str, Any]) -> None:
        row = {"epoch": record.get("epoch"), "step": record.get("step"), **numeric_items(record)}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new or not self.path.exists():
            self.columns += new
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write(self.path, out.getvalue(), durable=False)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def close(self) -> None:
        pass


class MLflowLogger:
    """An MLflow run per run directory: the resolved config as parameters, every record's metrics
    at their step, config.yaml and the final snapshot as artifacts. A resumed run (or a restarted
    worker) continues the same MLflow run, whose id is kept in the run directory's logs/."""

    TAG = "runner.run_dir"

    def __init__(
        self,
        log_dir: str,
        run_dir: str,
        tracking_uri: Optional[str] = None,
        experiment: str = "runner",
        run_name: Optional[str] = None,
        log_snapshot: bool = True,
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        store = Path(log_dir)
        store.mkdir(parents=True, exist_ok=True)
        self.run_dir, self.log_snapshot = Path(run_dir), log_snapshot
        self.client = MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{store / 'mlflow.db'}")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=(store / "artifacts").as_uri())
        )
        id_file = self.run_dir / "logs" / "mlflow_run_id"  # archived with the run by snapshot.resume=never
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=run_name or self.run_dir.name, tags={self.TAG: str(self.run_dir)}
            )
            self.run_id = run.info.run_id
            params = [Param(k[:250], v[:6000]) for k, v in flatten(load_config(self.run_dir)).items()]
            for begin in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[begin : begin + 100])
            if (self.run_dir / "config.yaml").exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
            id_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(id_file, self.run_id, durable=False)

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp = int(float(record.get("time", time.time())) * 1000)
        metrics = [Metric(k, v, stamp, int(record["step"])) for k, v in numeric_items(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        snapshot = summary.get("snapshot_path")
        if self.log_snapshot and snapshot and Path(snapshot).exists():
            self.client.log_artifact(self.run_id, snapshot, artifact_path="snapshots")
        self.client.set_terminated(self.run_id, status="FINISHED")

    def close(self) -> None:
        pass


class WandbLogger:
    """A Weights & Biases run per run directory (`mode=offline` by default: no account, no
    network; `wandb sync` uploads it later). Its id is kept in the run directory, so a resumed run
    continues the same W&B run."""

    def __init__(
        self,
        log_dir: str,
        run_dir: str,
        project: str = "runner",
        mode: str = "offline",
        entity: Optional[str] = None,
        run_name: Optional[str] = None,
    ) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner would drown the runner's console
        import wandb

        self.dir, self.run_dir = Path(log_dir), Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        id_file = self.dir / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            dir=str(self.dir),
            id=run_id,
            resume="allow",
            name=run_name or self.run_dir.name,
            config=load_config(self.run_dir),
            reinit="create_new",
        )
        atomic_write(id_file, run_id, durable=False)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(numeric_items(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class ManyLoggers:
    """Several loggers at once: `loggers` is a list of logger configs (each with its `_target_`)."""

    def __init__(self, log_dir: str, run_dir: str, loggers: list) -> None:
        self.loggers = [_build(node, Path(run_dir)) for node in loggers]

    def log(self, record: dict[str, Any]) -> None:  # never called: Loggers guards each logger on its own
        raise NotImplementedError


class Loggers:
    """Rank 0's trackers as the loop sees them: each record once, failures warned about once."""

    def __init__(self, loggers: list, run_dir: Path) -> None:
        self.loggers = loggers
        self.state_path = Path(run_dir) / "logs" / SENT_FILE
        self.sent = 0
        if self.state_path.exists():
            try:
                self.sent = int(json.loads(self.state_path.read_text()).get("sent", 0))
            except (ValueError, OSError):
                self.sent = 0
        self.failed: set[int] = set()

    def log(self, record: dict[str, Any], index: int) -> None:
        """`index`: the record's position in the run's history (the same after a resume)."""
        if index < self.sent:
            return  # sent before a restart or resume: the redone record holds the same values
        record = tracked(record)
        for i, logger in enumerate(self.loggers):
            self._call(i, logger.log, record)
        self.sent = index + 1
        try:
            atomic_write(self.state_path, json.dumps({"sent": self.sent}), durable=False)
        except OSError:
            pass

    def finish(self, summary: dict[str, Any]) -> None:
        for i, logger in enumerate(self.loggers):
            if hasattr(logger, "finish"):
                self._call(i, logger.finish, summary)

    def close(self) -> None:
        for i, logger in enumerate(self.loggers):
            self._call(i, logger.close)

    def _call(self, i: int, method, *args) -> None:
        try:
            method(*args)
        except Exception as err:  # a tracker must never end a training run
            if i not in self.failed:
                self.failed.add(i)
                log.warning(
                    "logger %s failed (%s: %s); training goes on, further failures of it are not reported",
                    type(self.loggers[i]).__name__,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )


def _build(node, run_dir: Path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.create(node) if not OmegaConf.is_config(node) else node
    log_dir = Path(str(node.get("log_dir") or "logs"))
    log_dir = log_dir if log_dir.is_absolute() else run_dir / log_dir
    return instantiate(node, log_dir=str(log_dir.resolve()), run_dir=str(run_dir), _recursive_=False)


def build_logger(cfg, run_dir: Path) -> Optional[Loggers]:
    """The configured loggers, guarded; None if none. A logger that cannot start is warned about
    and left out (training does not depend on it)."""
    node = cfg.get("logger")
    if not node:
        return None
    try:
        built = _build(node, Path(run_dir))
    except Exception as err:
        cause = err.__cause__ or err
        log.warning(
            "logger %s could not start (%s: %s); training goes on without it",
            node.get("_target_"),
            type(cause).__name__,
            str(cause).splitlines()[0] if str(cause) else "",
        )
        return None
    return Loggers(built.loggers if isinstance(built, ManyLoggers) else [built], run_dir)


# What each logger needs installed, for the check before launch: _target_ -> (module, extra).
REQUIREMENTS = {
    "runner.loggers.TensorBoardLogger": ("tensorboard", "tensorboard"),
    "runner.loggers.MLflowLogger": ("mlflow", "mlflow"),
    "runner.loggers.WandbLogger": ("wandb", "wandb"),
}
