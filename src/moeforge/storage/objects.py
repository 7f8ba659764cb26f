"""Objects in a store: what a remote copy is, how a local file is uploaded, and how its content is checked.

Two stores. ``S3Store`` talks the S3 API through s3fs's client (AWS, MinIO, moto, GCS's S3-compatible
endpoint): single PUTs up to the part size and multipart uploads above it, the file's sha256 in the object's
metadata, and an ETag the *server* computes from the bytes it received (the MD5 of the body, or for a
multipart object the MD5 of the parts' MD5s with ``-N``). Comparing that ETag with the one computed from
the local file is what lets a HEAD prove content: a byte corrupted on the wire changes the server's ETag,
while the metadata sha256 is only the uploader's claim. ``FsspecStore`` covers every other fsspec
filesystem (``file://``, ``gs://`` through gcsfs, ``memory://``); they have no such attested digest, so
their copies are verified by reading the bytes back.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from moeforge.storage.urls import Location, StorageError, locate

__all__ = [
    "DEFAULT_PART_SIZE",
    "MIN_PART_SIZE",
    "FsspecStore",
    "LocalFile",
    "ObjectStore",
    "RemoteObject",
    "S3Store",
    "digest_file",
    "open_store",
]

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest part (all but the last)
DEFAULT_PART_SIZE = 16 * 1024 * 1024
_READ = 1024 * 1024
SHA256_META = "sha256"  # x-amz-meta-sha256: the file's sha256, hex
PART_SIZE_META = "moeforge-part-size"

Progress = Callable[[int], None]


def _noop(_: int) -> None:
    return None


@dataclass(frozen=True)
class LocalFile:
    """A file to export: its ``key`` under the destination, ``sha256`` (hex) and the ``etag`` S3 computes
    for it when uploaded in parts of ``part_size`` (one part at or below it)."""

    key: str
    path: str
    size: int
    sha256: str
    etag: str
    part_size: int


def digest_file(path: str | os.PathLike[str], key: str, part_size: int = DEFAULT_PART_SIZE) -> LocalFile:
    """One streamed pass over the file: its sha256 and the ETag an S3 upload in ``part_size`` parts gets."""
    sha = hashlib.sha256()
    whole = hashlib.md5(usedforsecurity=False)
    part_md5s: list[bytes] = []
    part = hashlib.md5(usedforsecurity=False)
    in_part = size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(min(_READ, part_size - in_part)):
            sha.update(chunk)
            whole.update(chunk)
            part.update(chunk)
            size += len(chunk)
            in_part += len(chunk)
            if in_part == part_size:
                part_md5s.append(part.digest())
                part, in_part = hashlib.md5(usedforsecurity=False), 0
    if in_part or not part_md5s:
        part_md5s.append(part.digest())
    if size <= part_size:
        etag = whole.hexdigest()
    else:
        etag = f"{hashlib.md5(b''.join(part_md5s), usedforsecurity=False).hexdigest()}-{len(part_md5s)}"
    return LocalFile(key, os.fspath(path), size, sha.hexdigest(), etag, part_size)


@dataclass(frozen=True)
class RemoteObject:
    """What a HEAD tells: ``size``, ``etag`` (quotes stripped), the ``sha256`` metadata when present, and
    whether the ETag is an MD5 the server computed from the bytes (False for SSE-KMS/SSE-C objects, whose
    ETag is not a digest of the content, and for stores without ETags)."""

    key: str
    size: int
    etag: str | None
    sha256: str | None
    etag_is_md5: bool


class ObjectStore(Protocol):
    location: Location
    attests_content: bool  # a HEAD proves the bytes (server-computed MD5 ETag)

    def head(self, key: str) -> RemoteObject | None: ...
    def upload(self, local: LocalFile, progress: Progress = _noop) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def read_back(self, key: str, progress: Progress = _noop, out: Any = None) -> tuple[int, str]: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def abort_incomplete(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...


def _copy_hashing(fh: Any, out: Any, progress: Progress) -> tuple[int, str]:
    """Copy ``fh`` to ``out`` (None: just read) through sha256: (bytes, hex digest)."""
    sha, n = hashlib.sha256(), 0
    while chunk := fh.read(_READ):
        sha.update(chunk)
        if out is not None:
            out.write(chunk)
        n += len(chunk)
        progress(len(chunk))
    return n, sha.hexdigest()


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class S3Store:
    """An ``s3://bucket/prefix`` destination, driven through s3fs's aiobotocore client (``call_s3``), so
    credentials, endpoint (``AWS_ENDPOINT_URL``) and retries are s3fs's and botocore's own."""

    attests_content = True

    def __init__(self, location: Location, part_size: int = DEFAULT_PART_SIZE) -> None:
        if part_size < MIN_PART_SIZE:
            raise StorageError(
                f"part size {part_size} is below S3's minimum of {MIN_PART_SIZE} bytes (5 MiB)"
            )
        self.location = location
        self.part_size = part_size
        self.fs = location.filesystem()
        self.bucket, _, self.prefix = location.path.partition("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix.rstrip('/')}/{key}" if self.prefix else key

    def head(self, key: str) -> RemoteObject | None:
        try:
            r = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return None
        etag = (r.get("ETag") or "").strip('"') or None
        encrypted = (
            str(r.get("ServerSideEncryption", "")).startswith("aws:kms") or "SSECustomerAlgorithm" in r
        )
        meta = {k.lower(): v for k, v in (r.get("Metadata") or {}).items()}
        return RemoteObject(key, int(r["ContentLength"]), etag, meta.get(SHA256_META), not encrypted)

    def upload(self, local: LocalFile, progress: Progress = _noop) -> None:
        meta = {SHA256_META: local.sha256, PART_SIZE_META: str(local.part_size)}
        key = self._key(local.key)
        if local.size <= local.part_size:
            with open(local.path, "rb") as fh:
                body = fh.read()
            self.fs.call_s3(
                "put_object",
                Bucket=self.bucket,
                Key=key,
                Body=body,
                Metadata=meta,
                ContentMD5=_b64(hashlib.md5(body, usedforsecurity=False).digest()),
            )
            progress(len(body))
            return
        mpu = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=key, Metadata=meta)
        upload_id = mpu["UploadId"]
        try:
            parts = []
            with open(local.path, "rb") as fh:
                number = 1
                while body := fh.read(local.part_size):
                    r = self.fs.call_s3(
                        "upload_part",
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                        ContentMD5=_b64(hashlib.md5(body, usedforsecurity=False).digest()),
                    )
                    parts.append({"PartNumber": number, "ETag": r["ETag"]})
                    progress(len(body))
                    number += 1
            self.fs.call_s3(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the store may be unreachable; a rerun aborts leftovers (abort_incomplete)
            log.warning("could not abort multipart upload %s of %s: %s", upload_id, key, exc)

    def abort_incomplete(self, key: str) -> int:
        """Abort multipart uploads of ``key`` left by an interrupted export (they cost storage and are
        never an object); returns how many."""
        full = self._key(key)
        r = self.fs.call_s3("list_multipart_uploads", Bucket=self.bucket, Prefix=full)
        stale = [u for u in r.get("Uploads", []) if u.get("Key") == full]
        for u in stale:
            self._abort(full, u["UploadId"])
        return len(stale)

    def delete(self, key: str) -> None:
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.fs.call_s3(
            "put_object",
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            Metadata={SHA256_META: hashlib.sha256(data).hexdigest()},
            ContentMD5=_b64(hashlib.md5(data, usedforsecurity=False).digest()),
        )

    def read_back(self, key: str, progress: Progress = _noop, out: Any = None) -> tuple[int, str]:
        """Stream the object's bytes through sha256 (and into ``out`` when given): (bytes, hex digest)."""
        with self.fs.open(f"{self.bucket}/{self._key(key)}", "rb", cache_type="none") as fh:
            return _copy_hashing(fh, out, progress)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(f"{self.bucket}/{self._key(key)}"))
        except FileNotFoundError:
            return None


