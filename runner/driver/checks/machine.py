"""Checks of the config against this machine: CUDA, worker start, shared memory, the run directory's disk.

`resolve_machine` decides the runtime (runner.launch.runtime) once for the whole check and returns it;
the driver passes that same record on to the launch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from runner.config import Backend, CpuAllreduce, LaunchMode, NprocWord, Precision, Runtime, Strategy, parse_nproc
from runner.driver.rundir import existing_ancestor
from runner.errors import UserError

log = logging.getLogger("runner.driver.checks")


def resolve_machine(cfg: DictConfig, parallel_jobs: int = 1, slot: int = 0) -> Runtime:
    """The runtime for this machine, after refusing what it cannot run. `parallel_jobs`/`slot`: this
    job's share of the machine when sweep jobs run side by side (runner.launch.runtime)."""
    from runner.launch.runtime import resolve_runtime, visible_gpus

    check_cuda_asked(cfg.launch)
    runtime = resolve_runtime(cfg.launch, parallel_jobs=parallel_jobs, slot=slot)
    check_cpu_offload(cfg.trainer, runtime)
    check_gpu_count(runtime, len(visible_gpus()), cfg.launch.nproc_per_node)
    check_start_method(cfg.launch, runtime)
    check_shm_allreduce(cfg.launch, runtime)
    warn_gpu_options_on_cpu(cfg, runtime.device)
    return runtime


def check_cuda_asked(launch: DictConfig) -> None:
    """GPU workers or NCCL asked for on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    if parse_nproc(launch.nproc_per_node) == NprocWord.gpu:
        raise UserError(
            "launch.nproc_per_node",
            "gpu",
            "no CUDA device is visible on this machine",
            "auto | cpu | a positive integer",
            "use launch.nproc_per_node=auto (or check CUDA_VISIBLE_DEVICES)",
        )
    if launch.backend == Backend.nccl:
        raise UserError(
            "launch.backend",
            "nccl",
            "NCCL needs CUDA devices and none is visible",
            "auto | gloo",
            "use launch.backend=auto (gloo on CPU)",
        )


def check_cpu_offload(trainer: DictConfig, runtime: Runtime) -> None:
    if trainer.strategy == Strategy.fsdp and trainer.fsdp.cpu_offload and runtime.device != "cuda":
        raise UserError(
            "trainer.fsdp.cpu_offload",
            True,
            "moves a GPU worker's sharded state into CPU memory, and these workers train on the CPU already",
            "false on CPU workers",
            "drop trainer.fsdp.cpu_offload=true",
        )


def check_gpu_count(runtime: Runtime, visible: int, asked: object) -> None:
    """NCCL workers need a GPU each (several workers cannot share one GPU with NCCL)."""
    if runtime.device == "cuda" and runtime.nproc_per_node > visible:
        raise UserError(
            "launch.nproc_per_node",
            asked,
            f"{runtime.nproc_per_node} GPU workers need a GPU each, and "
            f"{visible} {'is' if visible == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES)",
            f"gpu | auto | an integer from 1 to {visible}",
            "use launch.nproc_per_node=gpu (one worker per visible GPU), or launch.backend=gloo for CPU workers",
        )


def check_start_method(launch: DictConfig, runtime: Runtime) -> None:
    method = runtime.start_method
    if launch.mode == LaunchMode.local:
        return
    if method not in multiprocessing.get_all_start_methods():
        raise UserError(
            "launch.start_method",
            method,
            f"this platform ({sys.platform}) cannot start processes that way",
            " | ".join(["auto", *multiprocessing.get_all_start_methods()]),
            "use launch.start_method=auto",
        )
    if method == "fork" and runtime.device == "cuda":
        raise UserError(
            "launch.start_method",
            method,
            "the workers use CUDA, and a process forked from the driver cannot (CUDA does not survive fork)",
            "auto | forkserver | spawn",
            "use launch.start_method=auto (a fork server that never touches CUDA)",
        )


def check_shm_allreduce(launch: DictConfig, runtime: Runtime) -> None:
    """launch.cpu_allreduce=shm is refused where it cannot work, unless it was moot (one worker on one
    machine: nothing to average)."""
    moot = launch.mode != LaunchMode.multinode and runtime.nproc_per_node < 2
    if launch.cpu_allreduce == CpuAllreduce.shm and runtime.allreduce != "shm" and not moot:
        raise UserError(
            "launch.cpu_allreduce",
            "shm",
            f"shared-memory gradients cannot be used here: {runtime.allreduce_reason}",
            "auto | gloo",
            "use launch.cpu_allreduce=auto (it falls back to gloo where shm cannot work)",
        )


def warn_gpu_options_on_cpu(cfg: DictConfig, device: str) -> None:
    """Options that only pay off on GPUs: allowed on CPU workers (the same command runs on both), said once."""
    if device != "cpu":
        return
    if cfg.data.get("pin_memory"):
        log.warning(
            "data.pin_memory=true: the workers train on the CPU, where pinned (page-locked) batches only cost "
            "memory; drop it (the default pins on CUDA only)"
        )
    if str(cfg.trainer.precision) == Precision.fp16:
        log.warning(
            "trainer.precision=fp16: the workers train on the CPU, where float16 autocast is usually slower "
            "than float32 and its gradient scaler guards nothing; use 32, or bf16 on a CPU with bfloat16 units"
        )


def check_run_dir(run_dir: Path, param_bytes: int) -> None:
    """The run directory can be made and written, and its disk holds the snapshots (`param_bytes`: 0
    before the model is built, when only the lock file is to be written)."""
    base = existing_ancestor(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            "hydra.run.dir",
            run_dir,
            "exists and is not a directory",
            "a directory path",
            "pass another hydra.run.dir=... or name=...",
        )
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise UserError(
            "hydra.run.dir",
            run_dir,
            f"cannot be written ({base} is not a writable directory)",
            "a path under a directory you can write",
            "pass hydra.run.dir=<writable path> or run from another folder",
        )
    # One snapshot holds weights + optimizer state (up to ~2x weights); the atomic write needs a
    # second copy while it replaces the old one.
    needed = 2 * 3 * param_bytes + 16 * 2**20
    free = shutil.disk_usage(base).free
    if free < needed:
        raise UserError(
            "hydra.run.dir",
            run_dir,
            f"cannot hold snapshots: {free / 2**20:.0f} MiB free on its "
            f"filesystem, about {needed / 2**20:.0f} MiB needed",
            "a disk with room for two snapshots",
            "free some space or pass hydra.run.dir=<path on a larger disk>",
        )
