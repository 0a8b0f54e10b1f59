"""The runtime decision: backend, device, worker count, threads and gradient all-reduce, made once.

The driver calls `resolve_runtime` once per job; the record (runner.config.Runtime) goes into the
run's config.yaml (`runtime:`), the workers read it back with `Runtime.from_config`, and the
summary reports it.
Nothing else decides these, so what the console says is what the workers do.
"""

from __future__ import annotations

import os
from typing import Optional

from omegaconf import DictConfig

from runner.config import Backend, CpuAllreduce, LaunchMode, NprocWord, Runtime, StartMethod, Topology, parse_nproc
from runner.system import usable_cores


def resolve_runtime(
    launch: DictConfig,
    parallel_jobs: int = 1,
    slot: int = 0,
    cuda_devices: Optional[list[str]] = None,
    cores: Optional[int] = None,
) -> Runtime:
    """What this machine runs for launch.* (torchrun's meaning of nproc_per_node). Pure: reads the
    machine, changes nothing. `parallel_jobs` > 1 (a joblib sweep): this job gets GPU slice `slot`
    and its share of the CPU cores. `cuda_devices`/`cores` default to what this process sees."""
    if cuda_devices is None:
        cuda_devices = visible_gpus()
    cores = max(1, (cores if cores is not None else usable_cores()) // parallel_jobs)
    visible_env = None
    gpus = cuda_devices
    if cuda_devices and parallel_jobs > 1:
        per_job = max(1, len(cuda_devices) // parallel_jobs)
        gpus = cuda_devices[(slot * per_job) % len(cuda_devices) :][:per_job]
        visible_env = ",".join(gpus)
    nproc = parse_nproc(launch.nproc_per_node)
    if launch.mode == LaunchMode.rpc:
        count = (
            nproc if isinstance(nproc, int) else (launch.num_stages + 1 if launch.topology == Topology.pipeline else 3)
        )
        return Runtime(
            "gloo",
            "cpu",
            count,
            launch.omp_num_threads or max(1, cores // count),
            "rpc",
            "launch=rpc: gradients travel through distributed autograd",
            visible_env,
            start_method(launch),
        )
    cuda = bool(cuda_devices)
    if launch.mode == LaunchMode.local:
        count = 1
    elif nproc == NprocWord.gpu or (nproc == NprocWord.auto and cuda):
        count = len(gpus)
    elif nproc in (NprocWord.cpu, NprocWord.auto):
        count = cores
    else:
        count = int(nproc)
    backend = str(launch.backend)
    if backend == Backend.auto:
        backend = "nccl" if cuda and nproc != NprocWord.cpu else "gloo"
    device = "cuda" if backend == "nccl" else "cpu"
    threads = launch.omp_num_threads
    if threads is None and device == "cpu":
        threads = max(1, cores // count)
    allreduce, reason = gradient_allreduce(launch, device, count, cores)
    return Runtime(backend, device, count, threads, allreduce, reason, visible_env, start_method(launch))


def start_method(launch: DictConfig) -> str:
    """How the agent starts the workers: launch.start_method, with auto decided by the platform."""
    from runner.launch.start import default_start_method

    method = str(launch.get("start_method", StartMethod.auto))
    return default_start_method() if method == StartMethod.auto else method


def gradient_allreduce(launch: DictConfig, device: str, nproc: int, cores: int) -> tuple[str, str]:
    """("shm", why) when DDP's gradients go through shared memory, else (the backend's name, why).

    auto picks shm for CPU workers of one machine, unless they outnumber the cores: a waiting
    worker spins briefly, which only pays off when every worker has a core of its own."""
    from runner.train.shm_allreduce import unavailable_reason

    wanted = launch.get("cpu_allreduce", CpuAllreduce.auto)
    backend = "gloo" if device == "cpu" else "nccl"
    if device != "cpu":
        return backend, "the workers train on GPUs (NCCL is used)"
    if launch.mode == LaunchMode.multinode:
        return backend, "launch=multinode may place the workers on several machines"
    if nproc < 2:
        return backend, "a single worker has nothing to average"
    if wanted == CpuAllreduce.gloo:
        return backend, "launch.cpu_allreduce=gloo"
    reason = unavailable_reason(device, single_host=True)
    if reason is not None:
        return backend, reason
    if wanted == CpuAllreduce.shm or nproc <= cores:
        return "shm", "CPU workers on one machine"
    return backend, f"{nproc} workers on {cores} cores: waiting workers would compete for the cores"


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES would list them."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not env:
        return [str(i) for i in range(count)]
    # CUDA stops at the first entry that names no device ("0,1,9" on a 2-GPU machine is 2 devices)
    return [d.strip() for d in env.split(",") if d.strip()][:count]
