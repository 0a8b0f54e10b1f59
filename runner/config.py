"""The config schema: every key the runner reads, its type, its default, its choices and what it means.

This module is the single source of every default. Registered in Hydra's ConfigStore as
`runner_schema` (first in conf/config.yaml's defaults), so a misspelled key, a value of the wrong
type or a word that is not one of a key's choices is rejected by Hydra while composing; the YAML
files in conf/ hold only what an entry changes. Ranges that a type cannot express are checked by
`check_ranges`, in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from runner.errors import UserError


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

    shard: Optional[str] = None  # class (dotted path or bare name) whose every module is sharded on its own; null = each top-level child
    reshard_after_forward: bool = True  # free the gathered parameters after forward (less memory, a second all-gather in backward)
    param_dtype: Optional[str] = None  # bf16 | fp16 | 32: dtype of forward/backward compute (weights stay float32); null = float32
    reduce_dtype: Optional[str] = None  # bf16 | fp16 | 32: dtype the gradients are reduced in; null = param_dtype
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory (CUDA workers)
    meta_init: bool = False  # build the model without memory, shard it, then initialise each rank's shards (reset_parameters / init_weights): no worker ever holds the whole model; not the same initial values as a whole-model build


@dataclass
class DDPConfig:
    """trainer.strategy=ddp: options of DistributedDataParallel (runner.train.engines.ddp), DDP's own defaults.
    A single process (launch=local, or one worker in all) is not wrapped in DDP: nothing to average."""

    broadcast_buffers: bool = True  # copy rank 0's buffers (BatchNorm statistics) to every rank before each forward
    find_unused_parameters: bool = False  # find parameters a forward left unused (a model with branches): a graph walk per step
    static_graph: bool = False  # the set of used parameters never changes between steps (lets DDP skip that search)
    bucket_cap_mb: Optional[float] = None  # MiB of gradients averaged in one go; null = DDP's default (25)
    gradient_as_bucket_view: bool = False  # gradients live in DDP's buckets: saves a copy and the memory of one


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


@dataclass
class DataConfig:
    """How batches are made (the dataset group says what the samples are)."""

    loader: LoaderKind = LoaderKind.auto  # auto | tensor | dataloader
    val_fraction: float = 0.0  # split this share off a single dataset for validation (deterministic from trainer.seed)
    num_workers: int = 0  # DataLoader worker processes per training process
    pin_memory: Optional[bool] = None  # page-locked host batches; null = on when training on CUDA
    persistent_workers: bool = True  # keep DataLoader workers alive between epochs (num_workers > 0)
    prefetch_factor: Optional[int] = None  # batches each DataLoader worker prepares ahead; null = torch's default (2)
    collate_fn: Any = None  # a _target_ building the collate function (called with no arguments); null = torch's default
    drop_last: bool = False  # drop each rank's last incomplete batch of an epoch
    eval_batch_size: Optional[int] = None  # batch size for validation and test; null = trainer.batch_size


@dataclass
class LaunchConfig:
    mode: LaunchMode = LaunchMode.standalone
    nproc_per_node: str = "auto"  # auto | cpu | gpu | N (torchrun's meaning), see `parse_nproc`
    backend: Backend = Backend.auto
    max_restarts: int = 3  # worker-group restarts after a failure before the job fails
    monitor_interval: float = 0.1  # seconds between the agent's health checks of its workers
    stop_timeout: int = 120  # seconds workers get to snapshot after SIGTERM/SIGINT before SIGKILL
    collective_timeout: float = 600.0  # seconds a worker waits for its peers in a collective before failing
    nnodes: str = "1"  # N or MIN:MAX (multinode)
    node_rank: Optional[int] = None  # multinode: this node's rank (optional with c10d)
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None  # multinode: host:port every node can reach
    rdzv_id: Optional[str] = None  # multinode: job id shared by all nodes; default: the run directory's name
    rdzv_timeout: int = 900  # seconds to wait for all nodes to join
    omp_num_threads: Optional[int] = None  # threads per CPU worker; default: usable cores / workers
    cpu_allreduce: CpuAllreduce = CpuAllreduce.auto  # how CPU workers on one machine average gradients
    start_method: StartMethod = StartMethod.auto  # how worker processes start (runner.launch.start)
    topology: Topology = Topology.pipeline  # launch=rpc
    num_stages: int = 2  # launch=rpc, pipeline: stages the nn.Sequential model is cut into
    rpc_timeout: float = 120.0  # launch=rpc: seconds before an RPC is considered lost


# `snapshot.async` is the natural key, but `async` is a Python keyword and cannot be written as a
# field in a class body; the class is declared from its namespace instead, without the generated
# __init__, __repr__ and __eq__ (they would spell `self.async`). OmegaConf reads the annotations.
SnapshotConfig = dataclass(init=False, repr=False, eq=False)(type("SnapshotConfig", (), {
    "__doc__": "Where snapshots go, how many are kept and how a run resumes.",
    "__annotations__": {"dir": str, "keep_last": int, "milestone_every": int, "resume": str, "async": bool,
                        "monitor": Optional[str], "mode": Mode, "keep_best": int, "format": SnapshotFormat},
    "dir": "snapshots",  # inside the run directory
    "keep_last": 3,  # newest versions kept (milestones are kept on top)
    "milestone_every": 0,  # epochs; end-of-epoch snapshots at multiples of it are kept forever
    "resume": "auto",  # auto | never | must | path to a snapshot file (ResumeWord)
    "async": False,  # write in the background; the loop waits only for a copy into reused buffers
    "monitor": None,  # a metric to keep the best versions by, e.g. val/accuracy (also early stopping's metric)
    "mode": Mode.min,  # min | max: which way `monitor` improves
    "keep_best": 1,  # best versions by `monitor` kept beyond keep_last
    "format": SnapshotFormat.auto,  # auto | file | dcp: one file by rank 0, or a folder of shards by every rank
}))


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

    def describe(self, strategy: str = "ddp") -> str:
        """`cpu x 2 (gloo, gradients through shared memory)`: where the workers run and how they
        average gradients. FSDP reduce-scatters them through the process group's own collectives."""
        if str(strategy) == Strategy.fsdp:
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
        if (sep and key.lstrip("+") in PATH_KEYS and value[:1] not in ("'", '"') and any(c in value for c in "=,")
                and "'" not in value and "\\" not in value and Path(value).exists()):
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


