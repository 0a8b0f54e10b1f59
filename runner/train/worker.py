"""What runs inside each DDP worker process: set up, build from config, resume, hand to the loop.

The elastic agent starts `main(run_dir)` in every worker with RANK, LOCAL_RANK and WORLD_SIZE in
the environment; `launch=local` calls it in the driver's own process. The config comes from the
run directory's config.yaml, written (resolved and validated) by the driver, and the runtime
(backend, device, threads, all-reduce) is the record the driver decided.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from runner.config import OnNonFinite, Runtime, Strategy
from runner.layout import CONFIG_FILE, rank_log_path
from runner.logs import setup_worker_logging
from runner.train import rng, watchdog
from runner.train.batches import DataSource
from runner.train.collectives import ProcessGroupCollectives
from runner.train.engines.ddp import DDPEngine
from runner.train.engines.fsdp import FSDPEngine, initialise_shards, shard_model
from runner.train.init_from import init_weights_from
from runner.train.loop import planned_steps
from runner.train.schedules import build_scheduler, scheduler_interval
from runner.train.session import run_reported, train

log = logging.getLogger(__name__)


def main(run_dir: str, in_driver: bool = False) -> Optional[dict[str, Any]]:
    """Train as one rank of the job; rank 0 returns the run's summary. Started by the elastic agent
    through runner.launch.start.ddp_worker, or in the driver itself (`in_driver`, launch=local)."""
    run_path = Path(run_dir)
    cfg = OmegaConf.load(run_path / CONFIG_FILE)
    runtime = Runtime.from_config(cfg.runtime)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    log_handlers = setup_worker_logging(run_path, rank, in_driver=in_driver)
    try:
        watchdog.start(rank_log_path(run_path, rank), rank)  # stacks on demand, the heartbeat; then the rendezvous
        device = _init_distributed(runtime, local_rank, float(cfg.launch.collective_timeout))
        watchdog.phase("building")
        log.info(
            "rank %d of %d up: %s, pid %d, host %s",
            rank,
            world_size,
            device,
            os.getpid(),
            socket.gethostname(),
            extra={"console": False},
        )
        if os.environ.get("RUNNER_PROFILE"):  # cProfile of each rank, written next to its log
            import cProfile

            profiler = cProfile.Profile()
            summary = run_reported(
                lambda: profiler.runcall(_train, cfg, runtime, run_path, rank, device), run_path, rank
            )
            profiler.dump_stats(run_path / "logs" / f"profile-rank-{rank}.out")
        else:
            summary = run_reported(lambda: _train(cfg, runtime, run_path, rank, device), run_path, rank)
        return summary if rank == 0 else None
    finally:
        watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        if in_driver:
            for handler in log_handlers:
                logging.getLogger().removeHandler(handler)
                handler.close()


def _init_distributed(runtime: Runtime, local_rank: int, timeout_s: float) -> torch.device:
    if runtime.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if runtime.omp_num_threads:
        torch.set_num_threads(int(runtime.omp_num_threads))
    dist.init_process_group(
        backend=runtime.backend,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return device


def _collectives(runtime: Runtime, timeout_s: float):
    """Small collectives on the CPU (a gloo group beside NCCL), through shared memory when the
    gradients go that way. Returns (collectives, shared-memory state or None)."""
    group = dist.new_group(backend="gloo") if runtime.backend == "nccl" else None
    shared_memory = None
    if runtime.allreduce == "shm" and dist.get_world_size() > 1:
        from runner.train.shm_allreduce import SharedMemoryAllreduce

        shared_memory = SharedMemoryAllreduce.create(timeout=timeout_s)
        if shared_memory is None:  # the driver checked the room; another job took it since
            raise RuntimeError(
                "shared-memory all-reduce: /dev/shm has no room left for its buffers; "
                "pass launch.cpu_allreduce=gloo, or free /dev/shm"
            )
        log.info(
            "gradients averaged through shared memory (in chunks of up to %d KiB)",
            shared_memory.slot_bytes >> 10,
            extra={"console": False},
        )
    return ProcessGroupCollectives(group, shared_memory), shared_memory


def _train(cfg: DictConfig, runtime: Runtime, run_dir: Path, rank: int, device: torch.device) -> dict[str, Any]:
    t = cfg.trainer
    if t.deterministic:
        # cuBLAS is only deterministic with a fixed workspace; read when its handle is first made
        # (the first matmul), so setting it here, before any, is in time.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rng.seed_everything(t.seed)  # identical model init on every rank
    data = DataSource(cfg, rank, dist.get_world_size(), device)
    task = instantiate(cfg.task)
    fsdp = t.strategy == Strategy.fsdp
    meta = fsdp and bool(t.fsdp.meta_init)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = instantiate(cfg.model)
    init_weights_from(model, cfg, run_dir)  # trainer.init_from: another run's weights, before wrapping or sharding
    if fsdp:  # before the optimizer: its parameters become this rank's shards
        # Built in CPU memory (or on the meta device: no memory at all); fully_shard moves one unit
        # at a time to the device and keeps this rank's shard of it, so a GPU never holds more than
        # its shards and one whole unit.
        blocks = shard_model(model, device, t.fsdp)
        if meta:
            initialise_shards(model, device, t.fsdp, seed=int(t.seed), rank=rank)
            log.info(
                "model built on the meta device and initialised shard by shard (trainer.fsdp.meta_init)",
                extra={"console": False},
            )
        log.info(
            "model sharded over %d workers (FSDP2): %d blocks%s",
            dist.get_world_size(),
            len(blocks),
            f" ({', '.join(blocks[:4])}{', ...' if len(blocks) > 4 else ''})" if blocks else "",
            extra={"console": False},
        )
    else:
        model = model.to(device)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler = build_scheduler(cfg.get("scheduler"), optimizer, planned_steps(t, data.train.batches_per_epoch()))
    rng.seed_everything(t.seed + rank)  # per-rank streams (dropout)

    collectives, shared_memory = _collectives(runtime, float(cfg.launch.collective_timeout))
    options = dict(
        skip_nonfinite=t.on_nonfinite == OnNonFinite.skip,
        precision=str(t.precision),
        clip_grad_norm=t.clip_grad_norm,
        compile=bool(t.compile),
        scheduler_interval=scheduler_interval(cfg.get("scheduler")),
    )
    if fsdp:  # the shared memory still carries the loop's small collectives; FSDP's own go through the group
        engine = FSDPEngine(model, optimizer, scheduler, task, device, collectives, backend=runtime.backend, **options)
    else:
        engine = DDPEngine(
            model,
            optimizer,
            scheduler,
            task,
            device,
            collectives,
            runtime.allreduce,
            shared_memory=shared_memory,
            ddp_options=OmegaConf.to_container(t.ddp),
            **options,
        )
    return train(cfg, run_dir, engine, data, task)
