"""Server limits that keep one request from stalling the rest: the request body limit (413 before the
body is parsed) and a listening socket bound before anything is announced (busy port → a clear error,
port 0 → the real port)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from moeforge.model.config import load_model_config
from moeforge.model.transformer import MoETransformer
from moeforge.serve.api import create_app
from moeforge.serve.engine import Engine
from moeforge.serve.loading import ServeError, bind_socket


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    torch.manual_seed(0)
    engine = Engine(MoETransformer(load_model_config("tiny")).eval(), None)
    with TestClient(create_app(engine, model_name="m", max_body_bytes=2000)) as c:
        yield c


def test_a_body_within_the_limit_is_served(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_declared_oversized_body_is_413_with_an_openai_error(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": [1] * 5000, "max_tokens": 2})
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "2,000 bytes" in err["message"]
    assert client.get("/health").status_code == 200


def test_a_chunked_oversized_body_without_length_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "prompt": ['
        for _ in range(1000):
            yield b"1, "
        yield b'1], "max_tokens": 2}'

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_port_zero_binds_a_real_port_and_a_busy_port_is_a_clear_error() -> None:
    sock = bind_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        with pytest.raises(ServeError, match=rf"cannot listen on 127\.0\.0\.1:{port}.*another process"):
            bind_socket("127.0.0.1", port)
    finally:
        sock.close()


def test_an_unknown_host_is_a_clear_error() -> None:
    with pytest.raises(ServeError, match="not an address"):
        bind_socket("no-such-host.invalid", 0)


def test_cli_serve_on_a_busy_port_exits_2_without_loading(tmp_path) -> None:
    import subprocess
    import sys

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        r = subprocess.run(
            [sys.executable, "-m", "moeforge", "serve", str(tmp_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        busy.close()
    assert r.returncode == 2
    assert "cannot listen" in r.stderr and "Traceback" not in r.stderr
