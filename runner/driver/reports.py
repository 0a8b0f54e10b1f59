"""What the driver tells the user when a job ends: the summary, and how it failed, stopped or
diverged, in a few lines naming what is on disk (never the agent's traceback). Also the first
lines' account of how the run's numbers are made (training_setup) and a search's objective."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from runner.config import LaunchMode, Strategy
from runner.driver.observed import observed_lines
from runner.errors import EXIT_TRAINING_FAILED, full_errors_requested
from runner.layout import stop_marker
from runner.system import peak_rss_mb


def training_setup(cfg: DictConfig, runtime) -> str:
    """Strategy, precision, accumulation and the global batch: what decides the numbers a run produces."""
    from runner.config import parse_nnodes

    trainer = cfg.trainer
    precision = {"32": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler"}.get(
        str(trainer.precision), str(trainer.precision)
    )
    if cfg.launch.mode == LaunchMode.rpc:
        return f"{cfg.launch.topology} over RPC, precision {precision}"
    nodes = (parse_nnodes(cfg.launch.nnodes) or (1, 1))[0] if cfg.launch.mode == LaunchMode.multinode else 1
    workers = int(runtime.nproc_per_node) * nodes
    accumulate = int(trainer.accumulate)
    most = (parse_nnodes(cfg.launch.nnodes) or (1, 1))[1] if cfg.launch.mode == LaunchMode.multinode else 1
    single = workers == 1 and most == 1 and trainer.strategy == Strategy.ddp
    strategy = "one process (no DDP)" if single else f"strategy {trainer.strategy}"
    parts = [f"{trainer.batch_size} per worker", f"{workers} worker{'s' if workers > 1 else ''}"]
    if accumulate > 1:
        parts.append(f"{accumulate} micro-batches")
    text = (
        f"{strategy}, precision {precision}, global batch {int(trainer.batch_size) * workers * accumulate} "
        f"({' x '.join(parts)})"
    )
    if most > nodes:  # launch.nnodes=MIN:MAX: the batch follows the nodes that take part
        text += f" on {nodes} node{'s' if nodes > 1 else ''}, up to {most} (launch.nnodes={cfg.launch.nnodes})"
    return text


def short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def objective(summary: dict) -> Optional[float]:
    """What a search optimises: the best value of snapshot.monitor, else the final training loss."""
    value = summary.get("best") if summary.get("best") is not None else summary.get("final_loss")
    return float(value) if isinstance(value, (int, float)) else None


def _worker_memory(summary: dict) -> str:
    """Every rank's peak (what decides whether a model fits: FSDP spreads it over the workers)."""
    ranks = summary.get("peak_rss_mb_per_rank") or [summary.get("peak_rss_mb", 0)]
    if len(ranks) == 1:
        return f"rank 0 {ranks[0]:.0f} MB"
    shown = ", ".join(f"{mb:.0f}" for mb in ranks[:8]) + (", ..." if len(ranks) > 8 else "")
    return f"ranks {shown} MB"


def print_summary(run_dir: Path, summary: dict, wall: float, cfg: DictConfig) -> None:
    if not summary:
        print(f"done: this node's workers finished; rank 0's node reports the summary ({short(run_dir)})")
        return
    loss = summary.get("final_loss")
    sps = summary.get("samples_per_s")
    resumed = summary.get("resumed_from")
    snapshot = summary.get("snapshot")
    lines = [
        f"run directory : {short(run_dir)}",
        f"epochs        : {summary.get('epochs')} ({summary.get('steps')} steps, {summary.get('world_size')} "
        + ("worker)" if summary.get("world_size") == 1 else "workers)")
        + (f", resumed from {resumed['file']} at epoch {resumed['epoch']} step {resumed['step']}" if resumed else ""),
        f"final loss    : {loss:.6g}" if loss is not None else "final loss    : n/a",
        (f"throughput    : {sps:,.0f} samples/s" if sps else "throughput    : n/a")
        + (" (gradients through shared memory)" if summary.get("allreduce") == "shm" else ""),
        f"wall time     : {wall:.1f} s",
        f"peak memory   : driver {peak_rss_mb():.0f} MB, " + _worker_memory(summary),
        f"snapshot      : {_where(cfg, run_dir, snapshot)}" if snapshot else "snapshot      : none written",
    ]
    stalls = summary.get("snapshot_stall_seconds") or []
    if snapshot and stalls:
        lines[-1] += (
            f" (training waited {sum(stalls):.2f} s for {len(stalls)} snapshot{'s' if len(stalls) > 1 else ''})"
        )
    unit = next((k for k in summary if k.endswith("_per_s") and k != "samples_per_s" and summary[k]), None)
    if unit:
        lines[3] += f", {summary[unit]:,.0f} {unit[:-6]}/s"
    extra = []
    if summary.get("val"):
        extra.append("validation    : " + _metrics_line(summary["val"]) + f" (step {summary.get('steps')})")
    if summary.get("best") is not None:
        extra.append(f"best          : {summary['monitor']} {summary['best']:.6g} at step {summary['best_step']}")
    if summary.get("test"):
        test = summary["test"]
        extra.append(
            "test          : "
            + _metrics_line({k: v for k, v in test.items() if k.startswith("test/")})
            + f" ({test.get('chosen_by')}, {test.get('snapshot')}; results.json)"
        )
    if summary.get("ended"):
        extra.append(f"ended early   : {summary['ended']}")
    lines[3:3] = extra
    if summary.get("skipped_steps"):
        lines.insert(
            3, f"skipped steps : {summary['skipped_steps']} (non-finite loss or gradients, trainer.on_nonfinite=skip)"
        )
    lines += observed_lines(summary, short(run_dir))
    print("\n".join(lines))


