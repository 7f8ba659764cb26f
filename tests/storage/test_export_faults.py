"""The export's promise under faults: a local file is deleted only when its remote copy is proven.

Each case puts a fault proxy (tests/fault_proxy.py) between s3fs and a real S3 API (moto server) and runs
`export_directory(..., delete_local=True)`. Whatever the fault — a 5xx, a connection cut mid-upload or
before the answer, a body truncated or with one byte flipped on the way in, a response cut short on the way
out — the invariant is checked against what moto really stores (read directly, not through the proxy):

* every local file that is gone has a remote copy byte-identical to it (files lost: 0);
* a failure is reported by file with a message, and then nothing local is deleted;
* the rerun without the fault completes, deletes the rest, and every remote copy matches.

docs/STORAGE.md counts the cases and faults injected.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fault_proxy import Fault, FaultProxy
from moeforge.storage.export import EXPORT_MANIFEST, export_directory
from moeforge.storage.objects import MIN_PART_SIZE
from s3_server import S3

pytestmark = pytest.mark.faults

PART = MIN_PART_SIZE


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer client retries than the defaults (botocore 5 attempts with backoff, s3fs 5 more around each),
    so that a persistent fault fails in seconds; a one-off fault is still retried."""
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)


def make_run(root: Path) -> dict[str, bytes]:
    """A run of 4 files (one multipart: 2 full parts + a tail); returns key → original bytes."""
    files = {
        "train/part-00000.jsonl.zst": b"shard-0 " * 3000,
        "train/part-00001.jsonl.zst": b"shard-1 " * 2000,
        "tokens.bin": os.urandom(2 * PART + 4321),
        "manifest.json": b'{"kind": "data-run"}\n',
    }
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return files


def remote(s3: S3, key: str) -> bytes | None:
    c = s3.client(raw=True)  # straight to moto, not through the proxy; what it holds, damaged or not
    try:
        return c.get_object(Bucket=s3.bucket, Key=f"run/{key}")["Body"].read()
    except c.exceptions.NoSuchKey:
        return None


def lost_files(s3: S3, run: Path, original: dict[str, bytes]) -> list[str]:
    """Local files that are gone without a byte-identical remote copy."""
    return [k for k, data in original.items() if not (run / k).exists() and remote(s3, k) != data]


# (name, faults, verify mode): each case's faults are injected into one export
CASES: list[tuple[str, list[Fault], str]] = [
    ("503 on every PUT of a shard", [Fault("status_503", "PUT", "part-00001", times=99)], "head"),
    ("500 on part 2 of the multipart upload", [Fault("status_500", "PUT", "partNumber=2", times=99)], "head"),
    (
        "connection dropped mid-body of part 1",
        [Fault("drop_request_body", "PUT", "partNumber=1", times=99)],
        "head",
    ),
    (
        "connection dropped before the answer to complete",
        [Fault("drop_response", "POST", "uploadId", times=99)],
        "head",
    ),
    ("one byte flipped in a shard's PUT", [Fault("corrupt_request", "PUT", "part-00000")], "head"),
    ("one byte flipped in part 2", [Fault("corrupt_request", "PUT", "partNumber=2")], "head"),
    ("a shard's PUT body truncated", [Fault("truncate_request", "PUT", "part-00001")], "head"),
    ("the read-back GET truncated", [Fault("truncate_response", "GET", "tokens.bin", times=99)], "read-back"),
    ("503 on every HEAD that verifies", [Fault("status_503", "HEAD", "part-00000", times=99)], "head"),
    ("500 on the export manifest's PUT", [Fault("status_500", "PUT", EXPORT_MANIFEST, times=99)], "head"),
    ("one 503 on the run manifest, retried", [Fault("status_503", "PUT", "/manifest.json")], "head"),
]


@pytest.mark.parametrize(("name", "faults", "verify"), CASES, ids=[c[0] for c in CASES])
def test_no_local_file_is_deleted_without_a_verified_remote_copy(
    fault_proxy: FaultProxy, s3: S3, tmp_path: Path, name: str, faults: list[Fault], verify: str
) -> None:
    run = tmp_path / "run"
    original = make_run(run)
    for f in faults:
        fault_proxy.add(f)
    first = export_directory(run, s3.url("run"), delete_local=True, verify=verify, part_size=PART)  # type: ignore[arg-type]
    assert fault_proxy.injected, f"{name}: the fault never fired"
    # one line per case for docs/STORAGE.md's table (pytest -s shows it)
    print(f"FAULTCASE | {name} | {len(fault_proxy.injected)} | {first.complete} | {sorted(first.failed)}")
    assert lost_files(s3, run, original) == []
    if first.complete:  # the client's own retries absorbed the fault; then all went, all verified
        assert sorted(first.deleted) == sorted(original)
    else:
        assert first.failed and all(msg for msg in first.failed.values())
        assert first.deleted == [] and all((run / k).exists() for k in original)
    fault_proxy.clear()
    second = export_directory(run, s3.url("run"), delete_local=True, verify=verify, part_size=PART)  # type: ignore[arg-type]
    assert second.complete and not second.failed
    assert all(not (run / k).exists() for k in original)
    assert {k: remote(s3, k) for k in original} == original
    assert remote(s3, EXPORT_MANIFEST) is not None


def test_corruption_is_caught_by_the_servers_digest_and_named(
    fault_proxy: FaultProxy, s3: S3, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    original = make_run(run)
    fault_proxy.add(Fault("corrupt_request", "PUT", "part-00000"))
    s = export_directory(run, s3.url("run"), delete_local=True, part_size=PART)
    msg = s.failed["train/part-00000.jsonl.zst"]
    assert "ETag" in msg and "altered in transit" in msg
    stored = remote(s3, "train/part-00000.jsonl.zst")  # moto kept the damaged bytes: only the ETag tells
    assert stored is not None and stored != original["train/part-00000.jsonl.zst"]
    assert (
        hashlib.sha256(stored).hexdigest()
        != hashlib.sha256(original["train/part-00000.jsonl.zst"]).hexdigest()
    )


def test_the_cli_says_what_failed_and_that_nothing_was_deleted(
    fault_proxy: FaultProxy, s3: S3, tmp_path: Path
) -> None:
    from moeforge.cli.main import app

    run = tmp_path / "run"
    make_run(run)
    fault_proxy.add(Fault("status_500", "PUT", "part-00001", times=99))
    r = CliRunner().invoke(
        app, ["data", "export", str(run), s3.url("run"), "--delete-local", "--part-size", "5"]
    )
    assert r.exit_code == 1, r.output
    assert "failed train/part-00001.jsonl.zst" in r.output
    assert "export incomplete" in r.output and "no local file was deleted" in r.output
    assert "Traceback" not in r.output
    fault_proxy.clear()
    r = CliRunner().invoke(
        app, ["data", "export", str(run), s3.url("run"), "--delete-local", "--part-size", "5"]
    )
    assert r.exit_code == 0, r.output
    assert "export complete" in r.output
