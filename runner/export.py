"""`python -m runner.export RUN_DIR`: a trained model's bare weights, for serving and notebooks.

A snapshot exists to resume training: it also holds the optimizer, the schedules, the RNG streams
and the loop's position, and it is read through the runner (checksum, then a weights-only unpickle).
An export holds what the model needs and nothing else, in files that load without the runner:

    <run_dir>/export/model.safetensors   the model's state dict (model.pt with --format pt or
                                         without the safetensors package: a plain torch.save)
    <run_dir>/export/model.yaml          `model:` the model's config (its _target_ and arguments,
                                         resolved) and `export:` where the weights came from (run
                                         directory, snapshot, step, epoch, monitored value)

Loading them needs torch, hydra-core and safetensors, and the model's own class (for model=mlp that
is runner.models.MLP; torch.nn.Linear needs nothing more):

    cfg = omegaconf.OmegaConf.load("export/model.yaml")
    model = hydra.utils.instantiate(cfg.model).eval()
    model.load_state_dict(safetensors.torch.load_file("export/model.safetensors"))  # .pt: torch.load(f, weights_only=True)

In Python, `runner.load_model(run_dir)` returns the model straight from a run directory, through
the verified snapshot loading: the best snapshot when the run kept one (`snapshot.monitor`), else
the newest valid one.

Tied weights (a head.weight that is the embedding's weight): safetensors refuses tensors that share
memory, so each name is written as its own copy (the file's metadata lists them under "shared").
`load_state_dict(strict=True)` then fills both names with the same values, and the tie the model's
constructor made is kept. The .pt format stores shared tensors once, as torch.save does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from runner.errors import EXIT_USER_ERROR, UserError, full_errors_requested, report_user_error
from runner.fileio import atomic_write, temporary_path
from runner.layout import CONFIG_FILE
from runner.snapshot.format import MODEL_KEY, SHARDED_KEY, SnapshotError
from runner.snapshot.sources import RunSnapshots, is_snapshot_url, run_snapshots, stored_model_config, url_snapshots

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
FORMATS = ("auto", "safetensors", "pt")
SUFFIXES = {"safetensors": ".safetensors", "pt": ".pt"}
_FORMAT_OF_SUFFIX = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt"}
_RUN_DIR_ALLOWED = "a run directory: the folder a run wrote (its hydra.run.dir), holding config.yaml and snapshots/"


@dataclass
class RunWeights:
    """What a run directory offers: the model's config and the weights of one verified snapshot."""

    run_dir: Optional[Path]  # None when the weights come from a snapshot URL
    snapshots: RunSnapshots
    model_config: dict[str, Any]  # the `model:` node, resolved, with its _target_
    entry: dict[str, Any]  # the snapshot's manifest entry
    weights: dict[str, Any]  # the snapshot's MODEL_KEY part: the model's state dict
    chosen_by: str  # "best" (the manifest's best by snapshot.monitor) or "newest"
    notes: list[str] = field(default_factory=list)

    @property
    def snapshot_path(self) -> str:
        return self.snapshots.path_of(self.entry["file"])

    @property
    def source(self) -> str:
        """The run directory, or the snapshot URL, the weights came from."""
        return str(self.run_dir.resolve()) if self.run_dir is not None else self.snapshots.where


@dataclass
class Exported:
    """What `export` wrote, for the CLI's summary."""

    path: Path
    config_path: Path
    format: str
    tensors: int
    parameters: int
    source: RunWeights
    shared: dict[str, str]
    notes: list[str]


