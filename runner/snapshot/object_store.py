"""Snapshot versions in an object store: S3 and S3-compatible servers (s3fs), GCS (gcsfs), Azure (adlfs).

An object store has no rename, so the local commit protocol (fsync, rename, manifest last) becomes:

1. the writer writes a version into a local staging file (under the run directory), as on disk;
2. `commit_file` uploads it under a name no other writer uses (`snapshot-<step>.pt.<random>`),
   reads it back and compares size and sha256: a version whose bytes the store did not keep
   exactly is never listed;
3. `publish_manifest` writes the manifest with a conditional write (conditional.py): on S3 `If-Match`
   on the ETag of the manifest this writer read (`If-None-Match: *` when there was none), on GCS
   `ifGenerationMatch` on its generation (0 when there was none), on Azure as on S3. If another
   writer published in between, the write is refused (HTTP 412) and this one raises
   `ManifestConflict`: two writers can never both win, and neither manifest is ever torn;
4. `delete` removes only objects the published manifest no longer lists (retention runs after);
5. objects a killed writer uploaded but never listed are removed when the next run starts, once
   a day old (orphans.py).

Readers trust only what the manifest lists: each read downloads the listed object and checks its
size and sha256 before anything is unpickled, so a corrupt or missing object is skipped for the
previous version. Credentials and the endpoint come from the environment (AWS_* variables,
profiles, instance roles, AWS_ENDPOINT_URL; Google's application default credentials,
STORAGE_EMULATOR_HOST; AZURE_STORAGE_* variables), never from the config, the logs or the manifest.

Sharded (DCP) versions: every rank writes its shards into a local staging folder, hashing them
as it writes (dcp_writing.py), and uploads them itself as `step-<N>/<file>.<random>`, hashing
the bytes it sends (the read an upload needs anyway) against the digests it computed, and
passing each one's sha256 to the server, which refuses bytes that arrive otherwise (one part per
64 MB block for large files): nothing is downloaded again. The object names travel to the lead
with the digests; the lead uploads .metadata and loop.pt and publishes the manifest. A resume reads byte ranges of the
listed objects, each block checked against its digest as it arrives (dcp_reading.py), so each
rank fetches and verifies only the blocks it loads, also on another world size.
With snapshot.upload=async (the default for file versions) the background uploader (upload.py) calls
`upload_file`.

The checked uploads above (server-side sha256 per part, ETag against the MD5 of what was sent) are
S3's; on GCS and Azure each upload is one put through fsspec, then read back and checked like a
listed read.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from runner.snapshot import orphans, s3_parts
from runner.snapshot.conditional import Refused, manifest_access, s3_call
from runner.snapshot.format import SnapshotError
from runner.snapshot.manifest import FILE_PATTERN, FOLDER_PATTERN, SHARD_FILE_PATTERN, parse_manifest
from runner.snapshot.store import CHUNK, MANIFEST, SnapshotStore, sha256_of_file, staged_files
from runner.snapshot.versions import StoredFile, Version

log = logging.getLogger(__name__)
_MIN_PART = 5 * 2**20  # S3's smallest part but the last: smaller blocks go up in one put
_OWN_SUFFIX = r"\.[0-9a-f]{12}"  # what `_own_name` appends
# Every name this store's uploads take: single-file versions, and the files of sharded ones
OURS = re.compile(rf"({FILE_PATTERN.pattern}|{FOLDER_PATTERN.pattern}/({SHARD_FILE_PATTERN.pattern})){_OWN_SUFFIX}")


def _own_name(name: str) -> str:
    """An object name no other writer uses: `name` and 12 random hex digits."""
    return f"{name}.{secrets.token_hex(6)}"


class ManifestConflict(SnapshotError):
    """Another writer published the manifest after this one read it: this publish did not happen."""


class NotAsListed(SnapshotError):
    """A local file to upload is not what its manifest entry says (rewritten or rotten): not uploaded."""


class ObjectStore(SnapshotStore):
    """One run's versions under a URL prefix; `location` is the local staging folder."""

    local = False

    def __init__(self, url: str, staging: Path, fs: Any = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.location = Path(staging)
        self._kind = self.url.split("://", 1)[0].lower()
        self.fs = fs if fs is not None else fsspec.filesystem(self._kind)
        self._prefix = self.url.split("://", 1)[1]  # bucket/prefix
        self._etag: Optional[str] = None  # version token of the manifest last read: what a publish must replace

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
            got = manifest_access(self._kind, self.fs, bucket, key).read()
        except Exception as err:
            raise SnapshotError(f"{self.url}/{MANIFEST} cannot be read ({type(err).__name__}: {err})") from None
        data, self._etag = got if got is not None else (None, None)
        return data

    def publish_manifest(self, data: bytes) -> None:
        bucket, key = self._bucket_key(MANIFEST)
        try:
            self._etag = manifest_access(self._kind, self.fs, bucket, key).publish(data, self._etag)
        except Refused:
            raise ManifestConflict(
                f"{self.url}/{MANIFEST} was published by another writer after this one read it, so this "
                "version is not listed (do two runs write to one snapshot.dir?)"
            ) from None

    # ---- writing -----------------------------------------------------------------------------
    def commit_file(self, staged: Path, name: str) -> StoredFile:
        """Upload under a name of this writer's own, then read it back: listed only if it matches."""
        key = _own_name(name)
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

    def commit_folder(
        self, staged: Path, name: str, digests: Optional[dict[str, StoredFile]] = None
    ) -> tuple[StoredFile, ...]:
        """Upload each file not stored yet under a name of this writer's own, checked against its
        digests as it is sent (the ranks' shards are already up: `shard_uploader`); the local
        staging folder is removed once all are stored."""
        uploaded: list[str] = []
        try:
            files = []
            for item in staged_files(staged, digests):
                if item.object is not None:  # uploaded by the rank that wrote it
                    self._object(item, name)
                    files.append(item)
                    continue
                stored = self._upload_new(staged / item.name, name, item)
                uploaded.append(stored.object)
                files.append(stored)
        except BaseException:
            for key in uploaded:
                self._remove(key)
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return tuple(files)

    def shard_uploader(self, name: str) -> Callable[[Path, StoredFile], StoredFile]:
        """Each rank uploads the shards it wrote, from its own process, then drops its local copy:
        the network and the checks scale with the ranks, and no node needs another's files."""

        def upload(path: Path, item: StoredFile) -> StoredFile:
            stored = self._upload_new(path, name, item)
            path.unlink(missing_ok=True)
            return stored

        return upload

    def _upload_new(self, path: Path, name: str, item: StoredFile) -> StoredFile:
        """`path` uploaded (checked) as `<name>/<file>.<random>`: a name no other writer uses."""
        key = _own_name(f"{name}/{item.name}")
        try:
            self._upload_checked(path, key, item)
        except BaseException:
            self._remove(key)
            raise
        return dataclasses.replace(item, object=key)

    def _upload_checked(self, path: Path, key: str, item: StoredFile) -> None:
        """One put (or one part per block, for large files) whose bytes are hashed as they are read
        for sending and must match `item`; the server also checks each body's sha256. Other stores
        than S3: one put, then the object is read back and checked against `item`."""
        if self._kind != "s3":
            self.fs.put_file(str(path), self._remote(key))
            self._check(dataclasses.replace(item, object=key), key.split("/", 1)[0])
            return
        bucket, object_key = self._bucket_key(key)
        whole, blocks = hashlib.sha256(), enumerate(item.blocks)

        def checked(data: bytes) -> dict:  # before it is sent: the server checks it too
            whole.update(data)
            digest = hashlib.sha256(data)
            number, expected = next(blocks, (len(item.blocks), None))
            if digest.hexdigest() != expected:
                raise SnapshotError(f"{path} changed since it was written (block {number})")
            return {"ChecksumSHA256": _b64(digest)}

        with open(path, "rb") as f:
            if item.blocks and item.block_size >= _MIN_PART and len(item.blocks) > 1:
                s3_parts.send_in_parts(
                    self.fs,
                    bucket,
                    object_key,
                    f,
                    item.block_size,
                    headers=checked,
                    before_complete=lambda: _check_read(path, f, whole, item),
                    ChecksumAlgorithm="SHA256",
                )
                return
            data = f.read(item.size + 1)
            whole.update(data)
            _check_read(path, f, whole, item, len(data))
            self._call(
                "put_object", Bucket=bucket, Key=object_key, Body=data, ChecksumSHA256=_b64(hashlib.sha256(data))
            )

    def upload_file(self, local: Path, expected: StoredFile) -> StoredFile:
        """A complete local file (`expected`: its name, size and sha256) uploaded under a name of this
        writer's own, returned only if the store kept exactly those bytes. The file is read once:
        what is sent is hashed as it is sent (sha256: it must be `expected`'s; MD5: the store's ETag
        must match it, so the bytes are not downloaded again). A store whose ETag is no MD5 (SSE-KMS,
        some S3-compatible servers) is read back instead. The local file is left in place."""
        stored = StoredFile(expected.name, expected.size, expected.sha256, _own_name(expected.name))
        if self._kind != "s3":  # no ETag to compare: checked before it goes up, read back after
            if sha256_of_file(local) != (expected.sha256, expected.size):
                raise NotAsListed(f"{local} no longer matches its manifest entry: not uploaded")
            try:
                self.fs.put_file(str(local), self._remote(stored.object))
                self._check(stored)
            except BaseException:
                self.discard(stored)
                raise
            return stored
        try:
            if not self._put_hashed(local, stored):
                self._check(stored)
        except BaseException:
            self.discard(stored)
            raise
        return stored

    def _put_hashed(self, local: Path, stored: StoredFile) -> bool:
        """Upload `local` as `stored.object`, hashing each part while it is on its way; True when the
        store's ETag matches the MD5 of what was sent. NotAsListed when what was sent is not
        `stored` (the file changed): a multipart upload is then aborted before it completes."""
        bucket, key = self._bucket_key(stored.object)
        digest, md5s = hashlib.sha256(), []

        def hashed(data: bytes) -> None:
            digest.update(data)
            md5s.append(hashlib.md5(data))

        def as_listed(sent: int) -> None:
            if sent != stored.size or digest.hexdigest() != stored.sha256:
                raise NotAsListed(f"{local} changed while it was uploaded (it no longer matches its manifest entry)")

        with open(local, "rb") as f:
            if stored.size < 2 * s3_parts.PART:  # one request, as s3fs's put_file does below two parts
                data = f.read()
                sending = s3_parts.submit(self.fs, "put_object", Bucket=bucket, Key=key, Body=data)
                hashed(data)
                etag = sending.result()["ETag"]
                as_listed(len(data))
            else:
                etag = s3_parts.send_in_parts(
                    self.fs, bucket, key, f, s3_parts.PART, inspect=hashed, before_complete=lambda: as_listed(f.tell())
                )
        if len(md5s) == 1:
            return etag.strip('"') == md5s[0].hexdigest()
        whole = hashlib.md5(b"".join(m.digest() for m in md5s)).hexdigest()
        return etag.strip('"') == f"{whole}-{len(md5s)}"

    def discard(self, stored: StoredFile) -> None:
        """Remove an uploaded object no manifest lists (best effort: a store that is down keeps it)."""
        try:
            self.fs.rm_file(self._remote(stored.object))
        except Exception:
            pass

    def after_publish(self) -> None:
        pass

    # ---- verified reads ----------------------------------------------------------------------
    def read_verified(self, path: Path, expected: StoredFile) -> bytes:
        """The listed object's bytes (never more than one past the listed size) if they match."""
        key = self._object(expected, path.parent.name)
        remote = self._remote(key)
        try:
            data = self.fs.cat_file(remote, start=0, end=expected.size + 1)
        except FileNotFoundError:
            raise SnapshotError(f"{self.url}/{key} is missing") from None
        except Exception as err:
            raise SnapshotError(f"{self.url}/{key} cannot be read ({err})") from None
        if len(data) != expected.size:
            raise SnapshotError(f"{self.url}/{key} has {len(data)} bytes, the manifest says {expected.size}")
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise SnapshotError(f"{self.url}/{key} does not match its sha256 (corrupted)")
        return data

    def check_verified(self, path: Path, expected: StoredFile) -> None:
        self._check(expected, path.parent.name)

    def check_listed(self, path: Path, expected: StoredFile) -> None:
        """The listed object is there with the listed size (one HEAD; its bytes are checked as they are read)."""
        key = self._object(expected, path.parent.name)
        try:
            size = self.fs.info(self._remote(key))["size"]
        except FileNotFoundError:
            raise SnapshotError(f"{self.url}/{key} is missing") from None
        except Exception as err:
            raise SnapshotError(f"{self.url}/{key} cannot be read ({err})") from None
        if size != expected.size:
            raise SnapshotError(
                f"{self.url}/{key} has {size} bytes, the manifest says {expected.size} (truncated or torn)"
            )

    def shard_reader(self, version: Version, item: StoredFile) -> Callable[[int, int], bytes]:
        """Ranged reads of one listed file of a sharded version: (offset, length) -> bytes."""
        remote = self._remote(self._object(item, version.file))

        def read(offset: int, length: int) -> bytes:
            try:
                return self.fs.cat_file(remote, start=offset, end=offset + length)
            except FileNotFoundError:
                raise SnapshotError(f"{self.url}/{self._object(item, version.file)} is missing") from None

        return read

    def _check(self, expected: StoredFile, folder: Optional[str] = None) -> None:
        """Stream the object and compare size and sha256 with `expected`."""
        key = self._object(expected, folder)
        shown = f"{self.url}/{key}"
        digest, seen = hashlib.sha256(), 0
        try:
            with self.fs.open(self._remote(key), "rb", block_size=CHUNK) as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    seen += len(chunk)
        except FileNotFoundError:
            raise SnapshotError(f"{shown} is missing") from None
        if seen != expected.size:
            raise SnapshotError(f"{shown} has {seen} bytes, the manifest says {expected.size}")
        if digest.hexdigest() != expected.sha256:
            raise SnapshotError(f"{shown} does not match its sha256 (corrupted)")

    def _object(self, expected: StoredFile, folder: Optional[str] = None) -> str:
        """The object a listed file is stored as; only a name this store gives its uploads passes
        (`folder`: the sharded version the file belongs to; None, or this store's own location,
        for a single-file version)."""
        key = expected.object
        prefix = "" if folder in (None, self.location.name) else re.escape(folder) + "/"
        if prefix and not FOLDER_PATTERN.fullmatch(folder):
            key = None
        if not isinstance(key, str) or not re.fullmatch(prefix + re.escape(expected.name) + _OWN_SUFFIX, key):
            raise SnapshotError(f"{expected.name}: the manifest names no object of ours for it ({key!r})")
        return key

    # ---- what versions name, and deleting them -------------------------------------------------
    def problem(self, version: Version) -> Optional[str]:
        try:
            self._objects_of(version)
        except SnapshotError as err:
            return str(err)
        return None

    def _objects_of(self, version: Version) -> list[str]:
        if version.sharded:
            return [self._object(item, version.file) for item in version.files]
        return [self._object(StoredFile(version.file, version.size, version.sha256, version.object))]

    def delete(self, version: Version) -> None:
        problem = self.problem(version)
        if problem is not None:
            log.warning("retention: not deleting %r: %s", version.file, problem)
            return
        for key in self._objects_of(version):
            self._remove(key)

    def _remove(self, key: str) -> None:
        try:
            self.fs.rm_file(self._remote(key))
        except FileNotFoundError:
            pass
        except Exception as err:  # the version is unlisted already: a leftover object, not a torn run
            log.warning("retention: could not delete %s/%s (%s); it is no longer listed", self.url, key, err)

    def remove_stale_temporaries(self) -> None:
        """Staging files a killed writer left here, and the objects it uploaded but never listed
        (orphans.py); a store that cannot be searched now is searched by the next run."""
        if self.location.is_dir():
            for tmp in self.location.glob(".*.tmp-*"):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)
                elif tmp.is_dir() and not tmp.is_symlink():  # a sharded version never uploaded
                    shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.remove_orphans()
        except Exception as err:
            log.warning("could not look for unlisted objects in %s (%s: %s)", self.url, type(err).__name__, err)

    def remove_orphans(self, now: Optional[float] = None) -> list[str]:
        """Remove the objects of ours that the manifest does not list and that are older than
        `orphans.ORPHAN_AGE` (and abort such incomplete multipart uploads); the names removed."""
        data = self.read_manifest()
        if data is None:
            return []
        listed = orphans.listed_objects(parse_manifest(data, f"{self.url}/{MANIFEST}"))
        now = time.time() if now is None else now
        self.fs.invalidate_cache(self._prefix)
        found = self.fs.find(self._prefix, detail=True)
        start = len(self._prefix) + 1
        gone = orphans.orphaned(((path[start:], info) for path, info in found.items()), OURS, listed, now)
        for name in gone:
            self._remove(name)
        if self._kind == "s3":
            gone += self._abort_orphaned_uploads(listed, now)
        if gone:
            log.info(
                "removed %d object(s) from %s that no manifest lists (left by a writer stopped before it "
                "listed them): %s",
                len(gone),
                self.url,
                ", ".join(gone[:5]) + (", ..." if len(gone) > 5 else ""),
            )
        return gone

    def _abort_orphaned_uploads(self, listed: set[str], now: float) -> list[str]:
        """Incomplete multipart uploads of ours older than ORPHAN_AGE: their parts are billed, never shown."""
        bucket, prefix = self._bucket_key("")
        uploads, markers = [], {}
        while True:
            response = self._call("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            uploads += [(u["Key"][len(prefix) :], u) for u in response.get("Uploads", [])]
            if not response.get("IsTruncated"):
                break
            markers = {"KeyMarker": response["NextKeyMarker"], "UploadIdMarker": response["NextUploadIdMarker"]}
        gone = orphans.orphaned(uploads, OURS, listed, now)
        for name, upload in uploads:
            if name in gone:
                self._call("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        return [f"{name} (incomplete upload)" for name in gone]

    # ---- S3 calls ------------------------------------------------------------------------------
    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, _, prefix = self._prefix.partition("/")
        return bucket, f"{prefix}/{name}" if prefix else name

    def _call(self, method: str, **kwargs: Any) -> dict:
        return s3_call(self.fs, method, **kwargs)


def _b64(digest: Any) -> str:
    return base64.b64encode(digest.digest()).decode()


def _check_read(path: Path, f: Any, whole: Any, item: StoredFile, seen: Optional[int] = None) -> None:
    """What was read for sending is the file its writer hashed: same size, same sha256."""
    seen = f.tell() if seen is None else seen
    if seen != item.size or f.read(1) or whole.hexdigest() != item.sha256:
        raise SnapshotError(f"{path} changed since it was written: not uploaded")
