"""A real S3 API for the storage tests: moto in server mode on 127.0.0.1, on a free port.

Clients (s3fs, boto3) reach it over HTTP exactly as they reach AWS; the tests point them at it with
``AWS_ENDPOINT_URL``, the variable botocore and s3fs read for any S3-compatible store (MinIO, moto).
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "moeforge-test",
    "AWS_SECRET_ACCESS_KEY": "moeforge-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_bucket_ids = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class S3:
    """One test's view of the server: its ``endpoint`` URL and a fresh, empty ``bucket``."""

    endpoint: str
    bucket: str

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def client(self, *, raw: bool = False):
        """boto3, the second client beside s3fs. ``raw``: do not check the response checksums moto echoes
        from the upload request (to read back bytes that were damaged on the way in)."""
        import boto3
        from botocore.config import Config

        config = Config(response_checksum_validation="when_required") if raw else None
        return boto3.client("s3", endpoint_url=self.endpoint, config=config)


def point_clients_at(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send s3fs and boto3 to ``endpoint`` (a moto server or a proxy in front of it)."""
    import s3fs

    for k, v in _CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance keeps its old endpoint


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Start moto's server once per test process; stop it at the end."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A fresh bucket on the moto server, with the environment pointing s3fs and boto3 at it."""
    import s3fs

    point_clients_at(moto_endpoint, monkeypatch)
    bucket = f"moeforge-{os.getpid()}-{next(_bucket_ids)}"
    S3(moto_endpoint, bucket).client().create_bucket(Bucket=bucket)
    yield S3(moto_endpoint, bucket)
    s3fs.S3FileSystem.clear_instance_cache()