# ---- reading a run directory ------------------------------------------------------------------
def read_run(run_dir: Union[str, Path], best: bool = True) -> RunWeights:
    """The model config and the weights of the snapshot to use: the manifest's best one when `best`
    and the run recorded one, else the newest loadable one. UserError when there is none.

    `run_dir`: a run directory (its snapshots wherever its snapshot.dir keeps them, a URL too), or
    a snapshot URL itself (`s3://bucket/prefix`): then the model config is the one its manifest
    records, and no run directory is needed."""
    if is_snapshot_url(run_dir):
        snapshots = url_snapshots(str(run_dir))
        model_config = stored_model_config(snapshots, "run_dir")
        where: Path | str = snapshots.where
    else:
        run_dir = Path(run_dir)
        cfg = _run_config(run_dir)
        model_config = _model_config(cfg, run_dir)
        snapshots = run_snapshots(run_dir, cfg)
        where = run_dir
    entry, state, chosen_by, notes = _choose_snapshot(snapshots, where, best)
    weights = state.get(MODEL_KEY)
    if state.get(SHARDED_KEY):  # a sharded version: its files are verified; gather the model's shards in this process
        from runner.snapshot.sharded import full_model

        weights = full_model(state[SHARDED_KEY])
    if not isinstance(weights, dict) or not weights:
        raise UserError(
            "snapshot",
            snapshots.path_of(entry["file"]),
            f"holds no model weights (its '{MODEL_KEY}' part is "
            f"{type(weights).__name__}{' and empty' if isinstance(weights, dict) else ''})",
            "a snapshot the runner wrote while training this run",
            "pass the run directory the run wrote",
        )
    return RunWeights(snapshots.run_dir, snapshots, model_config, entry, weights, chosen_by, notes)


def _run_config(run_dir: Path) -> DictConfig:
    if not run_dir.exists():
        raise UserError(
            "run_dir",
            run_dir,
            "no such directory",
            _RUN_DIR_ALLOWED,
            "check the path (runs live in outputs/ by default)",
        )
    if not run_dir.is_dir():
        raise UserError(
            "run_dir", run_dir, "is a file, not a directory", _RUN_DIR_ALLOWED, "pass the folder that holds config.yaml"
        )
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        runs = sorted(p.parent for p in run_dir.glob(f"*/{CONFIG_FILE}"))
        fix = (
            f"pass one of the {len(runs)} run directories under it, e.g. {runs[0]}"
            if runs
            else "pass the directory a training run wrote, e.g. outputs/<name>"
        )
        raise UserError(
            "run_dir", run_dir, f"holds no {CONFIG_FILE}, so it is not a run directory", _RUN_DIR_ALLOWED, fix
        )
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:
        raise UserError(
            "run_dir",
            run_dir,
            f"{path} cannot be read: {_one_line(err)}",
            _RUN_DIR_ALLOWED,
            "restore the file the run wrote",
        ) from None
    if not isinstance(cfg, DictConfig):
        raise UserError(
            "run_dir",
            run_dir,
            f"{path} is not a mapping of config groups",
            _RUN_DIR_ALLOWED,
            "restore the file the run wrote",
        )
    return cfg


