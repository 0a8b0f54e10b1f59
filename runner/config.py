"""The config schema: every key the runner reads, its type, its default, its choices and what it means.

This module is the single source of every default. Registered in Hydra's ConfigStore as
`runner_schema` (first in conf/config.yaml's defaults), so a misspelled key, a value of the wrong
type or a word that is not one of a key's choices is rejected by Hydra while composing; the YAML
files in conf/ hold only what an entry changes. Ranges that a type cannot express are checked with
every other check, before any worker starts, by runner.driver.checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig


class Choice(str, Enum):
    """A config word: compares equal to its string (configs read back from YAML hold plain strings)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def words(cls) -> str:
        return " | ".join(m.value for m in cls)


class LaunchMode(Choice):
    auto = "auto"  # standalone, or multinode placed by the scheduler (runner.launch.schedulers)
    local = "local"  # one process, in the driver: debuggers work
    standalone = "standalone"  # one machine, torchrun --standalone
    multinode = "multinode"  # several machines, one c10d rendezvous
    rpc = "rpc"  # the model split across processes (docs/rpc.md)


class Backend(Choice):
    auto = "auto"  # nccl on CUDA, else gloo
    gloo = "gloo"
    nccl = "nccl"


class CpuAllreduce(Choice):
    auto = "auto"  # shared memory where it works and every worker has a core
    shm = "shm"  # through shared memory: microseconds
    gloo = "gloo"  # over local TCP


class StartMethod(Choice):
    auto = "auto"  # forkserver on Linux, spawn elsewhere (runner.launch.start)
    forkserver = "forkserver"  # forked from a server with torch preloaded: no import per worker
    fork = "fork"  # forked from the driver (CPU workers only)
    spawn = "spawn"  # a fresh interpreter per worker, as torchrun does


class Topology(Choice):
    pipeline = "pipeline"  # 1 trainer + num_stages stage owners
    parameter_server = "parameter_server"  # 1 server + N trainers


class NprocWord(Choice):
    auto = "auto"  # GPUs if any, else one worker per usable core
    cpu = "cpu"  # one CPU worker per usable core
    gpu = "gpu"  # one worker per visible GPU


class ResumeWord(Choice):
    auto = "auto"  # resume when the run directory has a snapshot, else start fresh
    never = "never"  # start over (previous snapshots and metrics are archived, never deleted)
    must = "must"  # fail unless there is a snapshot to resume from


class Precision(Choice):
    full = "32"  # float32 everywhere
    bf16 = "bf16"  # bfloat16 autocast for forward and loss (weights, gradients and optimizer stay float32)
    fp16 = "fp16"  # float16 autocast with a gradient scaler (its state is in the snapshot)


class Mode(Choice):
    min = "min"  # lower is better (losses)
    max = "max"  # higher is better (accuracy)


class LoaderKind(Choice):
    auto = "auto"  # the in-memory fast path for tensor datasets without loader options, else a DataLoader
    tensor = "tensor"  # batches are one index_select per tensor (TensorDataset-like datasets only)
    dataloader = "dataloader"  # a torch.utils.data.DataLoader with the data.* options


class Interval(Choice):
    epoch = "epoch"
    step = "step"


class Strategy(Choice):
    ddp = "ddp"  # every worker holds the whole model; gradients are averaged (DistributedDataParallel)
    fsdp = "fsdp"  # parameters, gradients and optimizer state sharded over the workers (FSDP2 fully_shard)


class SnapshotFormat(Choice):
    auto = "auto"  # dcp with trainer.strategy=fsdp, else file
    file = "file"  # one verified file, written by rank 0 (snapshot-<step>.pt)
    dcp = "dcp"  # a folder of shards, one per rank, by torch.distributed.checkpoint (step-<step>/)


class UploadMode(Choice):
    auto = "auto"  # async with an object-store snapshot.dir (s3://) and file snapshots, else sync
    async_ = "async"  # write the version locally, upload it in the background: training never waits for the network
    sync = "sync"  # upload on the snapshot writer's thread: the next snapshot waits for the previous upload


class OnNonFinite(Choice):
    stop = "stop"  # end the run (exit 1) naming the step; the last finite snapshot is kept
    skip = "skip"  # skip optimizer steps whose gradients are not finite (one host sync per step)
    warn = "warn"  # log a warning and go on (snapshots of non-finite weights are still never written)


@dataclass
class EarlyStopConfig:
    patience: int = 0  # validations without improvement of snapshot.monitor before the run ends; 0 = off
    min_delta: float = 0.0  # an improvement smaller than this does not count


