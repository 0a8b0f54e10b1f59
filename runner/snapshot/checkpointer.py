"""The checkpointer: takes a snapshot's stateful parts and decides how they are written and read.

A snapshot is the state of its parts: the engine (model, optimizer, scheduler, scaler, through its
`state_dict` / `sharded_state` and `load_state_dict`) and the loop's own parts (position and each
rank's partial sums, RNG streams, monitor, metrics, config). The training loop hands them over
the same way whatever the format; the strategy picks it:

- `FileCheckpointer` (snapshot.format=file): the lead writes one file (writer.py), the other
  ranks write nothing;
- `ShardedCheckpointer` (snapshot.format=dcp): every rank writes its shards of the model and the
  optimizer through DCP, the lead adds loop.pt and commits (sharded.py); at resume the lead
  picks the newest complete version and every rank verifies the blocks it reads of it, falling
  back together to the previous version when any rank finds one corrupted.

`wait_for_staging` is the line the engine runs right before the optimizer changes the
parameters: an asynchronous snapshot copies the state while forward and backward run, and the
training step waits for that copy there, and only there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch

from runner.snapshot import format as snap
from runner.snapshot.format import SnapshotError
from runner.snapshot.manager import SnapshotManager
from runner.snapshot.versions import Version
from runner.snapshot.writer import BackgroundWrites, NullWriter, SnapshotWriter

log = logging.getLogger(__name__)

Loaded = tuple[Version, dict[str, Any]]


class Checkpointer(ABC):
    """One run's snapshots as the loop sees them: save parts, wait, load the newest or the best."""

    upload_timeout = 90.0  # seconds the end of a run (or a stop) waits for background uploads

    def __init__(self, manager: SnapshotManager, writer: Any, lead: bool, asynchronous: bool) -> None:
        self.manager, self.writer, self.lead, self.asynchronous = manager, writer, lead, asynchronous

    @abstractmethod
    def save(
        self,
        engine: Any,
        loop_parts: Optional[dict[str, Any]],
        step: int,
        epoch: int,
        end_of_epoch: bool,
        tag: str,
        **marks: Any,
    ) -> None:
        """Collective: snapshot the engine's parts and the loop's (`loop_parts`: train_state, rng,
        config, world_size, allreduce, metrics; the lead's only, None elsewhere). `tag`: the lead's
        name for this write, the same on every rank; `marks`: what the manifest records beside it."""

    @abstractmethod
    def load_latest(self, collectives: Any) -> Optional[Loaded]:
        """Collective: (version, state) of the newest valid version, None when there is none;
        SnapshotError when versions exist but none is valid."""

    @abstractmethod
    def load_best(self, collectives: Any) -> Optional[Loaded]:
        """Collective: (version, state) of the version the manifest names best, if any."""

    # ---- the background writes -----------------------------------------------------------------
    @property
    def last_entry(self) -> Optional[Version]:
        return self.writer.last_entry

    @property
    def stall_seconds(self) -> list[float]:
        """Time the training loop spent waiting for snapshots (saving, and for staged copies)."""
        return self.writer.stall_seconds

    def wait_for_staging(self) -> None:
        """Block until the snapshot in flight holds its own copy of the state; after this the live
        tensors may change. Cheap when there is nothing to wait for."""
        self.writer.wait_staged()

    def check(self) -> None:
        """Raise the failure of a background write, if one has failed (cheap: called every step)."""
        self.writer.check()

    def wait(self, since: Optional[float] = None) -> None:
        """Block until the snapshot in flight (if any) is committed, then surface its failure; with
        background uploads, also until they are done (at most `upload_timeout`, counted from
        `since` (time.monotonic: a stop signal) when given). Called at the end of a run and on a
        stop only."""
        self.writer.wait()
        if self.lead:
            spent = 0.0 if since is None else time.monotonic() - since
            self.manager.finish_uploads(max(self.upload_timeout - spent, 0.0))

    def close(self) -> None:
        for part in (self.writer, self.manager):
            close = getattr(part, "close", None)
            if close is not None:
                close()


class FileCheckpointer(Checkpointer):
    """One file per version, written by the lead."""

    def __init__(self, manager: SnapshotManager, lead: bool, config: Optional[dict], asynchronous: bool) -> None:
        writer: BackgroundWrites | NullWriter = SnapshotWriter(manager, config, asynchronous) if lead else NullWriter()
        super().__init__(manager, writer, lead, asynchronous)

    def save(self, engine, loop_parts, step, epoch, end_of_epoch, tag, **marks) -> None:
        if not self.lead:
            return
        state = snap.make_state(**engine.state_dict(copy_unstepped=self.asynchronous), **loop_parts)
        self.writer.save(state, step=step, epoch=epoch, end_of_epoch=end_of_epoch, **marks)

    def load_latest(self, collectives) -> Optional[Loaded]:
        return self.manager.load_latest()

    def load_best(self, collectives) -> Optional[Loaded]:
        best = self.manager.best_entry()
        return None if best is None else (best, self.manager.load_entry(best))


