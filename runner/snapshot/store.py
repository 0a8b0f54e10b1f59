"""Where the bytes of snapshot versions live, behind one interface: `SnapshotStore`.

The catalogue of versions (manager.py) decides what is listed, kept and loaded; a store only
keeps bytes and says whether they are intact. The interface follows the order a store without
rename (an object store) needs, and the local filesystem keeps it too:

1. a writer writes a version into a staging file or folder (`staging_file`, `staging_folder`);
2. `commit_file` / `commit_folder` put its data under its final name, durable and hashed as
   stored (returned as `StoredFile`s): it exists, but does not count yet;
3. `publish_manifest` publishes the manifest that lists it, last: only then does it count;
4. `delete` removes a version the published manifest no longer lists.

Reads are verified here, once: `read_verified` and `check_verified` compare size and sha256
with what the manifest says (`check_listed` only the size: shards are verified per block by the
ranks that read them, runner.snapshot.dcp_reading), and the store remembers the digests it computed for files that
have not changed since (large shards are hashed once per process and store, not once per
reader). `LocalStore` is the local filesystem: fsync, rename, and hardened reads that never
follow a link or hang on a FIFO.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Optional

from runner.fileio import atomic_write, fsync_dir, temporary_path
from runner.snapshot.format import SnapshotError
from runner.snapshot.manifest import SHARD_FILE_PATTERN, file_name_problem
from runner.snapshot.versions import StoredFile, Version

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHUNK = 16 * 2**20
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # no links, no FIFO hang


class SnapshotStore(ABC):
    """The bytes of one run's versions and its manifest."""

    location: Path  # where versions are (shown in messages; the folder a sharded version is read from)
    local = True  # versions are files under `location` (else objects, read through `shard_reader`)

    def where(self) -> str:
        """Where the versions are, for messages."""
        return str(self.location)

    @abstractmethod
    def read_manifest(self) -> Optional[bytes]:
        """The published manifest's bytes; None when none was published yet."""

    @abstractmethod
    def publish_manifest(self, data: bytes) -> None:
        """Publish a new manifest at once (readers see the old one or the new one, never a mix)."""

    def staging_file(self, name: str) -> Path:
        """A fresh local path to write version `name` to before it is committed (in `location`:
        the versions' folder on disk, the staging folder of an object store)."""
        self.location.mkdir(parents=True, exist_ok=True)
        return temporary_path(self.location / name)

    def staging_folder(self, name: str, tag: str) -> Path:
        """The local folder every rank writes its shards of version `name` to (`tag`: the same on every rank)."""
        return self.location / f".{name}.tmp-{tag}"

    @abstractmethod
    def commit_file(self, staged: Path, name: str) -> StoredFile:
        """Store a staged file as `name`, durable; its size and sha256 as stored. Not listed yet."""

    @abstractmethod
    def commit_folder(
        self, staged: Path, name: str, digests: Optional[dict[str, StoredFile]] = None
    ) -> tuple[StoredFile, ...]:
        """Store a staged folder of shards as `name`, durable; each file's size and sha256.
        `digests`: files their writers hashed (and fsync'ed) while writing them, by name: trusted
        as they are (their size is checked), never read again; the others are hashed here."""

    @abstractmethod
    def after_publish(self) -> None:
        """Drop what a commit replaced, once the manifest that decides about it is published (or failed)."""

    @abstractmethod
    def read_verified(self, path: Path, expected: StoredFile) -> bytes:
        """The bytes of `path` if they match `expected`; SnapshotError saying why otherwise."""

    @abstractmethod
    def check_verified(self, path: Path, expected: StoredFile) -> None:
        """`path` matches `expected` (read in chunks: shards may be large); SnapshotError otherwise."""

    @abstractmethod
    def check_listed(self, path: Path, expected: StoredFile) -> None:
        """`path` is there with the listed size (not read: its bytes are verified where they are read)."""

    def shard_uploader(self, name: str) -> Optional[Callable[[Path, StoredFile], StoredFile]]:
        """How a rank stores the shard files it wrote for version `name` itself, from its own
        process (None: they stay in the staging folder and the lead's `commit_folder` stores them)."""
        return None

    def shard_reader(self, version: Version, item: StoredFile) -> Callable[[int, int], bytes]:
        """Ranged reads of one file of a sharded version kept as an object (stores that are not local)."""
        raise NotImplementedError

    @abstractmethod
    def problem(self, version: Version) -> Optional[str]:
        """Why what `version` names is not what its kind must be, or None (also when it is missing)."""

    @abstractmethod
    def delete(self, version: Version) -> None:
        """Remove a version the published manifest no longer lists (only files of ours)."""

    @abstractmethod
    def remove_stale_temporaries(self) -> None:
        """Remove what writers that were killed left half written."""