class FsspecStore:
    """Any other fsspec filesystem. No server-side digest, so nothing is taken as verified without a
    read-back; files are written under a temporary name and moved into place where the filesystem can."""

    attests_content = False

    def __init__(self, location: Location) -> None:
        self.location = location
        self.fs = location.filesystem()

    def _path(self, key: str) -> str:
        return self.location.child_path(key)

    def head(self, key: str) -> RemoteObject | None:
        try:
            info: dict[str, Any] = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return RemoteObject(key, int(info.get("size") or 0), None, None, False)

    def upload(self, local: LocalFile, progress: Progress = _noop) -> None:
        target = self._path(local.key)
        self.fs.makedirs(self.fs._parent(target), exist_ok=True)
        tmp = f"{target}.moeforge-partial"
        self.fs.put_file(local.path, tmp)
        self.fs.mv(tmp, target)
        progress(local.size)

    def delete(self, key: str) -> None:
        if self.fs.exists(self._path(key)):
            self.fs.rm(self._path(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        self.fs.makedirs(self.fs._parent(target), exist_ok=True)
        tmp = f"{target}.moeforge-partial"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, target)

    def read_back(self, key: str, progress: Progress = _noop, out: Any = None) -> tuple[int, str]:
        with self.fs.open(self._path(key), "rb") as fh:
            return _copy_hashing(fh, out, progress)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return None

    def abort_incomplete(self, key: str) -> int:
        tmp = f"{self._path(key)}.moeforge-partial"
        if self.fs.exists(tmp):
            self.fs.rm(tmp)
            return 1
        return 0


def open_store(url: str, part_size: int = DEFAULT_PART_SIZE) -> ObjectStore:
    """The store behind ``url``: S3's API for ``s3://``, fsspec's filesystem for anything else."""
    loc = locate(url)
    if loc.is_s3:
        return S3Store(loc, part_size)
    return FsspecStore(loc)
