"""S3 multipart uploads that keep the network busy: PARTS_IN_FLIGHT parts are on their way at once
(on fsspec's event loop) while the calling thread reads and hashes the next one, so the hashing an
upload's checks need costs no wall time (hashlib releases the GIL on large buffers). Memory held
is at most one part size times PARTS_IN_FLIGHT. An upload that fails or is refused is aborted: S3
shows nothing of it."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from typing import Any, BinaryIO, Callable, Optional

from runner.snapshot.conditional import s3_call

PART = 50 * 2**20  # bytes per part (s3fs's default chunk)
PARTS_IN_FLIGHT = 4  # parts sent at once (s3fs sends up to 10)


def submit(fs: Any, method: str, **kwargs: Any) -> concurrent.futures.Future:
    """Start one S3 call on fsspec's event loop; its response through the future."""
    return asyncio.run_coroutine_threadsafe(fs._call_s3(method, **kwargs), fs.loop)


def send_in_parts(
    fs: Any,
    bucket: str,
    key: str,
    f: BinaryIO,
    part_size: int,
    *,
    headers: Optional[Callable[[bytes], dict]] = None,
    inspect: Optional[Callable[[bytes], None]] = None,
    before_complete: Optional[Callable[[], None]] = None,
    **create: Any,
) -> str:
    """The rest of `f` uploaded as `key` in parts of `part_size`; the completed object's ETag.
    `headers(part)` runs before a part is sent (checksums the server checks), `inspect(part)` while
    it is being sent; `before_complete()` may raise to abort the upload."""
    upload = s3_call(fs, "create_multipart_upload", Bucket=bucket, Key=key, **create)["UploadId"]
    in_flight: deque[tuple[dict, concurrent.futures.Future]] = deque()
    parts: list[dict] = []

    def settle_oldest() -> None:
        part, future = in_flight[0]  # left in the window until done: an abort cancels and waits for it
        parts.append({**part, "ETag": future.result()["ETag"]})
        in_flight.popleft()

    try:
        while True:
            while len(in_flight) >= PARTS_IN_FLIGHT:
                settle_oldest()
            data = f.read(part_size)
            if not data:
                break
            part = {"PartNumber": len(parts) + len(in_flight) + 1, **(headers(data) if headers else {})}
            in_flight.append(
                (part, submit(fs, "upload_part", Bucket=bucket, Key=key, UploadId=upload, Body=data, **part))
            )
            if inspect is not None:
                inspect(data)
            del data
        while in_flight:
            settle_oldest()
        if not parts:
            raise ValueError(f"nothing left to upload as {key} in parts")
        if before_complete is not None:
            before_complete()
        done = s3_call(
            fs, "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )
        return done["ETag"]
    except BaseException:
        for _, future in in_flight:
            future.cancel()
        concurrent.futures.wait([future for _, future in in_flight])
        try:
            s3_call(fs, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
        except Exception:  # a store that is down keeps the parts until its lifecycle rule drops them
            pass
        raise
