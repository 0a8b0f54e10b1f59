"""Rank 0's snapshot writer: keeps the training loop's wait for a snapshot as short as possible.

A snapshot has a part that must read the live training state and a part that need not:

- synchronous (`snapshot.async=false`): the loop waits while `torch.save` serialises the state
  to a temporary file, about what a plain `torch.save` costs; hashing, fsync, rename and the
  manifest entry then happen in a background thread.
- asynchronous (`snapshot.async=true`): the loop hardly waits. `save` only lays out the copy
  (CPU buffers allocated once and reused: a `copy_` into warm memory is ~20x cheaper than a
  `clone()` into fresh pages); the tensors are copied on the writer's thread while the loop runs
  the next step's forward and backward (a copy releases the GIL), and the loop waits for that copy
  only before the optimizer next changes the parameters (`wait_staged`, which the checkpointer's
  `wait_for_staging` calls from the training step). Tensors that change in
  the forward pass (BatchNorm statistics) must be handed over as copies already (the engine does).
  Serialisation, hashing, fsync and the manifest follow on the same thread.

At most one snapshot is in flight: the next save waits for the previous one. A failed write is
raised at the next save, at the next step (`check()`) or at the end (`wait()`), never swallowed.
The guarantees are those of `SnapshotManager.commit` and its store: a version counts only once
the manifest that lists it is published, after the file is complete, hashed and durable.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch

from runner.snapshot.manager import SnapshotManager

log = logging.getLogger(__name__)


class BackgroundWrites:
    """At most one snapshot in flight on a thread of its own, and its failure surfaced, never lost."""

    def __init__(self, manager: SnapshotManager, config: Optional[dict], asynchronous: bool) -> None:
        self.manager, self.config, self.asynchronous = manager, config, asynchronous
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")
        self._inflight: Optional[Future] = None
        self.last_entry: Optional[dict[str, Any]] = None
        self.stall_seconds: list[float] = []  # time the training loop spent inside save() and wait_staged()

    def check(self) -> None:
        """Raise the failure of a background write, if one has failed (cheap: called every step)."""
        if self._inflight is not None and self._inflight.done():
            self.wait()

    def wait(self) -> None:
        """Block until the snapshot in flight (if any) is committed, then surface its failure."""
        if self._inflight is None:
            return
        inflight, self._inflight = self._inflight, None
        err = inflight.exception()
        if isinstance(err, OSError) and err.errno is not None:  # ENOSPC, EACCES...: reported as such, with the path
            raise OSError(err.errno, f"{err.strerror} (writing a snapshot)", err.filename) from err
        if err is not None:
            raise RuntimeError(f"writing a snapshot failed: {type(err).__name__}: {err}") from err


class SnapshotWriter(BackgroundWrites):
    def __init__(self, manager: SnapshotManager, config: Optional[dict] = None, asynchronous: bool = False) -> None:
        super().__init__(manager, config, asynchronous)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._staged: Optional[threading.Event] = None  # set once the snapshot in flight has copied the state

    def save(self, state: dict[str, Any], step: int, epoch: int, end_of_epoch: bool = False, **marks: Any) -> None:
        """`marks`: what the manifest entry records beside the file (`monitor`, `ended`). With
        asynchronous writes, the caller must call `wait_staged()` before it changes any tensor of
        `state` (the optimizer step)."""
        started = time.perf_counter()
        self.wait()
        if self.asynchronous:
            staged, copies = self._lay_out(state, ())
            done = self._staged = threading.Event()
            job: Callable[[], Any] = lambda: self._copy_and_write(
                copies, done, staged, step, epoch, end_of_epoch, marks
            )
        else:
            tmp = self.manager.write(state, step)
            job = lambda: self._commit(tmp, step, epoch, end_of_epoch, marks)
        self._inflight = self._pool.submit(job)
        self.stall_seconds.append(time.perf_counter() - started)

    def wait_staged(self) -> None:
        """Block until the snapshot in flight holds its own copy of the state (not until it is on
        disk): after this the live tensors may change. Cheap when there is nothing to wait for."""
        staged, self._staged = self._staged, None
        if staged is None or staged.is_set():
            return
        started = time.perf_counter()
        staged.wait()
        self.stall_seconds[-1] += time.perf_counter() - started

    def _copy_and_write(
        self,
        copies: list,
        staged: threading.Event,
        state: dict[str, Any],
        step: int,
        epoch: int,
        end_of_epoch: bool,
        marks: dict[str, Any],
    ) -> None:
        try:
            for buffer, tensor in copies:
                buffer.copy_(tensor)
        finally:
            staged.set()  # on failure too: the error surfaces through the future, the loop must not hang
        self._commit(self.manager.write(state, step), step, epoch, end_of_epoch, marks)

    def _commit(self, tmp, step: int, epoch: int, end_of_epoch: bool, marks: dict[str, Any]) -> None:
        self.last_entry = self.manager.commit(tmp, step, epoch, config=self.config, end_of_epoch=end_of_epoch, **marks)
        log.info(
            "snapshot %s written (epoch %d, step %d, %.1f MB)",
            self.last_entry["file"],
            epoch,
            step,
            self.last_entry["size"] / 1e6,
        )

    def _lay_out(self, obj: Any, path: tuple, copies: Optional[list] = None) -> tuple[Any, list]:
        """The state's structure with every tensor replaced by its reused CPU buffer, and the
        (buffer, tensor) copies still to make. Containers are rebuilt here, on the loop's thread,
        so that lists and dicts the loop goes on changing (the metrics) are captured as they are."""
        copies = [] if copies is None else copies
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
                self._buffers[path] = buf
            copies.append((buf, obj.detach()))
            return buf, copies
        if isinstance(obj, dict):
            return {k: self._lay_out(v, path + (k,), copies)[0] for k, v in obj.items()}, copies
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._lay_out(v, path + (i,), copies)[0] for i, v in enumerate(obj)), copies
        return obj, copies


class NullWriter:
    """Ranks other than 0 write nothing."""

    last_entry = None
    stall_seconds: list = []
    asynchronous = False

    def save(self, *args, **kwargs) -> None:
        pass

    def wait_staged(self) -> None:
        pass

    def check(self) -> None:
        pass

    def wait(self) -> None:
        pass