@dataclass
class FSDPConfig:
    """trainer.strategy=fsdp: how the model is sharded (runner.train.engines.fsdp)."""

    shard: Optional[str] = (
        None  # class (dotted path or bare name) whose every module is sharded on its own; null = each top-level child
    )
    reshard_after_forward: bool = (
        True  # free the gathered parameters after forward (less memory, a second all-gather in backward)
    )
    param_dtype: Optional[str] = (
        None  # bf16 | fp16 | 32: dtype of forward/backward compute (weights stay float32); null = float32
    )
    reduce_dtype: Optional[str] = None  # bf16 | fp16 | 32: dtype the gradients are reduced in; null = param_dtype
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory (CUDA workers)
    meta_init: bool = False  # build the model without memory, shard it, then initialise each rank's shards (reset_parameters / init_weights): no worker ever holds the whole model; not the same initial values as a whole-model build


@dataclass
class DDPConfig:
    """trainer.strategy=ddp: options of DistributedDataParallel (runner.train.engines.ddp), DDP's own defaults.
    A single process (launch=local, or one worker in all) is not wrapped in DDP: nothing to average."""

    broadcast_buffers: bool = True  # copy rank 0's buffers (BatchNorm statistics) to every rank before each forward
    find_unused_parameters: bool = (
        False  # find parameters a forward left unused (a model with branches): a graph walk per step
    )
    static_graph: bool = False  # the set of used parameters never changes between steps (lets DDP skip that search)
    bucket_cap_mb: Optional[float] = None  # MiB of gradients averaged in one go; null = DDP's default (25)
    gradient_as_bucket_view: bool = False  # gradients live in DDP's buckets: saves a copy and the memory of one


@dataclass
class ProfileConfig:
    """trainer.profile: torch.profiler over a window of steps, a trace per rank in <run>/profile/."""

    start_step: Optional[int] = None  # first global step profiled (counted from 1); null = off
    steps: int = 3  # steps in the window
    ranks: Optional[list[int]] = field(default_factory=lambda: [0])  # ranks that record; null = every rank
    record_shapes: bool = False  # operators' input shapes in the trace
    profile_memory: bool = False  # allocations and frees in the trace


@dataclass
class TrainerConfig:
    total_epochs: int = 20  # epochs to train; raise it and re-run to continue a finished run
    max_steps: int = 0  # optimizer steps to train instead of epochs (0 = train total_epochs epochs)
    batch_size: int = 32  # samples per worker per step
    save_every: int = 0  # epochs between snapshots; 0 = only the final snapshot
    save_every_steps: int = 0  # steps between snapshots, for long epochs; 0 = off
    seed: int = 0  # model init and per-rank RNG seeds (data order uses it too)
    log_every: int = 50  # optimizer steps between training rows (metrics.jsonl, trackers, bar or log line; one host sync each); 0 = off
    progress: bool = True  # tqdm bar on rank 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    shuffle: bool = True  # shuffle the data every epoch (DistributedSampler)
    on_nonfinite: OnNonFinite = OnNonFinite.stop  # a NaN/inf loss or weight: stop | skip | warn
    precision: str = "32"  # 32 | bf16 | fp16 (autocast of forward and loss); a str: "32" cannot be an enum name
    accumulate: int = 1  # micro-batches per optimizer step (gradients all-reduced on the last one only)
    clip_grad_norm: Optional[float] = None  # clip the global gradient norm to this value; null = off
    compile: bool = False  # torch.compile the model (snapshots keep the plain module's keys)
    val_every: int = 1  # epochs between validations (when there is a validation split); 0 = only at the end
    val_every_steps: int = 0  # optimizer steps between validations inside an epoch; 0 = off
    test: bool = False  # evaluate the best (else final) snapshot on the test split at the end: results.json
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    strategy: Strategy = Strategy.ddp  # ddp | fsdp: how the model is spread over the workers
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)  # DistributedDataParallel's options (trainer.strategy=ddp)
    # Start a new run from another run's model weights (fresh optimizer, schedule, step 0): a run directory (its
    # best snapshot, else its newest), a snapshot file or step-* folder, or exported weights (model.safetensors,
    # model.pt). Part of the run's identity; a run directory with snapshots of its own resumes from them instead.
    init_from: Optional[str] = None
    # The loss lives with the task now (task.loss for task=regression).
    # Fault injection, to rehearse recovery: rank `crash_rank` kills itself with SIGKILL at global
    # step `crash_at_step` (first attempt only, so the restarted workers go on).
    crash_at_step: Optional[int] = None
    crash_rank: int = 0
    # Observability (runner.train.observer): FLOPs of one sample's forward and backward (null = counted on the
    # first step with torch's FlopCounterMode) and the device's peak TFLOP/s for MFU (null = from a table of GPUs).
    flops_per_sample: Optional[float] = None
    peak_tflops: Optional[float] = None
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    memory_snapshot: bool = False  # CUDA: record allocations, and on out of memory write memory/rank-N.pickle


