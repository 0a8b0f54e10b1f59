"""Checks of the snapshots a run would start from: its own (resume mistakes, another run's snapshots in
its directory, every snapshot invalid) or another run's (snapshot.resume=<path>, trainer.init_from).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from runner.config import LaunchMode, ResumeWord, Strategy, resume_path
from runner.driver.rundir import identity, identity_diff
from runner.errors import UserError
from runner.snapshot import SnapshotError, SnapshotManager
from runner.snapshot.location import snapshot_manager


def check_init_from(cfg: DictConfig, run_dir: Path) -> None:
    """The two doors into another run's snapshot: trainer.init_from (its weights, for a new run) must name
    weights that fit this model; snapshot.resume=<path> (its whole state: step, optimizer, schedule) must
    leave something to train. Neither applies when the run directory has snapshots of its own."""
    from runner.train import init_from

    resume = str(cfg.snapshot.resume)
    try:
        own = resume != ResumeWord.never and bool(snapshot_manager(cfg, run_dir).entries())
    except SnapshotError:
        return  # check_resume reports the unreadable manifest
    if own:
        return
    source = cfg.trainer.get("init_from")
    if not source:
        init_from.check_resume_target(cfg, resume_path(resume))
        return
    if resume_path(resume) is not None:
        raise UserError(
            "snapshot.resume",
            resume,
            f"restores another run's whole state, and trainer.init_from="
            f"{source} already starts this run from a run's weights",
            "one of them",
            "drop snapshot.resume to fine-tune (fresh optimizer, schedule and step), or drop "
            "trainer.init_from to continue that run's training",
        )
    if cfg.launch.mode == LaunchMode.rpc:
        raise UserError(
            "trainer.init_from",
            source,
            "launch=rpc builds its model inside the RPC stages, which do not load initial weights",
            "trainer.init_from with launch=standalone, local or multinode",
            "drop launch=rpc for the fine-tuning run",
        )
    if cfg.trainer.strategy == Strategy.fsdp and cfg.trainer.fsdp.meta_init:
        raise UserError(
            "trainer.fsdp.meta_init",
            True,
            "builds the model without memory, so trainer.init_from="
            f"{source} has nothing to load its weights into before sharding",
            "trainer.fsdp.meta_init=false with trainer.init_from (each worker builds the model whole in "
            "CPU memory, loads the weights, then shards)",
            "drop trainer.fsdp.meta_init=true",
        )
    init_from.check_source(cfg)


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """snapshot.resume against the run directory: its manifest reads, its snapshots are this run's and
    one of them is valid; `must` finds one; a path names a snapshot."""
    resume = str(cfg.snapshot.resume)
    manager = snapshot_manager(cfg, run_dir)
    if resume == ResumeWord.never:
        return  # the driver archives what is there; nothing to check
    try:
        entries = manager.entries()
        entry, problems = manager.newest_valid_entry()
    except SnapshotError as err:
        raise UserError(
            "snapshot.resume",
            resume,
            f"the run directory's manifest is unreadable: {err}",
            "a readable manifest.json",
            "snapshot.resume=never starts over (old files are archived, not deleted)",
        ) from None
    if entries:
        check_same_run(cfg, run_dir, manager, resume)
    if entry is None and problems:  # versions are listed but none can be used: never a silent fresh start
        raise UserError(
            "snapshot.resume",
            resume,
            "every snapshot in the run directory is invalid: " + "; ".join(problems),
            "at least one snapshot that matches its manifest",
            "restore the files, or snapshot.resume=never to start over (the invalid files are archived, not deleted)",
        )
    if entries or problems:
        return
    if resume == ResumeWord.must:
        raise UserError(
            "snapshot.resume",
            "must",
            f"no snapshot in {manager.store.where()} to resume from",
            f"{ResumeWord.words()} | a snapshot file path",
            "use snapshot.resume=auto to start fresh when there is none",
        )
    check_resume_path(resume)


def check_same_run(cfg: DictConfig, run_dir: Path, manager: SnapshotManager, resume: str) -> None:
    """The snapshots in the run directory were written by a run with this run's identity."""
    old = (manager.stored_config() or {}).get("identity")
    if old is None:
        return
    new = identity(cfg)
    diff = identity_diff(old, new)
    if not diff:
        return
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
    more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
    raise UserError(
        "snapshot.resume",
        resume,
        f"{run_dir} holds snapshots of a different run; differing keys: {shown}{more}",
        "resuming only a run with the same model, dataset, optimizer, scheduler, loss, seed and batch size",
        "snapshot.resume=never starts over here (old snapshots are archived), or pass name=<new name> "
        "for a new run directory",
    )


def check_resume_path(resume: str) -> None:
    """snapshot.resume=<path>: a snapshot file, or a sharded snapshot's folder listed by its manifest."""
    path = resume_path(resume)
    if path is None:
        return
    if not (path.is_file() or path.is_dir()):
        raise UserError(
            "snapshot.resume",
            resume,
            "no such snapshot file or sharded snapshot folder",
            f"{ResumeWord.words()} | path to an existing snapshot-*.pt or step-* folder",
            "check the path (relative paths start from the current directory)",
        )
    if path.is_dir():
        beside = SnapshotManager(path.parent)
        try:
            listed = any(e["file"] == path.name and e.get("kind") == "dcp" for e in beside.entries())
        except SnapshotError:
            listed = False
        if not listed:
            raise UserError(
                "snapshot.resume",
                resume,
                f"is a folder that {beside.manifest_path} does not list as a "
                "sharded snapshot (its files are verified through that entry)",
                "a step-* folder inside the snapshots/ folder of the run that wrote it",
                "pass the step-* folder where the run left it, next to its manifest.json",
            )
