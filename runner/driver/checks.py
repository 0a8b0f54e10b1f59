"""Checks run in the driver before any worker starts, so a mistake costs milliseconds, not a launch.

`preflight(cfg, run_dir)` raises `UserError` for the first problem: ranges (config.check_ranges),
the machine (CUDA, disk, permissions), the objects the config names (every `_target_` is imported
and the model, optimizer and scheduler are built on the meta device, so a bad keyword or a
negative learning rate is caught here), and the run directory's snapshots (resume mistakes).
Nothing here writes to disk.
"""

from __future__ import annotations

import importlib.util
import logging
import inspect
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from runner.config import (Backend, CpuAllreduce, LaunchMode, NprocWord, ResumeWord, Topology, check_ranges, check_unknown_keys,
                           parse_nproc, resume_path)
from runner.errors import UserError
from runner.driver.rundir import check_name, existing_ancestor, identity, identity_diff
from runner.snapshot import SnapshotError, SnapshotManager

log = logging.getLogger(__name__)

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
# torch optimizers say "Invalid learning rate: -1"; map the phrase to the config key.
TORCH_PHRASES = {"learning rate": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
                 "beta": "betas", "epsilon": "eps", "dampening": "dampening", "step_size": "step_size"}


def preflight(cfg: DictConfig, run_dir: Path, choices: Optional[dict[str, str]] = None, overrides: tuple = (),
              lock: Optional[Callable[[], object]] = None) -> None:
    """`choices`: the config file picked per group (Hydra's runtime.choices); `overrides`: the command line.

    `lock` (taking the run directory's lock) is called between the quick checks and the slow ones
    (importing and dry-building the objects, building the dataset, reading the snapshots): a
    command whose run is in use is refused in milliseconds, and only the holder reads the snapshots."""
    check_unknown_keys(cfg)
    check_ranges(cfg)
    check_name(cfg.get("name"), run_dir.parent)
    check_machine(cfg)
    check_run_dir(run_dir, 0)  # the lock file needs a writable directory
    if lock is not None:
        lock()
    param_bytes = check_objects(cfg, choices or {}, tuple(overrides))
    check_init_from(cfg, run_dir)
    check_data(cfg, (choices or {}).get("dataset"))
    check_run_dir(run_dir, param_bytes)
    check_resume(cfg, run_dir)


def check_gpu_count(runtime, visible: int, asked: object) -> None:
    """NCCL workers need a GPU each (several workers cannot share one GPU with NCCL)."""
    if runtime.device == "cuda" and runtime.nproc_per_node > visible:
        raise UserError("launch.nproc_per_node", asked, f"{runtime.nproc_per_node} GPU workers need a GPU each, and "
                        f"{visible} {'is' if visible == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES)",
                        f"gpu | auto | an integer from 1 to {visible}",
                        "use launch.nproc_per_node=gpu (one worker per visible GPU), or launch.backend=gloo for CPU workers")


def check_start_method(launch: DictConfig, runtime) -> None:
    import multiprocessing

    method = runtime.start_method
    if launch.mode == LaunchMode.local:
        return
    if method not in multiprocessing.get_all_start_methods():
        raise UserError("launch.start_method", method, f"this platform ({sys.platform}) cannot start processes that way",
                        " | ".join(["auto", *multiprocessing.get_all_start_methods()]), "use launch.start_method=auto")
    if method == "fork" and runtime.device == "cuda":
        raise UserError("launch.start_method", method, "the workers use CUDA, and a process forked from the driver cannot "
                        "(CUDA does not survive fork)", "auto | forkserver | spawn",
                        "use launch.start_method=auto (a fork server that never touches CUDA)")


