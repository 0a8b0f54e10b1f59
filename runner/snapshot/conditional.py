"""The manifest's conditional read and publish, one small class per object store.

An object store has no rename and no lock, so the manifest is replaced only if it is still the one
this writer read: each backend reads the manifest with its version token, and publishes with a
condition on that token, refused by the server (HTTP 412) when another writer published in between.

- S3 (s3fs): the ETag; `If-Match: <etag>`, or `If-None-Match: *` when there was no manifest.
- GCS (gcsfs): the object's generation; `ifGenerationMatch=<generation>`, or `0` (must not exist).
  The manifest is read at the generation its metadata names, so bytes and token always agree.
- Azure Blob Storage (adlfs, through its azure-storage-blob client): the ETag; `If-Match: <etag>`,
  or `If-None-Match: *` (the SDK's overwrite=False). The SDK downloads pinned to one ETag.

`read` returns (bytes, token) or None when there is no manifest; `publish` returns the new token
and raises `Refused` when the condition failed. Any other error propagates as it is.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional
from urllib.parse import quote


class Refused(Exception):
    """The store refused the conditional write: the manifest is no longer the one that was read."""


def refused(err: BaseException) -> bool:
    """s3fs and gcsfs turn HTTP 412 into FileExistsError; s3fs into OSError for If-Match."""
    return isinstance(err, FileExistsError) or "pre-condition" in str(err).lower() or "412" in str(err)


def s3_call(fs: Any, method: str, **kwargs: Any) -> dict:
    """One S3 call with the headers s3fs's own methods do not pass (If-Match, If-None-Match, checksums);
    a GetObject's body is read whole (the manifest is small)."""
    from fsspec.asyn import sync

    async def call() -> dict:
        response = await fs._call_s3(method, **kwargs)
        if "Body" in response and hasattr(response["Body"], "read"):
            response["Body"] = await response["Body"].read()
        return response

    return sync(fs.loop, call)


class S3Manifest:
    def __init__(self, fs: Any, bucket: str, key: str) -> None:
        self.fs, self.bucket, self.key = fs, bucket, key

    def read(self) -> Optional[tuple[bytes, str]]:
        try:
            response = s3_call(self.fs, "get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        return response["Body"], response["ETag"]

    def publish(self, data: bytes, token: Optional[str]) -> str:
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            response = s3_call(self.fs, "put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except Exception as err:
            if refused(err):
                raise Refused() from None
            raise
        return response["ETag"]


class GCSManifest:
    READS = 5  # a manifest replaced between its metadata and its bytes is read again

    def __init__(self, fs: Any, bucket: str, key: str) -> None:
        self.fs, self.bucket, self.key = fs, bucket, key

    def read(self) -> Optional[tuple[bytes, str]]:
        for _ in range(self.READS):
            try:
                meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            except FileNotFoundError:
                return None
            generation = str(meta["generation"])
            try:
                _, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media", generation=generation)
            except FileNotFoundError:  # that generation was replaced (or removed) in between
                continue
            return data, generation
        raise OSError(f"{self.bucket}/{self.key} changed on each of {self.READS} reads")

    def publish(self, data: bytes, token: Optional[str]) -> str:
        try:
            out = self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o",
                uploadType="media",
                name=self.key,
                ifGenerationMatch="0" if token is None else token,
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                json_out=True,
            )
        except Exception as err:
            if refused(err):
                raise Refused() from None
            raise
        finally:
            self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        return str(out["generation"])


class AzureManifest:
    def __init__(self, fs: Any, container: str, key: str) -> None:
        self.fs, self.container, self.key = fs, container, key

    def _run(self, step: Callable[[Any], Awaitable[Any]]) -> Any:
        from fsspec.asyn import sync

        async def call() -> Any:
            return await step(self.fs.service_client.get_blob_client(self.container, self.key))

        return sync(self.fs.loop, call)

    def read(self) -> Optional[tuple[bytes, str]]:
        from azure.core.exceptions import ResourceNotFoundError

        async def download(blob: Any) -> Optional[tuple[bytes, str]]:
            try:
                stream = await blob.download_blob()
            except ResourceNotFoundError:
                return None
            return await stream.readall(), stream.properties.etag

        return self._run(download)

    def publish(self, data: bytes, token: Optional[str]) -> str:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

        if token is None:
            condition: dict = {"overwrite": False}
        else:
            condition = {"overwrite": True, "etag": token, "match_condition": MatchConditions.IfNotModified}

        async def upload(blob: Any) -> str:
            return (await blob.upload_blob(data, **condition))["etag"]

        try:
            return self._run(upload)
        except (ResourceExistsError, ResourceModifiedError):
            raise Refused() from None
        finally:
            self.fs.invalidate_cache(f"{self.container}/{self.key}")


def manifest_access(kind: str, fs: Any, bucket: str, key: str) -> Any:
    """The conditional read/publish for URL scheme `kind` (location.CONDITIONAL lists them)."""
    if kind == "s3":
        return S3Manifest(fs, bucket, key)
    if kind in ("gs", "gcs"):
        return GCSManifest(fs, bucket, key)
    if kind == "az":
        return AzureManifest(fs, bucket, key)
    raise ValueError(f"{kind}:// has no conditional manifest publish")
