"""Reading a sharded version as untrusted input. DCP's own reader unpickles `.metadata` with plain
`pickle`, its planner loads non-tensor values with `torch.load(weights_only=False)`, and it opens
whatever file names the metadata gives, following links. Here:

- `.metadata` must match its sha256 in the manifest entry at the moment it is read, and is then
  unpickled by an unpickler that knows only DCP's metadata dataclasses, dtypes, `torch.Size` and
  the memory-format enum, sets state only on instances of those dataclasses and only their own
  fields, and turns paths and layouts into plain values: it cannot run code nor change anything
  outside the objects it builds;
- every file the metadata names must be one the entry lists, and is opened relative to the
  version's folder (opened once, not through a link), never through a link itself, only if it is
  a regular file of the listed size; its bytes are checked as they are read, each block a read
  touches against its sha256 (runner.snapshot.digests), so a rank verifies what it reads and
  nothing else (a file listed before block digests existed is checked whole when opened);
- non-tensor values (the optimizer's hyperparameters) load weights-only.

A tampered version therefore cannot run code or read outside its folder, as a single-file
snapshot cannot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import pickle
import stat
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from runner.snapshot.digests import BlockVerifiedFile, as_one_block
from runner.snapshot.format import ShardedVersion, SnapshotError
from runner.snapshot.store import CHUNK
from runner.snapshot.versions import StoredFile

_DATACLASSES = {
    getattr(dcp_metadata, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
    )
} | {dcp_filesystem._StorageInfo}
_LAYOUTS = {
    str(layout): layout
    for layout in (
        getattr(torch, n, None)
        for n in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged")
    )
    if isinstance(layout, torch.layout)
}
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _path_as_text(*parts: Any) -> str:
    """A pickled pathlib path, as plain text (the real classes are never handed to the unpickler)."""
    return os.path.join(*(str(p) for p in parts)) if parts else ""


def _layout(name: Any) -> torch.layout:
    if name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")
    return _LAYOUTS[name]


class _MetadataUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be restricted
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and name == "_MEM_FORMAT_ENCODING":
            return dcp_metadata._MEM_FORMAT_ENCODING
        for cls in _DATACLASSES:
            if (module, name) == (cls.__module__, cls.__qualname__):
                return cls
        if (module, name) == ("torch", "Size"):
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        if module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return _path_as_text
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")

    def load_build(self) -> None:
        """State is set only on instances of DCP's dataclasses, and only their own fields."""
        state = self.stack[-1]
        inst = self.stack[-2]
        if type(inst) not in _DATACLASSES:
            raise pickle.UnpicklingError(f"refusing to set state on {type(inst).__name__}")
        if "__setstate__" in type(inst).__dict__:  # DCP's own setter (TensorProperties) takes its own state
            pickle._Unpickler.load_build(self)
            return
        fields = {f.name for f in dataclasses.fields(inst)}
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            if part is not None and not (
                isinstance(part, dict) and all(isinstance(k, str) and k in fields for k in part)
            ):
                raise pickle.UnpicklingError(
                    f"refusing state {sorted(part) if isinstance(part, dict) else type(part).__name__} "
                    f"for {type(inst).__name__}"
                )
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


class _ConfinedFileSystem(dcp_filesystem.FileSystem):
    """Opens only the files the version lists, relative to its folder, never through a link."""

    def __init__(self, version: ShardedVersion) -> None:
        super().__init__()
        self.version = version
        self.folder_fd = None
        if version.source is not None:  # in an object store: ranged reads of the listed objects
            return
        try:
            self.folder_fd = os.open(
                version.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
            )
        except OSError as err:
            raise SnapshotError(f"{version.folder} cannot be opened as a folder ({err.strerror or err})") from None

    def close(self) -> None:
        if self.folder_fd is not None:
            os.close(self.folder_fd)
            self.folder_fd = None

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[io.IOBase]:
        path = Path(path)
        name = path.name
        if mode != "rb" or path.parent != self.version.folder or name not in self.version.files:
            raise SnapshotError(f"{path}: not a file the manifest entry of {self.version.folder.name} lists")
        if self.version.source is not None:
            expected = as_one_block(self.version.files[name])
            with BlockVerifiedFile(self.version.source(expected), expected, str(path)) as verified:
                yield verified
            return
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.folder_fd)
        except OSError as err:
            raise SnapshotError(f"{path} cannot be opened ({err.strerror or err})") from None
        f = os.fdopen(fd, "rb")
        with f:
            st = os.fstat(f.fileno())
            expected = self.version.files[name]
            if not stat.S_ISREG(st.st_mode) or st.st_size != expected.size:
                raise SnapshotError(f"{path} is not the regular file of {expected.size} bytes its manifest entry lists")
            if expected.blocks:  # each block a read touches is checked as it is read
                fd = f.fileno()
                with BlockVerifiedFile(lambda offset, n: os.pread(fd, n, offset), expected, str(path)) as verified:
                    yield verified
                return
            _check_whole(f, expected, path)  # listed before block digests: the file as a whole, first
            yield f


def _check_whole(f: io.BufferedReader, expected: StoredFile, path: Path) -> None:
    digest, seen = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        seen += len(chunk)
    if seen != expected.size or digest.hexdigest() != expected.sha256:
        raise SnapshotError(f"{path} does not match its sha256 (corrupted)")
    f.seek(0)


class VerifiedReader(FileSystemReader):
    """DCP's file reader, confined to the files of one verified version; the metadata is read and
    checked when the reader is made, so a bad one is a SnapshotError before DCP starts."""

    def __init__(self, version: ShardedVersion) -> None:
        super().__init__(str(version.folder))
        self.fs = _ConfinedFileSystem(version)
        self.version = version
        try:
            self.metadata = self._checked_metadata()
        except BaseException:
            self.fs.close()
            raise

    def _checked_metadata(self) -> Metadata:
        path = self.version.folder / ".metadata"
        if ".metadata" not in self.version.files:
            raise SnapshotError(f"{path} is not listed in its manifest entry")
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != self.version.files[".metadata"].sha256:
            raise SnapshotError(f"{path} does not match its sha256 (changed since it was verified)")
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as err:
            raise SnapshotError(f"{path} cannot be read safely ({type(err).__name__}: {err})") from None
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise SnapshotError(f"{path} is not DCP metadata")
        for info in metadata.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not (isinstance(name, str) and name in self.version.files and name.endswith(".distcp")):
                raise SnapshotError(f"{path} names {name!r}, which is not a shard file its manifest entry lists")
        return metadata

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP must not fall back to per-rank metadata files
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def close(self) -> None:
        self.fs.close()


class _WeightsOnlyBytes:
    """Non-tensor values (the optimizer's hyperparameters) unpickled weights-only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    pass


class SafeWholeLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds the saved state dict from the metadata (no model needed), weights-only."""
