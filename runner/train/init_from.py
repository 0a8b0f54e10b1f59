"""`trainer.init_from`: a new run that starts from another run's model weights (fine-tuning).

Only the weights are taken: the optimizer, the schedule, the RNG streams and the step start fresh,
which is what `snapshot.resume=<path>` (the whole state of another run) does not do. A source is

    a run directory        its best snapshot (manifest "best", by snapshot.monitor), else its newest valid one
                           (from its snapshot.dir, a URL too)
    a snapshot URL         the same, from the manifest at s3://bucket/prefix (a run's snapshot.dir)
    a snapshots folder     the same, from its manifest.json
    a snapshot             snapshot-*.pt (verified against the manifest beside it, when there is one) or a
                           sharded step-* folder (its shards gathered in this process, no process group)
    exported weights       python -m runner.export's model.safetensors or model.pt (a plain state dict)

The driver reads the source once before launch and compares its key names and shapes with the
model built on the meta device; every worker then loads it into the model it built, before the
model is wrapped or sharded. A run directory that has snapshots of its own resumes from them and
never reads the source again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from runner.errors import UserError
from runner.layout import CONFIG_FILE
from runner.snapshot import SnapshotError, SnapshotManager, load_path
from runner.snapshot import format as snap
from runner.snapshot.location import snapshot_manager
from runner.snapshot.manager import MANIFEST

log = logging.getLogger(__name__)

KEY = "trainer.init_from"
ALLOWED = (
    "a run directory (its best snapshot, else its newest), a snapshots folder or snapshot URL (s3://...), a "
    "snapshot-*.pt file or step-* folder, or exported weights (model.safetensors, model.pt from python -m runner.export)"
)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
SHOWN_KEYS = 6  # keys named per kind of mismatch; the rest are counted


@dataclass
class InitSource:
    """The weights a source offers, and what to say about where they came from."""

    path: Path | str  # a str for a snapshot URL
    weights: dict[str, torch.Tensor]
    which: str  # e.g. "best snapshot snapshot-000000010.pt", "exported weights"
    step: Optional[int]

    def describe(self) -> str:
        return self.which + (f", step {self.step}" if self.step is not None else "")


def read_source(path: Any) -> InitSource:
    """The model weights `path` names (see the module docstring); UserError when there are none."""
    from runner.snapshot.sources import is_snapshot_url, url_snapshots

    if is_snapshot_url(str(path)):
        snapshots = url_snapshots(str(path), key=KEY)
        try:
            return _read_manager(snapshots.where, snapshots.manager)
        except SnapshotError as err:
            raise UserError(
                KEY, path, f"cannot be used: {err}", ALLOWED, "pass a URL whose snapshots are intact"
            ) from None
        except UserError:
            raise
        except Exception as err:  # the store does not answer: its own words
            raise UserError(
                KEY,
                path,
                f"cannot be read ({type(err).__name__}: {_one_line(err)})",
                ALLOWED,
                "check the URL, the endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_* variables or a profile)",
            ) from None
    path = Path(os.path.abspath(str(path)))
    if not path.exists():
        raise UserError(
            KEY,
            path,
            "no such file or directory",
            ALLOWED,
            "check the path (relative paths start from the directory the command runs in)",
        )
    try:
        if path.is_dir():
            return _read_folder(path)
        return _read_file(path)
    except SnapshotError as err:
        raise UserError(
            KEY,
            path,
            f"cannot be used: {err}",
            ALLOWED,
            "pass a run directory or snapshot whose files match their manifest",
        ) from None


def _read_folder(path: Path) -> InitSource:
    if (path / CONFIG_FILE).is_file():  # a run directory: its snapshot.dir is named in its config (a URL too)
        from runner.snapshot.sources import run_snapshots

        return _read_manager(path, run_snapshots(path, OmegaConf.load(path / CONFIG_FILE)).manager)
    if (path / MANIFEST).is_file():
        return _read_manager(path, SnapshotManager(path))
    if (path.parent / MANIFEST).is_file():  # a sharded version, step-*/: loaded through its manifest entry
        return _from_state(path, load_path(path), f"sharded snapshot {path.name}")
    raise UserError(
        KEY,
        path,
        f"is a folder with no {CONFIG_FILE}, no {MANIFEST} and no manifest beside it, so it "
        "holds no run and no snapshot",
        ALLOWED,
        "pass the run directory a training run wrote, e.g. outputs/<name>",
    )


def _read_manager(path: Path | str, manager: SnapshotManager) -> InitSource:
    entry = manager.best_entry()
    which = "best"
    if entry is not None:
        state = manager.load_entry(entry)
    else:
        latest = manager.load_latest()  # raises SnapshotError when versions exist but none is valid
        if latest is None:
            raise UserError(
                KEY,
                path,
                f"has no snapshot yet ({manager.manifest_path} lists none)",
                "a run directory whose training wrote at least one snapshot",
                "train that run first",
            )
        entry, state = latest
        which = "newest"
    monitor = entry.get("monitor")
    by = f" by {monitor['name']}={monitor['value']:.6g}" if which == "best" and isinstance(monitor, dict) else ""
    return _from_state(path, state, f"{which} snapshot {entry['file']}{by}", int(entry["step"]))


def _from_state(path: Path | str, state: dict[str, Any], which: str, step: Optional[int] = None) -> InitSource:
    weights = state.get(snap.MODEL_KEY)
    if state.get(snap.SHARDED_KEY):  # gathered whole in this process (no collective, no model needed)
        from runner.snapshot.sharded import full_model

        weights = full_model(state[snap.SHARDED_KEY])
    if step is None:
        step = (state.get(snap.TRAIN_STATE_KEY) or {}).get("global_step")
    return InitSource(path, _tensors(path, weights), which, step)


def _read_file(path: Path) -> InitSource:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                weights = {name: f.get_tensor(name) for name in f.keys()}
                step = (f.metadata() or {}).get("step")
        except Exception as err:
            raise UserError(
                KEY,
                path,
                f"cannot be read as safetensors: {_one_line(err)}",
                ALLOWED,
                "pass the model.safetensors that python -m runner.export wrote",
            ) from None
        return InitSource(path, _tensors(path, weights), "exported weights", int(step) if str(step).isdigit() else None)
    if (path.parent / MANIFEST).is_file() or path.name.startswith("snapshot-"):
        return _from_state(path, load_path(path), f"snapshot {path.name}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            KEY,
            path,
            f"cannot be loaded as weights ({type(err).__name__}: {_one_line(err)})",
            ALLOWED,
            "pass a state dict saved with torch.save (python -m runner.export --format pt)",
        ) from None
    if isinstance(loaded, dict) and snap.FORMAT_KEY in loaded:  # a runner snapshot under another name
        return _from_state(path, snap.load_bytes(path.read_bytes(), path), f"snapshot {path.name}")
    return InitSource(path, _tensors(path, loaded), "exported weights", _exported_step(path))


def _exported_step(path: Path) -> Optional[int]:
    """The step python -m runner.export recorded in the model config beside the weights, if any."""
    try:
        step = OmegaConf.select(OmegaConf.load(path.with_suffix(".yaml")), "export.step")
    except Exception:
        return None
    return int(step) if isinstance(step, int) else None


def _tensors(path: Path, weights: Any) -> dict[str, torch.Tensor]:
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        what = type(weights).__name__ + (" (empty)" if isinstance(weights, dict) and not weights else "")
        raise UserError(
            KEY,
            path,
            f"holds no model weights (a state dict of tensors); it holds a {what}",
            ALLOWED,
            "pass a run directory, a snapshot, or the weights python -m runner.export wrote",
        )
    return dict(weights)


# ---- fitting the weights to the model --------------------------------------------------------
def fitted(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with the prefix a wrapper adds ("module." of DDP, "_orig_mod." of torch.compile) taken off
    when the model's own names lack it."""
    own = model.state_dict().keys()
    for prefix in ("module.", "_orig_mod."):
        if weights and all(k.startswith(prefix) for k in weights) and not any(k.startswith(prefix) for k in own):
            weights = {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


def mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Optional[str]:
    """What keeps `weights` from loading strictly into `model` (missing and unexpected keys, other
    shapes), in one sentence; None when they fit. Works on a model built on the meta device."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    parts = []
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [f"{k} {list(theirs[k])} for {list(own[k])}" for k in own if k in theirs and own[k] != theirs[k]]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)):
        if keys:
            more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            parts.append(f"{label} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}{more}")
    return "; ".join(parts) or None


def check_source(cfg: DictConfig) -> InitSource:
    """Driver side: the source holds weights that fit the model the config builds (on the meta device)."""
    from hydra.utils import instantiate

    source = read_source(cfg.trainer.init_from)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    problem = mismatch(model, fitted(model, source.weights))
    if problem:
        raise UserError(
            KEY,
            source.path,
            f"its weights ({source.describe()}) do not fit the model {cfg.model._target_} builds: {problem}",
            "weights of the same model class with the same arguments",
            "pass the model=... and model.* the source run trained (see its config.yaml), or another source",
        )
    return source


def check_resume_target(cfg: DictConfig, path: Optional[Path]) -> None:
    """snapshot.resume=<path> restores that snapshot's step and epoch: one already at this run's end would
    train nothing and exit 0, which is never what was meant (mostly: a fine-tuning)."""
    if path is None or not path.exists():
        return  # check_resume reports a missing path
    try:
        listed = SnapshotManager(path.parent).entries() if (path.parent / MANIFEST).is_file() else []
        entry = next((e for e in listed if e["file"] == path.name), None)
        if entry is None:
            if path.is_dir():
                return  # an unlisted folder: check_resume refuses it
            position = load_path(path).get(snap.TRAIN_STATE_KEY) or {}
            entry = {"step": position.get("global_step", 0), "epoch": position.get("epoch", 0)}
    except SnapshotError:
        return  # the worker reports the unusable snapshot, as before
    by_steps = int(cfg.trainer.max_steps) > 0
    key, limit = (
        ("trainer.max_steps", int(cfg.trainer.max_steps))
        if by_steps
        else ("trainer.total_epochs", int(cfg.trainer.total_epochs))
    )
    at = int(entry["step"] if by_steps else entry["epoch"])
    if at < limit:
        return
    where = f"step {entry['step']}" if by_steps else f"epoch {entry['epoch']} (step {entry['step']})"
    raise UserError(
        "snapshot.resume",
        path,
        f"restores that run's whole training state (step, optimizer, schedule), "
        f"which is at {where}, already at or past this run's end ({key}={limit}): nothing would be trained",
        "a snapshot before the run's end",
        f"to fine-tune from its weights (fresh optimizer, schedule and "
        f"step 0) pass trainer.init_from={path} instead; to train that run on, raise {key} above {at}",
    )


# ---- the worker's hook -----------------------------------------------------------------------
def init_weights_from(model: torch.nn.Module, cfg: DictConfig, run_dir: Path) -> None:
    """Load trainer.init_from's weights into the freshly built `model` (every rank, before it is wrapped
    or sharded), unless the run directory has snapshots of its own: the run resumes from those."""
    path = cfg.trainer.get("init_from")
    if not path:
        return
    lead = int(os.environ.get("RANK", "0")) == 0
    if snapshot_manager(cfg, Path(run_dir)).entries():
        if lead:
            log.info("%s=%s not applied: the run resumes from its own snapshots", KEY, path)
        return
    if any(t.is_meta for t in model.state_dict().values()):
        raise RuntimeError(
            f"{KEY}: the model was built on the meta device (trainer.fsdp.meta_init), which holds no "
            "memory to load weights into"
        )
    source = read_source(path)
    weights = fitted(model, source.weights)
    problem = mismatch(model, weights)
    if problem:  # checked before launch too: the source changed since
        raise RuntimeError(f"{KEY}={source.path}: the weights no longer fit the model: {problem}")
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
    if lead:
        log.info("model initialised from %s (%s)", source.path, source.describe())


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
