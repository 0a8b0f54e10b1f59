"""The run directory: a stable name derived from the config, and what the driver writes into it.

Hydra's default `outputs/<date>/<time>` would make every call a new run; here the directory is
named from the overrides that define the run, so re-running a command finds its snapshots.
Overrides that only extend or steer a run (more epochs, launch and snapshot settings) are left
out of the name: re-running with `trainer.total_epochs=100` continues the same run.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from runner.config import LaunchMode
from runner.layout import CONFIG_FILE

# Keys (and groups) that never change what a run computes, only how long or how it is watched.
NON_DEFINING_KEYS = (
    "name",
    "hydra",
    "launch",
    "snapshot",
    "logger",
    "trainer.total_epochs",
    "trainer.save_every",
    "trainer.save_every_steps",
    "trainer.log_every",
    "trainer.progress",
    "trainer.crash_at_step",
    "trainer.crash_rank",
    "trainer.max_steps",
    "trainer.val_every",
    "trainer.val_every_steps",
    "trainer.test",
    "trainer.early_stop",
    "trainer.flops_per_sample",
    "trainer.peak_tflops",
    "trainer.profile",
    "trainer.memory_snapshot",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.prefetch_factor",
    "data.eval_batch_size",
    "data.loader",
    # How the model is spread over the workers, not what it computes: a run may move between
    # ddp and fsdp, and between numbers of workers (sharded snapshots reshard at load).
    "trainer.strategy",
    "trainer.fsdp.shard",
    "trainer.fsdp.reshard_after_forward",
    "trainer.fsdp.cpu_offload",
    "trainer.ddp",
)
# What a snapshot's config must share with the current one for a resume to make sense.
# trainer.batch_size changes the data order and the steps (and names the run directory like these).
IDENTITY_KEYS = (
    "dataset",
    "task",
    "model",
    "optimizer",
    "scheduler",
    "trainer.seed",
    "trainer.shuffle",
    "trainer.batch_size",
    "trainer.accumulate",
    "data.val_fraction",
    "data.drop_last",
    "trainer.init_from",
)
# Identity keys added after runs were already written: a snapshot without them still resumes (the
# loss moved from trainer.loss to task.loss; a scheduler's `interval` defaults to epoch, as before).
LATER_IDENTITY_KEYS = (
    "trainer.batch_size",
    "task",
    "trainer.accumulate",
    "data.val_fraction",
    "data.drop_last",
    "scheduler.interval",
    "trainer.init_from",
)
RETIRED_IDENTITY_KEYS = ("trainer.loss",)
MAX_NAME = 80


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


# ...except these, which switch to another training engine (launch=rpc) and so define the run.
ENGINE_OVERRIDES = ("launch=rpc", "launch.topology=", "launch.num_stages=")


def _defines_run(override: str) -> bool:
    return override.startswith(ENGINE_OVERRIDES) or not _matches(_override_key(override), NON_DEFINING_KEYS)


def run_dir_name(name: Optional[str], overrides: Iterable[str]) -> str:
    """`name` if given, else the defining overrides joined by commas ('default' when none).

    Long names keep a readable head and end in a hash of the whole, so they stay unique.
    """
    if name:
        return _sanitize(str(name))
    kept = sorted(o for o in overrides if _defines_run(o))
    text = _sanitize(",".join(kept)) or "default"
    if len(text) > MAX_NAME:
        digest = hashlib.sha1(",".join(kept).encode()).hexdigest()[:10]
        text = f"{text[: MAX_NAME - 11]}-{digest}"
    return text


def check_name(name: Optional[str], parent: Path) -> None:
    """`name=` must leave a usable folder name once cleaned (not empty, not `.`/`..`, not longer than
    the filesystem allows); raises UserError before anything is created."""
    from runner.errors import UserError

    if name is None:
        return
    cleaned = _sanitize(str(name))
    if not cleaned:
        raise UserError(
            "name",
            name,
            "leaves no folder name once cleaned (letters, digits and ._=,+@- are kept; "
            "leading and trailing dots are dropped)",
            "a name with at least one letter or digit",
            "e.g. name=baseline",
        )
    try:
        limit = os.pathconf(existing_ancestor(parent), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(cleaned.encode()) > limit:
        raise UserError(
            "name",
            f"{cleaned[:40]}... ({len(cleaned)} characters)",
            f"is longer than this filesystem allows ({limit} bytes)",
            f"a name of at most {limit} bytes",
            "pass a shorter name=...",
        )


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+@-]", "_", text).strip(".")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """Flattened, resolved values of `IDENTITY_KEYS`.

    Keys that only extend a run are blanked first, so a value derived from them (a cosine
    schedule's `T_max: ${trainer.total_epochs}`) does not make an extended run look different.
    """
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in NON_DEFINING_KEYS:
        if key.startswith("trainer."):
            OmegaConf.update(copy, key, None, force_add=True)
    launch = copy.get("launch") or {}
    mode = launch.get("mode", "standalone")
    flat: dict[str, Any] = {
        "engine": f"rpc/{launch.get('topology')}/{launch.get('num_stages')}" if mode == LaunchMode.rpc else "ddp"
    }
    for key in IDENTITY_KEYS:
        node = OmegaConf.select(copy, key)
        _flatten(key, OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node, flat)
    flat["trainer.init_from"] = absolute_init_from(flat.get("trainer.init_from"))
    return flat


def absolute_init_from(path: Any) -> Optional[str]:
    """trainer.init_from as an absolute path (a URL as it is): the same source whatever directory the
    command runs from."""
    if not path:
        return None
    return str(path) if "://" in str(path) else os.path.abspath(str(path))


def _flatten(prefix: str, node: Any, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = node


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ; keys the old run could not have had, or that moved, do not count."""
    old = {k: v for k, v in old.items() if not _matches(k, RETIRED_IDENTITY_KEYS)}
    later = [k for k in new if _matches(k, LATER_IDENTITY_KEYS) and k not in old]
    keys = set(old) | (set(new) - set(later))
    return sorted(k for k in keys if old.get(k) != new.get(k))


def write_run_files(run_dir: Path, cfg: DictConfig, hydra_cfg: Optional[DictConfig]) -> Path:
    """Hydra's record (.hydra/) and the resolved config the workers read (config.yaml)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if hydra_cfg is not None:
        record = run_dir / ".hydra"
        record.mkdir(exist_ok=True)
        OmegaConf.save(cfg, record / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), record / "hydra.yaml")
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), record / "overrides.yaml")
    path = run_dir / CONFIG_FILE
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["run_dir"] = str(run_dir.resolve())
    resolved["identity"] = identity(cfg)
    if resolved.get("trainer", {}).get("init_from"):
        resolved["trainer"]["init_from"] = absolute_init_from(resolved["trainer"]["init_from"])
    OmegaConf.save(OmegaConf.create(resolved), path)
    return path