def parse_nnodes(text: object) -> Optional[tuple[int, int]]:
    parts = str(text).split(":")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        return None
    lo, hi = int(parts[0]), int(parts[-1])
    return (lo, hi) if 1 <= lo <= hi else None


# ---- ranges ------------------------------------------------------------------------------------

def _require(cond: bool, key: str, value: object, problem: str, allowed: str, fix: str = "") -> None:
    if not cond:
        raise UserError(key, value, problem, allowed, fix or f"pass e.g. {key}=<{allowed.split(' ')[0]}>")


def check_ranges(cfg: DictConfig) -> None:
    """Value checks no type can express. Raises UserError naming the first bad key."""
    t, l, s = cfg.trainer, cfg.launch, cfg.snapshot
    _require(t.total_epochs >= 1, "trainer.total_epochs", t.total_epochs, "must be at least 1", "an integer >= 1", "e.g. trainer.total_epochs=20")
    _require(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be at least 1", "an integer >= 1 (samples per worker)", "e.g. trainer.batch_size=32")
    for key in ("save_every", "save_every_steps", "log_every", "max_steps", "val_every", "val_every_steps"):
        _require(t[key] >= 0, f"trainer.{key}", t[key], "must not be negative", "an integer >= 0 (0 turns it off)", f"e.g. trainer.{key}=0")
    _require(str(t.precision) in Precision._value2member_map_, "trainer.precision", t.precision, "is not a precision",
             Precision.words(), "e.g. trainer.precision=bf16")
    _require(t.accumulate >= 1, "trainer.accumulate", t.accumulate, "must be at least 1", "an integer >= 1 (micro-batches per optimizer step)",
             "e.g. trainer.accumulate=4")
    if t.clip_grad_norm is not None:
        _require(t.clip_grad_norm > 0, "trainer.clip_grad_norm", t.clip_grad_norm, "must be positive", "null or a number > 0", "e.g. trainer.clip_grad_norm=1.0")
    es = t.early_stop
    _require(es.patience >= 0, "trainer.early_stop.patience", es.patience, "must not be negative", "an integer >= 0 (0 = off)")
    _require(es.min_delta >= 0, "trainer.early_stop.min_delta", es.min_delta, "must not be negative", "a number >= 0")
    _require(es.patience == 0 or bool(s.monitor), "trainer.early_stop.patience", es.patience, "early stopping watches snapshot.monitor, which is not set",
             "a metric name in snapshot.monitor, e.g. val/loss", "add snapshot.monitor=val/loss (and snapshot.mode=min|max)")
    d = cfg.data
    _require(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in [0, 1)", "a fraction, e.g. 0.1 (0 = no split)", "e.g. data.val_fraction=0.1")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must not be negative", "an integer >= 0 (0 = load in the training process)")
    if d.prefetch_factor is not None:
        _require(d.prefetch_factor >= 1 and d.num_workers > 0, "data.prefetch_factor", d.prefetch_factor,
                 "needs loader workers (data.num_workers > 0) and a value >= 1", "null, or an integer >= 1 with data.num_workers > 0")
    if d.eval_batch_size is not None:
        _require(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be at least 1", "null or an integer >= 1")
    _require(s.keep_best >= 0, "snapshot.keep_best", s.keep_best, "must not be negative", "an integer >= 0", "e.g. snapshot.keep_best=1")
    if t.crash_at_step is not None:
        _require(t.crash_at_step >= 1, "trainer.crash_at_step", t.crash_at_step, "must be at least 1", "null or an integer >= 1")
    nproc = parse_nproc(l.nproc_per_node)
    _require(nproc is not None, "launch.nproc_per_node", l.nproc_per_node, "is not a worker count",
             f"{NprocWord.words()} | a positive integer", "e.g. launch.nproc_per_node=2")
    _require(l.max_restarts >= 0, "launch.max_restarts", l.max_restarts, "must not be negative", "an integer >= 0", "e.g. launch.max_restarts=3")
    _require(l.monitor_interval > 0, "launch.monitor_interval", l.monitor_interval, "must be positive", "seconds > 0", "e.g. launch.monitor_interval=0.1")
    _require(l.stop_timeout >= 1, "launch.stop_timeout", l.stop_timeout, "must be at least 1", "seconds >= 1", "e.g. launch.stop_timeout=120")
    _require(l.collective_timeout > 0, "launch.collective_timeout", l.collective_timeout, "must be positive", "seconds > 0",
             "e.g. launch.collective_timeout=600")
    _require(l.rdzv_timeout > 0, "launch.rdzv_timeout", l.rdzv_timeout, "must be positive", "seconds > 0", "e.g. launch.rdzv_timeout=900")
    if l.omp_num_threads is not None:
        _require(l.omp_num_threads >= 1, "launch.omp_num_threads", l.omp_num_threads, "must be at least 1", "null or an integer >= 1")
    _require(parse_nnodes(l.nnodes) is not None, "launch.nnodes", l.nnodes, "is not a node count", "N or MIN:MAX with 1 <= MIN <= MAX", "e.g. launch.nnodes=2")
    if l.mode == LaunchMode.local:
        _require(nproc in (1, NprocWord.auto, NprocWord.cpu), "launch.nproc_per_node", l.nproc_per_node,
                 "launch=local runs exactly one process", "1", "use launch=standalone for several workers")
    if l.mode == LaunchMode.multinode:
        _require(bool(l.rdzv_endpoint), "launch.rdzv_endpoint", l.rdzv_endpoint, "launch=multinode needs a rendezvous endpoint",
                 "host:port that every node can reach", "e.g. launch.rdzv_endpoint=node0:29400 on every node")
    if l.mode == LaunchMode.rpc:
        check_rpc(cfg)
    if t.strategy == Strategy.fsdp:
        check_fsdp(cfg)
        for key, default in DDPConfig().__dict__.items():  # FSDP reduces through its own collectives
            value = t.ddp.get(key)
            _require(value == default, f"trainer.ddp.{key}", value, "is read only with trainer.strategy=ddp",
                     f"{str(default).lower() if default is not None else 'null'} with trainer.strategy=fsdp",
                     f"drop trainer.ddp.{key}, or use trainer.strategy=ddp")
    else:
        cap = t.ddp.bucket_cap_mb
        _require(cap is None or cap > 0, "trainer.ddp.bucket_cap_mb", cap, "must be positive", "null (DDP's 25) or MiB > 0",
                 "e.g. trainer.ddp.bucket_cap_mb=25")
        _require(not (t.ddp.static_graph and t.accumulate > 1), "trainer.ddp.static_graph", True,
                 f"cannot be combined with trainer.accumulate={t.accumulate}: DDP's no_sync (local accumulation) "
                 "fails an internal assertion under a static graph", "false with trainer.accumulate > 1",
                 "drop trainer.ddp.static_graph=true, or use trainer.accumulate=1")
        for key, default in FSDPConfig().__dict__.items():
            value = t.fsdp.get(key)
            _require(value == default, f"trainer.fsdp.{key}", value, "is read only with trainer.strategy=fsdp",
                     f"{str(default).lower() if default is not None else 'null'} with trainer.strategy={t.strategy}",
                     f"add trainer.strategy=fsdp, or drop trainer.fsdp.{key}")
    _require(s.keep_last >= 1, "snapshot.keep_last", s.keep_last, "must keep at least one version", "an integer >= 1", "e.g. snapshot.keep_last=3")
    _require(s.milestone_every >= 0, "snapshot.milestone_every", s.milestone_every, "must not be negative", "an integer >= 0 (0 = no milestones)")
    _require(bool(s.dir) and Path(str(s.dir)).name == str(s.dir) and str(s.dir) not in (".", ".."), "snapshot.dir", s.dir,
             "must name one folder inside the run directory", "a plain folder name", "e.g. snapshot.dir=snapshots")
    for group in ("dataset", "task", "model", "optimizer"):
        node = cfg.get(group)
        _require(isinstance(node, DictConfig) and "_target_" in node, f"{group}._target_", None if node is None else node.get("_target_"),
                 f"the {group} group needs a _target_", "a dotted path to a class or function", f"pick an entry with {group}=<name>")


# Sections of the schema and their dataclasses: a key `+`-added under one of them does nothing, so it is refused.
def schema_sections() -> dict[str, type]:
    return {"trainer": TrainerConfig, "trainer.early_stop": EarlyStopConfig, "trainer.fsdp": FSDPConfig, "trainer.ddp": DDPConfig, "data": DataConfig, "launch": LaunchConfig,
            "snapshot": SnapshotConfig}


def check_unknown_keys(cfg: DictConfig) -> None:
    """A key that the schema does not know (added with `+`) is a mistake the user believes is on."""
    for section, schema in schema_sections().items():
        node = cfg
        for part in section.split("."):
            node = node.get(part) if isinstance(node, DictConfig) else None
        if not isinstance(node, DictConfig):
            continue
        known = list(schema.__dataclass_fields__)
        for key in node.keys():
            if key not in known:
                close = [k for k in known if k.startswith(str(key)[:3])] or known
                raise UserError(f"{section}.{key}", node.get(key), f"is not a setting of {section}: nothing would read it",
                                f"one of: {', '.join(known)}", f"remove +{section}.{key}" + (f" (did you mean {section}.{close[0]}?)" if close != known else ""))


DTYPE_WORDS = ("bf16", "fp16", "32")


def snapshot_format(cfg: DictConfig) -> SnapshotFormat:
    """snapshot.format with auto decided: shards for a sharded model, one file otherwise."""
    fmt = SnapshotFormat(str(cfg.snapshot.get("format", SnapshotFormat.auto)))
    if fmt != SnapshotFormat.auto:
        return fmt
    return SnapshotFormat.dcp if str(cfg.trainer.get("strategy", Strategy.ddp)) == Strategy.fsdp else SnapshotFormat.file


def check_fsdp(cfg: DictConfig) -> None:
    """Options that FSDP cannot honour, refused before any worker starts."""
    t, f = cfg.trainer, cfg.trainer.fsdp
    _require(str(t.precision) != Precision.fp16, "trainer.precision", "fp16", "is not supported with trainer.strategy=fsdp "
             "(its gradient scaler needs whole gradients)", "32 | bf16, or trainer.fsdp.param_dtype=bf16",
             "use trainer.precision=bf16 or trainer.fsdp.param_dtype=bf16")
    for key in ("param_dtype", "reduce_dtype"):
        value = f.get(key)
        _require(value is None or str(value) in DTYPE_WORDS, f"trainer.fsdp.{key}", value, "is not a dtype FSDP can compute in",
                 "null | " + " | ".join(DTYPE_WORDS), f"e.g. trainer.fsdp.{key}=bf16")
    _require(snapshot_format(cfg) == SnapshotFormat.dcp, "snapshot.format", cfg.snapshot.format,
             "a sharded model is snapshotted as shards (every rank writes its own)", "auto | dcp", "use snapshot.format=auto")


def check_rpc(cfg: DictConfig) -> None:
    """Options that make no sense when the model is split across processes."""
    l = cfg.launch
    _require(l.num_stages >= 1, "launch.num_stages", l.num_stages, "must be at least 1", "an integer >= 1", "e.g. launch.num_stages=2")
    _require(l.rpc_timeout > 0, "launch.rpc_timeout", l.rpc_timeout, "must be positive", "seconds > 0", "e.g. launch.rpc_timeout=120")
    nproc = parse_nproc(l.nproc_per_node)
    if l.topology == Topology.pipeline:
        _require(nproc == NprocWord.auto or nproc == l.num_stages + 1, "launch.nproc_per_node", l.nproc_per_node,
                 f"a pipeline of {l.num_stages} stages runs {l.num_stages + 1} processes (1 trainer + 1 per stage)",
                 f"auto | {l.num_stages + 1}", "use launch.nproc_per_node=auto or change launch.num_stages")
    else:
        _require(nproc == NprocWord.auto or (isinstance(nproc, int) and nproc >= 2), "launch.nproc_per_node", l.nproc_per_node,
                 "a parameter server needs itself and at least one trainer", "auto | an integer >= 2")
    _require(l.backend in (Backend.auto, Backend.gloo), "launch.backend", l.backend, "launch=rpc trains on the CPU through TensorPipe",
             "auto | gloo", "use launch.backend=auto")
    _require(cfg.trainer.on_nonfinite != OnNonFinite.skip, "trainer.on_nonfinite", "skip",
             "launch=rpc cannot skip a step (the optimizer steps where the parameters live)", "stop | warn",
             "use trainer.on_nonfinite=stop")
    _require(not cfg.get("scheduler"), "scheduler", "(set)", "learning-rate schedulers are not supported with launch=rpc",
             "scheduler=none", "add scheduler=none")
    _require(str(cfg.trainer.strategy) == Strategy.ddp, "trainer.strategy", cfg.trainer.strategy,
             "launch=rpc splits the model over its stages itself", "ddp with launch=rpc", "drop trainer.strategy, or use launch=standalone")
    _require(snapshot_format(cfg) == SnapshotFormat.file, "snapshot.format", cfg.snapshot.format,
             "launch=rpc writes one snapshot file (the lead gathers the stages' state)", "auto | file", "use snapshot.format=auto")
    t = cfg.trainer
    for key, value, default in (("accumulate", t.accumulate, 1), ("precision", str(t.precision), "32"), ("compile", t.compile, False),
                                ("clip_grad_norm", t.clip_grad_norm, None)):
        _require(value == default, f"trainer.{key}", value, "is not supported with launch=rpc (the optimizer steps where the parameters live)",
                 str(default).lower() if default is not None else "null", f"drop trainer.{key}")
    _require(cfg.trainer.crash_at_step is None or 0 <= cfg.trainer.crash_rank, "trainer.crash_rank", cfg.trainer.crash_rank,
             "must name a worker", "an integer >= 0")
