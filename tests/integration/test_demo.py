"""`moeforge demo --quick` on built-in data: every stage runs and leaves its artifacts, no downloads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.mark.timeout(400)
def test_quick_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "160", "MPLCONFIGDIR": str(tmp_path / "mpl")},
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "next:" in r.stdout and "test loss/math" in r.stdout
    for name in ("loss.png", "routing_load.png", "affinity.png", "summary.json", "data/report.html"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 1000, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["train"]["steps"] == 60
    assert set(s["tokens"]) == {"train", "valid", "test"}
    # the splits' domain mixes differ (hash split of few long documents): the summary says so, with shares
    assert (
        s["splits_note"].startswith("blocks per domain: train code")
        and "per-domain curves" in s["splits_note"]
    )
    valid = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "valid"]  # fmt: skip
    assert {"loss/code", "loss/math", "loss/prose"} <= set(valid[-1])  # what loss.png draws per domain
    assert Path(s["checkpoint"]).name == "step-00000060"
    # the data run's test records scored through lm-eval's `moeforge` model (the demo's --quick limit: 40)
    held = s["heldout_lm_eval"]
    assert held["documents"] == 40 and 0 < held["bits_per_byte"] < 8 and held["byte_perplexity"] > 1
    assert "moeforge_heldout" in json.loads((out / "train" / "eval" / "results.json").read_text())["tasks"]
    losses = [json.loads(x)["loss"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["split"] == "train"]  # fmt: skip
    assert losses[-1] < losses[0] - 1.0  # it learned something in 60 steps
    _serve_and_ask(out / "train", tmp_path)


def _serve_and_ask(run: Path, tmp_path: Path) -> None:
    """`moeforge serve` on the demo's checkpoint answers the official openai client, streaming too."""
    openai = pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeforge", "serve", str(run), "--port", str(port), "--api-key", "k"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),  # noqa: SIM115 - closed with the process
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("server did not start: " + (tmp_path / "serve.log").read_text()[-2000:])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
        model = client.models.list().data[0].id
        msgs = [{"role": "user", "content": "A store had 82 mugs and sold 11. How many are left?"}]
        res = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
        assert res.choices[0].finish_reason in ("stop", "length") and res.usage.completion_tokens > 0
        chunks = list(
            client.chat.completions.create(
                model=model, messages=msgs, max_tokens=12, temperature=0, stream=True
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == res.choices[0].message.content  # greedy: the same text either way
    finally:
        proc.terminate()
        proc.wait(timeout=30)
