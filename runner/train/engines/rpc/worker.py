"""Entry point of every worker in launch=rpc: join the RPC group, play this rank's role, shut down.

Roles by rank: pipeline: 0 = trainer, 1..S = stage0..stage{S-1}; parameter_server: 0 = ps,
1..N = trainer1..trainerN. Workers that own parameters just serve RPCs until `rpc.shutdown()`,
which waits for every worker, so nobody leaves while another still needs it. Trainers run the
same training loop as DDP mode (runner.train.loop) with an RPC engine.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.rpc as rpc
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from runner.config import Runtime, Topology
from runner.layout import CONFIG_FILE
from runner.logs import setup_worker_logging
from runner.train import rng
from runner.train.batches import DataSource
from runner.train.session import run_reported, train

log = logging.getLogger(__name__)


def role(topology: str, rank: int) -> str:
    if topology == Topology.pipeline:
        return "trainer" if rank == 0 else f"stage{rank - 1}"
    return "ps" if rank == 0 else f"trainer{rank}"


def main(run_dir: str) -> Optional[dict[str, Any]]:
    """One role of the RPC job (started by the agent through runner.launch.start.rpc_worker)."""
    run_path = Path(run_dir)
    cfg = OmegaConf.load(run_path / CONFIG_FILE)
    runtime = Runtime.from_config(cfg.runtime)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    setup_worker_logging(run_path, rank)
    logging.getLogger("torch.distributed.optim").setLevel(logging.ERROR)  # "without TorchScript support": intended
    warnings.filterwarnings("ignore", message="You are using a Backend")  # raised inside torch's own init_rpc
    if runtime.omp_num_threads:
        torch.set_num_threads(int(runtime.omp_num_threads))
    topology = str(cfg.launch.topology)
    name = role(topology, rank)
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rpc_timeout=float(cfg.launch.rpc_timeout),
        num_worker_threads=max(16, 4 * world_size),
    )
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    log.info("rpc worker %s (rank %d of %d) up, pid %d", name, rank, world_size, os.getpid(), extra={"console": False})
    trains = (topology == Topology.pipeline and rank == 0) or (topology == Topology.parameter_server and rank > 0)
    summary = None
    try:
        if trains:
            summary = run_reported(lambda: _train(cfg, run_path, topology, rank, world_size), run_path, rank)
    except BaseException:
        rpc.shutdown(graceful=False)
        raise
    rpc.shutdown()  # graceful: waits until every worker is done with everyone else
    lead = rank == 0 if topology == Topology.pipeline else rank == 1
    return summary if lead else None


def _train(cfg: DictConfig, run_dir: Path, topology: str, rank: int, world_size: int) -> dict[str, Any]:
    t = cfg.trainer
    task = instantiate(cfg.task)
    if topology == Topology.pipeline:
        from runner.train.engines.rpc.pipeline import PipelineEngine

        rng.seed_everything(t.seed)
        engine = PipelineEngine(cfg, task)
    else:
        from runner.train.engines.rpc.parameter_server import ParameterServerEngine

        rng.seed_everything(t.seed + rank)
        engine = ParameterServerEngine(cfg, task, trainer=rank - 1, trainers=world_size - 1, processes=world_size)
    return train(
        cfg,
        run_dir,
        engine,
        DataSource(cfg, engine.collectives.rank, engine.collectives.world_size, engine.device),
        task,
    )
