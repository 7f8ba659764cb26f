"""Reading an export back: refused when incomplete, unsafe or unreadable, with a message, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeforge.storage.export import EXPORT_MANIFEST
from moeforge.storage.fetch import fetch_export
from moeforge.storage.urls import StorageError
from s3_server import S3


def _manifest(s3: S3, files: list[dict[str, object]]) -> None:
    doc = {"kind": "moeforge-export", "version": 1, "files": files}
    s3.client().put_object(Bucket=s3.bucket, Key=f"x/{EXPORT_MANIFEST}", Body=json.dumps(doc).encode())


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "", ".fetched.json", ".lock"])
def test_unsafe_or_reserved_keys_are_refused(s3: S3, tmp_path: Path, key: str) -> None:
    _manifest(s3, [{"key": key, "size": 1, "sha256": "0" * 64}])
    with pytest.raises(StorageError, match="unsafe key"):
        fetch_export(s3.url("x"), tmp_path)


def test_a_manifest_that_is_not_an_object_is_refused(s3: S3, tmp_path: Path) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key=f"x/{EXPORT_MANIFEST}", Body=b"[1, 2]")
    with pytest.raises(StorageError, match="not a moeforge export manifest"):
        fetch_export(s3.url("x"), tmp_path)


def test_a_missing_object_is_named(s3: S3, tmp_path: Path) -> None:
    _manifest(s3, [{"key": "data/a.bin", "size": 1, "sha256": "0" * 64}])
    with pytest.raises(StorageError, match=r"data/a\.bin.*missing from the store"):
        fetch_export(s3.url("x"), tmp_path)


def test_missing_credentials_are_a_storage_error(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError) as err:
        fetch_export(s3.url("x"), tmp_path)
    assert "Credentials" in str(err.value) or "no export-manifest.json" in str(err.value)


def test_a_second_fetcher_waits_for_the_first_instead_of_failing(s3: S3, tmp_path: Path) -> None:
    """The other ranks of a training job on one node wait for local rank 0's fetch (train/build.py)."""
    import threading

    from moeforge.io import DirectoryLock, DirectoryLockedError

    _manifest(s3, [])
    url = s3.url("x")
    first = fetch_export(url, tmp_path)  # where the copy lives
    held = DirectoryLock(first, "a fetch in another process")
    with pytest.raises(DirectoryLockedError):
        fetch_export(url, tmp_path)  # no wait: fails at once
    threading.Timer(0.5, held.release).start()
    assert fetch_export(url, tmp_path, wait=10.0) == first
