"""The built-in streaming sources (`dataset=text_shards`, `token_shards`, `webdataset`): shard files
found by a glob, read one record at a time, never held whole in memory.
"""

from __future__ import annotations

import glob as globlib
import importlib
import io
import json
import os
import tarfile
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from runner.errors import UserError
from runner.streams.base import ShardedStream

TEXT_SUFFIXES = (".jsonl", ".json", ".ndjson")


def find_files(files: Any, key: str = "dataset.files") -> list[str]:
    """Every file a glob (or a list of globs) matches, sorted; a glob that matches nothing is an error."""
    patterns = [files] if isinstance(files, str) else list(files or [])
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(p for p in globlib.glob(os.path.expanduser(str(pattern)), recursive=True) if os.path.isfile(p))
        if not found:
            raise UserError(
                key,
                pattern,
                "matches no file",
                "a glob of existing shard files, e.g. data/shards/*.txt",
                "check the path (relative paths start in the directory the command runs in)",
            )
        paths += found
    return sorted(set(paths))


def tokenizer_for(name: str) -> Callable[[str], list[int]]:
    """`bytes`: one token per UTF-8 byte (ids 0-255); `ascii`: ASCII codes, others become '?' (0-127);
    or `package.module.function`, a function from a string to a list of ids."""
    if name == "bytes":
        return lambda text: list(text.encode("utf-8"))
    if name == "ascii":
        return lambda text: list(text.encode("ascii", errors="replace"))
    module, _, attr = str(name).rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise UserError(
            "dataset.tokenizer",
            name,
            "is neither a built-in tokenizer nor an importable function",
            "bytes, ascii, or package.module.function (a string to a list of token ids)",
            "e.g. dataset.tokenizer=bytes",
        ) from None


class TextShards(ShardedStream):
    """Text files (a record per line, a document per file) or JSON lines (a record and a document
    per line, the text under `field`), tokenised by `tokenizer`. Samples are windows of seq_len + 1
    tokens: each document cut alone (the tail shorter than a window is dropped), or with `pack`
    every document joined with `eot` after it into windows across document and shard boundaries."""

    def __init__(
        self,
        files: Any,
        seq_len: int = 64,
        field: Optional[str] = None,
        tokenizer: str = "bytes",
        pack: bool = False,
        eot: int = 0,
    ) -> None:
        super().__init__(pack=pack, seq_len=seq_len, eot=eot)
        self.paths = find_files(files)
        self.field, self.tokenizer_name = field, tokenizer
        self.encode = tokenizer_for(tokenizer)
        self.check_first_record()

    def is_json(self, path: str) -> bool:
        return path.endswith(TEXT_SUFFIXES)

    def check_first_record(self) -> None:
        """JSON lines need `field`, and the first record of every JSON shard must hold it."""
        for path in self.paths:
            if not self.is_json(path):
                continue
            with open(path, "rb") as f:
                line = f.readline()
            if not line.strip():
                continue
            record = json.loads(line)
            if not self.field or not isinstance(record, dict) or self.field not in record:
                keys = sorted(record) if isinstance(record, dict) else []
                raise UserError(
                    "dataset.field",
                    self.field,
                    f"is not a key of the first JSON line of {path} (its keys: {', '.join(keys) or 'none'})",
                    "the key that holds each record's text",
                    f"pass dataset.field={keys[0] if keys else '<key>'}",
                )

    def read(self, shard: int, start: int, step: int, offset: int) -> Iterator[tuple[int, Any]]:
        """Records are (text, whether it ends a document): a JSON line is a whole document; a text
        file's lines are not, and one more record ("", True) after its last line ends it."""
        path = self.paths[shard]
        json_lines = self.is_json(path)
        with open(path, "rb") as f:
            index = start if offset else 0  # a known offset points at record `start`
            f.seek(offset)
            while True:
                line = f.readline()
                if not line and json_lines:
                    return
                here = index
                index += 1
                if here >= start and (here - start) % step == 0:
                    if not line:
                        yield 0, ("", True)
                    elif json_lines:
                        yield f.tell(), (self.field_of(line, path, here) if line.strip() else "", True)
                    else:
                        yield f.tell(), (line.decode("utf-8", errors="replace"), False)
                if not line:
                    return

    def field_of(self, line: bytes, path: str, index: int) -> str:
        record = json.loads(line)
        if not isinstance(record, dict) or self.field not in record:
            raise KeyError(f"line {index + 1} of {path} has no key {self.field!r} (dataset.field)")
        return str(record[self.field])

    def samples(self, record: tuple[str, bool]) -> Iterator[torch.Tensor]:
        ids = self.encode(record[0])
        width = int(self.seq_len) + 1
        for begin in range(0, len(ids) - width + 1, width - 1):
            yield torch.tensor(ids[begin : begin + width], dtype=torch.int64)

    def tokens(self, record: tuple[str, bool]) -> list[int]:
        text, ends = record
        ids = list(self.encode(text)) if text else []
        return ids + [self.eot] if ends else ids