def check_machine(cfg: DictConfig) -> None:
    from runner.launch.runtime import resolve_runtime, visible_gpus

    launch = cfg.launch
    nproc = parse_nproc(launch.nproc_per_node)
    if not torch.cuda.is_available():
        if nproc == NprocWord.gpu:
            raise UserError("launch.nproc_per_node", "gpu", "no CUDA device is visible on this machine",
                            "auto | cpu | a positive integer", "use launch.nproc_per_node=auto (or check CUDA_VISIBLE_DEVICES)")
        if launch.backend == Backend.nccl:
            raise UserError("launch.backend", "nccl", "NCCL needs CUDA devices and none is visible",
                            "auto | gloo", "use launch.backend=auto (gloo on CPU)")
    runtime = resolve_runtime(launch)
    if str(cfg.trainer.strategy) == "fsdp" and cfg.trainer.fsdp.cpu_offload and runtime.device != "cuda":
        raise UserError("trainer.fsdp.cpu_offload", True, "moves a GPU worker's sharded state into CPU memory, and these "
                        "workers train on the CPU already", "false on CPU workers", "drop trainer.fsdp.cpu_offload=true")
    check_gpu_count(runtime, len(visible_gpus()), launch.nproc_per_node)
    check_start_method(launch, runtime)
    warn_gpu_options_on_cpu(cfg, runtime.device)
    # Refused unless shm was moot (one worker on one machine: nothing to average).
    moot = launch.mode != LaunchMode.multinode and runtime.nproc_per_node < 2
    if launch.cpu_allreduce == CpuAllreduce.shm and runtime.allreduce != "shm" and not moot:
        raise UserError("launch.cpu_allreduce", "shm", f"shared-memory gradients cannot be used here: {runtime.allreduce_reason}",
                        "auto | gloo", "use launch.cpu_allreduce=auto (it falls back to gloo where shm cannot work)")


def warn_gpu_options_on_cpu(cfg: DictConfig, device: str) -> None:
    """Options that only pay off on GPUs: allowed on CPU workers (the same command runs on both), said once."""
    if device != "cpu":
        return
    if cfg.data.get("pin_memory"):
        log.warning("data.pin_memory=true: the workers train on the CPU, where pinned (page-locked) batches only cost "
                    "memory; drop it (the default pins on CUDA only)")
    if str(cfg.trainer.precision) == "fp16":
        log.warning("trainer.precision=fp16: the workers train on the CPU, where float16 autocast is usually slower than "
                    "float32 and its gradient scaler guards nothing; use 32, or bf16 on a CPU with bfloat16 units")


def _source(group: str, choices: dict[str, str], overrides: tuple) -> str:
    if any(o.lstrip("+~").startswith(f"{group}.") for o in overrides):
        return f"conf/{group}/{choices.get(group)}.yaml and the command line"
    return f"conf/{group}/{choices[group]}.yaml" if group in choices else f"the '{group}' config"


