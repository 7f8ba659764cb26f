"""The fault proxy itself: byte-exact pass-through, and what each injected fault does to s3fs and boto3.

The storage code's retry and verification logic will be tested through this proxy, so these tests pin down
two things first: that the proxy is transparent when no rule matches (multipart uploads, keep-alive,
``Expect: 100-continue``, chunked and ``aws-chunked`` bodies), and how each fault shows up in the two clients
at their pinned versions: which ones botocore, aiobotocore, aiohttp or s3fs retry on their own, which raise
and as what, and which ones succeed *silently* with damaged data stored (the case that needs verification).

Retries are made deterministic by building clients with an explicit attempt budget (``standard`` retry
mode, ``total_max_attempts``; s3fs's own ``retries`` loop on top); the default clients are used where the
point is "the default client recovers on its own". The ``fast_retries`` fixture (autouse here) removes
botocore's jittered backoff sleeps, which would otherwise cost up to seconds per retried fault.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
from typing import Any

import boto3
import botocore.exceptions
import pytest
import s3fs
from botocore.config import Config

from fault_proxy import (
    Fault,
    FaultProxy,
    aws_chunk_spans,
    corrupt_payload,
    fast_retries,  # noqa: F401  (a fixture; ``fault_proxy`` itself is registered in conftest.py)
    truncate_payload,
)
from s3_server import S3

pytestmark = pytest.mark.usefixtures("fast_retries")

MiB = 1 << 20
# a connection cut while the client is still sending surfaces as one or the other, depending on whether the
# client was writing the body (broken pipe: EndpointConnectionError) or already waiting for the answer
# (reset / EOF: ConnectionClosedError) when the close arrived: a race the test cannot pin down
CUT_WHILE_SENDING = (botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)
DATA = bytes(range(256)) * 4096  # 1 MiB, every byte value, so a flipped or missing byte always shows


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def client(attempts: int | None = None) -> Any:
    """boto3 through the proxy (AWS_ENDPOINT_URL); ``attempts`` = total tries, None = botocore's default."""
    config = Config(retries={"total_max_attempts": attempts, "mode": "standard"}) if attempts else None
    return boto3.client("s3", config=config)


def filesystem(attempts: int | None = None) -> s3fs.S3FileSystem:
    """s3fs through the proxy. ``attempts`` caps both aiobotocore's retries and s3fs's own retry loop
    (``S3FileSystem.retries``, not a constructor argument); None keeps both defaults."""
    if attempts is None:
        return s3fs.S3FileSystem(skip_instance_cache=True)
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,
        config_kwargs={"retries": {"total_max_attempts": attempts, "mode": "standard"}},
    )
    fs.retries = attempts
    return fs


def direct(s3: S3) -> Any:
    """boto3 straight to moto, with response checksum validation off: reads back what moto really stored,
    even when the stored checksum no longer matches it."""
    return boto3.client(
        "s3", endpoint_url=s3.endpoint, config=Config(response_checksum_validation="when_required")
    )


def stored(s3: S3, key: str) -> bytes:
    return direct(s3).get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def put(kind: str, s3: S3, key: str, data: bytes, attempts: int | None = None) -> None:
    if kind == "boto3":
        client(attempts).put_object(Bucket=s3.bucket, Key=key, Body=data)
    else:
        filesystem(attempts).pipe(f"{s3.bucket}/{key}", data)


# ---- pass-through -----------------------------------------------------------------------------------------


