"""Rank 0's snapshot writer: keeps the training loop's wait for a snapshot as short as possible.

A snapshot has a part that must read the live training state and a part that need not:

- synchronous (`snapshot.async=false`): the loop waits while `torch.save` serialises the state
  to a temporary file, about what a plain `torch.save` costs; hashing, fsync, rename and the
  manifest entry then happen in a background thread.
- asynchronous (`snapshot.async=true`): the loop waits only while the state is copied into CPU
  buffers that are allocated once and reused (a `copy_` into warm memory is ~20x cheaper than a
  `clone()` into fresh pages); serialisation happens in the background too.

At most one snapshot is in flight: the next save waits for the previous one. A failed write is
raised at the next save, at the next step (`check()`) or at the end (`wait()`), never swallowed.
The guarantees are those of `SnapshotManager.commit`: a version counts only once its manifest
entry is written, after the file is complete, hashed and fsync'ed.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch

from runner.snapshot.manager import SnapshotManager

log = logging.getLogger(__name__)


class SnapshotWriter:
    def __init__(self, manager: SnapshotManager, config: Optional[dict] = None, asynchronous: bool = False) -> None:
        self.manager, self.config, self.asynchronous = manager, config, asynchronous
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")
        self._inflight: Optional[Future] = None
        self.last_entry: Optional[dict[str, Any]] = None
        self.stall_seconds: list[float] = []  # time the training loop spent inside save()

    def save(self, state: dict[str, Any], step: int, epoch: int, end_of_epoch: bool = False, **marks: Any) -> None:
        """`marks`: what the manifest entry records beside the file (`monitor`, `ended`)."""
        started = time.perf_counter()
        self.wait()
        if self.asynchronous:
            staged = self._stage(state, ())
            job: Callable[[], Any] = lambda: self._commit(self.manager.write(staged, step), step, epoch, end_of_epoch, marks)
        else:
            tmp = self.manager.write(state, step)
            job = lambda: self._commit(tmp, step, epoch, end_of_epoch, marks)
        self._inflight = self._pool.submit(job)
        self.stall_seconds.append(time.perf_counter() - started)

    def _commit(self, tmp, step: int, epoch: int, end_of_epoch: bool, marks: dict[str, Any]) -> None:
        self.last_entry = self.manager.commit(tmp, step, epoch, config=self.config, end_of_epoch=end_of_epoch, **marks)
        log.info("snapshot %s written (epoch %d, step %d, %.1f MB)", self.last_entry["file"], epoch, step,
                 self.last_entry["size"] / 1e6)

    def _stage(self, obj: Any, path: tuple) -> Any:
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
                self._buffers[path] = buf
            buf.copy_(obj.detach())
            return buf
        if isinstance(obj, dict):
            return {k: self._stage(v, path + (k,)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._stage(v, path + (i,)) for i, v in enumerate(obj))
        return obj

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


class NullWriter:
    """Ranks other than 0 write nothing."""

    last_entry = None
    stall_seconds: list = []

    def save(self, *args, **kwargs) -> None:
        pass

    def check(self) -> None:
        pass

    def wait(self) -> None:
        pass
