"""Sharded snapshots (snapshot.format=dcp): every rank writes its own part through
torch.distributed.checkpoint (DCP), and DCP reshards at load time, so a run snapshotted by N
workers resumes on M.

One version is a folder, `step-<N>/`, written as a hidden temporary folder first:

    __<rank>_0.distcp   each rank's shards of the model and the optimizer (DCP writes replicated
                        tensors, as with DDP, once: the ranks share the writing)
    .metadata           DCP's index of the shards, written last by rank 0 once every rank is done
    loop.pt             the loop's state (position, every rank's RNG, metrics, scheduler, config),
                        written by rank 0 alone, a weights-only pickle like a single-file snapshot

Every rank hashes its files while it writes them and fsyncs them (dcp_writing.py); the digests
(size, sha256, one sha256 per 64 MB block) reach rank 0 in the gather DCP does before writing
.metadata. Once all files are on disk, rank 0 renames the folder into place and lists it in the
manifest, each file with its digests (`SnapshotManager.commit_folder`, through the store), without
reading any shard; until then the version does not exist. At a resume every rank verifies the
blocks it reads (dcp_reading.py), so one torn or corrupted shard of any rank makes the whole
version invalid and the previous one is used (the checkpointer's walk), and no process reads
every rank's bytes.

Asynchronous (`snapshot.async=true`): DCP's `async_save` stages the tensors into CPU buffers
that are allocated once and reused (pinned on CUDA), on a staging thread, while the loop runs the
next step's forward and backward; the loop waits for the staging only before the optimizer next
changes the parameters (`wait_staged`, through the checkpointer's `wait_for_staging`). The writes, the collectives DCP needs (on a process group
of its own, so they never interleave with training's) and the commit follow in the background.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import time
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from runner.snapshot.dcp_writing import HashingWriter, fsynced_write
from runner.snapshot.digests import BLOCK_SIZE, digest_of_bytes
from runner.snapshot.format import ShardedVersion, SnapshotError
from runner.snapshot.manager import LOOP_FILE, SnapshotManager, folder_name
from runner.snapshot.writer import BackgroundWrites

log = logging.getLogger(__name__)


# ---- state dicts keyed by parameter names, as DCP saves and reshards them ------------------------
def get_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts keyed by fully qualified parameter names: DTensor shards for an
    FSDP model, plain tensors otherwise; the same names whatever the number of ranks."""
    from torch.distributed.checkpoint.state_dict import get_state_dict as dcp_get_state_dict

    return dcp_get_state_dict(model, optimizer)


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, version: ShardedVersion) -> None:
    """Collective: every rank reads its part of the model and optimizer from a verified version."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from runner.snapshot.dcp_reading import SafeLoadPlanner

    if version.preloaded:  # read already, in the checkpointer's walk to the newest loadable version
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with reading(version) as reader:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_model(model: torch.nn.Module, version: ShardedVersion) -> None:
    """Collective: the model's weights alone (the best version, before testing)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from runner.snapshot.dcp_reading import SafeLoadPlanner

    state = {"model": get_model_state_dict(model)}
    with reading(version) as reader:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    set_model_state_dict(model, state["model"])


def full_model(version: ShardedVersion) -> dict[str, torch.Tensor]:
    """The whole model's state dict from a verified version, in this process alone (no collective
    even where a process group exists, no model needed): what an export reads."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # what _load_state_dict_from_keys runs

    from runner.snapshot.dcp_reading import SafeWholeLoadPlanner

    state: dict[str, Any] = {}
    with reading(version) as reader:
        _load_state_dict(state, storage_reader=reader, planner=SafeWholeLoadPlanner(keys={"model"}), no_dist=True)
    return dict(state["model"])


def _causes(err: BaseException) -> list[BaseException]:
    """The per-rank errors a CheckpointException holds ({rank: (error, traceback)} in torch 2.13)."""
    failures = getattr(err, "failures", {}) or {}
    return [f[0] if isinstance(f, tuple) else f for f in failures.values() if isinstance(f, (tuple, BaseException))]


def _first_cause(err: BaseException, prefer: tuple) -> BaseException:
    """An interrupt (Ctrl-C, exit) wins over everything, then the kinds in `prefer`, then the first."""
    causes = [c for c in _causes(err) if isinstance(c, BaseException)]
    for wanted in ((lambda c: not isinstance(c, Exception)), (lambda c: isinstance(c, prefer))):
        found = next((c for c in causes if wanted(c)), None)
        if found is not None:
            return found
    return causes[0] if causes else err


@contextlib.contextmanager
def unwrapped_failures() -> Iterator[None]:
    """DCP reports a failed write as a CheckpointException (a BaseException) holding each rank's
    error: raise the error itself (a full disk stays an OSError with its errno and path; a Ctrl-C
    stays a KeyboardInterrupt)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        cause = _first_cause(err, (OSError,))
        if cause is err:
            raise RuntimeError(f"writing a sharded snapshot failed: {str(err).splitlines()[0]}") from None
        raise cause from None