def sha256_of_file(path: Path) -> tuple[str, int]:
    """Hash what is actually in the file (read back from the page cache), not what we meant to write."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def staged_files(staged: Path, digests: Optional[dict[str, StoredFile]] = None) -> list[StoredFile]:
    """Each file of a staged sharded version, sorted by name: from `digests` where its writer hashed
    it (its size checked against the file; one its rank already stored as an object need not be
    here), else hashed and fsync'ed here. SnapshotError for a file a sharded snapshot never
    writes, or a hashed file that is missing or of another size."""
    digests = dict(digests or {})
    files = []
    for path in sorted(staged.iterdir(), key=lambda p: p.name):
        if not SHARD_FILE_PATTERN.fullmatch(path.name) or _type_problem(path) is not None:
            raise SnapshotError(f"{staged} holds {path.name}, which a sharded snapshot never writes")
        known = digests.pop(path.name, None)
        if known is not None:
            _check_size(path, os.lstat(path), known.size)
            files.append(known)
            continue
        sha256, size = sha256_of_file(path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files.append(StoredFile(path.name, size, sha256))
    stored = [item for item in digests.values() if item.object is not None]  # uploaded by their own rank
    missing = sorted(name for name, item in digests.items() if item.object is None)
    if missing:
        raise SnapshotError(f"{staged} lacks {', '.join(missing)}, which its writers wrote")
    return sorted(files + stored, key=lambda item: item.name)


def out_of_space(directory: Path) -> bool:
    """The filesystem has (next to) no room left: what a failed write there most likely means."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < (1 << 20)