def _metrics_line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def _where(cfg: DictConfig, run_dir: Path, snapshot: str) -> str:
    from runner.snapshot.location import is_url

    folder = str(cfg.snapshot.dir)
    return f"{folder.rstrip('/')}/{snapshot}" if is_url(folder) else short(run_dir / folder / snapshot)


def _newest_snapshot(cfg: DictConfig, run_dir: Path) -> Optional[dict]:
    from runner.snapshot import SnapshotError
    from runner.snapshot.location import snapshot_manager

    try:
        return snapshot_manager(cfg, run_dir).newest_valid_entry()[0]
    except SnapshotError:
        return None


def resume_point(cfg: Optional[DictConfig], run_dir: Path) -> str:
    entry = _newest_snapshot(cfg, run_dir) if cfg is not None else None
    if entry is None:
        return "there is no snapshot yet: it starts from scratch"
    return f"it resumes from {entry['file']} (epoch {entry['epoch']}, step {entry['step']})"


def report_stopped(run_dir: Path, signum, cfg: Optional[DictConfig] = None, aborted: bool = False) -> int:
    """Say what is on disk: the stop's own snapshot only when the workers wrote it."""
    import json

    try:
        written = json.loads(stop_marker(run_dir).read_text())
    except (OSError, ValueError):
        written = None
    signum = (written or {}).get("signal") or signum  # the signal that stopped the job, maybe on another node
    name = signal.Signals(signum).name if signum else "a signal"
    if written and written.get("file"):
        print(
            f"Stopped by {name}: a snapshot of the last step ({written['file']}, step {written['step']}) is in "
            f"{short(run_dir)}; run the same command again to resume.",
            file=sys.stderr,
        )
    elif written:
        print(
            f"Stopped by {name} at step {written['step']} without a snapshot of it (its weights are not finite); "
            f"run the same command again: {resume_point(cfg, run_dir)}.",
            file=sys.stderr,
        )
    elif aborted:
        print(
            f"Aborted by a second {name}: no snapshot of the last step was written; run the same command again: "
            f"{resume_point(cfg, run_dir)}.",
            file=sys.stderr,
        )
    else:
        timeout = f" within launch.stop_timeout={cfg.launch.stop_timeout} s" if cfg is not None else ""
        print(
            f"Stopped by {name}: the workers did not write a snapshot after the signal (they did not reach a step "
            f"boundary{timeout}); run the same command again: {resume_point(cfg, run_dir)}.",
            file=sys.stderr,
        )
    return 128 + (signum or 15)


def report_diverged(summary: dict, cfg: DictConfig, run_dir: Path) -> int:
    last = summary.get("last_snapshot")
    kept = (
        f"the last finite snapshot is {last}"
        if last
        else f"no snapshot of this attempt was written; {resume_point(cfg, run_dir)}"
    )
    print(
        f"Error: training diverged: {summary.get('what')} is not finite at step {summary.get('step')} "
        f"(trainer.on_nonfinite=stop); {kept}.\n"
        f"  fix: lower optimizer.lr (now {cfg.optimizer.get('lr', '?')}), or pass trainer.on_nonfinite=skip to skip "
        f"such steps; snapshot.resume=never starts over",
        file=sys.stderr,
    )
    return EXIT_TRAINING_FAILED


