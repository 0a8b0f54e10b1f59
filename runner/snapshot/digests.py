"""Digests of shard files per block, computed while the bytes are written and checked while they
are read, so verification costs each rank what it writes and reads, never a second pass.

A file's digest is its size, its whole sha256, and one sha256 per block of `BLOCK_SIZE` bytes
(the last one shorter). The writer hashes every byte on its way to the file (`HashingStream`);
a reader that reads a byte range checks each block the range touches, reading that block whole
(`BlockVerifiedFile`), so a rank that reads parts of several files (another world size) verifies
exactly what it uses, and what it hands on is the bytes it verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections import OrderedDict
from typing import Any, Callable

from runner.snapshot.format import SnapshotError
from runner.snapshot.versions import StoredFile

BLOCK_SIZE = 64 * 2**20
_CACHED_BLOCKS = 2  # a tensor's header sits at its end: keep its last block while its first ones are read


def digest_of_bytes(name: str, data: bytes, block_size: int = BLOCK_SIZE) -> StoredFile:
    """The digest of bytes held in memory (the lead's loop.pt)."""
    view = memoryview(data)
    blocks = tuple(hashlib.sha256(view[i : i + block_size]).hexdigest() for i in range(0, len(data), block_size))
    return StoredFile(name, len(data), hashlib.sha256(view).hexdigest(), block_size=block_size, blocks=blocks)


class HashingStream(io.RawIOBase):
    """A file being written, hashed as it is written (whole and per block); fsync'ed at close, and its
    digest handed to `done(name, StoredFile)` then. Writes are sequential, as DCP's are."""

    def __init__(self, raw: Any, name: str, done, block_size: int = BLOCK_SIZE) -> None:
        super().__init__()
        self.raw, self.name, self.done, self.block_size = raw, name, done, block_size
        self.position = 0
        self.whole = hashlib.sha256()
        self.block = hashlib.sha256()
        self.in_block = 0
        self.blocks: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            n = self.raw.write(view[written:])
            written += n if n is not None else len(view) - written
        self.whole.update(view)
        while view:
            take = min(len(view), self.block_size - self.in_block)
            self.block.update(view[:take])
            self.in_block += take
            view = view[take:]
            if self.in_block == self.block_size:
                self.blocks.append(self.block.hexdigest())
                self.block, self.in_block = hashlib.sha256(), 0
        self.position += written
        return written

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        if not self.closed:
            self.raw.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.raw.flush()
        os.fsync(self.raw.fileno())
        super().close()
        self.raw.close()
        if self.in_block:
            self.blocks.append(self.block.hexdigest())
        self.done(
            self.name,
            StoredFile(
                self.name, self.position, self.whole.hexdigest(), block_size=self.block_size, blocks=tuple(self.blocks)
            ),
        )


def as_one_block(expected: StoredFile) -> StoredFile:
    """A file listed without block digests, as one block: its whole sha256 (read whole, then checked)."""
    if expected.blocks:
        return expected
    return dataclasses.replace(expected, block_size=max(expected.size, 1), blocks=(expected.sha256,))


class BlockVerifiedFile(io.RawIOBase):
    """Reads of a listed file served from blocks that matched their digests: each block a read
    touches is read whole (`read_at(offset, length)`: a local file's pread, or a ranged read of an
    object) and checked first; a mismatch, a short block or a file of another size is a
    SnapshotError naming the file."""

    def __init__(self, read_at: Callable[[int, int], bytes], expected: StoredFile, shown: str) -> None:
        super().__init__()
        if not expected.blocks or expected.block_size <= 0:
            raise ValueError(f"{expected.name} has no block digests")
        self.read_at, self.expected, self.shown = read_at, expected, shown
        self.position = 0
        self.cache: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.expected.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.position = base + offset
        return self.position

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        wanted = max(0, min(len(out), self.expected.size - self.position))
        done = 0
        while done < wanted:
            index, start = divmod(self.position, self.expected.block_size)
            block = self._block(index)
            take = min(wanted - done, len(block) - start)
            out[done : done + take] = block[start : start + take]
            done += take
            self.position += take
        return done

    def _block(self, index: int) -> bytes:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        size = self.expected.block_size
        length = min(size, self.expected.size - index * size)
        data = self.read_at(index * size, length + (1 if index == len(self.expected.blocks) - 1 else 0))
        if len(data) != length:
            raise SnapshotError(
                f"{self.shown} is not the {self.expected.size} bytes its manifest entry lists (truncated or torn)"
            )
        if index >= len(self.expected.blocks) or hashlib.sha256(data).hexdigest() != self.expected.blocks[index]:
            raise SnapshotError(f"{self.shown} does not match its sha256 in block {index} (corrupted)")
        self.cache[index] = data
        while len(self.cache) > _CACHED_BLOCKS:
            self.cache.popitem(last=False)
        return data
