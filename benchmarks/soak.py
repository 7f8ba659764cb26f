"""Server soak: ``moeforge serve`` under a seeded mix of good, cancelled and bad requests.

Starts ``moeforge serve`` as a subprocess on 127.0.0.1 (port 0, the real port read from its log) with a
small request body limit, then sends ``--requests`` requests at ``--concurrency`` with asyncio + httpx,
drawn with ``--seed`` from this mix (weights in :data:`MIX`):

* ``completion`` / ``chat``: whole completions (text or token-id prompts, 1-8 new tokens);
* ``completion_stream`` / ``chat_stream``: ``stream: true`` read to ``data: [DONE]``; an error event in
  the stream counts as its error's status (a ``server_error`` event is a 5xx);
* ``stream_cancel``: a stream the client closes after 1-3 chunks (the server must free its slot);
* ``abort``: a whole completion the client gives up on after 20-80 ms (closes the connection);
* ``malformed_json``, ``wrong_type``: 400s (truncated JSON, a lone ``\\ud800`` escape in a prompt or a
  message, a string for an int, an unknown field …);
* ``oversized``: a body of 0.1-2 MB against the server's 0.05 MB ``--max-body-mb`` (with and without a
  Content-Length): 413;
* ``too_long``: a prompt or chat over the model's context: 400 ``context_length_exceeded``;
* ``unknown_route``: 404 / 405; ``info``: ``GET /v1/models`` and ``/metrics``.

Meanwhile a process of its own (so the soak's client cannot delay it) polls ``/health`` every 100 ms and
records the latency, and a thread samples the server's resident memory (``VmRSS`` of
``/proc/PID/status``) every 0.5 s.

Pass when: no 5xx (on the wire, in a stream's error event, or in the server's own
``moeforge_requests_total``), every status is the one its kind expects, no ``/health`` answer slower than
1 s, RSS growth from the warm-up window (20-40 % of requests done, median) to the end window (80-100 %,
median) under :data:`RSS_GROWTH_MB` MB, and no ``Traceback`` in the server's log. Exit 1 otherwise.

The model is built here unless ``--checkpoint`` is given: the ``tiny`` preset (4 layers, 4 experts
top-2, context 256) with a 512-token vocabulary and a byte-level BPE trained in a second on fixed prose,
exported as a Hugging Face directory with its ``tokenizer.json``.

Run: ``python benchmarks/soak.py [--requests 2000] [--concurrency 32] [--seed 0] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

MODEL = "soak"
MAX_BODY_MB = 0.05  # the server's body limit: oversized bodies of 0.1-2 MB are cheap to send
HEALTH_EVERY_S = 0.1
RSS_EVERY_S = 0.5
HEALTH_LIMIT_S = 1.0
# RSS growth from the warm-up window to the end window that fails the soak. Measured on 2 cores: +1.2 to
# +3.7 MB over 2,000 requests, a creep that levels off (+1.5 MB over 10,000; docs/RELIABILITY.md). The
# windows' medians lie ~60 % of the requests apart (1,200 of 2,000), so 20 MB fails a leak of ~17 kB per
# request or more (a KV-cache row of this model is 0.5 MB); the end-of-run in-flight check catches
# leaked admission slots whatever their size.
RSS_GROWTH_MB = 20.0

# kind → weight (per 100 requests)
MIX: dict[str, int] = {
    "completion": 15,
    "chat": 15,
    "completion_stream": 6,
    "chat_stream": 14,
    "stream_cancel": 10,
    "abort": 4,
    "malformed_json": 8,
    "wrong_type": 8,
    "oversized": 6,
    "too_long": 6,
    "unknown_route": 4,
    "info": 4,
}
# kind → statuses that are right for it (None: the client gave up before an answer)
EXPECTED: dict[str, set[int | None]] = {
    "completion": {200},
    "chat": {200},
    "completion_stream": {200},
    "chat_stream": {200},
    "stream_cancel": {200},
    "abort": {200, None},
    "malformed_json": {400},
    "wrong_type": {400},
    "oversized": {413},
    "too_long": {400},
    "unknown_route": {404, 405},
    "info": {200},
}

PROSE = (
    "the river ran past the old mill where the miller kept his accounts in a leather book every morning "
    "he counted the sacks of grain and wrote the number beside the date. "
)
WORDS = PROSE.rstrip(". ").split()


# ---- the model --------------------------------------------------------------------------------------------


def build_checkpoint(out: Path, seed: int = 0) -> Path:
    """A tiny MoE model with a BPE tokenizer (ChatML specials), exported as an HF directory in ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moeforge.model.config import load_model_config
    from moeforge.model.hf import export_hf
    from moeforge.model.transformer import MoETransformer
    from moeforge.tokens.tokenizer import BASE_SPECIALS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(BASE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([PROSE] * 20, trainer=trainer)
    torch.manual_seed(seed)
    cfg = load_model_config("tiny", ["vocab_size=512", "tie_embeddings=false", "name=soak"])
    hf = export_hf(MoETransformer(cfg).eval(), out)
    tok.save(str(hf / "tokenizer.json"))
    return hf


# ---- the server -------------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    argv: list[str]


def start_server(checkpoint: Path, workdir: Path, extra: list[str] | None = None) -> Server:
    """``moeforge serve`` on 127.0.0.1, port 0; its stdout and stderr go to ``workdir/server.log``."""
    argv = [
        sys.executable,
        "-m",
        "moeforge",
        "serve",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model-name",
        MODEL,
        "--system-prompt",
        "",
        "--max-body-mb",
        str(MAX_BODY_MB),
        *(extra or []),
    ]
    log = workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MOEFORGE_FAULTS", "MOEFORGE_API_KEY")}
    path = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env |= {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while True:  # the real port, from the line `serve` logs once the socket is bound
        text = log.read_text(errors="replace")
        if m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", text):
            url = f"http://127.0.0.1:{m.group(1)}"
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"moeforge serve did not start (exit {proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.1)
    while True:  # bound and announced; /health answers once uvicorn runs
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"moeforge serve never answered /health:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return Server(proc, url, log, argv)


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---- the requests -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no HTTP answer (the client gave up, or a transport error)
    error: str | None = None  # a transport error or a wrong answer
    seconds: float = 0.0


def plan(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (kind, variant seed) pairs drawn from :data:`MIX` with ``seed``."""
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    return [(k, rng.randrange(2**31)) for k in rng.choices(kinds, weights, k=n)]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _sampling(rng: random.Random, lo: int = 1, hi: int = 8) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": rng.randint(lo, hi)}
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body |= {"temperature": 0.8, "seed": rng.randrange(1000), "top_p": 0.95}
    return body


def _messages(rng: random.Random, n_words: int = 8) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": _text(rng, rng.randint(1, n_words))}]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": "You are brief."})
    return msgs


async def _read_stream(resp: httpx.Response, stop_after: int | None) -> tuple[int, str | None]:
    """Read SSE ``data:`` lines; the status to count and an error. ``stop_after``: close after that many
    chunks (a cancelling client). An error event counts as its status (server_error → 500)."""
    chunks = 0
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return resp.status_code, None
        event = json.loads(data)
        if "error" in event:
            err = event["error"]
            status = {"server_error": 500, "timeout_error": 504, "client_closed_request": 499}.get(
                err.get("type"), 400
            )
            return status, f"error event in the stream: {err}"
        chunks += 1
        if stop_after is not None and chunks >= stop_after:
            return resp.status_code, None  # leaving the `async with` closes the connection
    if stop_after is not None:
        return resp.status_code, None  # it finished before we cancelled
    return resp.status_code, "the stream ended without data: [DONE]"


async def one(client: httpx.AsyncClient, kind: str, variant: int) -> Outcome:
    rng = random.Random(variant)
    start = time.perf_counter()

    def done(status: int | None, error: str | None = None) -> Outcome:
        return Outcome(kind, status, error, time.perf_counter() - start)

    json_headers = {"Content-Type": "application/json"}
    try:
        if kind == "completion":
            prompt: Any = (
                _text(rng, rng.randint(1, 12))
                if rng.random() < 0.8
                else [rng.randrange(5, 400) for _ in range(rng.randint(1, 16))]
            )
            body = {"model": MODEL, "prompt": prompt, **_sampling(rng)}
            r = await client.post("/v1/completions", json=body)
            if r.status_code == 200 and not r.json()["choices"]:
                return done(r.status_code, "no choices")
            return done(r.status_code)
        if kind == "chat":
            body = {"model": MODEL, "messages": _messages(rng), **_sampling(rng)}
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code == 200 and "content" not in r.json()["choices"][0]["message"]:
                return done(r.status_code, "no message content")
            return done(r.status_code)
        if kind in ("completion_stream", "chat_stream", "stream_cancel"):
            chat = kind != "completion_stream" and (kind == "chat_stream" or rng.random() < 0.7)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body = {"model": MODEL, "stream": True}
            body |= {"messages": _messages(rng)} if chat else {"prompt": _text(rng, rng.randint(1, 12))}
            if kind == "stream_cancel":
                body |= _sampling(rng, 16, 48)
                stop_after = rng.randint(1, 3)
            else:
                body |= _sampling(rng)
                stop_after = None
                if rng.random() < 0.3:
                    body["stream_options"] = {"include_usage": True}
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    return done(resp.status_code)
                status, error = await _read_stream(resp, stop_after)
                return done(status, error)
        if kind == "abort":
            body = {"model": MODEL, "messages": _messages(rng), "max_tokens": 64, "temperature": 0.8}
            try:
                r = await asyncio.wait_for(
                    client.post("/v1/chat/completions", json=body), rng.uniform(0.02, 0.08)
                )
            except TimeoutError:
                return done(None)
            return done(r.status_code)
        if kind == "malformed_json":
            good = json.dumps({"model": MODEL, "prompt": "the river", "max_tokens": 2})
            completions, chat = "/v1/completions", "/v1/chat/completions"
            path, content = rng.choice(
                [
                    (None, good[: rng.randint(1, len(good) - 1)]),  # truncated
                    (None, good.replace(":", "=", 1)),
                    (None, "{'model': 'soak', 'prompt': 'x'}"),  # Python, not JSON
                    (None, ""),
                    (None, "\xff\xfe not utf-8"),
                    (None, '{"model": "soak", "prompt": "x",}'),
                    (None, "[1, 2, 3]"),
                    (None, "null"),
                    # valid JSON, invalid text: a lone surrogate escape (no character; not UTF-8 encodable)
                    (completions, '{"model": "soak", "prompt": "the \\ud800 river", "max_tokens": 2}'),
                    (completions, '{"model": "soak", "prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
                    (
                        chat,
                        '{"model": "soak", "messages": [{"role": "user", "content": "hi \\udc00"}], "max_tokens": 2}',
                    ),
                ]
            )
            data = content.encode("latin-1") if content.startswith("\xff") else content.encode()
            path = path or rng.choice([completions, chat])
            r = await client.post(path, content=data, headers=json_headers)
            return done(r.status_code)
        if kind == "wrong_type":
            path, body = rng.choice(
                [
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}),
                    ("/v1/completions", {"model": MODEL, "prompt": {"text": "x"}}),
                    ("/v1/completions", {"model": MODEL, "prompt": [1, "2", 3]}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 1000}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}),
                    ("/v1/completions", {"model": MODEL, "prompt": [99999], "max_tokens": 2}),
                    ("/v1/completions", {"model": 7, "prompt": "x"}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "bogus": 1}),
                    ("/v1/completions", {"prompt": "x"}),
                    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}),
                    ("/v1/chat/completions", {"model": MODEL, "messages": []}),
                    (
                        "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
                    ),
                    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
                    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}),
                    (
                        "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [""]},
                    ),
                    (
                        "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream_options": 3},
                    ),
                ]
            )
            r = await client.post(path, json=body)
            return done(r.status_code)
        if kind == "oversized":
            size = rng.randint(100_000, 2_000_000)
            head = b'{"model": "soak", "max_tokens": 2, "prompt": "'
            tail = b'"}'
            filler = size - len(head) - len(tail)
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
            if rng.random() < 0.5:  # declared Content-Length
                content: Any = head + b"a" * filler + tail
            else:  # chunked, no length

                async def chunks() -> Any:
                    yield head
                    left = filler
                    while left > 0:
                        yield b"a" * min(left, 65536)
                        left -= 65536
                    yield tail

                content = chunks()
            try:
                r = await client.post(path, content=content, headers=json_headers)
            except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # the server answered 413 and closed while we were still sending; httpx lost the answer
                return done(None, f"transport error after sending part of an oversized body: {exc!r}")
            return done(r.status_code)
        if kind == "too_long":
            words = _text(rng, rng.randint(400, 2000))  # context 256 tokens; under the body limit
            if rng.random() < 0.5:
                r = await client.post(
                    "/v1/completions", json={"model": MODEL, "prompt": words, "max_tokens": 2}
                )
            else:
                body = {"model": MODEL, "messages": [{"role": "user", "content": words}], "max_tokens": 2}
                r = await client.post("/v1/chat/completions", json=body)
            if r.status_code == 400 and r.json()["error"]["code"] != "context_length_exceeded":
                return done(r.status_code, f"400 without context_length_exceeded: {r.text[:200]}")
            return done(r.status_code)
        if kind == "unknown_route":
            method, path = rng.choice(
                [
                    ("GET", "/v1/nope"),
                    ("POST", "/v1/engines/soak/completions"),
                    ("GET", "/v1/completions"),
                    ("DELETE", "/v1/models"),
                    ("GET", "/v1/models/no-such-model"),
                    ("GET", "/%2e%2e/etc/passwd"),
                ]
            )
            r = await client.request(method, path)
            return done(r.status_code)
        if kind == "info":
            r = await client.get(rng.choice(["/v1/models", "/metrics", f"/v1/models/{MODEL}"]))
            return done(r.status_code)
        raise ValueError(f"unknown kind {kind}")
    except httpx.HTTPError as exc:
        return done(None, f"{type(exc).__name__}: {exc}")


# ---- the soak ---------------------------------------------------------------------------------------------


# The /health poller runs in a process of its own, so that the soak's client (its event loop and its GIL)
# cannot delay a poll: the latency measured is the server's. One line per poll: "unix_time seconds status".
_POLLER = """
import sys, time, httpx
url, every, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with httpx.Client(base_url=url, timeout=10) as c, open(out, "w", buffering=1) as f:
    while True:
        t0, p0 = time.time(), time.perf_counter()
        try:
            status = c.get("/health").status_code
        except httpx.HTTPError:
            status = 0
        took = time.perf_counter() - p0
        f.write(f"{t0} {took} {status}\\n")
        time.sleep(max(0.0, every - took))
"""


@dataclass
class Probes:
    """The /health poller (a process) and the RSS sampler (a thread)."""

    url: str
    pid: int
    workdir: Path
    completed: list[int] = field(default_factory=lambda: [0])  # requests done (written by the soak)
    health: list[tuple[float, float, int]] = field(default_factory=list)  # (unix time, latency, status)
    rss: list[tuple[float, float, int]] = field(default_factory=list)  # (unix time, MB, requests done)
    stop: threading.Event = field(default_factory=threading.Event)

    def _sample_rss(self) -> None:
        while not self.stop.is_set():
            mb = rss_mb(self.pid)
            if mb is not None:
                self.rss.append((time.time(), mb, self.completed[0]))
            self.stop.wait(RSS_EVERY_S)

    def __enter__(self) -> Probes:
        self.health_file = self.workdir / "health.txt"
        self.poller = subprocess.Popen(
            [sys.executable, "-c", _POLLER, self.url, str(HEALTH_EVERY_S), str(self.health_file)],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not (self.health_file.is_file() and self.health_file.stat().st_size):
            if self.poller.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the /health poller did not start (exit {self.poller.returncode})")
            time.sleep(0.05)
        self.thread = threading.Thread(target=self._sample_rss, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.poller.terminate()
        self.poller.wait(15)
        self.thread.join(15)
        for line in self.health_file.read_text().splitlines():
            t, took, status = line.split()
            self.health.append((float(t), float(took), int(status)))


async def fire(
    url: str, jobs: list[tuple[str, int]], concurrency: int, completed: list[int]
) -> list[Outcome]:
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    outcomes: list[Outcome] = []
    it = iter(jobs)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for kind, variant in it:
                outcomes.append(await one(client, kind, variant))
                completed[0] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _server_5xx(metrics_text: str) -> int:
    n = 0
    for line in metrics_text.splitlines():
        m = re.match(r'moeforge_requests_total\{endpoint="[^"]*",status="(\d+)"\} (\S+)', line)
        if m and m.group(1).startswith("5"):
            n += int(float(m.group(2)))
    return n


def _first_error(log_text: str) -> str:
    """The log line before the first traceback and the exception that ends it."""
    lines = log_text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
    end = next((line for line in lines[i + 1 :] if line and not line[0].isspace()), "?")
    return f"{lines[i - 1] if i else ''} … {end}"


def soak(
    requests: int = 2000,
    concurrency: int = 32,
    seed: int = 0,
    checkpoint: Path | None = None,
    server_args: list[str] | None = None,
    rss_growth_mb: float = RSS_GROWTH_MB,
    keep_log: Path | None = None,
    allow: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Run the soak; the report (``report["passed"]``, ``report["failures"]``). ``keep_log``: copy the
    server's log there. ``allow``: more statuses any kind may get (429 for a server with a short queue)."""
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="moeforge-soak-") as tmp:
        work = Path(tmp)
        ckpt = checkpoint or build_checkpoint(work / "model", seed)
        server = start_server(ckpt, work, server_args)
        server_5xx = None
        try:
            jobs = plan(requests, seed)
            probes = Probes(server.url, server.proc.pid, work)
            with probes:
                time.sleep(1.0)  # a few idle samples first
                t0 = time.time()
                outcomes = asyncio.run(fire(server.url, jobs, concurrency, probes.completed))
                wall = time.time() - t0
                time.sleep(2.0)  # cancelled jobs drain; idle RSS
            idle = httpx.get(f"{server.url}/health", timeout=10).json()
            server_5xx = _server_5xx(httpx.get(f"{server.url}/metrics", timeout=10).text)
        finally:
            rc = stop_server(server.proc)
            log_text = server.log.read_text(errors="replace")
            if keep_log is not None:
                keep_log.write_text(log_text)
    load_end = os.getloadavg()

    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o.kind][str(o.status)] += 1
    statuses = Counter(str(o.status) for o in outcomes)
    five_xx = [o for o in outcomes if o.status is not None and o.status >= 500]
    unexpected = [
        o
        for o in outcomes
        if (o.status not in EXPECTED[o.kind] and o.status not in allow) or o.error is not None
    ]

    lat = [h[1] for h in probes.health]
    health_fail = [h for h in probes.health if h[2] != 200]

    def window(lo: float, hi: float) -> list[float]:
        return [mb for _, mb, done in probes.rss if lo * requests <= done <= hi * requests]

    warm, end = window(0.2, 0.4), window(0.8, 1.0)
    rss_warm = statistics.median(warm) if warm else float("nan")
    rss_end = statistics.median(end) if end else float("nan")
    growth = rss_end - rss_warm
    report: dict[str, Any] = {
        "requests": requests,
        "concurrency": concurrency,
        "seed": seed,
        "server_argv": [Path(server.argv[0]).name, *server.argv[1:4], "CKPT", *server.argv[5:]],
        "mix": MIX,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "cpus": os.cpu_count(),
        "status_counts": dict(sorted(statuses.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "five_xx": len(five_xx),
        "server_5xx": server_5xx,
        "unexpected": len(unexpected),
        "unexpected_examples": [
            {"kind": o.kind, "status": o.status, "error": o.error} for o in unexpected[:10]
        ],
        "request_s_p50": round(_pct([o.seconds for o in outcomes], 50), 4),
        "request_s_p99": round(_pct([o.seconds for o in outcomes], 99), 4),
        "health": {
            "polls": len(lat),
            "not_200": len(health_fail),
            "p50_ms": round(1000 * _pct(lat, 50), 1),
            "p99_ms": round(1000 * _pct(lat, 99), 1),
            "max_ms": round(1000 * max(lat, default=float("nan")), 1),
            "over_100ms": sum(x > 0.1 for x in lat),
            "max_at_s": round(max(probes.health, key=lambda h: h[1])[0] - t0, 2) if lat else None,
        },
        "health_after": idle,
        "rss_mb": {
            "samples": len(probes.rss),
            "before": round(probes.rss[0][1], 1) if probes.rss else None,
            "warm_median_20_40pct": round(rss_warm, 1),
            "end_median_80_100pct": round(rss_end, 1),
            "idle_after": round(probes.rss[-1][1], 1) if probes.rss else None,
            "peak": round(max(mb for _, mb, _ in probes.rss), 1) if probes.rss else None,
            "growth_mb": round(growth, 1),
            "growth_pct": round(100 * growth / rss_warm, 1) if rss_warm == rss_warm else None,
            "limit_mb": rss_growth_mb,
            "series": [[done, round(mb, 1)] for _, mb, done in probes.rss],  # (requests done, MB)
        },
        "server_exit": rc,
        "traceback_in_log": "Traceback" in log_text,
    }
    failures = []
    if five_xx or server_5xx:
        failures.append(f"{len(five_xx)} 5xx answers seen by the client, {server_5xx} counted by the server")
    if unexpected:
        failures.append(
            f"{len(unexpected)} answers not what their kind expects (e.g. {report['unexpected_examples'][:3]})"
        )
    if health_fail:
        failures.append(f"{len(health_fail)} /health polls did not answer 200")
    if not lat or max(lat) > HEALTH_LIMIT_S:
        failures.append(
            f"/health took up to {max(lat, default=float('nan')):.3f} s (limit {HEALTH_LIMIT_S} s)"
        )
    if not (growth <= rss_growth_mb):  # NaN (no samples) fails too
        failures.append(f"RSS grew {growth:.1f} MB after warm-up (limit {rss_growth_mb} MB)")
    if idle.get("models", {}).get(MODEL, {}).get("in_flight") != 0:
        failures.append(f"requests still in flight after the soak: {idle}")
    if report["traceback_in_log"]:
        failures.append(
            f"the server logged {log_text.count('Traceback')} tracebacks; the first: {_first_error(log_text)}"
        )
    report["failures"] = failures
    report["passed"] = not failures
    return report


def table(r: dict[str, Any]) -> str:
    h, m = r["health"], r["rss_mb"]
    kinds = sorted({s for v in r["by_kind"].values() for s in v})
    lines = [
        f"{r['requests']} requests at concurrency {r['concurrency']} (seed {r['seed']}) in {r['wall_s']} s: "
        f"{r['requests_per_s']} req/s; load average {r['loadavg_start'][0]} → {r['loadavg_end'][0]} "
        f"({r['cpus']} CPUs)",
        "",
        f"{'kind':<18}" + "".join(f"{s:>6}" for s in kinds),
    ]
    for kind, counts in r["by_kind"].items():
        lines.append(f"{kind:<18}" + "".join(f"{counts.get(s, 0):>6}" for s in kinds))
    lines += [
        "",
        f"5xx: {r['five_xx']} (server's count: {r['server_5xx']}); unexpected answers: {r['unexpected']}",
        f"/health: {h['polls']} polls, p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms",
        f"RSS: before {m['before']} MB, warm-up {m['warm_median_20_40pct']} MB, end {m['end_median_80_100pct']} MB "
        f"(growth {m['growth_mb']:+} MB, {m['growth_pct']:+}%), peak {m['peak']} MB, idle after {m['idle_after']} MB",
        f"server log Traceback: {r['traceback_in_log']}; server exit {r['server_exit']}",
        "PASS" if r["passed"] else "FAIL:\n  " + "\n  ".join(r["failures"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="serve this instead of a tiny model built here")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-growth-mb", type=float, default=RSS_GROWTH_MB)
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--log", type=Path, help="copy the server's log here")
    ap.add_argument(
        "--allow",
        type=int,
        action="append",
        default=[],
        help="a status any kind may get (e.g. 429), repeatable",
    )
    ap.add_argument("server_args", nargs="*", help="more `moeforge serve` options (after --)")
    a = ap.parse_args(argv)
    report = soak(
        a.requests,
        a.concurrency,
        a.seed,
        a.checkpoint,
        a.server_args,
        a.rss_growth_mb,
        a.log,
        frozenset(a.allow),
    )
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
