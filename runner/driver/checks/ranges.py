"""Checks of the composed config alone: values no type can express, keys the schema does not know.

The schema (runner.config) rejects a misspelled key, a wrong type or a word that is not a choice
while Hydra composes; what is left is here: ranges, combinations of keys, and `+`-added keys that
nothing would read. Each function raises UserError naming the first bad key; none touches the machine.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from runner.config import (
    DTYPE_WORDS,
    Backend,
    DDPConfig,
    EarlyStopConfig,
    FSDPConfig,
    LaunchMode,
    NprocWord,
    OnNonFinite,
    Precision,
    SnapshotFormat,
    Strategy,
    Topology,
    parse_nnodes,
    parse_nproc,
    schema_sections,
    snapshot_format,
)
from runner.errors import UserError

GROUPS_WITH_TARGETS = ("dataset", "task", "model", "optimizer")


def require(cond: bool, key: str, value: object, problem: str, allowed: str, fix: str = "") -> None:
    if not cond:
        raise UserError(key, value, problem, allowed, fix or f"pass e.g. {key}=<{allowed.split(' ')[0]}>")


def check_ranges(cfg: DictConfig) -> None:
    """Value checks no type can express, section by section. Raises UserError naming the first bad key."""
    check_trainer(cfg.trainer)
    check_early_stop(cfg.trainer.early_stop, cfg.snapshot.monitor)
    check_data_options(cfg.data)
    check_launch(cfg.launch)
    if cfg.launch.mode == LaunchMode.rpc:
        check_rpc(cfg)
    if cfg.trainer.strategy == Strategy.fsdp:
        check_fsdp(cfg)
    else:
        check_ddp(cfg.trainer)
    check_snapshot(cfg.snapshot)
    check_groups(cfg)


def check_trainer(trainer: DictConfig) -> None:
    require(
        trainer.total_epochs >= 1,
        "trainer.total_epochs",
        trainer.total_epochs,
        "must be at least 1",
        "an integer >= 1",
        "e.g. trainer.total_epochs=20",
    )
    require(
        trainer.batch_size >= 1,
        "trainer.batch_size",
        trainer.batch_size,
        "must be at least 1",
        "an integer >= 1 (samples per worker)",
        "e.g. trainer.batch_size=32",
    )
    for key in ("save_every", "save_every_steps", "log_every", "max_steps", "val_every", "val_every_steps"):
        require(
            trainer[key] >= 0,
            f"trainer.{key}",
            trainer[key],
            "must not be negative",
            "an integer >= 0 (0 turns it off)",
            f"e.g. trainer.{key}=0",
        )
    require(
        str(trainer.precision) in Precision._value2member_map_,
        "trainer.precision",
        trainer.precision,
        "is not a precision",
        Precision.words(),
        "e.g. trainer.precision=bf16",
    )
    for key in ("flops_per_sample", "peak_tflops"):
        require(
            trainer.get(key) is None or trainer[key] > 0,
            f"trainer.{key}",
            trainer.get(key),
            "must be positive",
            "a number > 0, or null (counted on the first step / looked up by device)",
            f"e.g. trainer.{key}=null",
        )
    profile = trainer.get("profile")
    if profile is not None:
        require(
            profile.start_step is None or profile.start_step >= 1,
            "trainer.profile.start_step",
            profile.start_step,
            "must be at least 1 (steps are counted from 1)",
            "an integer >= 1, or null (no profile)",
            "e.g. trainer.profile.start_step=10",
        )
        require(
            profile.steps >= 1,
            "trainer.profile.steps",
            profile.steps,
            "must be at least 1",
            "an integer >= 1 (steps in the window)",
            "e.g. trainer.profile.steps=3",
        )
        require(
            profile.ranks is None or all(r >= 0 for r in profile.ranks),
            "trainer.profile.ranks",
            profile.ranks,
            "holds a negative rank",
            "a list of ranks >= 0, or null (every rank)",
            "e.g. trainer.profile.ranks=[0,1]",
        )
    require(
        trainer.accumulate >= 1,
        "trainer.accumulate",
        trainer.accumulate,
        "must be at least 1",
        "an integer >= 1 (micro-batches per optimizer step)",
        "e.g. trainer.accumulate=4",
    )
    if trainer.clip_grad_norm is not None:
        require(
            trainer.clip_grad_norm > 0,
            "trainer.clip_grad_norm",
            trainer.clip_grad_norm,
            "must be positive",
            "null or a number > 0",
            "e.g. trainer.clip_grad_norm=1.0",
        )
    if trainer.crash_at_step is not None:
        require(
            trainer.crash_at_step >= 1,
            "trainer.crash_at_step",
            trainer.crash_at_step,
            "must be at least 1",
            "null or an integer >= 1",
        )


def check_early_stop(early_stop: EarlyStopConfig, monitor: object) -> None:
    require(
        early_stop.patience >= 0,
        "trainer.early_stop.patience",
        early_stop.patience,
        "must not be negative",
        "an integer >= 0 (0 = off)",
    )
    require(
        early_stop.min_delta >= 0,
        "trainer.early_stop.min_delta",
        early_stop.min_delta,
        "must not be negative",
        "a number >= 0",
    )
    require(
        early_stop.patience == 0 or bool(monitor),
        "trainer.early_stop.patience",
        early_stop.patience,
        "early stopping watches snapshot.monitor, which is not set",
        "a metric name in snapshot.monitor, e.g. val/loss",
        "add snapshot.monitor=val/loss (and snapshot.mode=min|max)",
    )


def check_data_options(data: DictConfig) -> None:
    require(
        0 <= data.val_fraction < 1,
        "data.val_fraction",
        data.val_fraction,
        "must be in [0, 1)",
        "a fraction, e.g. 0.1 (0 = no split)",
        "e.g. data.val_fraction=0.1",
    )
    require(
        data.num_workers >= 0,
        "data.num_workers",
        data.num_workers,
        "must not be negative",
        "an integer >= 0 (0 = load in the training process)",
    )
    if data.prefetch_factor is not None:
        require(
            data.prefetch_factor >= 1 and data.num_workers > 0,
            "data.prefetch_factor",
            data.prefetch_factor,
            "needs loader workers (data.num_workers > 0) and a value >= 1",
            "null, or an integer >= 1 with data.num_workers > 0",
        )
    if data.eval_batch_size is not None:
        require(
            data.eval_batch_size >= 1,
            "data.eval_batch_size",
            data.eval_batch_size,
            "must be at least 1",
            "null or an integer >= 1",
        )


def check_launch(launch: DictConfig) -> None:
    nproc = parse_nproc(launch.nproc_per_node)
    require(
        nproc is not None,
        "launch.nproc_per_node",
        launch.nproc_per_node,
        "is not a worker count",
        f"{NprocWord.words()} | a positive integer",
        "e.g. launch.nproc_per_node=2",
    )
    require(
        launch.max_restarts >= 0,
        "launch.max_restarts",
        launch.max_restarts,
        "must not be negative",
        "an integer >= 0",
        "e.g. launch.max_restarts=3",
    )
    require(
        launch.monitor_interval > 0,
        "launch.monitor_interval",
        launch.monitor_interval,
        "must be positive",
        "seconds > 0",
        "e.g. launch.monitor_interval=0.1",
    )
    require(
        launch.stop_timeout >= 1,
        "launch.stop_timeout",
        launch.stop_timeout,
        "must be at least 1",
        "seconds >= 1",
        "e.g. launch.stop_timeout=120",
    )
    require(
        launch.collective_timeout > 0,
        "launch.collective_timeout",
        launch.collective_timeout,
        "must be positive",
        "seconds > 0",
        "e.g. launch.collective_timeout=600",
    )
    require(
        launch.get("hang_timeout", 0) >= 0,
        "launch.hang_timeout",
        launch.get("hang_timeout"),
        "must not be negative",
        "seconds > 0, or 0 (no hang watchdog)",
        "e.g. launch.hang_timeout=300",
    )
    require(
        launch.rdzv_timeout > 0,
        "launch.rdzv_timeout",
        launch.rdzv_timeout,
        "must be positive",
        "seconds > 0",
        "e.g. launch.rdzv_timeout=900",
    )
    if launch.omp_num_threads is not None:
        require(
            launch.omp_num_threads >= 1,
            "launch.omp_num_threads",
            launch.omp_num_threads,
            "must be at least 1",
            "null or an integer >= 1",
        )
    require(
        parse_nnodes(launch.nnodes) is not None or (launch.mode == LaunchMode.auto and launch.nnodes == "auto"),
        "launch.nnodes",
        launch.nnodes,
        "is not a node count",
        "N or MIN:MAX with 1 <= MIN <= MAX (auto: with launch=auto)",
        "e.g. launch.nnodes=2",
    )
    if launch.mode == LaunchMode.local:
        require(
            nproc in (1, NprocWord.auto, NprocWord.cpu),
            "launch.nproc_per_node",
            launch.nproc_per_node,
            "launch=local runs exactly one process",
            "1",
            "use launch=standalone for several workers",
        )
    if launch.mode == LaunchMode.multinode:
        require(
            bool(launch.rdzv_endpoint),
            "launch.rdzv_endpoint",
            launch.rdzv_endpoint,
            "launch=multinode needs a rendezvous endpoint",
            "host:port that every node can reach",
            "e.g. launch.rdzv_endpoint=node0:29400 on every node",
        )


def check_ddp(trainer: DictConfig) -> None:
    """trainer.strategy=ddp: DDP's options in range, and no FSDP option set (nothing would read it)."""
    cap = trainer.ddp.bucket_cap_mb
    require(
        cap is None or cap > 0,
        "trainer.ddp.bucket_cap_mb",
        cap,
        "must be positive",
        "null (DDP's 25) or MiB > 0",
        "e.g. trainer.ddp.bucket_cap_mb=25",
    )
    require(
        not (trainer.ddp.static_graph and trainer.accumulate > 1),
        "trainer.ddp.static_graph",
        True,
        f"cannot be combined with trainer.accumulate={trainer.accumulate}: DDP's no_sync (local accumulation) "
        "fails an internal assertion under a static graph",
        "false with trainer.accumulate > 1",
        "drop trainer.ddp.static_graph=true, or use trainer.accumulate=1",
    )
    for key, default in FSDPConfig().__dict__.items():
        value = trainer.fsdp.get(key)
        require(
            value == default,
            f"trainer.fsdp.{key}",
            value,
            "is read only with trainer.strategy=fsdp",
            f"{_word(default)} with trainer.strategy={trainer.strategy}",
            f"add trainer.strategy=fsdp, or drop trainer.fsdp.{key}",
        )