def report_failure(err: BaseException, cfg: DictConfig, run_dir: Path) -> int:
    """Training failed: the failing rank, its exception and the tail of its log, not agent noise."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from runner.layout import TRAIN_LOG, rank_log_path
    from runner.logs import tail
    from runner.train.stop import Stopped

    if isinstance(err, Stopped):  # launch=local: the driver itself was the worker
        return report_stopped(run_dir, err.signum, cfg)
    if isinstance(err, SignalException):
        return report_stopped(run_dir, int(err.sigval), cfg)
    stop = getattr(err, "stop_request", None)  # the workers stopped on request; the signal may have gone elsewhere
    if stop is not None and stop.get("signal") is None and not stop_marker(run_dir).exists():
        print(
            f"Stopped at step {stop.get('step')}: another node was asked to stop, and rank 0 writes the snapshot on "
            f"its node; run the same command again on every node to resume.",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    if isinstance(err, KeyboardInterrupt) and cfg.launch.mode != LaunchMode.local:  # before the agent took signals
        print(
            f"Stopped by SIGINT while the workers were starting; run the same command again: "
            f"{resume_point(cfg, run_dir)}.",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    if isinstance(err, KeyboardInterrupt):  # launch=local: a second signal while the first was being handled
        return report_stopped(run_dir, signal.SIGINT, cfg, aborted=True)
    if cfg.launch.mode == LaunchMode.multinode and _rendezvous_lost(err) and not full_errors_requested():
        print(
            f"Error: the rendezvous at {cfg.launch.rdzv_endpoint} is gone: the node that hosted it (node 0) left "
            f"(its machine or process died, or it ended), and the other nodes cannot go on without it. Run the same "
            f"command again on every node (a requeue, a restarted job): {resume_point(cfg, run_dir)}.",
            file=sys.stderr,
        )
        return EXIT_TRAINING_FAILED
    if full_errors_requested():
        import traceback

        traceback.print_exception(err)
    rank = 0
    if isinstance(err, ChildFailedError):
        rank, failure = _root_failure(err)
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", str(message))
        text = str(message).strip().splitlines()
        what = text[0] if text else f"exit code {failure.exitcode}"
        if failure.exitcode < 0 and "Signal" not in what:
            what = f"killed by signal {-failure.exitcode}"
        if _secondary(what):  # the agent saw only a rank that lost its peer: the peer's own record says why
            rank, what = _own_cause(err) or (rank, what)
    elif isinstance(err, OSError) and err.strerror:
        what = f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    else:
        what = f"{type(err).__name__}: {err}"
    if getattr(err, "hang", None):  # the watchdog ended the last attempt (its table is above)
        what = err.hang
    full = _disk_full(run_dir)
    if full and "No space left on device" not in what:
        what = f"No space left on device: {full} (then: {what})"
    restarts = getattr(err, "restarts_done", 0)  # set by runner.launch.elastic: the restarts that ran
    if getattr(err, "repeated_failure", None):
        after = f" (not restarting: the same error after restart {restarts})"
    else:
        after = f" (after {restarts} restart{'s' if restarts > 1 else ''})" if restarts else ""
    log_path = rank_log_path(run_dir, rank)
    lines = [f"Error: training failed on rank {rank}{after}: {what}"]
    last = [line for line in tail(log_path, 60) if line.strip()][-8:]
    if last:
        lines.append(f"  last lines of {short(log_path)}:")
        lines += [f"    {line[:300]}" for line in last]
    lines.append(f"  full logs: {short(log_path)} (all ranks: {short(run_dir / TRAIN_LOG)})")
    print("\n".join(lines), file=sys.stderr)
    return EXIT_TRAINING_FAILED


# What a rank says when a peer failed first: a consequence, not the cause to report.
SECONDARY = ("exited while this rank waited", "Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _root_failure(err: Any) -> tuple[int, Any]:
    """(rank, failure) to report: the first failure by time, unless it only says that a peer went
    away first (a rank waiting in an all-reduce sees its peer's exit, sometimes before the agent has
    recorded the peer's own error): then the first failure that names its own cause."""
    first = err.get_first_failure()
    failures = sorted(err.failures.items(), key=lambda item: item[1].timestamp)

    def secondary(failure: Any) -> bool:
        message = failure.message
        return _secondary(str(message.get("message", message) if isinstance(message, dict) else message))

    return next(((rank, f) for rank, f in failures if not secondary(f)), first) if secondary(first[1]) else first


def _secondary(text: str) -> bool:
    return any(words in text for words in SECONDARY)


def _own_cause(err: Any) -> Optional[tuple[int, str]]:
    """(rank, error) of the first worker whose own failure record names a cause of its own. A rank
    that failed first is sometimes not among the agent's failures yet when it stops the group
    (its exit reaches the agent after the exit of the rank that waited for it)."""
    for record in getattr(err, "recorded_failures", None) or []:
        text, rank = record.get("text"), record.get("rank")
        if isinstance(text, str) and isinstance(rank, int) and not _secondary(text):
            return rank, text
    return None


def _rendezvous_lost(err: BaseException) -> bool:
    """The agent lost its rendezvous store (its host is gone), seen anywhere in the error's chain."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError

    while err is not None:
        if isinstance(err, (RendezvousConnectionError, DistNetworkError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _disk_full(run_dir: Path) -> Optional[str]:
    """The run directory's filesystem when it has (almost) no room left: the likeliest cause of a
    failure whose own report could not be written (torch's error file is empty on a full disk)."""
    try:
        return (
            f"the filesystem of {short(run_dir)} has {shutil.disk_usage(run_dir).free >> 10} KiB free"
            if shutil.disk_usage(run_dir).free < (1 << 20)
            else None
        )
    except OSError:
        return None