def _locate_target(key: str, node: DictConfig, where: str) -> Any:
    target = node.get("_target_")
    try:
        return get_object(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError from get_object
        reason = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise UserError(f"{key}._target_", target, f"cannot be imported (set in {where}): {reason}",
                        "a dotted path to an importable class or function, e.g. torch.nn.Linear",
                        "fix the spelling, or install the package that provides it") from None


def _build_error(key: str, node: DictConfig, err: Exception, where: str) -> UserError:
    cause = err.__cause__ or err
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    bad_key = key
    m = re.search(r"unexpected keyword argument '(\w+)'", text)
    if m:
        bad_key = f"{key}.{m.group(1)}"
    else:
        for phrase, name in TORCH_PHRASES.items():
            if phrase in text and name in node:
                bad_key = f"{key}.{name}"
                break
    value = node.get(bad_key.rsplit(".", 1)[-1]) if bad_key != key else node.get("_target_")
    return UserError(bad_key, value, f"{node.get('_target_')} rejects it (from {where}): {type(cause).__name__}: {text}",
                     "the arguments its constructor accepts", f"change or remove {bad_key}")


def check_objects(cfg: DictConfig, choices: dict[str, str], overrides: tuple = ()) -> int:
    """Import every _target_ and dry-build the model/optimizer/scheduler on the meta device.

    Returns the bytes of the model's parameters and buffers (for the disk-space check)."""
    where = {g: _source(g, choices, overrides) for g in ("dataset", "task", "model", "optimizer", "scheduler")}
    data_cls = _locate_target("dataset", cfg.dataset, where["dataset"])
    task_cls = _locate_target("task", cfg.task, where["task"])
    _locate_target("model", cfg.model, where["model"])
    _locate_target("optimizer", cfg.optimizer, where["optimizer"])
    scheduler = cfg.get("scheduler")
    if scheduler:
        _locate_target("scheduler", scheduler, where["scheduler"])
    if cfg.get("logger"):
        check_loggers(cfg.logger, _source("logger", choices, overrides))
    kwargs = _kwargs(cfg.dataset)
    _bind("dataset", cfg.dataset, where["dataset"], data_cls, [], kwargs)
    if "size" in kwargs and isinstance(kwargs["size"], int) and kwargs["size"] < 1:
        raise UserError("dataset.size", kwargs["size"], "a dataset needs at least one sample", "an integer >= 1")
    try:
        with torch.device("meta"):
            model = instantiate(cfg.model)
    except Exception as err:
        raise _build_error("model", cfg.model, err, where["model"]) from None
    if not isinstance(model, torch.nn.Module):
        raise UserError("model._target_", cfg.model._target_, f"builds a {type(model).__name__}, not a torch.nn.Module",
                        "a class or function returning torch.nn.Module")
    if cfg.launch.mode == LaunchMode.rpc and cfg.launch.topology == Topology.pipeline:
        stages = cfg.launch.num_stages
        if not isinstance(model, torch.nn.Sequential) or len(model) < stages:
            raise UserError("launch.num_stages", stages, f"a pipeline cuts an nn.Sequential into stages; {cfg.model._target_} "
                            f"builds {type(model).__name__}" + (f" with {len(model)} layers" if isinstance(model, torch.nn.Sequential) else ""),
                            "a model that is an nn.Sequential with at least num_stages layers (e.g. model=mlp)",
                            "use model=mlp, or fewer stages")
    if str(cfg.trainer.strategy) == "fsdp" and cfg.trainer.fsdp.meta_init:
        check_meta_init(model, str(cfg.model._target_))
    if str(cfg.trainer.strategy) == "fsdp" and cfg.trainer.fsdp.shard:
        from runner.train.engines.fsdp import shard_blocks

        if not shard_blocks(model, str(cfg.trainer.fsdp.shard)):
            kinds = sorted({type(m).__name__ for m in model.modules() if m is not model and any(True for _ in m.parameters())})
            raise UserError("trainer.fsdp.shard", cfg.trainer.fsdp.shard, f"names no module of {cfg.model._target_}",
                            f"a class of its modules: {', '.join(kinds[:8])}", "e.g. trainer.fsdp.shard=null (each top-level child)")
    params = list(model.parameters())
    if not params:
        raise UserError("model._target_", cfg.model._target_, "the model has no trainable parameters", "a model with parameters")
    # Optimizer and scheduler are checked by signature and value, not built: building any torch
    # optimizer imports torch._dynamo, ~1 s of startup the workers pay anyway.
    opt_cls = get_object(str(cfg.optimizer._target_))
    opt_kwargs = _kwargs(cfg.optimizer)
    _bind("optimizer", cfg.optimizer, where["optimizer"], opt_cls, [params], opt_kwargs)
    for name in ("lr", "momentum", "weight_decay", "eps", "dampening", "alpha"):
        value = opt_kwargs.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise UserError(f"optimizer.{name}", value, f"{opt_cls.__name__} rejects a negative {name} (from {where['optimizer']})",
                            "a value >= 0", f"e.g. optimizer.{name}=0.01" if name == "lr" else f"e.g. optimizer.{name}=0")
    betas = opt_kwargs.get("betas")
    if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise UserError("optimizer.betas", betas, f"must be two numbers in [0, 1) (from {where['optimizer']})", "[beta1, beta2], e.g. [0.9, 0.999]")
    if scheduler:
        from runner.train.schedules import RUNNER_KEYS

        interval = str(scheduler.get("interval", "epoch"))
        if interval not in ("epoch", "step"):
            raise UserError("scheduler.interval", interval, "is not a scheduler interval", "epoch | step", "e.g. scheduler.interval=step")
        sched_kwargs = {k: v for k, v in _kwargs(scheduler).items() if k not in RUNNER_KEYS}
        _bind("scheduler", scheduler, where["scheduler"], get_object(str(scheduler._target_)), [object()], sched_kwargs)
    _bind("task", cfg.task, where["task"], task_cls, [], _kwargs(cfg.task))
    try:
        instantiate(cfg.task)
    except Exception as err:
        raise _build_error("task", cfg.task, err, where["task"]) from None
    return sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])