class ShardedCheckpointer(Checkpointer):
    """DCP shards from every rank plus the lead's loop.pt, one folder per version."""

    def __init__(
        self,
        manager: SnapshotManager,
        lead: bool,
        config: Optional[dict],
        asynchronous: bool,
        device: Optional[torch.device],
        timeout_s: float,
    ) -> None:
        from runner.snapshot.sharded import ShardedSnapshotWriter

        writer = ShardedSnapshotWriter(manager, lead, config, asynchronous, device, timeout_s=timeout_s)
        super().__init__(manager, writer, lead, asynchronous)
        self.engine: Any = None  # what a resume reads the shards into (`build_checkpointer`'s engine)

    def save(self, engine, loop_parts, step, epoch, end_of_epoch, tag, **marks) -> None:
        parts = engine.sharded_state(copy_unstepped=self.asynchronous)
        shards = {"model": parts.pop("model"), "optimizer": parts.pop("optimizer")}
        state = snap.make_state(**parts, model=None, optimizer=None, **loop_parts) if self.lead else None
        self.writer.save(state, step=step, epoch=epoch, end_of_epoch=end_of_epoch, shards=shards, tag=tag, **marks)

    def load_latest(self, collectives) -> Optional[Loaded]:
        """The walk to the newest version every rank can read: the lead picks the newest whose files
        are all there with their sizes and whose loop.pt verifies, every rank reads its part of the
        shards into the engine, verifying each block it reads (dcp_reading.py), and a version any
        rank found corrupted is skipped by all (DCP gathers every rank's failure) for the previous
        one. No process reads the shards it does not load."""
        if self.engine is None:  # no engine to read into: the lead verifies every file
            return self._lead_verifies(collectives, self.manager.load_latest)
        skip: dict[str, str] = {}
        while True:
            entry = self._choose(collectives, skip)
            if entry is None:
                return None
            version = Version.from_entry(entry)
            state = self.manager.load_entry(version, verified=version.sharded)
            sharded_version = state.get(snap.SHARDED_KEY)
            if sharded_version is None:
                return version, state
            try:
                self._read_shards(sharded_version)
            except SnapshotError as err:
                if self.lead:  # every rank has the same error: DCP gathers them
                    log.warning("skipping snapshot %s: %s", version.file, err)
                skip[version.file] = str(err)
                continue
            state[snap.SHARDED_KEY] = dataclasses.replace(sharded_version, preloaded=True)
            return version, state

    def _choose(self, collectives, skip: dict[str, str]) -> Optional[dict[str, Any]]:
        """The lead's candidate (its manifest entry), on every rank; SnapshotError on every rank when
        versions are listed but none is valid."""

        def newest() -> Optional[dict[str, Any]]:
            version, _, problems = self.manager.newest(
                lambda v: self.manager.load_entry(v, whole=False), warn=True, skip=skip
            )
            if version is not None:
                return version.as_dict()
            if problems:
                raise SnapshotError(
                    "no snapshot in %s is valid: %s" % (self.manager.store.where(), "; ".join(problems))
                )
            return None

        if collectives is None or collectives.world_size == 1:
            return newest()
        return lead_decides(collectives, newest)

    def _read_shards(self, version: snap.ShardedVersion) -> None:
        """Collective: every rank reads its part of the model and optimizer (SnapshotError on every
        rank when any rank's blocks do not verify)."""
        from runner.snapshot import sharded

        sharded.load(self.engine.model, self.engine.optimizer, version)

    def load_best(self, collectives) -> Optional[Loaded]:
        def best() -> Optional[Loaded]:  # shards are verified by the ranks that read them, as at a resume
            version = self.manager.best_entry()
            return None if version is None else (version, self.manager.load_entry(version, whole=False))

        return self._lead_verifies(collectives, best)

    def _lead_verifies(self, collectives, load: Callable[[], Optional[Loaded]]) -> Optional[Loaded]:
        if collectives is None or collectives.world_size == 1:
            return load()
        found: dict[str, Loaded] = {}

        def chosen() -> Optional[dict[str, Any]]:
            loaded = load()
            if loaded is not None:
                found["loaded"] = loaded
            return None if loaded is None else loaded[0].as_dict()

        entry = lead_decides(collectives, chosen)
        if entry is None or "loaded" in found:
            return found.get("loaded")
        version = Version.from_entry(entry)
        return version, self.manager.load_entry(version, verified=version.sharded)


def lead_decides(collectives, decide: Callable[[], Any]) -> Any:
    """`decide()` on the lead alone; its (small, picklable) result on every rank. Its failure is
    every rank's too, so no rank is left waiting in a collective the others never reach."""
    result, failure = None, None
    if collectives.rank == 0:
        try:
            result = decide()
        except Exception as err:
            failure = err
    shared = collectives.gather((result, None if failure is None else f"{type(failure).__name__}: {failure}"))[0]
    if failure is not None:
        raise failure
    if shared[1] is not None:
        raise SnapshotError(f"rank 0 could not choose a snapshot: {shared[1]}")
    return shared[0]


def build_checkpointer(
    cfg: Any, manager: SnapshotManager, lead: bool, config: dict, device: torch.device, engine: Any = None
):
    """The checkpointer `snapshot.format` asks for (`engine`: what a sharded resume reads into)."""
    from runner.config import SnapshotFormat, snapshot_format

    asynchronous = bool(cfg.snapshot["async"])
    timeout_s = float(cfg.launch.collective_timeout)
    if snapshot_format(cfg) == SnapshotFormat.dcp:  # every rank writes its shards
        checkpointer = ShardedCheckpointer(manager, lead, config if lead else None, asynchronous, device, timeout_s)
        checkpointer.engine = engine
    else:
        checkpointer = FileCheckpointer(manager, lead, config, asynchronous)
    # the rest of launch.stop_timeout is for closing and exiting; the other ranks wait for the lead
    # in their next collective meanwhile
    checkpointer.upload_timeout = min(2 / 3 * float(cfg.launch.stop_timeout), 0.5 * float(timeout_s))
    return checkpointer
