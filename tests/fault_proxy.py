"""A fault-injecting HTTP proxy between the S3 clients (s3fs, boto3) and the moto server.

Verified deletion and export have to survive what a real object store and the network in front of it do:
5xx answers, connections cut mid-request or mid-response, and payloads damaged on the way in. moto answers
every request perfectly, so this proxy sits between the clients and moto and breaks chosen requests on
purpose, per :class:`Fault` rules; every other request passes through unchanged.

It is pure stdlib on purpose (``socketserver`` threads, ``http.client`` upstream): the faults have to be
injected at the byte level of real HTTP/1.1 (a body cut off after half its bytes, a response shorter than
its ``Content-Length``), which a mocking layer inside botocore or aiohttp could not show, and the clients'
own transport code (urllib3, aiohttp) has to be what meets them.

What the proxy itself does to pass-through traffic, and why:

* client side: HTTP/1.1 keep-alive, several requests per connection, one thread per connection, because
  both urllib3 and aiohttp pool connections and a proxy that closed after every answer would hide faults
  that only show on a reused connection;
* ``Expect: 100-continue`` is answered by the proxy itself (``HTTP/1.1 100 Continue``) and not sent
  upstream: the proxy needs the whole body before it can decide what to forward, and a forwarded ``Expect``
  would make the upstream send a second interim response;
* ``Transfer-Encoding: chunked`` request bodies are de-chunked and forwarded with ``Content-Length`` (the
  payload may be rewritten by a fault, so the framing has to be rebuilt anyway); HTTP-level trailers are
  dropped (neither client sends any: botocore's checksum trailer lives *inside* an ``aws-chunked`` payload);
* every other request header, ``Host`` and the signature included, goes upstream unchanged (moto does not
  check signatures, so a fault that rewrites the body does not have to re-sign it);
* responses are relayed with their status, reason and headers; the body is read in full and re-sent with a
  ``Content-Length`` (upstream chunking and ``Connection`` headers are hop-by-hop and replaced); ``HEAD``
  answers and 204/304 keep the upstream's headers and carry no body.

Nothing is printed: requests the proxy saw are in :attr:`FaultProxy.seen`, faults it injected in
:attr:`FaultProxy.injected`, and exceptions in its handler threads in :attr:`FaultProxy.errors`.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

import pytest

from s3_server import S3, point_clients_at

FaultKind = Literal[
    "drop_request_body",  # read part of the request body, then close the connection; nothing forwarded
    "drop_response",  # forward the request, then close without sending any response
    "status_500",  # answer 500 InternalError (S3-style XML); nothing forwarded
    "status_503",  # answer 503 SlowDown (S3-style XML); nothing forwarded
    "truncate_response",  # forward; send the full headers (original Content-Length), half the body, close
    "truncate_request",  # forward only the first half of the request body's payload
    "corrupt_request",  # flip one byte in the middle of the request body's payload, forward
]

# Faults that change or cut the request body: they only match requests that announce one, so that a rule
# like Fault("corrupt_request", contains="data/x") hits the PUT and is not used up by a HEAD or GET first.
BODY_FAULTS: frozenset[str] = frozenset({"drop_request_body", "truncate_request", "corrupt_request"})

_STATUS_ERRORS: dict[str, tuple[int, str, str, str]] = {
    # what S3 itself answers with these statuses: botocore retries both, s3fs retries SlowDown again itself
    "status_500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "status_503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
}

# hop-by-hop headers (RFC 9110 §7.6.1) plus the framing headers the proxy rebuilds itself
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
    }
)
_MAX_LINE = 65536
_TIMEOUT = 30.0


@dataclass
class Fault:
    """One rule: inject ``kind`` into the next ``times`` requests that match ``method`` and ``contains``.

    ``contains`` is matched against the request target as sent (path and query, e.g. ``partNumber=2``,
    ``uploads``, ``/data/part-00000``). Rules are tried in the order they were added; the first one that
    matches and still has ``times`` left is used, and once used up a rule lets matching requests pass.
    Body faults (:data:`BODY_FAULTS`) only match requests that carry a body.
    """

    kind: FaultKind
    method: str | None = None
    contains: str | None = None
    times: int = 1

    def matches(self, method: str, target: str, has_body: bool) -> bool:
        if self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.contains is not None and self.contains not in target:
            return False
        return has_body or self.kind not in BODY_FAULTS


@dataclass(frozen=True)
class SeenRequest:
    """A request as it reached the proxy, before any fault: for asserting what the clients actually send."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body_length: int  # payload bytes after HTTP de-chunking (-1: not read, the connection was dropped)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


