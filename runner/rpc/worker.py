"""Entry point of every worker in launch=rpc: join the RPC group, play this rank's role, shut down.

Roles by rank: pipeline: 0 = trainer, 1..S = stage0..stage{S-1}; parameter_server: 0 = ps,
1..N = trainer1..trainerN. Workers that own parameters just serve RPCs until `rpc.shutdown()`,
which waits for every worker, so nobody leaves while another still needs it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.rpc as rpc
from omegaconf import OmegaConf

from runner.logs import rank_log_path, setup_worker_logging
from runner.rundir import CONFIG_FILE

log = logging.getLogger(__name__)


def role(topology: str, rank: int) -> str:
    if topology == "pipeline":
        return "trainer" if rank == 0 else f"stage{rank - 1}"
    return "ps" if rank == 0 else f"trainer{rank}"


def main(run_dir: str) -> Optional[dict[str, Any]]:
    run_path = Path(run_dir)
    cfg = OmegaConf.load(run_path / CONFIG_FILE)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    setup_worker_logging(run_path, rank)
    logging.getLogger("torch.distributed.optim").setLevel(logging.ERROR)  # "without TorchScript support": intended
    warnings.filterwarnings("ignore", message="You are using a Backend")  # raised inside torch's own init_rpc
    if cfg.runtime.omp_num_threads:
        torch.set_num_threads(int(cfg.runtime.omp_num_threads))
    topology = cfg.launch.topology
    name = role(topology, rank)
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rpc_timeout=float(cfg.launch.rpc_timeout), num_worker_threads=max(16, 4 * world_size))
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    log.info("rpc worker %s (rank %d of %d) up, pid %d", name, rank, world_size, os.getpid(), extra={"console": False})
    summary = None
    try:
        if topology == "pipeline" and rank == 0:
            from runner.rpc import pipeline

            summary = pipeline.train(cfg, run_path)
        elif topology == "parameter_server" and rank > 0:
            from runner.rpc import parameter_server

            summary = parameter_server.train(cfg, run_path, rank, world_size)
    except Exception as err:
        log.error("training failed on %s", name, exc_info=True, extra={"console": False})
        log.warning("failed: %s: %s (traceback in %s)", type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                    rank_log_path(run_path, rank), extra={"file": False})
        rpc.shutdown(graceful=False)
        raise
    rpc.shutdown()  # graceful: waits until every worker is done with everyone else
    return summary if (rank == 0 or (topology == "parameter_server" and rank == 1)) else None
