"""The report in a real headless Chromium: it loads from file:// with no console error, every chart is laid
out with a non-zero size, no script runs, and a full-page screenshot is saved as a test artifact.

The browser is driven over the Chrome DevTools Protocol on ``--remote-debugging-pipe`` (NUL-separated JSON
on file descriptors 3 and 4), so the test needs only the ``chromium`` binary: no websocket library, no
selenium, no driver. Skipped when no Chromium is installed (``apt-get install chromium``); set
``MOEFORGE_CHROMIUM`` to use another binary and ``MOEFORGE_TEST_ARTIFACTS`` to keep the screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from moeforge.data.pipeline import run_pipeline
from moeforge.data.recipe import Recipe
from moeforge.data.report import write_report

XSS = "<script>alert(1)</script>"
WIDTH = 1280
TIMEOUT = 20.0


def _chromium() -> str | None:
    override = os.environ.get("MOEFORGE_CHROMIUM")
    if override:
        return override
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """A minimal CDP client for one headless Chromium over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, profile: Path, log_path: Path) -> None:
        cmd_read, self._cmd_write = os.pipe()  # we write commands; Chromium reads them on fd 3
        self._out_read, out_write = os.pipe()  # Chromium writes replies and events on fd 4

        def child_fds() -> None:
            # lift both ends above 4 first, so the dup2 onto 3 cannot clobber the other end
            a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_read, out_write))
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = open(log_path, "wb")  # noqa: SIM115 — closed in close()
        args = [
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--mute-audio", "--hide-scrollbars", f"--window-size={WIDTH},1000",
            "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            pass_fds=(3, 4),
            preexec_fn=child_fds,
        )
        os.close(cmd_read)
        os.close(out_write)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.log_path = log_path

    def _read(self, deadline: float) -> None:
        """Append what Chromium sent to the buffer; raise when it exits or stays silent past ``deadline``."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"Chromium did not answer in time; its log: {self.log_path}")
        ready, _, _ = select.select([self._out_read], [], [], left)
        if ready:
            chunk = os.read(self._out_read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()}); its log: {self.log_path}")
            self._buf += chunk

    def _messages(self) -> list[dict[str, Any]]:
        *complete, self._buf = self._buf.split(b"\0")
        return [json.loads(m) for m in complete]

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_write, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            for m in self._messages():
                if m.get("id") == self._next_id:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m.get("result", {})
                self.events.append(m)
            self._read(deadline)

    def wait_for(self, method: str, session: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self._read(deadline)
            self.events += self._messages()

    def open(self, url: str) -> str:
        """A new tab with console, log and page events on; navigate to ``url`` and wait for its load event."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired", session)
        return session

    def evaluate(self, expression: str, session: str) -> Any:
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
        )
        assert "exceptionDetails" not in result, result
        return result["result"]["value"]

    def problems(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions, error-level log entries (CSP violations, failed loads) and
        JavaScript dialogs of one tab, as text."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if e.get("sessionId") != session:
                continue
            if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(
                    "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log ({p['entry']['source']}): {p['entry']['text']}")
            elif method == "Page.javascriptDialogOpening":
                out.append(f"dialog: {p.get('message')}")
        return out

    def screenshot(self, session: str) -> bytes:
        size = self.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
            session=session,
        )
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._cmd_write)
            os.close(self._out_read)
            self._log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set MOEFORGE_CHROMIUM)")
    devtools = DevTools(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        yield devtools
    finally:
        devtools.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    root = os.environ.get("MOEFORGE_TEST_ARTIFACTS")
    out = Path(root) if root else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_with_every_section(root: Path) -> Path:
    """A finished run (language ID on, one record with an e-mail, 3 exact duplicates, every record holding
    ``<script>``) whose manifest also carries near-dup, decontamination and mixture data."""
    src = root / "in.jsonl"
    lines = [
        {
            "question": f"Problem {i}: {XSS} if a river stone costs {i} coins, what do {i % 7} cost?",
            "answer": f"{i}",
        }
        for i in range(150)
    ]
    lines[3]["answer"] += " (ask bob@example.com)"
    lines += lines[:3]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    recipe = Recipe.model_validate(
        {
            "name": "browser",
            "sources": [{"path": str(src), "kind": "qa", "family": "f", "domain": "math"}],
            "pii": {"review_density": 50.0},  # scrub the e-mail rather than hold its record for review
            "split": {"min_eval_records": 3},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1]},
        }
    )
    run = root / "run"
    run_pipeline(recipe, run, workers=1)
    path = run / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["near_dedup"] = {"cluster_sizes": {"2": 12, "3": 4, "9": 1}}
    manifest["decontamination"] = {
        "benchmarks": {
            "gsm8k": {"items": 1319, "items_matched": 2, "documents_affected": 3, "examples": [XSS]}
        }
    }
    manifest["mixture"] = {"by": "domain", "target": {"math": 1.0}, "achieved": {"math": 1.0}}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return run


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_console_errors_are_detected(browser: DevTools, tmp_path: Path) -> None:
    """The canary: without it, "no console errors" below could pass because nothing was listening."""
    canary = tmp_path / "canary.html"
    canary.write_text(
        "<!DOCTYPE html><meta charset=utf-8><title>canary</title><script>console.error('canary 42')</script>",
        encoding="utf-8",
    )
    session = browser.open(canary.as_uri())
    browser.evaluate("1", session)  # a round trip: every event sent before the reply has arrived
    assert browser.problems(session) == ["console.error: canary 42"]


def test_report_renders_offline_without_console_errors(
    browser: DevTools, tmp_path: Path, artifacts: Path
) -> None:
    report = write_report(_run_with_every_section(tmp_path))
    source = report.read_text(encoding="utf-8")
    session = browser.open(report.as_uri())
    page = browser.evaluate(
        """(() => {
            const charts = [...document.querySelectorAll('svg.chart')];
            return {
                charts: charts.length,
                laidOut: charts.filter(s => {
                    const r = s.getBoundingClientRect();
                    return r.width > 50 && r.height > 10;
                }).length,
                bars: document.querySelectorAll('svg.chart rect.bar').length,
                sections: [...document.querySelectorAll('section')].map(s => s.id),
                notRun: [...document.querySelectorAll('.not-run')].length,
                scripts: document.scripts.length,
                text: document.body.innerText,
            };
        })()""",
        session,
    )
    assert browser.problems(session) == []
    assert page["charts"] == source.count('<svg class="chart"') >= 9
    assert page["laidOut"] == page["charts"], "a chart has no size on the page"
    assert page["bars"] == source.count('class="bar"') > 0
    assert page["sections"] == [
        "overview", "counts", "lengths", "drops", "pii", "langid", "exact-dedup", "near-dedup",
        "decontamination", "mixture", "gates", "samples",
    ]  # fmt: skip
    assert page["notRun"] == 0
    assert page["scripts"] == 0 and XSS in page["text"]  # the record's <script> shows as text, never runs

    png = browser.screenshot(session)
    width, height = _png_size(png)
    assert width == WIDTH and height > 1500
    shot = artifacts / "report.png"
    shot.write_bytes(png)
    shutil.copyfile(report, artifacts / "report.html")
    print(f"report screenshot: {shot}")
