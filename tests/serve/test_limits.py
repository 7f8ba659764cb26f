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
from moeforge.serve.api import ServeError, create_app
from moeforge.serve.engine import Engine
from moeforge.serve.loading import bind_socket


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


PROSE = "The miller counted the sacks of grain every morning and wrote the number beside the date. " * 20


@pytest.fixture(scope="module")
def text_engine(make_bpe) -> Engine:
    torch.manual_seed(0)
    return Engine(MoETransformer(load_model_config("tiny")).eval(), make_bpe(PROSE))


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_encoding(
    text_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(
        text_engine.tokenizer, "encode", lambda *a, **k: calls.append(a) or None, raising=False
    )
    huge = "word " * 200_000  # 1 MB of text against a 256-token context
    with TestClient(create_app(text_engine, model_name="m", max_body_bytes=None)) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": huge, "max_tokens": 2})
        chat = c.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": huge}]}
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in r.json()["error"]["message"]
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []  # refused by the character bound: the tokenizer never saw the text


def test_tokenizing_a_prompt_does_not_block_other_requests(
    text_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    real = text_engine.encode

    def slow_encode(text: str) -> list[int]:
        time.sleep(2.0)  # a long prompt's tokenization
        return real(text)

    monkeypatch.setattr(text_engine, "encode", slow_encode)
    with TestClient(create_app(text_engine, model_name="m")) as c:
        worker = threading.Thread(
            target=lambda: c.post(
                "/v1/completions", json={"model": "m", "prompt": "The miller", "max_tokens": 1}
            )
        )
        worker.start()
        time.sleep(0.3)  # the completion is now encoding
        start = time.monotonic()
        assert c.get("/health").status_code == 200
        waited = time.monotonic() - start
        worker.join()
    assert waited < 1.0, f"/health waited {waited:.1f} s behind a prompt being tokenized"


def test_serve_freezes_the_startup_heap_so_a_full_collection_does_not_stall_requests(
    tmp_path, make_bpe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full garbage collection walks every tracked object with the GIL held; with the ~300k objects of
    torch, FastAPI and the model that stopped the event loop for ~0.25 s (the soak's worst /health
    answer). `serve` freezes what startup allocated, so collections while serving walk only new objects."""
    import gc

    import uvicorn

    from moeforge.model.hf import export_hf
    from moeforge.serve.loading import serve

    hf = export_hf(
        MoETransformer(load_model_config("tiny", ["tie_embeddings=false"])).eval(), tmp_path / "hf"
    )
    make_bpe(PROSE).save(str(hf / "tokenizer.json"))
    seen = {}

    def run(self, sockets=None) -> None:  # instead of serving: what the collector would walk now
        seen["frozen"], seen["tracked"] = gc.get_freeze_count(), len(gc.get_objects())
        for sock in sockets or []:
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    try:
        serve(hf, "127.0.0.1", 0, system_prompt="")
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert seen["frozen"] > 100_000, seen
    assert seen["tracked"] < seen["frozen"] / 20, seen  # a full collection walks under 5% of the heap
