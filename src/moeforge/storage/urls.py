"""Where a location lives: a local directory or an fsspec URL, and the filesystem that reaches it.

Every location moeforge reads or writes outside a run directory goes through here, so one rule decides
what is remote and one place turns ``s3://bucket/prefix`` into a filesystem plus a path on it.

Credentials and endpoints are the backends' own: for S3, s3fs reads the standard AWS variables and files
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for MinIO or any S3-compatible store);
for ``gs://``, gcsfs reads Google's application-default credentials. Nothing here stores a secret.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["Location", "StorageError", "is_remote", "join", "locate", "storage_errors"]


class StorageError(OSError):
    """A storage operation that cannot go on; the message names the location and what to do."""


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn the clients' own exception types (botocore's NoCredentialsError, EndpointConnectionError, …,
    which are neither OSError nor ValueError) into a StorageError naming ``what`` failed."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise
    except Exception as exc:
        hint = ""
        if "Credentials" in exc.__class__.__name__:
            hint = "; set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (docs/STORAGE.md)"
        raise StorageError(f"{what}: {exc.__class__.__name__}: {exc}{hint}") from exc


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URL with a scheme other than ``file://`` (``s3://``, ``gs://``, ``https://``, ``memory://``)."""
    s = os.fspath(location)
    return "://" in s and not s.startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base`` and relative keys joined with ``/`` (never the OS separator: keys are URL paths)."""
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


_EXTRA = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "abfs", "abfs": "abfs"}


@dataclass(frozen=True)
class Location:
    """A parsed location: ``protocol`` (``file`` for local), ``path`` as the filesystem wants it (for S3
    ``bucket/prefix``, no scheme), and the original ``url``."""

    url: str
    protocol: str
    path: str

    @property
    def remote(self) -> bool:
        return self.protocol != "file"

    @property
    def is_s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    def filesystem(self) -> Any:
        """The fsspec filesystem for this location (created per call; fsspec caches instances)."""
        try:
            import fsspec
        except ImportError as exc:  # a core dependency; only a broken install lands here
            raise StorageError("fsspec is not installed: pip install moeforge") from exc
        try:
            return fsspec.filesystem(self.protocol)
        except (ImportError, ValueError) as exc:
            extra = _EXTRA.get(self.protocol)
            hint = (
                f"pip install 'moeforge[{extra}]'"
                if extra == "s3"
                else "install the fsspec backend for it (gcsfs for gs://, adlfs for az://)"
            )
            raise StorageError(f"{self.url}: no filesystem for {self.protocol}:// ({exc}); {hint}") from exc

    def child(self, key: str) -> str:
        """The URL (or local path) of ``key`` under this location."""
        return join(self.url, key) if self.remote else os.path.join(self.path, *key.split("/"))

    def child_path(self, key: str) -> str:
        """``key``'s path on :meth:`filesystem` (no scheme)."""
        return join(self.path, key) if self.remote else os.path.join(self.path, *key.split("/"))


def locate(location: str | os.PathLike[str]) -> Location:
    """Parse a local path, ``file://`` URL or fsspec URL. Raises StorageError for an empty bucket name."""
    s = os.fspath(location)
    if not is_remote(s):
        return Location(s, "file", os.path.abspath(s.removeprefix("file://")))
    protocol, _, rest = s.partition("://")
    protocol = protocol.lower()
    rest = rest.strip("/")
    if protocol in ("s3", "s3a", "gs", "gcs") and not rest.split("/", 1)[0]:
        raise StorageError(f"{s}: no bucket name; write {protocol}://BUCKET/PREFIX")
    if protocol not in ("http", "https"):
        rest = "/".join(p for p in rest.split("/") if p)  # s3://b//runs is s3://b/runs, as S3 keys are
    path = rest if protocol not in ("http", "https") else s
    return Location(s.rstrip("/"), protocol, path)