@contextlib.contextmanager
def reading(version: ShardedVersion) -> Iterator[Any]:
    """A reader confined to `version`'s listed, verified files (runner.snapshot.dcp_reading). What
    shows the version cannot be read safely (a tampered .metadata, a pickle that is not weights
    only, a file that changed) is a SnapshotError naming it; any other failure is raised as itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    from runner.snapshot.dcp_reading import VerifiedReader

    reader = VerifiedReader(version)
    unsafe = (SnapshotError, pickle.UnpicklingError)
    try:
        yield reader
    except CheckpointException as err:
        cause = _first_cause(err, unsafe)
        if isinstance(cause, unsafe):
            raise SnapshotError(f"{version.folder} cannot be loaded safely: {_one_line(cause)}") from None
        raise (cause if cause is not err else RuntimeError(_one_line(err))) from None
    except pickle.UnpicklingError as err:
        raise SnapshotError(f"{version.folder} cannot be loaded safely: {_one_line(err)}") from None
    finally:
        reader.close()


def _one_line(err: BaseException) -> str:
    text = str(err).splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# ---- the writer ---------------------------------------------------------------------------------
class ShardedSnapshotWriter(BackgroundWrites):
    """Every rank's writer of sharded versions; the lead (rank 0) also writes loop.pt and commits.
    The same interface as `SnapshotWriter`, but `save` is collective: every rank calls it."""

    sharded = True

    def __init__(
        self,
        manager: SnapshotManager,
        lead: bool,
        config: Optional[dict] = None,
        asynchronous: bool = False,
        device: Optional[torch.device] = None,
        timeout_s: float = 600.0,
    ) -> None:
        super().__init__(manager, config, asynchronous)
        self.lead = lead
        # DCP's own collectives (plans, metadata) on a group of their own: an asynchronous save runs
        # them on a background thread while the training step runs its own on the default group.
        self._group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if dist.is_initialized() else None
        )
        self._cuda = device is not None and device.type == "cuda"
        self._stager = None
        self._staged: Optional[Future] = None
        self.block_size = BLOCK_SIZE  # what one block digest covers
        self.commit_seconds: list[float] = []  # the lead's: from every rank's files on disk to the manifest

    def save(
        self,
        state: Optional[dict[str, Any]],
        step: int,
        epoch: int,
        end_of_epoch: bool = False,
        *,
        shards: dict[str, Any],
        tag: str,
        **marks: Any,
    ) -> None:
        """`shards`: this rank's {"model", "optimizer"} (DCP state dicts); `state`: the lead's loop
        state (None on the other ranks); `tag`: the lead's name for this write, the same on every
        rank (it names the temporary folder)."""
        import torch.distributed.checkpoint as dcp

        started = time.perf_counter()
        self.wait()
        tmp = self.manager.store.staging_folder(folder_name(step), tag)
        loop_bytes = None
        if self.lead:
            self.manager.dir.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save(state, buffer)  # now: the loop goes on changing its lists (metrics)
            loop_bytes = buffer.getvalue()
        # Every rank hashes and fsyncs its own files as it writes them; the lead gets the digests.
        upload = self.manager.store.shard_uploader(folder_name(step))  # an object store: each rank its own files
        writer = HashingWriter(str(tmp), block_size=self.block_size, upload=upload)
        if self.asynchronous:
            response = dcp.async_save(
                shards, storage_writer=writer, process_group=self._group, async_stager=self._stager_for()
            )
            self._staged = response.staging_completion
            upload = response.upload_completion
            self._inflight = self._pool.submit(
                self._finish, upload, writer, tmp, loop_bytes, step, epoch, end_of_epoch, marks
            )
        else:
            with unwrapped_failures():
                dcp.save(shards, storage_writer=writer, process_group=self._group)
            self._inflight = self._pool.submit(
                self._finish, None, writer, tmp, loop_bytes, step, epoch, end_of_epoch, marks
            )
        self.stall_seconds.append(time.perf_counter() - started)

    def _stager_for(self):
        """One stager for the run: its CPU buffers are allocated at the first snapshot and reused."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=self._cuda,
                    use_shared_memory=False,
                    use_async_staging=True,
                    use_non_blocking_copy=self._cuda,
                )
            )
        return self._stager

    def _finish(
        self,
        upload: Optional[Future],
        writer: Any,
        tmp: Path,
        loop_bytes: Optional[bytes],
        step: int,
        epoch: int,
        end_of_epoch: bool,
        marks: dict[str, Any],
    ) -> None:
        if upload is not None:
            with unwrapped_failures():
                upload.result()  # this rank's shards are written; on the lead, every rank's and .metadata too
        if not self.lead:
            return
        fsynced_write(tmp / LOOP_FILE, loop_bytes)
        digests = {**writer.digests, LOOP_FILE: digest_of_bytes(LOOP_FILE, loop_bytes, self.block_size)}
        started = time.perf_counter()
        self.last_entry = self.manager.commit_folder(
            tmp, step, epoch, config=self.config, digests=digests, end_of_epoch=end_of_epoch, **marks
        )
        self.commit_seconds.append(time.perf_counter() - started)
        log.info(
            "snapshot %s written (epoch %d, step %d, %d files, %.1f MB)",
            self.last_entry["file"],
            epoch,
            step,
            len(self.last_entry["files"]),
            self.last_entry["size"] / 1e6,
        )

    def wait_staged(self) -> None:
        """Block until DCP holds its own copy of this rank's shards; then the live tensors may change."""
        staged, self._staged = self._staged, None
        if staged is None or staged.done():
            return
        started = time.perf_counter()
        staged.result()
        self.stall_seconds[-1] += time.perf_counter() - started

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        self._pool.shutdown(wait=True)
