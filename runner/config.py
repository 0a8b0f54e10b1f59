"""The config schema: every key the runner reads, its type, its default and what it means.

Registered in Hydra's ConfigStore as `runner_schema` (first in conf/config.yaml's defaults), so a
misspelled key or a value of the wrong type is rejected by Hydra while composing. Ranges and
choices that a type cannot express are checked by `check_ranges`, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from runner.errors import UserError

BACKENDS = ("auto", "gloo", "nccl")
LAUNCH_MODES = ("local", "standalone", "multinode", "rpc")
RPC_TOPOLOGIES = ("pipeline", "parameter_server")
NPROC_WORDS = ("auto", "cpu", "gpu")
CPU_ALLREDUCE = ("auto", "shm", "gloo")
RESUME_WORDS = ("auto", "never", "must")


@dataclass
class TrainerConfig:
    total_epochs: int = 20  # epochs to train; raise it and re-run to continue a finished run
    batch_size: int = 32  # samples per worker per step
    save_every: int = 0  # epochs between snapshots; 0 = only the final snapshot
    save_every_steps: int = 0  # steps between snapshots, for long epochs; 0 = off
    seed: int = 0  # model init and per-rank RNG seeds (data order uses it too)
    log_every: int = 50  # steps between progress-bar loss updates (one host sync each)
    progress: bool = True  # tqdm bar on rank 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    shuffle: bool = True  # shuffle the data every epoch (DistributedSampler)
    loss: Any = field(default_factory=lambda: {"_target_": "torch.nn.MSELoss"})
    # Fault injection, to rehearse recovery: rank `crash_rank` kills itself with SIGKILL at global
    # step `crash_at_step` (first attempt only, so the restarted workers go on).
    crash_at_step: Optional[int] = None
    crash_rank: int = 0


@dataclass
class LaunchConfig:
    mode: str = "standalone"  # local | standalone | multinode
    nproc_per_node: str = "auto"  # auto | cpu | gpu | N (torchrun's meaning)
    backend: str = "auto"  # auto (nccl on CUDA, else gloo) | gloo | nccl
    max_restarts: int = 3  # worker-group restarts after a failure before the job fails
    monitor_interval: float = 0.1  # seconds between the agent's health checks of its workers
    stop_timeout: int = 120  # seconds workers get to snapshot after SIGTERM/SIGINT before SIGKILL
    nnodes: str = "1"  # N or MIN:MAX (multinode)
    node_rank: Optional[int] = None  # multinode: this node's rank (optional with c10d)
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None  # multinode: host:port every node can reach
    rdzv_id: Optional[str] = None  # multinode: job id shared by all nodes
    rdzv_timeout: int = 900  # seconds to wait for all nodes to join
    omp_num_threads: Optional[int] = None  # threads per CPU worker; default: cores / workers
    # How CPU workers on one machine average gradients: shm (through shared memory: microseconds)
    # | gloo (over local TCP: a fraction of a millisecond per call) | auto (shm where it works).
    cpu_allreduce: str = "auto"
    topology: str = "pipeline"  # launch=rpc: pipeline | parameter_server
    num_stages: int = 2  # launch=rpc, pipeline: stages the nn.Sequential model is cut into
    rpc_timeout: float = 120.0  # launch=rpc: seconds before an RPC is considered lost


class SnapshotConfig:
    """Where snapshots go, how many are kept and how a run resumes."""

    dir: str = "snapshots"  # inside the run directory
    keep_last: int = 3  # newest versions kept (milestones are kept on top)
    milestone_every: int = 0  # epochs; end-of-epoch snapshots at multiples of it are kept forever
    resume: str = "auto"  # auto | never | must | path to a snapshot file


# `snapshot.async` is the natural key but `async` is a Python keyword, so it is added by name.
SnapshotConfig.__annotations__["async"] = bool
setattr(SnapshotConfig, "async", False)  # write snapshots in a background thread
SnapshotConfig = dataclass(init=False, repr=False, eq=False)(SnapshotConfig)


@dataclass
class RunnerConfig:
    name: Optional[str] = None
    dataset: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logger: Any = None  # optional metrics logger beside metrics.jsonl (conf/logger/)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="runner_schema", node=RunnerConfig)


# ---- ranges and choices ------------------------------------------------------------------------

def _require(cond: bool, key: str, value: object, problem: str, allowed: str, fix: str = "") -> None:
    if not cond:
        raise UserError(key, value, problem, allowed, fix or f"pass e.g. {key}=<{allowed.split(' ')[0]}>")


def check_ranges(cfg: DictConfig) -> None:
    """Value checks no type can express. Raises UserError naming the first bad key."""
    t, l, s = cfg.trainer, cfg.launch, cfg.snapshot
    _require(t.total_epochs >= 1, "trainer.total_epochs", t.total_epochs, "must be at least 1", "an integer >= 1", "e.g. trainer.total_epochs=20")
    _require(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be at least 1", "an integer >= 1 (samples per worker)", "e.g. trainer.batch_size=32")
    for key in ("save_every", "save_every_steps", "log_every"):
        _require(t[key] >= 0, f"trainer.{key}", t[key], "must not be negative", "an integer >= 0 (0 turns it off)", f"e.g. trainer.{key}=0")
    if t.crash_at_step is not None:
        _require(t.crash_at_step >= 1, "trainer.crash_at_step", t.crash_at_step, "must be at least 1", "null or an integer >= 1")
    _require(l.mode in LAUNCH_MODES, "launch.mode", l.mode, "is not a launch mode", " | ".join(LAUNCH_MODES), "pick one with launch=<mode>")
    nproc = str(l.nproc_per_node)
    _require(nproc in NPROC_WORDS or (nproc.isdigit() and int(nproc) >= 1), "launch.nproc_per_node", nproc,
             "is not a worker count", "auto | cpu | gpu | a positive integer", "e.g. launch.nproc_per_node=2")
    _require(l.backend in BACKENDS, "launch.backend", l.backend, "is not a known backend", " | ".join(BACKENDS), "e.g. launch.backend=auto")
    _require(l.max_restarts >= 0, "launch.max_restarts", l.max_restarts, "must not be negative", "an integer >= 0", "e.g. launch.max_restarts=3")
    _require(l.monitor_interval > 0, "launch.monitor_interval", l.monitor_interval, "must be positive", "seconds > 0", "e.g. launch.monitor_interval=0.1")
    _require(l.stop_timeout >= 1, "launch.stop_timeout", l.stop_timeout, "must be at least 1", "seconds >= 1", "e.g. launch.stop_timeout=120")
    _require(l.rdzv_timeout > 0, "launch.rdzv_timeout", l.rdzv_timeout, "must be positive", "seconds > 0", "e.g. launch.rdzv_timeout=900")
    _require(l.cpu_allreduce in CPU_ALLREDUCE, "launch.cpu_allreduce", l.cpu_allreduce, "is not a gradient all-reduce",
             " | ".join(CPU_ALLREDUCE), "e.g. launch.cpu_allreduce=auto")
    if l.omp_num_threads is not None:
        _require(l.omp_num_threads >= 1, "launch.omp_num_threads", l.omp_num_threads, "must be at least 1", "null or an integer >= 1")
    _require(parse_nnodes(l.nnodes) is not None, "launch.nnodes", l.nnodes, "is not a node count", "N or MIN:MAX with 1 <= MIN <= MAX", "e.g. launch.nnodes=2")
    if l.mode == "local":
        _require(nproc in ("1", "auto", "cpu"), "launch.nproc_per_node", nproc, "launch=local runs exactly one process", "1",
                 "use launch=standalone for several workers")
    if l.mode == "multinode":
        _require(bool(l.rdzv_endpoint), "launch.rdzv_endpoint", l.rdzv_endpoint, "launch=multinode needs a rendezvous endpoint",
                 "host:port that every node can reach", "e.g. launch.rdzv_endpoint=node0:29400 on every node")
    if l.mode == "rpc":
        check_rpc(cfg)
    _require(s.keep_last >= 1, "snapshot.keep_last", s.keep_last, "must keep at least one version", "an integer >= 1", "e.g. snapshot.keep_last=3")
    _require(s.milestone_every >= 0, "snapshot.milestone_every", s.milestone_every, "must not be negative", "an integer >= 0 (0 = no milestones)")
    _require(bool(s.dir), "snapshot.dir", s.dir, "must name a folder", "a folder name inside the run directory", "e.g. snapshot.dir=snapshots")
    for group in ("dataset", "model", "optimizer"):
        node = cfg.get(group)
        _require(isinstance(node, DictConfig) and "_target_" in node, f"{group}._target_", None if node is None else node.get("_target_"),
                 f"the {group} group needs a _target_", "a dotted path to a class or function", f"pick an entry with {group}=<name>")


def check_rpc(cfg: DictConfig) -> None:
    """Options that make no sense when the model is split across processes."""
    l = cfg.launch
    _require(l.topology in RPC_TOPOLOGIES, "launch.topology", l.topology, "is not an RPC topology", " | ".join(RPC_TOPOLOGIES))
    _require(l.num_stages >= 1, "launch.num_stages", l.num_stages, "must be at least 1", "an integer >= 1", "e.g. launch.num_stages=2")
    _require(l.rpc_timeout > 0, "launch.rpc_timeout", l.rpc_timeout, "must be positive", "seconds > 0", "e.g. launch.rpc_timeout=120")
    nproc = str(l.nproc_per_node)
    if l.topology == "pipeline":
        _require(nproc == "auto" or nproc == str(l.num_stages + 1), "launch.nproc_per_node", nproc,
                 f"a pipeline of {l.num_stages} stages runs {l.num_stages + 1} processes (1 trainer + 1 per stage)",
                 f"auto | {l.num_stages + 1}", "use launch.nproc_per_node=auto or change launch.num_stages")
    else:
        _require(nproc == "auto" or (nproc.isdigit() and int(nproc) >= 2), "launch.nproc_per_node", nproc,
                 "a parameter server needs itself and at least one trainer", "auto | an integer >= 2")
    _require(l.backend in ("auto", "gloo"), "launch.backend", l.backend, "launch=rpc trains on the CPU through TensorPipe",
             "auto | gloo", "use launch.backend=auto")
    _require(not cfg.get("scheduler"), "scheduler", "(set)", "learning-rate schedulers are not supported with launch=rpc",
             "scheduler=none", "add scheduler=none")
    _require(cfg.trainer.crash_at_step is None or 0 <= cfg.trainer.crash_rank, "trainer.crash_rank", cfg.trainer.crash_rank,
             "must name a worker", "an integer >= 0")


def parse_nnodes(text: object) -> Optional[tuple[int, int]]:
    parts = str(text).split(":")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        return None
    lo, hi = int(parts[0]), int(parts[-1])
    return (lo, hi) if 1 <= lo <= hi else None