# ---- aws-chunked payloads ----------------------------------------------------------------------------
# botocore and aiobotocore frame a body as ``aws-chunked`` (Content-Encoding) when they send the checksum as
# a trailer: ``<hex size>[;chunk-signature=..]\r\n<data>\r\n`` ... ``0\r\n<trailer lines>\r\n``. A fault
# that damages "the payload" must damage the object's bytes, i.e. the chunk data, and leave the framing
# parseable, or the server would reject the request for bad framing instead of storing damaged data.


def aws_chunk_spans(raw: bytes) -> tuple[list[tuple[int, int, bytes]], int]:
    """Parse an aws-chunked body: ``([(data_offset, data_length, chunk_extension), ...], end_offset)``.

    ``end_offset`` is where the final zero-size chunk line starts (the trailer follows it). Raises
    ValueError on malformed framing.
    """
    spans: list[tuple[int, int, bytes]] = []
    pos = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("aws-chunked body ends inside a chunk header")
        size_text, sep, ext = raw[pos:eol].partition(b";")
        size = int(size_text.strip(), 16)
        if size == 0:
            return spans, pos
        start = eol + 2
        if raw[start + size : start + size + 2] != b"\r\n":
            raise ValueError("aws-chunked chunk data is not followed by CRLF")
        spans.append((start, size, sep + ext))
        pos = start + size + 2


def corrupt_payload(body: bytes, aws_chunked: bool) -> bytes:
    """Flip (XOR 0xFF) the payload byte in the middle; for aws-chunked, the middle byte of the chunk data,
    so the framing, sizes and trailer stay byte-identical."""
    if not body:
        return body
    out = bytearray(body)
    if aws_chunked:
        try:
            spans, _ = aws_chunk_spans(body)
        except ValueError:
            spans = []
        total = sum(n for _, n, _ in spans)
        if total:
            index = total // 2
            for start, n, _ in spans:
                if index < n:
                    out[start + index] ^= 0xFF
                    return bytes(out)
                index -= n
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