@dataclass
class DataConfig:
    """How batches are made (the dataset group says what the samples are)."""

    loader: LoaderKind = LoaderKind.auto  # auto | tensor | dataloader
    val_fraction: float = 0.0  # split this share off a single dataset for validation (deterministic from trainer.seed)
    num_workers: int = 0  # DataLoader worker processes per training process
    pin_memory: Optional[bool] = None  # page-locked host batches; null = on when training on CUDA
    persistent_workers: bool = True  # keep DataLoader workers alive between epochs (num_workers > 0)
    prefetch_factor: Optional[int] = None  # batches each DataLoader worker prepares ahead; null = torch's default (2)
    collate_fn: Any = (
        None  # a _target_ building the collate function (called with no arguments); null = torch's default
    )
    drop_last: bool = False  # drop each rank's last incomplete batch of an epoch
    eval_batch_size: Optional[int] = None  # batch size for validation and test; null = trainer.batch_size


@dataclass
class LaunchConfig:
    mode: LaunchMode = LaunchMode.auto
    nproc_per_node: str = "auto"  # auto | cpu | gpu | N (torchrun's meaning), see `parse_nproc`
    backend: Backend = Backend.auto
    max_restarts: int = 3  # worker-group restarts after a failure before the job fails
    monitor_interval: float = 0.1  # seconds between the agent's health checks of its workers
    stop_timeout: int = 120  # seconds workers get to snapshot after SIGTERM/SIGINT before SIGKILL
    collective_timeout: float = 600.0  # seconds a worker waits for its peers in a collective before failing
    hang_timeout: float = 300.0  # seconds no rank moves before stacks are dumped and the attempt ends; 0 = off
    nnodes: str = "1"  # N or MIN:MAX (multinode); auto (launch=auto): as many as the scheduler placed
    node_rank: Optional[int] = None  # multinode: this node's rank (optional with c10d); node 0 hosts the store
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None  # multinode: host:port every node can reach
    rdzv_id: Optional[str] = None  # multinode: job id shared by all nodes; default: the run directory's name
    rdzv_timeout: int = 900  # seconds to wait for all nodes to join
    rdzv_last_call_timeout: int = 30  # nnodes=MIN:MAX: seconds a rendezvous with MIN nodes waits for more
    omp_num_threads: Optional[int] = None  # threads per CPU worker; default: usable cores / workers
    cpu_allreduce: CpuAllreduce = CpuAllreduce.auto  # how CPU workers on one machine average gradients
    start_method: StartMethod = StartMethod.auto  # how worker processes start (runner.launch.start)
    topology: Topology = Topology.pipeline  # launch=rpc
    num_stages: int = 2  # launch=rpc, pipeline: stages the nn.Sequential model is cut into
    rpc_timeout: float = 120.0  # launch=rpc: seconds before an RPC is considered lost


# `snapshot.async` is the natural key, but `async` is a Python keyword and cannot be written as a
# field in a class body; the class is declared from its namespace instead, without the generated
# __init__, __repr__ and __eq__ (they would spell `self.async`). OmegaConf reads the annotations.
SnapshotConfig = dataclass(init=False, repr=False, eq=False)(
    type(
        "SnapshotConfig",
        (),
        {
            "__doc__": "Where snapshots go, how many are kept and how a run resumes.",
            "__annotations__": {
                "dir": str,
                "keep_last": int,
                "milestone_every": int,
                "resume": str,
                "async": bool,
                "monitor": Optional[str],
                "mode": Mode,
                "keep_best": int,
                "format": SnapshotFormat,
                "upload": UploadMode,
            },
            "dir": "snapshots",  # inside the run directory
            "keep_last": 3,  # newest versions kept (milestones are kept on top)
            "milestone_every": 0,  # epochs; end-of-epoch snapshots at multiples of it are kept forever
            "resume": "auto",  # auto | never | must | path to a snapshot file (ResumeWord)
            "async": False,  # write in the background; the loop waits only for a copy into reused buffers
            "monitor": None,  # a metric to keep the best versions by, e.g. val/accuracy (also early stopping's metric)
            "mode": Mode.min,  # min | max: which way `monitor` improves
            "keep_best": 1,  # best versions by `monitor` kept beyond keep_last
            "format": SnapshotFormat.auto,  # auto | file | dcp: one file by rank 0, or a folder of shards by every rank
            "upload": UploadMode.auto,  # auto | async | sync: how versions reach an object store (snapshot.dir=s3://...)
        },
    )
)