def check_fsdp(cfg: DictConfig) -> None:
    """Options that FSDP cannot honour, refused before any worker starts."""
    trainer, fsdp = cfg.trainer, cfg.trainer.fsdp
    require(
        str(trainer.precision) != Precision.fp16,
        "trainer.precision",
        "fp16",
        "is not supported with trainer.strategy=fsdp (its gradient scaler needs whole gradients)",
        "32 | bf16, or trainer.fsdp.param_dtype=bf16",
        "use trainer.precision=bf16 or trainer.fsdp.param_dtype=bf16",
    )
    for key in ("param_dtype", "reduce_dtype"):
        value = fsdp.get(key)
        require(
            value is None or str(value) in DTYPE_WORDS,
            f"trainer.fsdp.{key}",
            value,
            "is not a dtype FSDP can compute in",
            "null | " + " | ".join(DTYPE_WORDS),
            f"e.g. trainer.fsdp.{key}=bf16",
        )
    require(
        snapshot_format(cfg) == SnapshotFormat.dcp,
        "snapshot.format",
        cfg.snapshot.format,
        "a sharded model is snapshotted as shards (every rank writes its own)",
        "auto | dcp",
        "use snapshot.format=auto",
    )
    for key, default in DDPConfig().__dict__.items():  # FSDP reduces through its own collectives
        value = trainer.ddp.get(key)
        require(
            value == default,
            f"trainer.ddp.{key}",
            value,
            "is read only with trainer.strategy=ddp",
            f"{_word(default)} with trainer.strategy=fsdp",
            f"drop trainer.ddp.{key}, or use trainer.strategy=ddp",
        )


