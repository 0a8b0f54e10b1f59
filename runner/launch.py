"""Start the workers: torch's elastic agent (torchrun's engine) called from Python, or in-process.

The driver resolves what the workers need to know about the machine (backend, device, worker
count, threads), then hands `runner.worker.main` to `elastic_launch`. The agent sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, restarts the worker group when a worker dies, and
forwards SIGTERM/SIGINT to the workers, which snapshot and exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from runner import worker
from runner.config import parse_nnodes
from runner.errors import full_errors_requested

log = logging.getLogger(__name__)


def resolve_runtime(launch: DictConfig, parallel_jobs: int = 1, slot: int = 0) -> dict[str, Any]:
    """Backend, device and worker count for this machine, from launch.* (torchrun's semantics).

    `parallel_jobs` > 1 (a joblib sweep): this job gets GPU slice `slot` (CUDA_VISIBLE_DEVICES
    for its workers) and its share of the CPU cores."""
    cuda = torch.cuda.is_available()
    cores = max(1, usable_cores() // parallel_jobs)
    if cuda and parallel_jobs > 1:
        visible = _visible_gpus()
        per_job = max(1, len(visible) // parallel_jobs)
        share = visible[(slot * per_job) % len(visible):][:per_job]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(share)  # read by the workers this job starts
        gpus = len(share)
    else:
        gpus = torch.cuda.device_count() if cuda else 0
    nproc = str(launch.nproc_per_node)
    if launch.mode == "local":
        count = 1
    elif launch.mode == "rpc":
        count = int(nproc) if nproc.isdigit() else (launch.num_stages + 1 if launch.topology == "pipeline" else 3)
        return {"backend": "gloo", "device": "cpu", "nproc_per_node": count,
                "omp_num_threads": launch.omp_num_threads or max(1, cores // count)}
    elif nproc == "gpu" or (nproc == "auto" and cuda):
        count = gpus
    elif nproc in ("cpu", "auto"):
        count = cores
    else:
        count = int(nproc)
    backend = launch.backend
    if backend == "auto":
        backend = "nccl" if cuda and nproc != "cpu" else "gloo"
    device = "cuda" if backend == "nccl" else "cpu"
    threads = launch.omp_num_threads
    if threads is None and device == "cpu":
        threads = max(1, cores // count)
    return {"backend": backend, "device": device, "nproc_per_node": count, "omp_num_threads": threads,
            "allreduce": gradient_allreduce(launch, device, count, cores)}


def gradient_allreduce(launch: DictConfig, device: str, nproc: int, cores: int) -> str:
    """"shm" when DDP's gradients go through shared memory (runner.shm_allreduce), else the backend's name.

    auto picks shm for CPU workers of one machine, unless they outnumber the cores: a waiting
    worker spins briefly, which only pays off when every worker has a core of its own."""
    from runner.shm_allreduce import unavailable_reason

    wanted = launch.get("cpu_allreduce", "auto")
    if device != "cpu" or nproc < 2 or launch.mode != "standalone" or wanted == "gloo":
        return "gloo" if device == "cpu" else "nccl"
    if unavailable_reason(device, single_host=True) is not None:
        return "gloo"  # wanted == "shm" here was refused by the preflight already
    return "shm" if wanted == "shm" or nproc <= cores else "gloo"


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d for d in env.split(",") if d.strip()] if env else [str(i) for i in range(torch.cuda.device_count())]


def launch(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the job to completion; returns rank 0's summary. Raises the agent's errors."""
    if cfg.launch.mode == "local":
        return _launch_in_process(run_dir)
    return _launch_elastic(cfg, run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_in_process(run_dir: Path) -> dict[str, Any]:
    """launch=local: this very process is rank 0 of 1, so breakpoints and debuggers just work."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return worker.main(str(run_dir), in_driver=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def elastic_config(cfg: DictConfig, run_dir: Path, nproc: int):
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    launch = cfg.launch
    if launch.mode == "multinode":
        min_nodes, max_nodes = parse_nnodes(launch.nnodes)
        endpoint = launch.rdzv_endpoint
        run_id = launch.rdzv_id or run_dir.name
        rdzv_configs: dict[str, Any] = {"timeout": launch.rdzv_timeout}
        if launch.node_rank is not None:
            rdzv_configs["rank"] = launch.node_rank
    else:  # standalone: torchrun --standalone, a private rendezvous on a free local port
        min_nodes = max_nodes = 1
        endpoint = "localhost:0"
        run_id = str(uuid.uuid4())
        rdzv_configs = {"timeout": launch.rdzv_timeout}
    return LaunchConfig(
        min_nodes=min_nodes, max_nodes=max_nodes, nproc_per_node=nproc, run_id=run_id,
        rdzv_backend=launch.rdzv_backend, rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs,
        max_restarts=launch.max_restarts, monitor_interval=launch.monitor_interval, start_method="spawn",
        shutdown_timeout=launch.stop_timeout,
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",  # forwarded to the workers
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "logs" / "elastic")),
    )


def _launch_elastic(cfg: DictConfig, run_dir: Path) -> Optional[dict[str, Any]]:
    from torch.distributed.launcher.api import elastic_launch

    # multiprocessing's resource tracker (a helper process) warns about the agent's semaphores at
    # exit; it inherits warning filters from sys.warnoptions.
    if "ignore::UserWarning:multiprocessing.resource_tracker" not in sys.warnoptions:
        sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    # Restarted gloo workers often fail to connect when they share the agent's rendezvous store
    # (a known upstream problem); a store of their own makes restarts reliable.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if not full_errors_requested():  # the driver reports failures itself, in a few lines
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    runtime = cfg.runtime
    if runtime.omp_num_threads:
        os.environ["OMP_NUM_THREADS"] = str(runtime.omp_num_threads)
    if multiprocessing.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        # Inside a joblib (loky) sweep worker: children would try to start with "loky" and fail.
        multiprocessing.set_start_method("spawn", force=True)
    config = elastic_config(cfg, run_dir, int(runtime.nproc_per_node))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                                                     signal.SIGUSR1, signal.SIGUSR2)}
    try:
        entrypoint = worker.main
        if cfg.launch.mode == "rpc":
            from runner.rpc import worker as rpc_worker

            entrypoint = rpc_worker.main
        results = elastic_launch(config, entrypoint)(str(run_dir))
    finally:  # the agent leaves its handlers installed; between jobs of a sweep, signals act as usual
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return next((r for _, r in sorted(results.items()) if r), None) if results else None