def test_boto3_multipart_small_put_list_head_get_pass_through_byte_exact(
    fault_proxy: FaultProxy, s3: S3
) -> None:
    c = client()
    parts = [b"\x01" * 5 * MiB, bytes(range(256)) * (5 * MiB // 256), b"tail of the object"]
    upload = c.create_multipart_upload(Bucket=s3.bucket, Key="data/big")["UploadId"]
    etags = [
        c.upload_part(Bucket=s3.bucket, Key="data/big", UploadId=upload, PartNumber=n, Body=p)["ETag"]
        for n, p in enumerate(parts, 1)
    ]
    c.complete_multipart_upload(
        Bucket=s3.bucket,
        Key="data/big",
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )
    c.put_object(Bucket=s3.bucket, Key="data/small", Body=b"hello")

    whole = b"".join(parts)
    assert [o["Key"] for o in c.list_objects_v2(Bucket=s3.bucket)["Contents"]] == ["data/big", "data/small"]
    assert c.head_object(Bucket=s3.bucket, Key="data/big")["ContentLength"] == len(whole)
    assert c.get_object(Bucket=s3.bucket, Key="data/big")["Body"].read() == whole
    assert c.get_object(Bucket=s3.bucket, Key="data/small")["Body"].read() == b"hello"
    assert stored(s3, "data/big") == whole and stored(s3, "data/small") == b"hello"
    assert [e.strip('"') for e in etags] == [md5(p) for p in parts]  # moto's part ETags: what it received

    assert fault_proxy.injected == [] and fault_proxy.errors == []
    puts = [r for r in fault_proxy.seen if r.method == "PUT"]
    assert len(puts) == 4
    # what botocore sends over plain http: Expect on every PUT, a CRC32 header checksum, no chunking
    for r in puts:
        assert r.header("Expect") == "100-continue"
        assert r.header("x-amz-checksum-crc32") is not None
        assert r.header("Transfer-Encoding") is None and r.header("Content-Encoding") is None


def test_s3fs_multipart_small_put_list_info_cat_pass_through_byte_exact(
    fault_proxy: FaultProxy, s3: S3
) -> None:
    fs = filesystem()
    parts = [b"\x02" * 5 * MiB, bytes(range(255, -1, -1)) * (5 * MiB // 256), b"small last part"]
    with fs.open(f"{s3.bucket}/data/big", "wb", block_size=5 * MiB) as f:
        for p in parts:
            f.write(p)
    fs.pipe(f"{s3.bucket}/data/small", b"hello")

    whole = b"".join(parts)
    assert fs.ls(f"{s3.bucket}/data", detail=False) == [f"{s3.bucket}/data/big", f"{s3.bucket}/data/small"]
    assert fs.info(f"{s3.bucket}/data/big")["size"] == len(whole)
    assert fs.cat(f"{s3.bucket}/data/big") == whole
    assert stored(s3, "data/big") == whole and stored(s3, "data/small") == b"hello"

    assert fault_proxy.injected == [] and fault_proxy.errors == []
    targets = [(r.method, r.target) for r in fault_proxy.seen]
    assert ("POST", f"/{s3.bucket}/data/big?uploads") in targets
    assert sum(1 for m, t in targets if m == "PUT" and "partNumber=" in t) == 3
    assert all(r.header("Expect") == "100-continue" for r in fault_proxy.seen if r.method == "PUT")


def test_keep_alive_chunked_request_and_expect_100_continue(fault_proxy: FaultProxy, s3: S3) -> None:
    """Neither client chunks a body over http, so the proxy's de-chunking and its own ``100 Continue``
    are driven by hand here: a chunked PUT and a GET on one kept-alive connection, then an Expect PUT."""
    port = int(fault_proxy.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "PUT", f"/{s3.bucket}/chunked", body=iter([b"abc", b"", b"defg" * 1000]), encode_chunked=True
    )
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    sock = conn.sock
    conn.request("PUT", f"/{s3.bucket}/plain", body=b"second request, same connection")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert conn.sock is sock  # the same connection served both requests
    conn.close()
    assert stored(s3, "chunked") == b"abc" + b"defg" * 1000
    assert stored(s3, "plain") == b"second request, same connection"
    assert fault_proxy.seen[0].header("Transfer-Encoding") == "chunked"
    assert fault_proxy.seen[0].body_length == 4003

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(
            f"PUT /{s3.bucket}/expect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert raw.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any body byte was sent
        raw.sendall(b"hello")
        final = http.client.HTTPResponse(raw)
        final.begin()
        final.read()
        assert final.status == 200
    assert stored(s3, "expect") == b"hello"
    assert fault_proxy.errors == []


# ---- aws-chunked payloads --------------------------------------------------------------------------------


def aws_chunked(chunks: list[bytes], ext: bytes = b"") -> bytes:
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks)
    return framed + b"0%s\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n" % ext


def test_aws_chunked_faults_touch_chunk_data_not_framing() -> None:
    chunks = [b"a" * 10, b"b" * 7, b"c" * 5]
    body = aws_chunked(chunks, ext=b";chunk-signature=" + b"0" * 64)
    spans, _ = aws_chunk_spans(body)
    assert [n for _, n, _ in spans] == [10, 7, 5]

    bad = corrupt_payload(body, aws_chunked=True)
    assert len(bad) == len(body)
    assert aws_chunk_spans(bad)[0] == spans  # same chunk sizes and offsets: framing untouched
    flipped = [i for i in range(len(body)) if bad[i] != body[i]]
    assert flipped == [spans[1][0] + 11 - 10]  # payload byte 11 of 22 lies in the second chunk
    assert bad[flipped[0]] == body[flipped[0]] ^ 0xFF

    short, decoded = truncate_payload(body, aws_chunked=True)
    assert decoded == 11
    new_spans, end = aws_chunk_spans(short)
    assert b"".join(short[s : s + n] for s, n, _ in new_spans) == b"a" * 10 + b"b"
    assert short[end:] == body[aws_chunk_spans(body)[1] :]  # final chunk and trailer kept as they were
    assert all(ext.startswith(b";chunk-signature=") for _, _, ext in new_spans)


@pytest.mark.parametrize("kind", [None, "corrupt_request", "truncate_request"])
def test_aws_chunked_body_through_the_proxy(fault_proxy: FaultProxy, s3: S3, kind: str | None) -> None:
    """An aws-chunked, HTTP-chunked PUT (what botocore sends over https, framed by hand here): moto decodes
    the forwarded payload, so a fault must leave it decodable and damage only the object's bytes."""
    payload = bytes(range(256)) * 64  # 16 KiB in 3 chunks
    chunks = [payload[:8192], payload[8192:12000], payload[12000:]]
    if kind:
        fault_proxy.add(Fault(kind, method="PUT"))  # type: ignore[arg-type]
    port = int(fault_proxy.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = aws_chunked(chunks)
    conn.request(
        "PUT",
        f"/{s3.bucket}/aws-chunked",
        body=iter([body[:5000], body[5000:]]),
        encode_chunked=True,
        headers={
            "Content-Encoding": "aws-chunked",
            "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            "x-amz-decoded-content-length": str(len(payload)),
            "x-amz-trailer": "x-amz-checksum-crc32",
        },
    )
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    got = stored(s3, "aws-chunked")
    if kind is None:
        assert got == payload
    elif kind == "corrupt_request":
        assert len(got) == len(payload)
        assert [i for i in range(len(got)) if got[i] != payload[i]] == [len(payload) // 2]
    else:
        assert got == payload[: len(payload) // 2]
    assert len(fault_proxy.injected) == (1 if kind else 0)


# ---- status faults -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["boto3", "s3fs"])
@pytest.mark.parametrize("kind", ["status_500", "status_503"])
def test_a_single_5xx_is_retried_and_the_put_succeeds(
    fault_proxy: FaultProxy, s3: S3, kind: str, who: str
) -> None:
    fault_proxy.add(Fault(kind, method="PUT", contains="/data/part-00000"))  # type: ignore[arg-type]
    put(who, s3, "data/part-00000", DATA)
    assert fault_proxy.injected == [(kind, "PUT", f"/{s3.bucket}/data/part-00000")]
    assert stored(s3, "data/part-00000") == DATA
    assert sum(r.method == "PUT" for r in fault_proxy.seen) == 2  # the failed try and the retry


def test_a_5xx_on_head_and_get_is_retried_too(fault_proxy: FaultProxy, s3: S3) -> None:
    direct(s3).put_object(Bucket=s3.bucket, Key="k", Body=DATA)
    fault_proxy.add(Fault("status_500", method="HEAD"))
    fault_proxy.add(Fault("status_503", method="GET"))
    c = client()
    assert c.head_object(Bucket=s3.bucket, Key="k")["ContentLength"] == len(DATA)
    assert c.get_object(Bucket=s3.bucket, Key="k")["Body"].read() == DATA
    assert [k for k, _, _ in fault_proxy.injected] == ["status_500", "status_503"]


@pytest.mark.parametrize("kind,code", [("status_500", "InternalError"), ("status_503", "SlowDown")])
def test_a_persistent_5xx_makes_boto3_raise_client_error(
    fault_proxy: FaultProxy, s3: S3, kind: str, code: str
) -> None:
    rule = fault_proxy.add(Fault(kind, method="PUT", times=50))  # type: ignore[arg-type]
    with pytest.raises(botocore.exceptions.ClientError) as err:
        put("boto3", s3, "k", DATA, attempts=2)
    assert err.value.response["Error"]["Code"] == code
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == int(kind[-3:])
    assert len(fault_proxy.injected) == 2 and rule.times == 48  # exactly the attempt budget was spent
    assert direct(s3).list_objects_v2(Bucket=s3.bucket)["KeyCount"] == 0


@pytest.mark.parametrize("kind", ["status_500", "status_503"])
def test_a_persistent_5xx_makes_s3fs_raise_os_error(fault_proxy: FaultProxy, s3: S3, kind: str) -> None:
    fault_proxy.add(Fault(kind, method="PUT", times=50))  # type: ignore[arg-type]
    with pytest.raises(OSError) as err:
        put("s3fs", s3, "k", DATA, attempts=1)
    assert isinstance(err.value.__cause__, botocore.exceptions.ClientError)  # s3fs translates ClientError
    assert len(fault_proxy.injected) == 1


# ---- connection faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["boto3", "s3fs"])
@pytest.mark.parametrize("kind", ["drop_request_body", "drop_response"])
def test_a_single_dropped_connection_is_retried_and_the_put_succeeds(
    fault_proxy: FaultProxy, s3: S3, kind: str, who: str
) -> None:
    """boto3: botocore's retry handler; s3fs: aiohttp itself resends an idempotent PUT once on a closed
    connection, before aiobotocore's retries are even asked (so this holds with retries switched off)."""
    fault_proxy.add(Fault(kind, method="PUT"))  # type: ignore[arg-type]
    put(who, s3, "k", DATA, attempts=None if who == "boto3" else 1)
    assert fault_proxy.injected == [(kind, "PUT", f"/{s3.bucket}/k")]
    assert stored(s3, "k") == DATA


def test_a_dropped_request_body_without_retries_raises_and_stores_nothing(
    fault_proxy: FaultProxy, s3: S3
) -> None:
    fault_proxy.add(Fault("drop_request_body", method="PUT", contains="/a"))
    fault_proxy.add(Fault("drop_request_body", method="PUT", contains="/b", times=2))
    with pytest.raises(CUT_WHILE_SENDING):
        put("boto3", s3, "a", DATA, attempts=1)
    with pytest.raises(CUT_WHILE_SENDING):
        put("s3fs", s3, "b", DATA, attempts=1)
    assert len(fault_proxy.injected) == 3  # boto3 once, s3fs twice (its try and aiohttp's own resend)
    assert direct(s3).list_objects_v2(Bucket=s3.bucket)["KeyCount"] == 0


def test_a_dropped_response_without_retries_raises_but_the_object_is_stored(
    fault_proxy: FaultProxy, s3: S3
) -> None:
    """The ambiguous outcome: the client sees a failure, the store has the object anyway."""
    fault_proxy.add(Fault("drop_response", method="PUT", contains="/a"))
    fault_proxy.add(Fault("drop_response", method="PUT", contains="/b", times=2))
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        put("boto3", s3, "a", DATA, attempts=1)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):  # after aiohttp's one resend
        put("s3fs", s3, "b", DATA, attempts=1)
    assert [k for k, _, _ in fault_proxy.injected] == ["drop_response"] * 3
    assert stored(s3, "a") == DATA and stored(s3, "b") == DATA


def test_a_dropped_complete_multipart_response_is_retried_and_moto_accepts_the_repeat(
    fault_proxy: FaultProxy, s3: S3
) -> None:
    """CompleteMultipartUpload is a POST (aiohttp does not resend it); botocore's retry sends it again
    after the first one already completed the upload, and moto answers the repeat with 200 as S3 does."""
    fault_proxy.add(Fault("drop_response", method="POST", contains="uploadId="))
    fs = filesystem()
    parts = [b"\x03" * 5 * MiB, b"\x04" * 5 * MiB, b"end"]
    with fs.open(f"{s3.bucket}/big", "wb", block_size=5 * MiB) as f:
        for p in parts:
            f.write(p)
    assert [k for k, _, _ in fault_proxy.injected] == ["drop_response"]
    assert sum(r.method == "POST" and "uploadId=" in r.target for r in fault_proxy.seen) == 2
    assert stored(s3, "big") == b"".join(parts)


# ---- payload faults: stored silently, caught only on read ----------------------------------------------


@pytest.mark.parametrize("who", ["boto3", "s3fs"])
@pytest.mark.parametrize("kind", ["corrupt_request", "truncate_request"])
def test_a_damaged_request_body_is_stored_without_error_and_caught_by_the_read_checksum(
    fault_proxy: FaultProxy, s3: S3, kind: str, who: str
) -> None:
    """moto stores whatever arrives and does not check the client's x-amz-checksum-crc32, so the upload
    succeeds; the damage shows in the ETag (MD5 of the stored bytes) and in a checksum-validating read,
    because moto hands the client's CRC32 back on GET and botocore checks it by default."""
    fault_proxy.add(Fault(kind, method="PUT", contains="/k"))  # type: ignore[arg-type]
    put(who, s3, "k", DATA)
    assert fault_proxy.injected == [(kind, "PUT", f"/{s3.bucket}/k")]
    assert sum(r.method == "PUT" for r in fault_proxy.seen) == 1  # not retried: nothing looked wrong

    got = stored(s3, "k")
    if kind == "corrupt_request":
        assert len(got) == len(DATA)
        assert [i for i in range(len(DATA)) if got[i] != DATA[i]] == [len(DATA) // 2]
    else:
        assert got == DATA[: len(DATA) // 2]
    etag = direct(s3).head_object(Bucket=s3.bucket, Key="k")["ETag"].strip('"')
    assert etag == md5(got) != md5(DATA)

    with pytest.raises(botocore.exceptions.FlexibleChecksumError):
        if who == "boto3":
            client().get_object(Bucket=s3.bucket, Key="k")["Body"].read()
        else:
            filesystem().cat(f"{s3.bucket}/k")


def test_put_object_returns_the_etag_of_what_was_stored(fault_proxy: FaultProxy, s3: S3) -> None:
    """The one check the uploader can make on its own: a single-part ETag is the MD5 of the stored bytes."""
    fault_proxy.add(Fault("corrupt_request", method="PUT"))
    etag = client().put_object(Bucket=s3.bucket, Key="k", Body=DATA)["ETag"].strip('"')
    assert etag != md5(DATA) and etag == md5(stored(s3, "k"))


# ---- truncated responses ---------------------------------------------------------------------------------


def test_a_truncated_get_response_raises_in_boto3_while_reading_the_body(
    fault_proxy: FaultProxy, s3: S3
) -> None:
    """Not retried: get_object returns once the headers arrived; the short body fails later, in read()."""
    direct(s3).put_object(Bucket=s3.bucket, Key="k", Body=DATA)
    fault_proxy.add(Fault("truncate_response", method="GET"))
    resp = client().get_object(Bucket=s3.bucket, Key="k")
    assert resp["ContentLength"] == len(DATA)  # the headers were whole
    with pytest.raises(botocore.exceptions.ResponseStreamingError, match="IncompleteRead"):
        resp["Body"].read()
    assert fault_proxy.injected == [("truncate_response", "GET", f"/{s3.bucket}/k")]


def test_a_truncated_get_response_is_retried_by_s3fs(fault_proxy: FaultProxy, s3: S3) -> None:
    import aiohttp

    direct(s3).put_object(Bucket=s3.bucket, Key="k", Body=DATA)
    fault_proxy.add(Fault("truncate_response", method="GET"))
    assert filesystem().cat(f"{s3.bucket}/k") == DATA  # s3fs's own loop retries ClientPayloadError
    assert len(fault_proxy.injected) == 1

    fault_proxy.add(Fault("truncate_response", method="GET"))
    with pytest.raises(aiohttp.ClientPayloadError):  # with its loop at one try, it surfaces unwrapped
        filesystem(attempts=1).cat(f"{s3.bucket}/k")


# ---- rules -----------------------------------------------------------------------------------------------


def test_rules_match_method_and_path_count_down_and_body_faults_skip_bodiless_requests(
    fault_proxy: FaultProxy, s3: S3
) -> None:
    c = client()
    rule = fault_proxy.add(Fault("corrupt_request", contains="/x", times=2))
    c.put_object(Bucket=s3.bucket, Key="y", Body=DATA)  # path does not match
    c.head_object(Bucket=s3.bucket, Key="y")
    with pytest.raises(botocore.exceptions.ClientError):
        c.head_object(Bucket=s3.bucket, Key="x")  # matches the path but has no body: not used up
    assert rule.times == 2
    c.put_object(Bucket=s3.bucket, Key="x", Body=DATA)
    c.put_object(Bucket=s3.bucket, Key="x", Body=DATA)
    c.put_object(Bucket=s3.bucket, Key="x", Body=DATA)  # the rule is used up: passes through
    assert rule.times == 0
    assert fault_proxy.injected == [("corrupt_request", "PUT", f"/{s3.bucket}/x")] * 2
    assert stored(s3, "x") == DATA and stored(s3, "y") == DATA

    fault_proxy.add(Fault("status_500", method="GET", times=5))
    fault_proxy.clear()
    assert fault_proxy.injected == [] and fault_proxy.seen == []
    assert c.get_object(Bucket=s3.bucket, Key="x")["Body"].read() == DATA
    assert fault_proxy.injected == [] and fault_proxy.errors == []


def test_the_proxy_stops_cleanly_with_idle_keep_alive_connections(moto_endpoint: str) -> None:
    with FaultProxy(moto_endpoint) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        idle.request("GET", "/")  # ListBuckets; afterwards the connection stays open, idle
        assert idle.getresponse().read().startswith(b"<?xml")
    with pytest.raises(RuntimeError):
        _ = proxy.url
    assert idle.sock is not None and idle.sock.recv(1) == b""  # the proxy closed its side
    idle.close()


def test_an_unreachable_upstream_is_answered_502_and_recorded_as_a_proxy_error() -> None:
    from s3_server import free_port

    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status == 502
        conn.close()
        assert len(proxy.errors) == 1 and isinstance(proxy.errors[0], ConnectionRefusedError)