def check_rpc(cfg: DictConfig) -> None:
    """Options that make no sense when the model is split across processes."""
    launch, trainer = cfg.launch, cfg.trainer
    require(
        launch.num_stages >= 1,
        "launch.num_stages",
        launch.num_stages,
        "must be at least 1",
        "an integer >= 1",
        "e.g. launch.num_stages=2",
    )
    require(
        launch.rpc_timeout > 0,
        "launch.rpc_timeout",
        launch.rpc_timeout,
        "must be positive",
        "seconds > 0",
        "e.g. launch.rpc_timeout=120",
    )
    nproc = parse_nproc(launch.nproc_per_node)
    if launch.topology == Topology.pipeline:
        processes = launch.num_stages + 1
        require(
            nproc == NprocWord.auto or nproc == processes,
            "launch.nproc_per_node",
            launch.nproc_per_node,
            f"a pipeline of {launch.num_stages} stages runs {processes} processes (1 trainer + 1 per stage)",
            f"auto | {processes}",
            "use launch.nproc_per_node=auto or change launch.num_stages",
        )
    else:
        require(
            nproc == NprocWord.auto or (isinstance(nproc, int) and nproc >= 2),
            "launch.nproc_per_node",
            launch.nproc_per_node,
            "a parameter server needs itself and at least one trainer",
            "auto | an integer >= 2",
        )
    require(
        launch.backend in (Backend.auto, Backend.gloo),
        "launch.backend",
        launch.backend,
        "launch=rpc trains on the CPU through TensorPipe",
        "auto | gloo",
        "use launch.backend=auto",
    )
    require(
        trainer.on_nonfinite != OnNonFinite.skip,
        "trainer.on_nonfinite",
        "skip",
        "launch=rpc cannot skip a step (the optimizer steps where the parameters live)",
        "stop | warn",
        "use trainer.on_nonfinite=stop",
    )
    require(
        not cfg.get("scheduler"),
        "scheduler",
        "(set)",
        "learning-rate schedulers are not supported with launch=rpc",
        "scheduler=none",
        "add scheduler=none",
    )
    require(
        trainer.strategy == Strategy.ddp,
        "trainer.strategy",
        trainer.strategy,
        "launch=rpc splits the model over its stages itself",
        "ddp with launch=rpc",
        "drop trainer.strategy, or use launch=standalone",
    )
    require(
        snapshot_format(cfg) == SnapshotFormat.file,
        "snapshot.format",
        cfg.snapshot.format,
        "launch=rpc writes one snapshot file (the lead gathers the stages' state)",
        "auto | file",
        "use snapshot.format=auto",
    )
    for key, value, default in (
        ("accumulate", trainer.accumulate, 1),
        ("precision", str(trainer.precision), "32"),
        ("compile", trainer.compile, False),
        ("clip_grad_norm", trainer.clip_grad_norm, None),
    ):
        require(
            value == default,
            f"trainer.{key}",
            value,
            "is not supported with launch=rpc (the optimizer steps where the parameters live)",
            _word(default),
            f"drop trainer.{key}",
        )
    require(
        trainer.crash_at_step is None or 0 <= trainer.crash_rank,
        "trainer.crash_rank",
        trainer.crash_rank,
        "must name a worker",
        "an integer >= 0",
    )