def _model_config(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    node = cfg.get("model")
    if not isinstance(node, DictConfig) or not node.get("_target_"):
        raise UserError(
            "model",
            node,
            f"{run_dir / CONFIG_FILE} has no model: node with a _target_",
            "the config.yaml a training run wrote (model._target_ names the model class)",
            "pass the run directory the run wrote",
        )
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception as err:
        raise UserError(
            "model",
            node.get("_target_"),
            f"the model config in {run_dir / CONFIG_FILE} cannot be resolved: {_one_line(err)}",
            "a config.yaml as the run wrote it (resolved)",
            "restore the file the run wrote",
        ) from None


def _choose_snapshot(snapshots: RunSnapshots, run_dir: Path | str, best: bool) -> tuple[dict, dict, str, list[str]]:
    manager, notes = snapshots.manager, []
    try:
        if best:
            entry = manager.best_entry()
            if entry is not None:
                try:
                    return entry, manager.load_entry(entry), "best", notes
                except SnapshotError as err:
                    raise UserError(
                        "snapshot",
                        snapshots.path_of(entry["file"]),
                        f"the best snapshot cannot be used: {err}",
                        "a snapshot that matches its manifest entry",
                        "export the newest valid snapshot instead (without --best; load_model(..., best=False))",
                    ) from None
            notes.append("no best snapshot recorded (the run did not set snapshot.monitor): using the newest")
        latest = manager.load_latest()  # verified (size, sha256) and unpickled weights-only, invalid ones skipped
    except SnapshotError as err:
        raise UserError(
            "run_dir",
            run_dir,
            f"has no usable snapshot: {err}",
            "a run directory with a valid snapshot",
            "re-run training to write a new snapshot, or restore the snapshot folder",
        ) from None
    except Exception as err:  # a store that does not answer: its own words, not a traceback
        raise UserError(
            "run_dir",
            run_dir,
            f"its snapshots in {snapshots.where} cannot be read ({type(err).__name__}: {_one_line(err)})",
            "a run directory or snapshot URL whose store answers",
            "check the endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_* variables or a profile)",
        ) from None
    if latest is None:
        if snapshots.run_dir is None or is_snapshot_url(snapshots.where):
            where = f"{snapshots.path_of('manifest.json')} lists none"
        else:
            where = f"{manager.manifest_path} lists none" if manager.dir.is_dir() else f"{manager.dir} does not exist"
        raise UserError(
            "run_dir",
            run_dir,
            f"has no snapshot to export: {where}",
            "a run directory whose training wrote at least one snapshot (one per epoch by default)",
            "train first (python -m runner ...), or pass the run directory that holds the snapshots",
        )
    entry, state = latest
    return entry, state, "newest", notes


# ---- building the model --------------------------------------------------------------------
def _build(model_config: dict[str, Any], source: Path | str, meta: bool = False) -> torch.nn.Module:
    from hydra.utils import instantiate

    target = model_config.get("_target_")
    try:
        if meta:
            with torch.device("meta"):
                model = instantiate(OmegaConf.create(model_config))
        else:
            model = instantiate(OmegaConf.create(model_config))
    except Exception as err:
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise UserError(
            "model._target_",
            target,
            f"cannot be built from {_config_source(source)}: {type(cause).__name__}: {_one_line(cause)}",
            "an importable torch.nn.Module class and its arguments",
            "run from where the model's module is importable (the folder you trained from, or set PYTHONPATH)",
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(
            "model._target_",
            target,
            f"builds a {type(model).__name__}, not a torch.nn.Module",
            "a class or function returning torch.nn.Module",
        )
    return model


def _config_source(source: Path | str) -> str:
    """Where the model config came from: a run's config.yaml or the manifest at a URL."""
    return f"the config recorded in {source}" if is_snapshot_url(str(source)) else str(Path(source) / CONFIG_FILE)


def _load_weights(model: torch.nn.Module, source: RunWeights) -> None:
    with warnings.catch_warnings():  # into a meta model the copies are no-ops, which torch warns about
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        try:
            model.load_state_dict(source.weights, strict=True)
        except Exception as err:
            raise UserError(
                "model",
                source.model_config.get("_target_"),
                f"the weights in {source.snapshot_path} do not fit the model config.yaml builds: {_one_line(err)}",
                "the config.yaml and snapshots of one run",
                "pass the run directory as the run wrote it (its config.yaml and snapshots together)",
            ) from None


def load_model(
    run_dir: Union[str, Path], best: bool = True, map_location: Union[str, torch.device, None] = "cpu"
) -> torch.nn.Module:
    """The trained model of `run_dir`, in eval mode, on `map_location` (a device; None: leave on CPU).

    Built from the run's config.yaml (`model:`), with the weights of the best snapshot when `best`
    and the run kept one (`snapshot.monitor`), else of the newest valid snapshot; snapshots are
    verified against their manifest before loading. Raises `runner.errors.UserError` when the run
    directory, its config.yaml or a usable snapshot is missing, or the weights do not fit.
    """
    source = read_run(run_dir, best)
    for note in source.notes:
        log.info("%s: %s", source.source, note)
    model = _build(source.model_config, source.source)
    _load_weights(model, source)
    log.info(
        "loaded %s (%s, step %d, epoch %d)",
        source.snapshot_path,
        source.chosen_by,
        source.entry["step"],
        source.entry["epoch"],
    )
    if map_location is not None:
        model.to(map_location)
    return model.eval()


# ---- writing the export --------------------------------------------------------------------
def export(
    run_dir: Union[str, Path], out: Union[str, Path, None] = None, best: bool = False, fmt: str = "auto"
) -> Path:
    """Write the model's bare weights and its config (`<name>.yaml` beside them); returns the weights' path.

    `fmt`: safetensors, pt (a plain torch.save of the state dict) or auto (safetensors when the
    package is installed, else pt; an `out` ending in .safetensors or .pt decides it too). `out`
    defaults to <run_dir>/export/model.safetensors (or .pt); an existing folder gets model.<ext>.
    `best`: the best snapshot by `snapshot.monitor` when the run kept one, else the newest."""
    result = export_run(run_dir, out, best, fmt)
    for note in result.notes:
        log.info("%s", note)
    return result.path


def export_run(
    run_dir: Union[str, Path], out: Union[str, Path, None] = None, best: bool = False, fmt: str = "auto"
) -> Exported:
    """`export`, returning what was written (paths, counts, the snapshot used)."""
    if fmt not in FORMATS:
        raise UserError("--format", fmt, "is not an export format", " | ".join(FORMATS))
    source = read_run(run_dir, best)
    notes = list(source.notes)
    fmt = _pick_format(fmt, out, source.weights, notes)
    path = _out_path(source.run_dir if source.run_dir is not None else Path.cwd(), out, fmt)
    parameters = _check_fit(source)
    shared: dict[str, str] = {}
    meta = _provenance(source, path, fmt, parameters)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "safetensors":
            tensors, shared = unshare(source.weights)
            if shared:
                meta["shared"] = shared
            _write_safetensors(tensors, path, meta, source.model_config)
        else:
            _write_pt(source.weights, path)
        config_path = path.with_suffix(".yaml")
        atomic_write(config_path, _config_text(path, meta, source.model_config), durable=False)
    except OSError as err:
        raise UserError(
            "--out",
            path,
            f"cannot be written: {err.strerror or err}",
            "a path in a writable folder",
            "pass --out with a writable location",
        ) from None
    return Exported(path, config_path, fmt, len(source.weights), parameters, source, shared, notes)


def _pick_format(fmt: str, out: Union[str, Path, None], weights: dict[str, Any], notes: list[str]) -> str:
    by_suffix = _FORMAT_OF_SUFFIX.get(Path(out).suffix.lower()) if out is not None else None
    if fmt != "auto" and by_suffix is not None and by_suffix != fmt:
        raise UserError(
            "--out",
            out,
            f"names a {Path(out).suffix} file but the format is {fmt}",
            f"a {SUFFIXES[fmt]} file for --format {fmt}",
            f"end --out with {SUFFIXES[fmt]}, or drop --format",
        )
    have_safetensors = importlib.util.find_spec("safetensors") is not None
    chosen = fmt if fmt != "auto" else by_suffix or ("safetensors" if have_safetensors else "pt")
    if fmt == "auto" and chosen == "pt" and by_suffix is None:
        notes.append(
            'safetensors is not installed: writing a plain torch.save file (pip install "hydra-torch-runner[export]" for safetensors)'
        )
    if chosen != "safetensors":
        return chosen
    if not have_safetensors:
        raise UserError(
            "--format",
            "safetensors",
            "needs the safetensors package, which is not installed",
            "--format pt, or safetensors installed",
            'pip install "hydra-torch-runner[export]" (or pip install safetensors), or pass --format pt',
        )
    odd = [k for k, v in weights.items() if not isinstance(v, torch.Tensor) or v.layout != torch.strided]
    if odd:
        if fmt == "auto" and by_suffix is None:
            notes.append(
                f"safetensors holds dense tensors only, and {', '.join(odd[:3])} is not one: writing a plain torch.save file"
            )
            return "pt"
        raise UserError(
            "--format",
            "safetensors",
            f"holds dense tensors only, and the model's state has {', '.join(odd[:3])}"
            f"{' and more' if len(odd) > 3 else ''} ({type(weights[odd[0]]).__name__})",
            "--format pt for this model",
            "pass --format pt",
        )
    return chosen


def _out_path(run_dir: Path, out: Union[str, Path, None], fmt: str) -> Path:
    name = f"model{SUFFIXES[fmt]}"
    if out is None:
        return run_dir / EXPORT_DIR / name
    text = str(out)
    out = Path(out)
    if out.is_dir() or text.endswith(("/", os.sep)):
        return out / name
    if out.suffix.lower() in (".yaml", ".yml"):
        raise UserError(
            "--out",
            out,
            "is where the model config goes (written beside the weights as <name>.yaml)",
            "a weights file, e.g. model.safetensors or model.pt",
            "pass the weights file's name",
        )
    return out if out.suffix else out.with_suffix(SUFFIXES[fmt])


def _check_fit(source: RunWeights) -> int:
    """Build the model (on the meta device when it allows) and load the weights strictly, so that
    what is exported is known to load into the model its config builds. Returns its parameter count."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _build(source.model_config, source.source, meta=True)
    except UserError:
        model = _build(source.model_config, source.source)  # some constructors need real tensors
    _load_weights(model, source)
    return sum(p.numel() for p in model.parameters())  # tied parameters once


def unshare(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with no two tensors sharing memory, as safetensors requires, and which names
    were copied: {copied name: the name it shared memory with}. Every tensor is made contiguous."""
    out: dict[str, torch.Tensor] = {}
    owners: dict[tuple, str] = {}
    shared: dict[str, str] = {}
    for name, tensor in weights.items():
        tensor = tensor.detach()
        if tensor.numel() and tensor.device.type != "meta":
            key = (tensor.device, tensor.untyped_storage().data_ptr())
            if key in owners:
                shared[name] = owners[key]
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            else:
                owners[key] = name
        out[name] = tensor.contiguous()
    return out, shared


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, Any], model_config: dict) -> None:
    from safetensors.torch import save_file

    header = {"format": "pt"}  # the convention for torch tensors in safetensors files
    header.update(
        {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in meta.items()
            if v is not None and k not in ("format", "weights")
        }
    )  # strings only
    header["model"] = json.dumps(model_config)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb"):  # created as any file of the run is (umask), since safetensors creates its files 0600
            pass
        mode = os.stat(tmp).st_mode & 0o777
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_pt(weights: dict[str, Any], path: Path) -> None:
    tmp = temporary_path(path)
    try:
        torch.save(dict(weights), str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _provenance(source: RunWeights, path: Path, fmt: str, parameters: int) -> dict[str, Any]:
    entry = source.entry
    monitor = entry.get("monitor")
    return {
        "weights": path.name,
        "format": fmt,
        "run_dir": source.source,
        "snapshot": entry["file"],
        "sha256": entry.get("sha256"),
        "step": int(entry["step"]),
        "epoch": int(entry["epoch"]),
        "chosen_by": source.chosen_by,
        "monitor": {"name": monitor["name"], "value": monitor["value"]} if isinstance(monitor, dict) else None,
        "tensors": len(source.weights),
        "parameters": parameters,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _config_text(path: Path, meta: dict[str, Any], model_config: dict[str, Any]) -> str:
    loader = (
        f"safetensors.torch.load_file({path.name!r})"
        if meta["format"] == "safetensors"
        else f"torch.load({path.name!r}, weights_only=True)"
    )
    head = (
        f"# The model of {meta['run_dir']}, exported by python -m runner.export. To load it:\n"
        f"#   model = hydra.utils.instantiate(OmegaConf.load({path.with_suffix('.yaml').name!r}).model).eval()\n"
        f"#   model.load_state_dict({loader})\n"
    )
    return head + OmegaConf.to_yaml(OmegaConf.create({"export": meta, "model": model_config}))


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---- command line ----------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner.export",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog="The files load without the runner; see the module docstring (pydoc runner.export).",
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run directory (holds config.yaml and snapshots/), or the snapshot.dir URL a run wrote to "
        "(s3://bucket/prefix: the export goes to ./export/ unless --out says where)",
    )
    parser.add_argument(
        "--best",
        action="store_true",
        help="the best snapshot by snapshot.monitor, when the run kept one (default: the newest valid one)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help=f"the weights file (default: RUN_DIR/{EXPORT_DIR}/model.safetensors, or .pt); "
        "the model config is written beside it as <name>.yaml",
    )
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        default="auto",
        help="safetensors, pt (plain torch.save) or auto: safetensors when installed (default)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = export_run(args.run_dir, args.out, args.best, args.fmt)
    except UserError as err:
        if full_errors_requested():
            raise
        report_user_error(err)
        return EXIT_USER_ERROR
    entry, source = result.source.entry, result.source
    monitor = entry.get("monitor")
    size = result.path.stat().st_size / 2**20
    print(f"weights  : {result.path} ({result.format}, {size:.1f} MB)")
    print(f"config   : {result.config_path}")
    print(
        f"contents : {result.tensors} tensors, {result.parameters:,} parameters"
        + (f" (shared in the model, written as copies: {', '.join(result.shared)})" if result.shared else "")
    )
    score = f"{monitor['name']}={monitor['value']:.6g}" if isinstance(monitor, dict) else ""
    chosen = f"best by {score}" if source.chosen_by == "best" else ", ".join(filter(None, [source.chosen_by, score]))
    print(f"snapshot : {source.snapshot_path} (step {entry['step']}, epoch {entry['epoch']}, {chosen})")
    for note in result.notes:
        print(f"note     : {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
