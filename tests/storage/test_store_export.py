"""`export_directory` against a real S3 API (moto server): what goes up, what is proven, what is deleted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moeforge.storage.export import EXPORT_MANIFEST, export_directory, local_files
from moeforge.storage.objects import MIN_PART_SIZE, digest_file
from moeforge.storage.urls import StorageError
from s3_server import S3

PART = MIN_PART_SIZE


def make_run(root: Path, big: int = 2 * PART + 123) -> Path:
    """A directory shaped like a data run: shards, a quarantine, a big file (multipart), its manifest."""
    (root / "train").mkdir(parents=True)
    (root / "quarantine").mkdir()
    (root / "train" / "part-00000.jsonl.zst").write_bytes(b"shard-0 " * 1000)
    (root / "train" / "part-00001.jsonl.zst").write_bytes(b"shard-1 " * 700)
    (root / "quarantine" / "bad.jsonl").write_bytes(b"")
    (root / "tokens.bin").write_bytes(os.urandom(big))
    (root / "manifest.json").write_text('{"kind": "data-run"}\n')
    (root / ".manifest.json.abc.tmp").write_text("half-written")  # an atomic write's temp: not exported
    return root


def remote_keys(s3: S3, prefix: str) -> list[str]:
    r = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in r.get("Contents", []))


def test_local_files_are_sorted_with_the_manifest_last_and_temps_left_out(tmp_path: Path) -> None:
    keys = [k for k, _ in local_files(make_run(tmp_path / "run"))]
    assert keys == [
        "quarantine/bad.jsonl",
        "tokens.bin",
        "train/part-00000.jsonl.zst",
        "train/part-00001.jsonl.zst",
        "manifest.json",
    ]


def test_digest_gives_the_etag_s3_computes(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    export_directory(run, s3.url("run"), part_size=PART)
    c = s3.client()
    for key in ("tokens.bin", "train/part-00000.jsonl.zst"):
        head = c.head_object(Bucket=s3.bucket, Key=f"run/{key}")
        local = digest_file(run / key, key, PART)
        assert head["ETag"].strip('"') == local.etag
        assert head["Metadata"]["sha256"] == local.sha256
    assert digest_file(run / "tokens.bin", "t", PART).etag.endswith("-3")


def test_export_uploads_everything_and_writes_the_manifest_last(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    s = export_directory(run, s3.url("exp/run"), part_size=PART)
    assert s.complete and not s.failed
    assert s.uploaded == [k for k, _ in local_files(run)] == s.verified
    assert remote_keys(s3, "exp/run/") == sorted(f"exp/run/{k}" for k in [*s.uploaded, EXPORT_MANIFEST])
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"exp/run/{EXPORT_MANIFEST}")["Body"].read()
    doc = json.loads(body)
    assert doc["kind"] == "moeforge-export"
    assert {f["key"]: f["sha256"] for f in doc["files"]} == {
        k: digest_file(p, k, PART).sha256 for k, p in local_files(run)
    }
    assert s.deleted == [] and set(s.kept) == set(s.uploaded)  # no --delete-local: everything stays
    assert all(p.exists() for _, p in local_files(run))


def test_rerun_skips_verified_objects_and_redoes_a_changed_one(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    export_directory(run, s3.url("run"), part_size=PART)
    again = export_directory(run, s3.url("run"), part_size=PART)
    assert again.complete and again.uploaded == [] and len(again.skipped) == 5
    # someone overwrites a remote object with other bytes of the same size: the ETag gives it away
    c = s3.client()
    c.put_object(
        Bucket=s3.bucket,
        Key="run/train/part-00001.jsonl.zst",
        Body=b"SHARD-1 " * 700,
        Metadata={"sha256": digest_file(run / "train/part-00001.jsonl.zst", "k", PART).sha256},
    )
    third = export_directory(run, s3.url("run"), part_size=PART)
    assert third.uploaded == ["train/part-00001.jsonl.zst"] and third.complete


def test_delete_local_removes_only_after_the_export_completes(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    s = export_directory(run, s3.url("run"), part_size=PART, delete_local=True, verify="read-back")
    assert s.complete
    assert sorted(s.deleted) == sorted(s.uploaded) and s.read_back == s.verified
    assert list(local_files(run)) == []
    # the rerun finds nothing local, keeps the previous manifest's entries and is complete
    again = export_directory(run, s3.url("run"), part_size=PART, delete_local=True)
    assert again.complete and again.uploaded == [] and len(again.skipped) == 5


def test_an_interrupted_deletion_is_finished_by_the_rerun(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    export_directory(run, s3.url("run"), part_size=PART)
    (run / "tokens.bin").unlink()  # as if the earlier run had deleted this one before it was killed
    s = export_directory(run, s3.url("run"), part_size=PART, delete_local=True)
    assert s.complete and "tokens.bin" in s.skipped
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"run/{EXPORT_MANIFEST}")["Body"].read()
    assert "tokens.bin" in {f["key"] for f in json.loads(body)["files"]}


def test_a_leftover_multipart_upload_is_aborted_and_redone(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    c = s3.client()
    up = c.create_multipart_upload(Bucket=s3.bucket, Key="run/tokens.bin")
    c.upload_part(
        Bucket=s3.bucket, Key="run/tokens.bin", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * PART
    )
    s = export_directory(run, s3.url("run"), part_size=PART)
    assert s.complete and s.aborted_uploads == 1
    assert c.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_export_to_a_local_directory_is_verified_by_reading_back(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", big=1000)
    dest = tmp_path / "copy"
    s = export_directory(run, str(dest), delete_local=True)
    assert s.complete and s.read_back == s.verified and len(s.deleted) == 5
    assert (dest / "train" / "part-00000.jsonl.zst").read_bytes() == b"shard-0 " * 1000
    assert json.loads((dest / EXPORT_MANIFEST).read_text())["bytes"] == 8000 + 5600 + 1000 + 21


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such directory"):
        export_directory(tmp_path / "nope", str(tmp_path / "d"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="nothing to export"):
        export_directory(tmp_path / "empty", str(tmp_path / "d"))
    with pytest.raises(StorageError, match="minimum"):
        export_directory(make_run(tmp_path / "r"), "s3://bucket/x", part_size=1024)


def test_a_local_destination_overlapping_the_source_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", big=10)
    for dest in (run, run / "backup", tmp_path):
        with pytest.raises(StorageError, match="overlaps the source"):
            export_directory(run, str(dest), delete_local=True)
    assert len(list(local_files(run))) == 5


def test_the_exports_own_files_in_the_source_are_never_uploaded_as_data(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", big=10)
    (run / EXPORT_MANIFEST).write_text('{"kind": "moeforge-export", "files": []}')  # copied back from a store
    (run / ".fetched.json").write_text("{}")  # a fetch cache's state
    s = export_directory(run, s3.url("run"), delete_local=True)
    assert s.complete and EXPORT_MANIFEST not in s.uploaded and ".fetched.json" not in s.uploaded
    assert (run / EXPORT_MANIFEST).exists()  # not ours to delete: it was not exported
    doc = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=f"run/{EXPORT_MANIFEST}")["Body"].read())
    assert EXPORT_MANIFEST not in {f["key"] for f in doc["files"]}


def test_an_earlier_different_export_is_not_overwritten_without_asking(s3: S3, tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", big=10)
    export_directory(a, s3.url("p"))
    b = make_run(tmp_path / "b", big=20)  # another run: tokens.bin differs
    with pytest.raises(StorageError, match=r"earlier export whose files differ.*--overwrite"):
        export_directory(b, s3.url("p"), delete_local=True)
    assert remote_keys(s3, "p/tokens.bin") and len(list(local_files(b))) == 5  # nothing touched
    s = export_directory(b, s3.url("p"), overwrite=True)
    assert s.complete and s.uploaded == ["tokens.bin"]


def test_a_file_changed_after_its_upload_is_kept(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", big=10)
    first = run / "quarantine" / "bad.jsonl"

    def touch(key: str, _size: int) -> None:
        if key == "manifest.json":  # the last file: the first one has long been uploaded and verified
            first.write_bytes(b"a late write\n")

    s = export_directory(run, s3.url("run"), delete_local=True, on_file=touch)
    assert s.complete and "quarantine/bad.jsonl" not in s.deleted
    assert "changed since" in s.kept["quarantine/bad.jsonl"] and first.read_bytes() == b"a late write\n"


def test_read_back_decides_when_the_etag_cannot(s3: S3, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    export_directory(run, s3.url("run"), part_size=PART)  # tokens.bin went up in 3 parts
    # another part size gives another ETag for the same bytes: a HEAD cannot prove them, the bytes can
    head = export_directory(run, s3.url("run"), part_size=4 * PART)
    assert head.uploaded == ["tokens.bin"]
    export_directory(run, s3.url("run"), part_size=PART)
    back = export_directory(run, s3.url("run"), part_size=4 * PART, verify="read-back")
    assert back.uploaded == [] and back.complete


def test_symlinked_directories_are_reported_not_silently_skipped(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", big=10)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("x")
    (run / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    s = export_directory(run, str(tmp_path / "copy"))
    assert s.complete and "linked" in s.not_exported and (tmp_path / "elsewhere" / "x.txt").exists()