@dataclass
class RunnerConfig:
    name: Optional[str] = None  # the run directory's name; default: derived from the defining overrides
    dataset: Any = None
    task: Any = None  # what a batch means and what is measured (conf/task/, runner.tasks)
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logger: Any = None  # optional metrics logger beside metrics.jsonl (conf/logger/)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)


@dataclass(frozen=True)
class Runtime:
    """What the driver decided for this machine (runner.launch.runtime); not a user key: the
    driver writes it into the run's config.yaml as `runtime:` and the workers read it back."""

    backend: str  # gloo | nccl (the process group's backend)
    device: str  # cpu | cuda
    nproc_per_node: int  # worker processes on this node
    omp_num_threads: Optional[int]  # threads per CPU worker (None: torch's default on CUDA)
    allreduce: str  # how gradients are averaged: shm | gloo | nccl | rpc
    allreduce_reason: str  # why that one (shown when the user asked for another)
    cuda_visible_devices: Optional[str] = None  # this job's GPUs when sweep jobs share the machine
    start_method: str = "spawn"  # forkserver | fork | spawn: how the agent starts the workers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, node: DictConfig) -> "Runtime":
        return cls(**{k: node[k] for k in cls.__dataclass_fields__ if k in node})

    def describe(self, strategy: str = Strategy.ddp) -> str:
        """`cpu x 2 (gloo, gradients through shared memory)`: where the workers run and how they
        average gradients. FSDP reduce-scatters them through the process group's own collectives."""
        if strategy == Strategy.fsdp:
            comm = f"{self.backend}, FSDP: gradients reduce-scattered by {self.backend}"
        elif self.allreduce == "shm":
            comm = f"{self.backend}, gradients through shared memory"
        else:
            comm = self.backend
        return f"{self.device} x {self.nproc_per_node} ({comm})"


def register_schema() -> None:
    ConfigStore.instance().store(name="runner_schema", node=RunnerConfig)


# ---- words that share a key with free values ---------------------------------------------------


def parse_nproc(text: object) -> Union[NprocWord, int, None]:
    """launch.nproc_per_node as a word or a positive count; None when it is neither."""
    text = str(text)
    if text in NprocWord._value2member_map_:
        return NprocWord(text)
    return int(text) if text.isdigit() and int(text) >= 1 else None


def resume_path(resume: object) -> Optional[Path]:
    """snapshot.resume as a file path, or None when it is one of the words."""
    text = str(resume)
    return None if text in ResumeWord._value2member_map_ else Path(text)


PATH_KEYS = ("trainer.init_from", "snapshot.resume")  # keys whose value may be a run directory's path


def quote_path_overrides(args: list[str]) -> list[str]:
    """Hydra reads `=` and `,` in a value as syntax, and run directories are named with both
    (outputs/model=mlp,optimizer=adam): an existing path given to a PATH_KEYS key is quoted for
    Hydra, so that it can be passed as the shell completes it. Anything else is left as it is."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if (
            sep
            and key.lstrip("+") in PATH_KEYS
            and value[:1] not in ("'", '"')
            and any(c in value for c in "=,")
            and "'" not in value
            and "\\" not in value
            and Path(value).exists()
        ):
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


def parse_nnodes(text: object) -> Optional[tuple[int, int]]:
    parts = str(text).split(":")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        return None
    lo, hi = int(parts[0]), int(parts[-1])
    return (lo, hi) if 1 <= lo <= hi else None


# Sections of the schema and their dataclasses: a key `+`-added under one of them does nothing, so it is refused.
def schema_sections() -> dict[str, type]:
    return {
        "trainer": TrainerConfig,
        "trainer.early_stop": EarlyStopConfig,
        "trainer.fsdp": FSDPConfig,
        "trainer.ddp": DDPConfig,
        "trainer.profile": ProfileConfig,
        "data": DataConfig,
        "launch": LaunchConfig,
        "snapshot": SnapshotConfig,
    }


DTYPE_WORDS = ("bf16", "fp16", "32")


def snapshot_format(cfg: DictConfig) -> SnapshotFormat:
    """snapshot.format with auto decided: shards for a sharded model, one file otherwise."""
    fmt = SnapshotFormat(str(cfg.snapshot.get("format", SnapshotFormat.auto)))
    if fmt != SnapshotFormat.auto:
        return fmt
    return SnapshotFormat.dcp if cfg.trainer.get("strategy", Strategy.ddp) == Strategy.fsdp else SnapshotFormat.file