def check_snapshot(snapshot: DictConfig) -> None:
    require(
        snapshot.keep_best >= 0,
        "snapshot.keep_best",
        snapshot.keep_best,
        "must not be negative",
        "an integer >= 0",
        "e.g. snapshot.keep_best=1",
    )
    require(
        snapshot.keep_last >= 1,
        "snapshot.keep_last",
        snapshot.keep_last,
        "must keep at least one version",
        "an integer >= 1",
        "e.g. snapshot.keep_last=3",
    )
    require(
        snapshot.milestone_every >= 0,
        "snapshot.milestone_every",
        snapshot.milestone_every,
        "must not be negative",
        "an integer >= 0 (0 = no milestones)",
    )
    folder = str(snapshot.dir)
    one_folder = bool(snapshot.dir) and Path(folder).name == folder and folder not in (".", "..")
    one_folder = one_folder or "://" in folder  # a URL: checked by store.py
    require(
        one_folder,
        "snapshot.dir",
        snapshot.dir,
        "must name one folder inside the run directory, or be a URL",
        "a plain folder name, s3://bucket/prefix or file:///abs/path",
        "e.g. snapshot.dir=snapshots",
    )


def check_groups(cfg: DictConfig) -> None:
    """The groups that build objects name what to build."""
    for group in GROUPS_WITH_TARGETS:
        node = cfg.get(group)
        require(
            isinstance(node, DictConfig) and "_target_" in node,
            f"{group}._target_",
            None if node is None else node.get("_target_"),
            f"the {group} group needs a _target_",
            "a dotted path to a class or function",
            f"pick an entry with {group}=<name>",
        )


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
                guess = f" (did you mean {section}.{close[0]}?)" if close != known else ""
                raise UserError(
                    f"{section}.{key}",
                    node.get(key),
                    f"is not a setting of {section}: nothing would read it",
                    f"one of: {', '.join(known)}",
                    f"remove +{section}.{key}{guess}",
                )


def _word(default: object) -> str:
    """A default as the user types it: false, null, 1."""
    return str(default).lower() if default is not None else "null"