def write_staged(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(path)`; on failure remove the half-written file, and report a full disk as ENOSPC
    (torch reports one as "unexpected pos ...")."""
    try:
        write(path)
    except BaseException as err:
        full = isinstance(err, Exception) and out_of_space(path.parent)
        path.unlink(missing_ok=True)
        if full and not isinstance(err, OSError):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _digest_problem(path: Path, actual: str, expected: StoredFile) -> None:
    if actual != expected.sha256:
        raise SnapshotError(f"{path} does not match its sha256 (corrupted)")


class LocalStore(SnapshotStore):
    """Versions as files in one local directory: a version's data is fsync'ed and renamed into
    place, the manifest is replaced atomically, and nothing that is not a regular file of ours
    is opened, followed or deleted."""

    def __init__(self, directory: Path | str) -> None:
        self.location = Path(directory)
        self._hashed: dict[tuple, str] = {}  # sha256 by file identity: files this store hashed, unchanged since
        self._set_aside: list[Path] = []  # versions a commit replaced, removed after the manifest

    @property
    def manifest_path(self) -> Path:
        return self.location / MANIFEST

    # ---- manifest ----------------------------------------------------------------------------
    def read_manifest(self) -> Optional[bytes]:
        try:
            return self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SnapshotError(f"{self.manifest_path} cannot be read ({err.strerror or err})") from None

    def publish_manifest(self, data: bytes) -> None:
        atomic_write(self.manifest_path, data)  # its directory fsync also persists the renames before it

    # ---- writing -----------------------------------------------------------------------------
    def commit_file(self, staged: Path, name: str) -> StoredFile:
        try:
            sha256, size = sha256_of_file(staged)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staged, self.location / name)  # the manifest's directory fsync persists this rename
        finally:
            staged.unlink(missing_ok=True)
        return StoredFile(name, size, sha256)

    def commit_folder(
        self, staged: Path, name: str, digests: Optional[dict[str, StoredFile]] = None
    ) -> tuple[StoredFile, ...]:
        final = self.location / name
        files = staged_files(staged, digests)
        fsync_dir(staged)
        aside = None
        if os.path.lexists(final):  # this step was written before (a torn version, resumed from an older one)
            aside = final.with_name(f".{name}.old-{os.getpid()}")
            os.replace(final, aside)
        try:
            os.replace(staged, final)  # the manifest's directory fsync persists this rename
        except BaseException:
            if aside is not None:  # put back what was there
                os.replace(aside, final)
            raise
        if aside is not None:
            self._set_aside.append(aside)
        for item in files:
            self._remember(final / item.name, item.sha256)
        return tuple(files)

    def after_publish(self) -> None:
        aside, self._set_aside = self._set_aside, []
        for path in aside:
            self._remove_folder(path)

    # ---- verified reads ----------------------------------------------------------------------
    def read_verified(self, path: Path, expected: StoredFile) -> bytes:
        """Its bytes, refusing links and special files, and never reading far past the expected size."""
        fd = self._open_regular(path)
        with os.fdopen(fd, "rb") as f:
            _check_size(path, os.fstat(f.fileno()), expected.size)
            data = f.read(expected.size + 1)
        if len(data) != expected.size:
            raise SnapshotError(f"{path} has {len(data)} bytes, the manifest says {expected.size} (truncated or torn)")
        _digest_problem(path, hashlib.sha256(data).hexdigest(), expected)
        return data

    def check_verified(self, path: Path, expected: StoredFile) -> None:
        """Not read again while the file is unchanged (same inode, size, mtime) since this store hashed it."""
        fd = self._open_regular(path)
        digest, seen = hashlib.sha256(), 0
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check_size(path, st, expected.size)
            known = self._hashed.get(_identity(st))
            if known is not None:
                return _digest_problem(path, known, expected)
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                seen += len(chunk)
            unchanged = _identity(os.fstat(f.fileno())) == _identity(st)
        if seen != expected.size:
            raise SnapshotError(f"{path} has {seen} bytes, the manifest says {expected.size} (truncated or torn)")
        if unchanged:  # not written to while it was read
            self._hashed[_identity(st)] = digest.hexdigest()
        _digest_problem(path, digest.hexdigest(), expected)

    def check_listed(self, path: Path, expected: StoredFile) -> None:
        problem = _type_problem(path)
        if problem is not None:
            raise SnapshotError(problem)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise SnapshotError(f"{path} is missing") from None
        _check_size(path, st, expected.size)

    def _remember(self, path: Path, sha256: str) -> None:
        try:
            self._hashed[_identity(os.lstat(path))] = sha256
        except OSError:
            pass

    def _open_regular(self, path: Path) -> int:
        problem = _type_problem(path)
        if problem is not None:
            raise SnapshotError(problem)
        try:
            return os.open(path, _OPEN_FLAGS)  # O_NOFOLLOW: a link swapped in after the lstat is refused too
        except FileNotFoundError:
            raise SnapshotError(f"{path} is missing") from None
        except OSError as err:
            raise SnapshotError(f"{path} cannot be opened ({err.strerror or err})") from None

    # ---- what versions name, and deleting them -------------------------------------------------
    def problem(self, version: Version) -> Optional[str]:
        return _type_problem(self.location / version.file, folder=version.sharded)

    def delete(self, version: Version) -> None:
        """Only a regular file (or a real folder of shards) of ours, directly inside the directory."""
        name = version.file
        path = self.location / name
        problem = file_name_problem(name, version.kind)
        if problem is None:
            problem = self.problem(version)
        if problem is None and path.resolve().parent != self.location.resolve():
            problem = f"{path} resolves outside {self.location}"
        if problem is not None:
            log.warning("retention: not deleting %r: %s", name, problem)
            return
        if version.sharded:
            self._remove_folder(path)
        else:
            path.unlink(missing_ok=True)

    def _remove_folder(self, path: Path) -> None:
        """The files a sharded snapshot writes, then the folder itself (anything else in it is left,
        with a warning)."""
        if not path.is_dir() or path.is_symlink():
            return
        for child in path.iterdir():
            if SHARD_FILE_PATTERN.fullmatch(child.name) and _type_problem(child) is None:
                child.unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            log.warning("retention: %s holds files a snapshot never writes: left in place", path)

    def remove_stale_temporaries(self) -> None:
        if self.location.is_dir():
            for tmp in self.location.glob(".*.tmp-*"):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)
            for tmp in [*self.location.glob(".step-*.tmp-*"), *self.location.glob(".step-*.old-*")]:
                if tmp.is_dir() and not tmp.is_symlink():  # a sharded version that never became one
                    shutil.rmtree(tmp, ignore_errors=True)


def _type_problem(path: Path, folder: bool = False) -> Optional[str]:
    """Why `path` (not followed if a link) is not a regular file (a folder with `folder`); None if
    it is one or is missing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return f"{path} is a symlink (never followed)"
    if folder and not stat.S_ISDIR(mode):
        return f"{path} is not a folder"
    if not folder and not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    return None


def _check_size(path: Path, st: os.stat_result, size: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{path} is not a regular file")
    if st.st_size != size:
        raise SnapshotError(f"{path} has {st.st_size} bytes, the manifest says {size} (truncated or torn)")