def check_init_from(cfg: DictConfig, run_dir: Path) -> None:
    """The two doors into another run's snapshot: trainer.init_from (its weights, for a new run) must name
    weights that fit this model; snapshot.resume=<path> (its whole state: step, optimizer, schedule) must
    leave something to train. Neither applies when the run directory has snapshots of its own."""
    from runner.train import init_from

    resume = str(cfg.snapshot.resume)
    try:
        own = resume != ResumeWord.never and bool(SnapshotManager(run_dir / cfg.snapshot.dir).entries())
    except SnapshotError:
        return  # check_resume reports the unreadable manifest
    if own:
        return
    source = cfg.trainer.get("init_from")
    if not source:
        init_from.check_resume_target(cfg, resume_path(resume))
        return
    if resume_path(resume) is not None:
        raise UserError("snapshot.resume", resume, f"restores another run's whole state, and trainer.init_from="
                        f"{source} already starts this run from a run's weights", "one of them",
                        "drop snapshot.resume to fine-tune (fresh optimizer, schedule and step), or drop "
                        "trainer.init_from to continue that run's training")
    if cfg.launch.mode == LaunchMode.rpc:
        raise UserError("trainer.init_from", source, "launch=rpc builds its model inside the RPC stages, which do not "
                        "load initial weights", "trainer.init_from with launch=standalone, local or multinode",
                        "drop launch=rpc for the fine-tuning run")
    if str(cfg.trainer.strategy) == "fsdp" and cfg.trainer.fsdp.meta_init:
        raise UserError("trainer.fsdp.meta_init", True, "builds the model without memory, so trainer.init_from="
                        f"{source} has nothing to load its weights into before sharding",
                        "trainer.fsdp.meta_init=false with trainer.init_from (each worker builds the model whole in "
                        "CPU memory, loads the weights, then shards)", "drop trainer.fsdp.meta_init=true")
    init_from.check_source(cfg)


