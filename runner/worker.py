"""What runs inside each worker process: set up, build from config, resume, train.

The elastic agent starts `main(run_dir)` in every worker with RANK, LOCAL_RANK and WORLD_SIZE in
the environment; `launch=local` calls it in the driver's own process. The config comes from the
run directory's config.yaml, written (resolved and validated) by the driver.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from runner import rng
from runner.loggers import build_logger
from runner.logs import MetricsWriter, rank_log_path, setup_worker_logging
from runner.rundir import CONFIG_FILE
from runner.snapshot import SnapshotManager, load_path
from runner.stop import Stopped, StopRequest
from runner.trainer import Trainer
from runner.writer import NullWriter, SnapshotWriter

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank waiting longer than this for its peers fails


def main(run_dir: str, in_driver: bool = False) -> Optional[dict[str, Any]]:
    """Train as one rank of the job; rank 0 returns the run's summary."""
    run_path = Path(run_dir)
    cfg = OmegaConf.load(run_path / CONFIG_FILE)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    log_handlers = setup_worker_logging(run_path, rank, in_driver=in_driver)
    stop: Optional[StopRequest] = None
    try:
        device = _init_distributed(cfg, local_rank)
        log.info("rank %d of %d up: %s, pid %d, host %s", rank, world_size, device, os.getpid(), socket.gethostname(),
                 extra={"console": False})
        stop = StopRequest(_cpu_group(cfg))
        if os.environ.get("RUNNER_PROFILE"):  # cProfile of each rank, written next to its log
            import cProfile

            profiler = cProfile.Profile()
            summary = profiler.runcall(_train, cfg, run_path, rank, world_size, device, stop)
            profiler.dump_stats(run_path / "logs" / f"profile-rank-{rank}.out")
        else:
            summary = _train(cfg, run_path, rank, world_size, device, stop)
        return summary if rank == 0 else None
    except Stopped as stopped:
        # Raised, not returned: a worker that returns a value waits for the agent to read it,
        # and an agent that is shutting down on the same signal never does.
        log.warning("%s; the snapshot of the last step is on disk", stopped)
        raise
    except Exception as err:
        log.error("training failed on rank %d", rank, exc_info=True, extra={"console": False})
        log.warning("failed: %s: %s (traceback in %s)", type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                    rank_log_path(run_path, rank), extra={"file": False})
        traceback.clear_frames(err.__traceback__)  # free what the frames hold (the DDP model) before exit
        raise
    finally:
        if stop is not None:
            stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()
        if in_driver:
            for handler in log_handlers:
                logging.getLogger().removeHandler(handler)
                handler.close()


def _init_distributed(cfg, local_rank: int) -> torch.device:
    backend = cfg.runtime.backend
    if cfg.runtime.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if cfg.runtime.omp_num_threads:
        torch.set_num_threads(int(cfg.runtime.omp_num_threads))
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return device


def _cpu_group(cfg) -> Optional[dist.ProcessGroup]:
    """Stop flags travel on the CPU: a gloo group beside NCCL, the default group otherwise."""
    return dist.new_group(backend="gloo") if cfg.runtime.backend == "nccl" else None


def _train(cfg, run_dir: Path, rank: int, world_size: int, device: torch.device, stop: StopRequest) -> dict[str, Any]:
    t = cfg.trainer
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    rng.seed_everything(t.seed)  # identical model init on every rank
    dataset = instantiate(cfg.dataset)
    model = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer) if cfg.get("scheduler") else None
    loss_fn = instantiate(t.loss)
    rng.seed_everything(t.seed + rank)  # per-rank streams (dropout, augmentation)

    manager = SnapshotManager(run_dir / cfg.snapshot.dir, cfg.snapshot.keep_last, cfg.snapshot.milestone_every)
    if rank == 0:
        manager.remove_stale_temporaries()
        writer = SnapshotWriter(manager, OmegaConf.to_container(cfg, resolve=True), getattr(cfg.snapshot, "async"))
    else:
        writer = NullWriter()

    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    shared_memory = _shared_memory_allreduce(cfg, ddp_model, world_size)
    trainer = Trainer(cfg, model, ddp_model, optimizer, scheduler, dataset, loss_fn, device, writer,
                      MetricsWriter(run_dir / METRICS_FILE), stop, rank, world_size)
    trainer.shared_memory = stop.shared_memory = shared_memory
    loaded = _find_resume_state(cfg, manager)
    if loaded is not None:
        entry, state = loaded
        trainer.load_snapshot(state, entry)
        log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch%s", entry.get("file"),
                 trainer.epoch, trainer.global_step, trainer.samples_in_epoch, _restart_note())
    elif rank == 0:
        log.info("starting from scratch: %d workers, %s, run directory %s%s", world_size, device, run_dir, _restart_note())
    trainer.logger = build_logger(cfg, run_dir) if rank == 0 else None
    try:
        summary = trainer.fit()
    finally:
        if trainer.logger is not None:
            trainer.logger.close()
        # A DDP model holding a Python comm hook must be gone before the interpreter shuts down
        # (destroying it during shutdown aborts the process); an exception's traceback would
        # otherwise keep it alive through these frames.
        trainer.ddp_model = ddp_model = None
    summary["status"] = "finished"
    summary["world_size"] = world_size
    summary["allreduce"] = "shm" if shared_memory is not None else cfg.runtime.backend
    summary["snapshot"] = writer.last_entry["file"] if getattr(writer, "last_entry", None) else None
    summary["snapshot_stall_seconds"] = getattr(writer, "stall_seconds", [])
    summary["peak_rss_mb"] = peak_rss_mb()
    return summary


def _shared_memory_allreduce(cfg, ddp_model: DDP, world_size: int):
    """When the driver chose it: gradients (a DDP comm hook), the per-epoch loss and the stop
    agreement go through shared memory. Returns its state, or None (gloo/nccl as usual)."""
    backend = cfg.runtime.backend
    if cfg.runtime.get("allreduce") != "shm" or world_size < 2:
        return None
    from runner.shm_allreduce import SharedMemoryAllreduce, shm_allreduce_hook

    state = SharedMemoryAllreduce.create(timeout=COLLECTIVE_TIMEOUT.total_seconds())
    if state is None:
        log.warning("too little room in /dev/shm for shared-memory gradients; averaging them with %s", backend)
        return None
    ddp_model.register_comm_hook(state, shm_allreduce_hook)
    log.info("gradients averaged through shared memory (in chunks of up to %d KiB)", state.slot_bytes >> 10,
             extra={"console": False})
    return state


def _find_resume_state(cfg, manager: SnapshotManager):
    """The run directory's newest valid snapshot wins; else a snapshot path given by the user."""
    latest = manager.load_latest()  # raises SnapshotError when versions exist but none is valid
    if latest is not None:
        return latest
    resume = str(cfg.snapshot.resume)
    if resume not in ("auto", "never", "must"):
        return {"file": resume}, load_path(resume)
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _restart_note() -> str:
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return f" (restart {restarts} after a worker failure)" if restarts else ""


if __name__ == "__main__":  # `python -m runner.worker <run_dir>`: what the elastic agent starts in each worker
    import json
    import sys

    result = main(sys.argv[1])
    if result is not None:
        (Path(sys.argv[1]) / "logs" / "summary.json").write_text(json.dumps(result))
