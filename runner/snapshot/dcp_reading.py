"""Reading a sharded version as untrusted input: DCP's own reader unpickles `.metadata` with plain
`pickle` and its planner loads non-tensor values with `torch.load(weights_only=False)`, and it
opens whatever file names the metadata gives. Here `.metadata` is unpickled with an allow-list of
DCP's own metadata classes, every file it names must be one the manifest entry lists (and the load
has verified), and non-tensor values load weights-only: a tampered version cannot run code or
reach outside its folder, as a single-file snapshot cannot.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from runner.snapshot.format import ShardedVersion, SnapshotError
from runner.snapshot.manifest import SHARD_FILE_PATTERN

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in
    ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
     "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


class VerifiedReader(FileSystemReader):
    """DCP's file reader, confined to the files of one verified version."""

    def __init__(self, version: ShardedVersion) -> None:
        super().__init__(str(version.folder))
        self.version = version

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.version.folder / ".metadata"
        if kwargs.get("rank") is not None or ".metadata" not in self.version.files:
            raise SnapshotError(f"{path}: a sharded snapshot is read through its one listed .metadata")
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
            raise SnapshotError(f"{path} cannot be read safely ({type(err).__name__}: {err})") from None
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise SnapshotError(f"{path} is not DCP metadata")
        for info in metadata.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not (isinstance(name, str) and name in self.version.files and SHARD_FILE_PATTERN.fullmatch(name)
                    and name.endswith(".distcp")):
                raise SnapshotError(f"{path} names {name!r}, which is not a shard file its manifest entry lists")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
