"""The server soak (``benchmarks/soak.py``) at full size: ``moeforge serve`` as a subprocess on 127.0.0.1
takes 2,000 requests at concurrency 32 — completions, chats, streams read to the end, streams and whole
requests the client abandons, malformed JSON, invalid Unicode, wrong types, oversized bodies, prompts over
the context, unknown routes — and stays healthy: no 5xx, ``/health`` never slower than 1 s, memory flat
after warm-up, no traceback in its log, nothing left in flight. About 30 s on 2 cores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("tokenizers")

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moeforge_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
def test_the_server_survives_2000_mixed_requests_at_concurrency_32(tmp_path: Path) -> None:
    soak = _load()
    report = soak.soak(requests=2000, concurrency=32, seed=0, keep_log=tmp_path / "server.log")
    summary = soak.table(report)

    assert sum(sum(v.values()) for v in report["by_kind"].values()) == 2000
    assert set(report["by_kind"]) == set(soak.MIX), summary  # every kind was sent
    # no 5xx: on the wire, as a stream's error event, or in the server's own request counter
    assert report["five_xx"] == 0 and report["server_5xx"] == 0, summary
    assert report["unexpected"] == 0, summary  # each kind got its status (200, 400, 404/405, 413)
    # /health answered 200 throughout, never slower than 1 s
    assert report["health"]["polls"] >= 50 and report["health"]["not_200"] == 0, summary
    assert report["health"]["max_ms"] <= 1000, summary
    # memory flat after warm-up
    assert report["rss_mb"]["growth_mb"] <= soak.RSS_GROWTH_MB, summary
    assert not report["traceback_in_log"], summary
    assert report["health_after"]["models"][soak.MODEL]["in_flight"] == 0, summary
    assert report["passed"], summary