def truncate_payload(body: bytes, aws_chunked: bool) -> tuple[bytes, int | None]:
    """The first half of the payload: ``(new_body, new_decoded_length)``.

    For aws-chunked the chunk data is cut to half its total and re-framed (chunk sizes rewritten, extensions
    and the final chunk plus trailer kept as they were), and the new decoded length is returned so the
    caller can fix ``X-Amz-Decoded-Content-Length``; the trailer checksum is left stale on purpose (that is
    the damage). For plain bodies ``new_decoded_length`` is None.
    """
    if aws_chunked:
        try:
            spans, end = aws_chunk_spans(body)
        except ValueError:
            spans, end = [], -1
        if end >= 0:
            keep = sum(n for _, n, _ in spans) // 2
            parts: list[bytes] = []
            left = keep
            for start, n, ext in spans:
                if left <= 0:
                    break
                take = min(n, left)
                parts.append(b"%x%s\r\n%s\r\n" % (take, ext, body[start : start + take]))
                left -= take
            return b"".join(parts) + body[end:], keep
    return body[: len(body) // 2], None


# ---- the proxy -------------------------------------------------------------------------------------------


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver prints tracebacks to stderr; keep them for the tests to look at instead
        self.proxy._record_error(sys.exc_info()[1])


class _Close(Exception):
    """Raised inside the handler to end the client connection (a fault, or the client went away)."""


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = _TIMEOUT

    def handle(self) -> None:
        proxy = self.server.proxy
        proxy._track(self.connection, add=True)
        try:
            while True:
                try:
                    if not self._one_request(proxy):
                        return
                except (_Close, OSError):  # a fault ended it, or the client went away / timed out
                    return
        finally:
            proxy._track(self.connection, add=False)

    # -- reading

    def _read_head(self) -> tuple[str, str, str, list[tuple[str, str]]] | None:
        line = self.rfile.readline(_MAX_LINE)
        while line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignore empty lines before a request line
            line = self.rfile.readline(_MAX_LINE)
        if not line:
            return None
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            h = self.rfile.readline(_MAX_LINE)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        return method, target, version, headers

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise _Close
        return data

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_line = self.rfile.readline(_MAX_LINE)
            if not size_line:
                raise _Close
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                    pass  # HTTP trailers: dropped (the body is forwarded with Content-Length)
                return b"".join(parts)
            parts.append(self._read_exact(size))
            self._read_exact(2)

    # -- one exchange

    def _one_request(self, proxy: FaultProxy) -> bool:
        """Serve one request; False when the connection should end."""
        head = self._read_head()
        if head is None:
            return False
        method, target, version, headers = head
        hmap = {k.lower(): v for k, v in headers}
        chunked = "chunked" in hmap.get("transfer-encoding", "").lower()
        length = int(hmap.get("content-length", "0") or 0) if not chunked else -1
        has_body = chunked or length > 0
        keep_alive = version.upper() == "HTTP/1.1"
        conn_tokens = hmap.get("connection", "").lower()
        if "close" in conn_tokens:
            keep_alive = False
        elif "keep-alive" in conn_tokens:
            keep_alive = True

        fault = proxy._match(method, target, has_body)
        if has_body and hmap.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()

        if fault == "drop_request_body":
            proxy._record_seen(method, target, headers, -1)
            proxy._record_injected(fault, method, target)
            if chunked:  # the first chunk's size line and half its data
                size_line = self.rfile.readline(_MAX_LINE)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                self.rfile.read(max(1, size // 2))
            else:
                self.rfile.read(max(1, length // 2))
            self._abort()
            raise _Close

        body: bytes | None = None
        if chunked:
            body = self._read_chunked()
        elif length > 0 or "content-length" in hmap:
            body = self._read_exact(length)
        proxy._record_seen(method, target, headers, len(body) if body is not None else 0)

        if fault in _STATUS_ERRORS:
            proxy._record_injected(fault, method, target)
            self._send_error(fault, method, target, keep_alive)
            return keep_alive

        out_headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        aws_chunked = "aws-chunked" in hmap.get("content-encoding", "").lower()
        if body is not None and fault == "corrupt_request":
            body = corrupt_payload(body, aws_chunked)
        elif body is not None and fault == "truncate_request":
            body, decoded = truncate_payload(body, aws_chunked)
            if decoded is not None:
                out_headers = [
                    (k, str(decoded) if k.lower() == "x-amz-decoded-content-length" else v)
                    for k, v in out_headers
                ]
        if fault in ("corrupt_request", "truncate_request"):
            proxy._record_injected(fault, method, target)
        if body is not None:
            out_headers.append(("Content-Length", str(len(body))))

        try:
            status, reason, resp_headers, data = proxy._forward(method, target, out_headers, body)
        except (OSError, http.client.HTTPException) as exc:
            # the upstream itself failed: a proxy-side problem, not an injected fault, so it is recorded
            # in .errors and answered 502 rather than passed off to the client as a dropped connection
            proxy._record_error(exc)
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.wfile.flush()
            return False

        if fault == "drop_response":
            proxy._record_injected(fault, method, target)
            self._abort()
            raise _Close

        no_body = method.upper() == "HEAD" or status in (204, 304) or 100 <= status < 200
        lines = [f"HTTP/1.1 {status} {reason}"]
        upstream_length: str | None = None
        for k, v in resp_headers:
            if k.lower() == "content-length":
                upstream_length = v
            if k.lower() not in _HOP_BY_HOP:
                lines.append(f"{k}: {v}")
        if no_body:
            if upstream_length is not None:
                lines.append(f"Content-Length: {upstream_length}")
            data = b""
        else:
            lines.append(f"Content-Length: {len(data)}")
        if not keep_alive or fault == "truncate_response":
            lines.append("Connection: close")
        head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        if fault == "truncate_response":
            proxy._record_injected(fault, method, target)
            self.wfile.write(head_bytes + data[: len(data) // 2])
            self.wfile.flush()
            self._abort()
            raise _Close
        self.wfile.write(head_bytes + data)
        self.wfile.flush()
        return keep_alive

    def _send_error(self, fault: str, method: str, target: str, keep_alive: bool) -> None:
        status, reason, code, message = _STATUS_ERRORS[fault]
        request_id = f"FAULTPROXY{next(_request_ids):06d}"
        resource = target.split("?", 1)[0]
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        body = b"" if method.upper() == "HEAD" else xml
        lines = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/xml",
            f"x-amz-request-id: {request_id}",
            f"Content-Length: {len(body)}",
        ]
        if not keep_alive:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.wfile.flush()

    def _abort(self) -> None:
        """Cut the connection the way a crashed peer or a dropped link does: no more bytes, then FIN
        (or RST when the client's unread bytes are still in our receive buffer)."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


_request_ids = itertools.count(1)


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 (a free port) in front of ``upstream``, injecting :class:`Fault` s.

    Use ``with FaultProxy(url) as proxy:`` or ``start()`` / ``stop()``; point clients at :attr:`url`.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.upstream = upstream
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._injected: list[tuple[str, str, str]] = []
        self._seen: list[SeenRequest] = []
        self._errors: list[BaseException] = []
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wake handler threads blocked on an idle keep-alive connection
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- rules and records

    def add(self, fault: Fault) -> Fault:
        """Add a rule (after the existing ones); returns it, so a test can watch ``times`` count down."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove all rules and forget what was injected and seen."""
        with self._lock:
            self._faults.clear()
            self._injected.clear()
            self._seen.clear()

    @property
    def injected(self) -> list[tuple[str, str, str]]:
        """``(kind, method, path)`` of every fault actually injected, in order (a copy)."""
        with self._lock:
            return list(self._injected)

    @property
    def seen(self) -> list[SeenRequest]:
        """Every request that reached the proxy, as the client sent it (a copy)."""
        with self._lock:
            return list(self._seen)

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions in handler threads (a proxy bug, not an injected fault)."""
        with self._lock:
            return list(self._errors)

    def _match(self, method: str, target: str, has_body: bool) -> str | None:
        with self._lock:
            for f in self._faults:
                if f.matches(method, target, has_body):
                    f.times -= 1
                    return f.kind
        return None

    def _record_injected(self, kind: str, method: str, target: str) -> None:
        with self._lock:
            self._injected.append((kind, method, target))

    def _record_seen(self, method: str, target: str, headers: list[tuple[str, str]], n: int) -> None:
        with self._lock:
            self._seen.append(SeenRequest(method, target, tuple(headers), n))

    def _record_error(self, exc: BaseException | None) -> None:
        if exc is not None:
            with self._lock:
                self._errors.append(exc)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """One request upstream on a fresh connection (no upstream pooling: a fault that cuts the client
        connection must never leave a half-used upstream connection behind for the next request)."""
        conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=_TIMEOUT)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


@pytest.fixture
def fault_proxy(moto_endpoint: str, s3: S3, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of moto, with s3fs and boto3 pointed at it (``s3.endpoint`` and
    ``s3.client()`` still reach moto directly, for reading back what was really stored)."""
    with FaultProxy(moto_endpoint) as proxy:
        point_clients_at(proxy.url, monkeypatch)
        yield proxy


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's and aiobotocore's retries without their backoff sleeps (opt-in).

    Which errors are retried and how many attempts are made stay exactly as configured; only the jittered
    waits (0–1 s, then 0–2 s, ... in both ``legacy`` and ``standard`` mode) go, which would otherwise make
    every retried fault cost up to seconds, at random. Patched at class / module level, so it applies to
    clients created after the fixture ran. s3fs's own retry loop (0.1 s, 0.17 s, ...) is left alone.
    """
    import botocore.retries.standard
    import botocore.retryhandler

    monkeypatch.setattr(
        botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0
    )
    monkeypatch.setattr(botocore.retryhandler, "delay_exponential", lambda base, growth_factor, attempts: 0.0)