INTEGER_DTYPES = "int8, uint8, int16, uint16, int32, uint32, int64, uint64"


def integer_dtype(dtype: Any, key: str = "dataset.dtype") -> np.dtype:
    try:
        found = np.dtype(str(dtype))
    except TypeError:
        found = None
    if found is None or found.kind not in "iu":
        raise UserError(
            key,
            dtype,
            "is not an integer dtype: token ids are integers",
            INTEGER_DTYPES,
            "pass the dtype the .bin files were written with, e.g. dataset.dtype=uint16",
        )
    return found


class TokenShards(ShardedStream):
    """Pre-tokenised shards, memory-mapped: `.npy` files of any integer dtype, or raw `.bin` files of
    `dtype`. Record i of a shard is the window tokens[i*seq_len : i*seq_len + seq_len + 1] (windows
    share their edge token), for task=language_model; the page cache, not the process, holds them."""

    def __init__(self, files: Any, seq_len: int = 64, dtype: str = "uint16") -> None:
        super().__init__(seq_len=seq_len)
        self.paths = find_files(files)
        self.dtype = integer_dtype(dtype)
        for path in self.paths:
            if path.endswith(".npy"):
                integer_dtype(np.load(path, mmap_mode="r").dtype, "dataset.files")

    def tokens_of(self, path: str) -> np.ndarray:
        if path.endswith(".npy"):
            return np.load(path, mmap_mode="r")
        return np.memmap(path, dtype=self.dtype, mode="r")

    def read(self, shard: int, start: int, step: int, offset: int) -> Iterator[tuple[int, Any]]:
        tokens, width = self.tokens_of(self.paths[shard]), int(self.seq_len)
        for i in range(start, (len(tokens) - 1) // width, step):
            yield 0, torch.from_numpy(tokens[i * width : i * width + width + 1].astype(np.int64))

    def windows(self) -> int:
        """Windows in every shard together (cheap: file sizes only)."""
        return sum((len(self.tokens_of(p)) - 1) // int(self.seq_len) for p in self.paths)


def decode_member(name: str, data: bytes) -> Any:
    """WebDataset's usual extensions: text, JSON, class labels, .npy arrays; anything else stays bytes."""
    ext = name.rsplit(".", 1)[-1].lower()
    if ext in ("txt", "text"):
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    if ext in ("cls", "cls2", "index"):
        return int(data.decode().strip())
    if ext == "npy":
        return torch.from_numpy(np.load(io.BytesIO(data)))
    return data


class WebDatasetShards(ShardedStream):
    """Tar shards in the WebDataset layout: the files of one sample are adjacent and share a key
    (the name up to its first dot); a sample is a dict from extension to decoded content, with
    `__key__`. Read as a stream: one member at a time."""

    def __init__(self, files: Any) -> None:
        super().__init__()
        self.paths = find_files(files)

    def read(self, shard: int, start: int, step: int, offset: int) -> Iterator[tuple[int, Any]]:
        index, key, sample = 0, None, {}
        with tarfile.open(self.paths[shard], mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                this_key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                if key is not None and this_key != key:
                    if index >= start and (index - start) % step == 0:
                        yield 0, sample
                    index, sample = index + 1, {}
                key = this_key
                wanted = index >= start and (index - start) % step == 0
                if wanted:
                    sample["__key__"] = key
                    sample[base.split(".", 1)[1] if "." in base else ""] = decode_member(
                        base, tar.extractfile(member).read()
                    )
            if key is not None and index >= start and (index - start) % step == 0:
                yield 0, sample


def token_shards(files: Any, val_files: Any = None, **options: Any):
    """`dataset=token_shards`: the training shards, and with `val_files` a validation split of its own."""
    from runner.data import Splits

    train = TokenShards(files, **options)
    return train if not val_files else Splits(train, TokenShards(val_files, **options))


def text_shards(files: Any, val_files: Any = None, **options: Any):
    """`dataset=text_shards`: the training shards, and with `val_files` a validation split of its own."""
    from runner.data import Splits

    train = TextShards(files, **options)
    return train if not val_files else Splits(train, TextShards(val_files, **options))
