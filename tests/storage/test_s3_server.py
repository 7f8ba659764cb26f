"""The moto fixture itself: a real S3 API both clients reach, one bucket per test."""

from __future__ import annotations

from s3_server import S3


def test_s3fs_and_boto3_see_the_same_bucket(s3: S3) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3.bucket}/a/b.txt", b"hello")
    body = s3.client().get_object(Bucket=s3.bucket, Key="a/b.txt")["Body"].read()
    assert body == b"hello"


def test_each_test_gets_an_empty_bucket(s3: S3) -> None:
    assert s3.client().list_objects_v2(Bucket=s3.bucket).get("KeyCount") == 0