def check_meta_init(model: torch.nn.Module, target: str) -> None:
    """trainer.fsdp.meta_init fills the model's memory with `init_weights()` or each module's
    `reset_parameters()`: anything neither reaches would train from whatever the memory held."""
    if callable(getattr(model, "init_weights", None)):
        return
    uncovered = [f"{prefix + '.' if prefix else ''}{name}" for prefix, module in model.named_modules()
                 if not callable(getattr(module, "reset_parameters", None))
                 for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
    if uncovered:
        shown = ", ".join(uncovered[:4]) + (f" and {len(uncovered) - 4} more" if len(uncovered) > 4 else "")
        raise UserError("trainer.fsdp.meta_init", True, f"{target} has no init_weights(), and {shown} belong to modules "
                        "without reset_parameters(): after a build on the meta device nothing would initialise them",
                        "a model with init_weights() (called after sharding), or whose every parameter and buffer is "
                        "in a module with reset_parameters()", "add an init_weights() method to the model, or drop "
                        "trainer.fsdp.meta_init (the model is then built whole and sharded)")
    log.warning("trainer.fsdp.meta_init: %s has no init_weights(), so each module's reset_parameters() initialises it; "
                "an initialisation its constructor applies (a custom std, tied weights) is not replayed", target)


def check_loggers(node: DictConfig, where: str) -> None:
    """Every logger's class imports and its package is installed (else: the pip install to run)."""
    from runner.loggers import REQUIREMENTS

    nodes = list(node.get("loggers") or []) if str(node.get("_target_")) == "runner.loggers.ManyLoggers" else [node]
    for i, item in enumerate(nodes):
        key = "logger" if item is node else f"logger.loggers[{i}]"
        _locate_target(key, item, where)
        module, extra = REQUIREMENTS.get(str(item.get("_target_")), (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            name = str(item._target_).rsplit(".", 1)[-1]
            raise UserError(f"{key}._target_", item._target_, f"{name} needs the {module} package, which is not installed",
                            f"logger=none, or {module} installed",
                            f'pip install "hydra-torch-runner[{extra}]", or drop the logger')


def check_data(cfg: DictConfig, choice: Optional[str] = None) -> None:
    """Build the dataset once in the driver and make one batch of it, the way the workers will:
    a DataLoader given as the dataset, an iterable dataset, a validation split too small to give
    every worker a sample, or a collate function that fails are reported here, not on rank 0."""
    from torch.utils.data import DataLoader, IterableDataset

    from runner.launch.runtime import resolve_runtime
    from runner.train.batches import collate_function, make_splits

    where = f"conf/dataset/{choice}.yaml" if choice else "the dataset config"
    try:
        built = instantiate(cfg.dataset)
    except Exception as err:
        cause = err.__cause__ or err
        if isinstance(cause, ImportError):
            raise UserError("dataset._target_", cfg.dataset._target_, f"needs a package that is not installed: {cause}",
                            "a dataset whose packages are installed", str(cause).split(": ", 1)[-1]) from None
        raise _build_error("dataset", cfg.dataset, err, where) from None
    if isinstance(built, DataLoader):
        raise UserError("dataset._target_", cfg.dataset._target_, "builds a DataLoader; the dataset group names the samples and the "
                        "runner makes the loader (resumable order, one shard per worker)",
                        "a map-style torch.utils.data.Dataset (__getitem__ and __len__), or runner.data.Splits(train, val, test)",
                        "point dataset._target_ at the dataset and move loader options to data.* (num_workers, collate_fn, pin_memory...)")
    splits = make_splits(built, float(cfg.data.val_fraction), int(cfg.trainer.seed))
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        if split is None:
            continue
        if isinstance(split, IterableDataset) or not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
            raise UserError("dataset._target_", cfg.dataset._target_, f"its {name} split is a {type(split).__name__}, not a map-style "
                            "dataset: resuming mid-epoch needs samples by index", "a dataset with __getitem__ and __len__",
                            "wrap the data in a map-style Dataset")
        if len(split) == 0:
            raise UserError("dataset", cfg.dataset._target_, f"its {name} split has no samples", "at least one sample per split")
    workers = resolve_runtime(cfg.launch).nproc_per_node if cfg.launch.mode != LaunchMode.rpc else 1
    if splits.val is not None and len(splits.val) < workers:
        raise UserError("data.val_fraction", cfg.data.val_fraction, f"leaves {len(splits.val)} validation samples for {workers} workers",
                        "a validation split with at least one sample per worker", "raise data.val_fraction or use fewer workers")
    monitor = cfg.snapshot.monitor
    if monitor and str(monitor).startswith("val/") and splits.val is None:
        raise UserError("snapshot.monitor", monitor, "there is no validation split to measure it on",
                        "a dataset with a val split, or data.val_fraction > 0", "add data.val_fraction=0.1")
    if monitor and not str(monitor).startswith(("val/", "train/")):
        raise UserError("snapshot.monitor", monitor, "names no metric the runner records", "val/<name> or train/<name>, e.g. val/loss",
                        "e.g. snapshot.monitor=val/loss")
    if cfg.trainer.test and splits.test is None:
        raise UserError("trainer.test", True, "the dataset has no test split", "a dataset returning runner.data.Splits(train, val, test)",
                        "drop trainer.test=true")
    try:
        collate = collate_function(cfg.data)
    except Exception as err:
        raise _build_error("data.collate_fn", cfg.data.collate_fn, err, "the command line") from None
    if collate is not None and not callable(collate):
        raise UserError("data.collate_fn", cfg.data.collate_fn._target_, f"builds a {type(collate).__name__}, which cannot be called",
                        "a _target_ that builds a function taking a list of samples", "e.g. a class whose instances are callable")
    try:
        samples = [splits.train[i] for i in range(min(2, len(splits.train)))]
        (collate or torch.utils.data.default_collate)(samples)
    except Exception as err:
        text = str(err).splitlines()[0] if str(err) else ""
        key = "data.collate_fn" if collate is not None else "dataset"
        raise UserError(key, cfg.data.collate_fn._target_ if collate is not None else cfg.dataset._target_,
                        f"making the first batch failed: {type(err).__name__}: {text}",
                        "samples that the collate function turns into a batch",
                        "fix the dataset's __getitem__ or pass data.collate_fn=<a function that batches these samples>") from None


def _kwargs(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in HYDRA_KEYS}


def _bind(key: str, node: DictConfig, where: str, target: Any, args: list, kwargs: dict) -> None:
    """The constructor accepts these arguments (an unknown or missing one is a user mistake)."""
    try:
        inspect.signature(target).bind(*args, **kwargs)
    except TypeError as err:
        raise _build_error(key, node, err, where) from None
    except ValueError:
        pass  # no introspectable signature


def check_run_dir(run_dir: Path, param_bytes: int) -> None:
    base = existing_ancestor(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError("hydra.run.dir", run_dir, "exists and is not a directory", "a directory path",
                        "pass another hydra.run.dir=... or name=...")
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise UserError("hydra.run.dir", run_dir, f"cannot be written ({base} is not a writable directory)",
                        "a path under a directory you can write", "pass hydra.run.dir=<writable path> or run from another folder")
    # One snapshot holds weights + optimizer state (up to ~2x weights); the atomic write needs a
    # second copy while it replaces the old one.
    needed = 2 * 3 * param_bytes + 16 * 2**20
    free = shutil.disk_usage(base).free
    if free < needed:
        raise UserError("hydra.run.dir", run_dir, f"cannot hold snapshots: {free / 2**20:.0f} MiB free on its filesystem, about {needed / 2**20:.0f} MiB needed",
                        "a disk with room for two snapshots", "free some space or pass hydra.run.dir=<path on a larger disk>")


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    snap = cfg.snapshot
    resume = str(snap.resume)
    manager = SnapshotManager(run_dir / snap.dir)
    if resume == ResumeWord.never:
        return  # the driver archives what is there; nothing to check
    try:
        entries = manager.entries()
        entry, problems = manager.newest_valid_entry()
    except SnapshotError as err:
        raise UserError("snapshot.resume", resume, f"the run directory's manifest is unreadable: {err}",
                        "a readable manifest.json", "snapshot.resume=never starts over (old files are archived, not deleted)") from None
    if entries:
        stored = manager.stored_config() or {}
        old = stored.get("identity")
        if old is not None:
            diff = identity_diff(old, identity(cfg))
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r} -> {identity(cfg).get(k)!r}" for k in diff[:4])
                more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
                raise UserError("snapshot.resume", resume,
                                f"{run_dir} holds snapshots of a different run; differing keys: {shown}{more}",
                                "resuming only a run with the same model, dataset, optimizer, scheduler, loss, seed and batch size",
                                "snapshot.resume=never starts over here (old snapshots are archived), or pass name=<new name> for a new run directory")
    if entry is None and problems:  # versions are listed but none can be used: never a silent fresh start
        raise UserError("snapshot.resume", resume, "every snapshot in the run directory is invalid: " + "; ".join(problems),
                        "at least one snapshot that matches its manifest",
                        "restore the files, or snapshot.resume=never to start over (the invalid files are archived, not deleted)")
    if entries or problems:
        return
    if resume == ResumeWord.must:
        raise UserError("snapshot.resume", "must", f"no snapshot in {manager.dir} to resume from",
                        f"{ResumeWord.words()} | a snapshot file path", "use snapshot.resume=auto to start fresh when there is none")
    path = resume_path(resume)
    if path is not None and not (path.is_file() or path.is_dir()):
        raise UserError("snapshot.resume", resume, "no such snapshot file or sharded snapshot folder",
                        f"{ResumeWord.words()} | path to an existing snapshot-*.pt or step-* folder",
                        "check the path (relative paths start from the current directory)")
    if path is not None and path.is_dir():
        beside = SnapshotManager(path.parent)
        try:
            listed = any(e["file"] == path.name and e.get("kind") == "dcp" for e in beside.entries())
        except SnapshotError:
            listed = False
        if not listed:
            raise UserError("snapshot.resume", resume, f"is a folder that {beside.manifest_path} does not list as a sharded "
                            "snapshot (its files are verified through that entry)",
                            "a step-* folder inside the snapshots/ folder of the run that wrote it",
                            "pass the step-* folder where the run left it, next to its manifest.json")
