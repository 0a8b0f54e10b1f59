"""DCP's file writer, with every file hashed while it is written and fsync'ed by the rank that
wrote it, and the digests carried to the lead by the gather DCP already does.

Each rank's `write_data` returns its WriteResults, which DCP gathers on the coordinator (rank 0)
for `finish(metadata, results)`. This writer appends one extra result per file it wrote, holding
the file's digest (size, sha256, per-block sha256s: runner.snapshot.digests); `finish` takes
them out before DCP builds `.metadata` (which therefore is exactly what DCP writes) and keeps
them, with `.metadata`'s own, in `digests`. The lead commits the version from these without
reading a single shard, so a snapshot's verification costs each rank its own bytes. With an
object store each rank also uploads its own files (`upload`), and the object names travel along.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from runner.snapshot.digests import BLOCK_SIZE, HashingStream
from runner.snapshot.versions import StoredFile

_DIGEST = "\x00runner-digest:"  # the fqn of a digest result: never a state dict key


class _HashingFileSystem(dcp_filesystem.FileSystem):
    """Streams opened for writing hash what goes through them and fsync at close."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.digests: dict[str, StoredFile] = {}
        self._lock = threading.Lock()  # DCP may write files from several threads

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = HashingStream(open(path, "wb"), Path(path).name, self._record, self.block_size)
        try:
            yield stream
        except BaseException:
            stream.raw.close()  # not recorded: a file that failed is never listed
            raise
        stream.close()

    def _record(self, name: str, stored: StoredFile) -> None:
        with self._lock:
            self.digests[name] = stored

    def rename(self, path: Any, new_path: Any) -> None:
        super().rename(path, new_path)
        with self._lock:
            stored = self.digests.pop(Path(path).name, None)
            if stored is not None:
                name = Path(new_path).name
                self.digests[name] = StoredFile(
                    name, stored.size, stored.sha256, None, stored.block_size, stored.blocks
                )


class HashingWriter(FileSystemWriter):
    """A FileSystemWriter whose files are hashed while written; on the coordinator, after `finish`,
    `digests` holds every rank's files and `.metadata`, name -> StoredFile."""

    def __init__(
        self,
        path: str,
        block_size: int = BLOCK_SIZE,
        upload: Optional[Callable[[Path, StoredFile], StoredFile]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, sync_files=False, **kwargs)  # each stream fsyncs itself at close
        self.fs = _HashingFileSystem(block_size)
        self.upload = upload  # a store's `shard_uploader`: this rank stores its own files
        self.digests: dict[str, StoredFile] = {}

    def write_data(self, plan, planner) -> Future:
        results = super().write_data(plan, planner).wait()  # DCP's file writer returns it done
        mine = []
        for name, stored in sorted(self.fs.digests.items()):
            if self.upload is not None:
                stored = self.upload(Path(self.path) / name, stored)
            mine.append(
                WriteResult(index=MetadataIndex(_DIGEST + name), size_in_bytes=stored.size, storage_data=stored)
            )
        written: Future = Future()
        written.set_result(results + mine)
        return written

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        digests, plain = {}, []
        for rank_results in results:
            plain.append([r for r in rank_results if not _is_digest(r)])
            digests.update({r.storage_data.name: r.storage_data for r in rank_results if _is_digest(r)})
        super().finish(metadata, plain)
        for name, stored in self.fs.digests.items():  # .metadata (this rank's shards are in `results`)
            digests.setdefault(name, stored)
        self.digests = digests


def _is_digest(result: WriteResult) -> bool:
    return isinstance(result.index.fqn, str) and result.index.fqn.startswith(_DIGEST)


def fsynced_write(path: Path, data: bytes) -> None:
    """Write `data` to a new file and fsync it (the lead's loop.pt)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
