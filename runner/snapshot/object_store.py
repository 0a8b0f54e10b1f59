"""Snapshot versions in an object store (S3 and S3-compatible servers, through fsspec's s3fs).

An object store has no rename, so the local commit protocol (fsync, rename, manifest last) becomes:

1. the writer writes a version into a local staging file (under the run directory), as on disk;
2. `commit_file` uploads it under a name no other writer uses (`snapshot-<step>.pt.<random>`),
   reads it back and compares size and sha256: a version whose bytes the store did not keep
   exactly is never listed;
3. `publish_manifest` writes the manifest with a conditional write: `If-Match` on the ETag of the
   manifest this writer read (`If-None-Match: *` when there was none). If another writer published
   in between, the write is refused (HTTP 412) and this one raises `ManifestConflict`: two writers
   can never both win, and neither manifest is ever torn;
4. `delete` removes only objects the published manifest no longer lists (retention runs after).

Readers trust only what the manifest lists: each read downloads the listed object and checks its
size and sha256 before anything is unpickled, so a corrupt or missing object is skipped for the
previous version. Credentials and the endpoint come from the environment (AWS_* variables,
profiles, instance roles, AWS_ENDPOINT_URL), never from the config, the logs or the manifest.
Sharded (DCP) versions are not kept in object stores yet: the checks refuse the combination.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from pathlib import Path
from typing import Any, Optional

from runner.fileio import temporary_path
from runner.snapshot.format import SnapshotError
from runner.snapshot.store import CHUNK, MANIFEST, SnapshotStore, sha256_of_file
from runner.snapshot.versions import StoredFile, Version

log = logging.getLogger(__name__)


class ManifestConflict(SnapshotError):
    """Another writer published the manifest after this one read it: this publish did not happen."""


class ObjectStore(SnapshotStore):
    """One run's versions under a URL prefix; `location` is the local staging folder."""

    def __init__(self, url: str, staging: Path, fs: Any = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.location = Path(staging)
        self.fs = fs if fs is not None else fsspec.filesystem(self.url.split("://", 1)[0])
        self._prefix = self.url.split("://", 1)[1]  # bucket/prefix
        self._etag: Optional[str] = None  # of the manifest last read: what a publish must replace

    def __repr__(self) -> str:
        return f"ObjectStore({self.url})"

    def where(self) -> str:
        return self.url

    def _remote(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    # ---- manifest ----------------------------------------------------------------------------
    def read_manifest(self) -> Optional[bytes]:
        bucket, key = self._bucket_key(MANIFEST)
        try:
            response = self._call("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            self._etag = None
            return None
        except Exception as err:
            raise SnapshotError(f"{self.url}/{MANIFEST} cannot be read ({type(err).__name__}: {err})") from None
        self._etag = response["ETag"]
        return response["Body"]

    def publish_manifest(self, data: bytes) -> None:
        bucket, key = self._bucket_key(MANIFEST)
        condition = {"IfNoneMatch": "*"} if self._etag is None else {"IfMatch": self._etag}
        try:
            response = self._call("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except Exception as err:
            if _precondition_failed(err):
                raise ManifestConflict(
                    f"{self.url}/{MANIFEST} was published by another writer after this one read it, so this "
                    "version is not listed (do two runs write to one snapshot.dir?)"
                ) from None
            raise
        self._etag = response["ETag"]

    # ---- writing -----------------------------------------------------------------------------
    def staging_file(self, name: str) -> Path:
        self.location.mkdir(parents=True, exist_ok=True)
        return temporary_path(self.location / name)

    def staging_folder(self, name: str, tag: str) -> Path:
        raise SnapshotError("sharded (DCP) snapshots cannot be kept in an object store yet")

    def commit_file(self, staged: Path, name: str) -> StoredFile:
        """Upload under a name of this writer's own, then read it back: listed only if it matches."""
        key = f"{name}.{secrets.token_hex(6)}"
        try:
            sha256, size = sha256_of_file(staged)
            self.fs.put_file(str(staged), self._remote(key))
            stored = StoredFile(name, size, sha256, key)
            try:
                self._check(stored)
            except SnapshotError:
                self._remove(key)
                raise
        finally:
            staged.unlink(missing_ok=True)
        return stored

    def commit_folder(self, staged: Path, name: str) -> tuple[StoredFile, ...]:
        raise SnapshotError("sharded (DCP) snapshots cannot be kept in an object store yet")

    def after_publish(self) -> None:
        pass

    # ---- verified reads ----------------------------------------------------------------------
    def read_verified(self, path: Path, expected: StoredFile) -> bytes:
        """The listed object's bytes (never more than one past the listed size) if they match."""
        remote = self._remote(self._object(expected))
        try:
            data = self.fs.cat_file(remote, start=0, end=expected.size + 1)
        except FileNotFoundError:
            raise SnapshotError(f"{self.url}/{self._object(expected)} is missing") from None
        except Exception as err:
            raise SnapshotError(f"{self.url}/{self._object(expected)} cannot be read ({err})") from None
        if len(data) != expected.size:
            raise SnapshotError(
                f"{self.url}/{self._object(expected)} has {len(data)} bytes, the manifest says {expected.size}"
            )
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise SnapshotError(f"{self.url}/{self._object(expected)} does not match its sha256 (corrupted)")
        return data

    def check_verified(self, path: Path, expected: StoredFile) -> None:
        self._check(expected)

    def check_listed(self, path: Path, expected: StoredFile) -> None:
        self._check(expected)

    def _check(self, expected: StoredFile) -> None:
        """Stream the object and compare size and sha256 with `expected`."""
        shown = f"{self.url}/{self._object(expected)}"
        digest, seen = hashlib.sha256(), 0
        try:
            with self.fs.open(self._remote(self._object(expected)), "rb", block_size=CHUNK) as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    seen += len(chunk)
        except FileNotFoundError:
            raise SnapshotError(f"{shown} is missing") from None
        if seen != expected.size:
            raise SnapshotError(f"{shown} has {seen} bytes, the manifest says {expected.size}")
        if digest.hexdigest() != expected.sha256:
            raise SnapshotError(f"{shown} does not match its sha256 (corrupted)")

    @staticmethod
    def _object(expected: StoredFile) -> str:
        """The object a listed file is stored as; only a name this store gives its uploads passes."""
        key = expected.object
        if not isinstance(key, str) or not re.fullmatch(re.escape(expected.name) + r"\.[0-9a-f]{12}", key):
            raise SnapshotError(f"{expected.name}: the manifest names no object of ours for it ({key!r})")
        return key

    # ---- what versions name, and deleting them -------------------------------------------------
    def problem(self, version: Version) -> Optional[str]:
        if version.sharded:
            return f"{version.file} is a sharded version, which an object store does not keep"
        try:
            self._object(StoredFile(version.file, version.size, version.sha256, version.object))
        except SnapshotError as err:
            return str(err)
        return None

    def delete(self, version: Version) -> None:
        problem = self.problem(version)
        if problem is not None:
            log.warning("retention: not deleting %r: %s", version.file, problem)
            return
        self._remove(version.object)

    def _remove(self, key: str) -> None:
        try:
            self.fs.rm_file(self._remote(key))
        except FileNotFoundError:
            pass
        except Exception as err:  # the version is unlisted already: a leftover object, not a torn run
            log.warning("retention: could not delete %s/%s (%s); it is no longer listed", self.url, key, err)

    def remove_stale_temporaries(self) -> None:
        """Staging files a killed writer left here (objects it uploaded but never listed stay in the store)."""
        if self.location.is_dir():
            for tmp in self.location.glob(".*.tmp-*"):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)

    # ---- S3 calls ------------------------------------------------------------------------------
    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, _, prefix = self._prefix.partition("/")
        return bucket, f"{prefix}/{name}" if prefix else name

    def _call(self, method: str, **kwargs: Any) -> dict:
        """One S3 call with the headers s3fs's own methods do not pass (If-Match, If-None-Match);
        a GetObject's body is read whole (the manifest is small)."""
        from fsspec.asyn import sync

        async def call() -> dict:
            response = await self.fs._call_s3(method, **kwargs)
            if "Body" in response and hasattr(response["Body"], "read"):
                response["Body"] = await response["Body"].read()
            return response

        return sync(self.fs.loop, call)


def _precondition_failed(err: BaseException) -> bool:
    """s3fs turns HTTP 412 into FileExistsError (If-None-Match) or OSError (If-Match)."""
    return isinstance(err, FileExistsError) or "pre-condition" in str(err).lower() or "412" in str(err)
