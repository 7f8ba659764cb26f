"""The OpenAI-compatible HTTP server: FastAPI routes over a batching scheduler that owns the engine.

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions`` and
``POST /v1/chat/completions`` with OpenAI's request and response schemas (``stream: true`` sends
server-sent events ending in ``data: [DONE]``), ``GET /health`` and ``GET /metrics`` (Prometheus text).
Every error, 4xx or 5xx, has OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

Scheduling. The engine is synchronous and not thread-safe, so each served engine is owned by one worker
thread (:class:`Scheduler`). A handler validates its request on the event loop (tokenizes, checks the
context and the sampling values, so a bad request costs no generation) and queues one job per choice.
The worker starts waiting jobs as a decode batch of up to ``engine.max_batch`` rows and advances every
running batch by one token per round, so a batch started while others run does not wait for them to
finish. A batch cannot take new rows once it runs (the engine's cache is laid out at prefill), and every
running batch costs one forward per round, so: an idle worker waits up to ``max_batch_wait_ms`` after
the first arrival for companions; a busy one starts a new batch only when it is full or when its oldest
job has waited ``BUSY_WAIT_STEPS`` decode steps. Streaming and non-streaming jobs share batches: after
each step a streaming job gets its new text (held back while it could still be the start of a stop
string, as ``Engine.stream`` does) and a finished job its completion, through its event loop's
``call_soon_threadsafe``. Requests that arrive together therefore decode together, and throughput grows
with concurrency up to ``max_batch`` rows per forward.

Limits. At most ``max_concurrency`` jobs decode at once and the rest wait; a request that would make
more than ``max_concurrency + max_queue`` requests in flight gets 429 at once. A request not done after
``request_timeout`` seconds gets 504 (mid-stream: an error event) and its jobs are cancelled.
Cancellation (a timeout, or a client that disconnects, streaming or not) sets a flag the worker reads
before every step: a waiting job is dropped, a running one is marked finished and leaves its batch, so
its slot is free within one step.

The worker drives the engine's batch internals (``_rows``, ``_start``, ``_step``) — the loop
``Engine.generate`` runs — because the public ``generate``/``stream`` cannot share a batch between
requests or drop one request from a running batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeforge.serve.engine import Engine, EngineError
from moeforge.serve.sampling import Completion, SamplingParams, stop_holdback
from moeforge.serve.sampling import Request as Row

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "Metrics",
    "Scheduler",
    "ServeError",
    "create_app",
    "find_system_prompt",
    "load_engine",
    "serve",
]

log = logging.getLogger(__name__)

MAX_CHOICES = 16  # choices (prompts × n) per request
BUSY_WAIT_STEPS = 8  # while batches run, a waiting job starts a partial batch after this many steps' time
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context


class ServeError(ValueError):
    """A model path or server setting that cannot be served; the message says what to do."""


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=dict(headers or {}))


# ---- request schemas ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    # JSON types must match (no "5" for 5) and unknown arguments are errors, as with OpenAI
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share: OpenAI's names; ``top_k`` and ``repetition_penalty`` are extensions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list) and any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if v:  # rejected rather than silently ignored
            hint = "" if info.field_name == "logit_bias" else "; repetition_penalty > 1 discourages repeats"
            raise ValueError(f"is not supported by this server (only 0 or null){hint}")
        return v

    def sampling(self, max_tokens: int, logprobs: bool) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=self.stop,
            seed=self.seed,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids or token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # 0: the chosen tokens' log-probabilities (no alternatives)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        ok = isinstance(v, str) or (
            isinstance(v, list) and (all(isinstance(p, str) for p in v) or ids(v) or all(ids(p) for p in v))
        )
        if not ok:
            raise ValueError(
                "must be a string, a list of strings, a list of token ids or a list of such lists"
            )
        if v == [] or v == "":
            raise ValueError("is empty; send at least one prompt with at least one token")
        return v

    @field_validator("echo", "suffix")
    @classmethod
    def _not_supported(cls, v: Any) -> Any:
        if v:
            raise ValueError("is not supported by this server")
        return v

    @field_validator("logprobs")
    @classmethod
    def _chosen_only(cls, v: int | None) -> int | None:
        if v:
            raise ValueError(
                "above 0 (alternative tokens) is not supported; 0 returns the chosen tokens' logprobs"
            )
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("other than 1 is not supported; use n for several completions")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(_Strict):
    """One chat turn; ``content`` is a string or OpenAI's list of ``{"type": "text", "text": …}`` parts.
    A ``developer`` turn (OpenAI's newer name for system) is a system turn."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None  # accepted and ignored

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(
                        f"part {i} must be {{'type': 'text', 'text': str}}; got {kind!r} (only text)"
                    )
                texts.append(part["text"])
            return "".join(texts)
        if not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        return v


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _chosen_only(cls, v: int | None) -> int | None:
        if v:
            raise ValueError(
                "above 0 (alternative tokens) is not supported; logprobs=true gives the chosen tokens'"
            )
        return v

    @field_validator("messages", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if v == []:
            raise ValueError("is empty; a chat needs at least one message")
        return v


# ---- response schemas ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: None = None
    text_offset: None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """A completion, or (with ``usage`` None) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[Any] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- metrics ------------------------------------------------------------------------------------------


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}'
            for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        return [*out, f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
    """Counters and histograms for ``/metrics``, updated from the event loop and the worker threads."""

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
    RATE_WINDOW_S = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.generated_tokens: dict[str, int] = {}
        self.steps: dict[str, int] = {}
        self.batch_rows: dict[str, _Histogram] = {}
        self._recent: dict[str, deque[tuple[float, int]]] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, _Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, model: str, rows: int, prompt_tokens: int) -> None:
        with self._lock:
            self.batch_rows.setdefault(model, _Histogram(self.BATCH_BUCKETS)).observe(rows)
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt_tokens

    def observe_step(self, model: str, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens[model] = self.generated_tokens.get(model, 0) + tokens
            self.steps[model] = self.steps.get(model, 0) + 1
            recent = self._recent.setdefault(model, deque())
            recent.append((now, tokens))
            while recent and recent[0][0] < now - self.RATE_WINDOW_S:
                recent.popleft()

    def tokens_per_second(self, model: str) -> float:
        now = time.monotonic()
        with self._lock:
            return (
                sum(n for t, n in self._recent.get(model, ()) if t >= now - self.RATE_WINDOW_S)
                / self.RATE_WINDOW_S
            )

    def render(self, gauges: Mapping[str, Mapping[str, float]]) -> str:
        """Prometheus text format 0.0.4; ``gauges[metric][model]`` are the live values."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))

        with self._lock:
            head("moeforge_requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (ep, status), n in sorted(self.requests.items()):
                out.append(f'moeforge_requests_total{{endpoint="{_label(ep)}",status="{status}"}} {n}')
            head("moeforge_request_duration_seconds", "histogram", "Request latency (until the last byte).")
            for ep, h in sorted(self.latency.items()):
                out.extend(h.lines("moeforge_request_duration_seconds", f'endpoint="{_label(ep)}"'))
            for name, table, text in (
                ("moeforge_prompt_tokens_total", self.prompt_tokens, "Prompt tokens prefilled."),
                ("moeforge_generated_tokens_total", self.generated_tokens, "Tokens generated."),
                (
                    "moeforge_decode_steps_total",
                    self.steps,
                    "Batched forward passes (prefills and decode steps).",
                ),
            ):
                head(name, "counter", text)
                out.extend(f'{name}{{model="{_label(m)}"}} {v}' for m, v in sorted(table.items()))
            head("moeforge_batch_rows", "histogram", "Requests (choices) per decode batch when it starts.")
            for m, h in sorted(self.batch_rows.items()):
                out.extend(h.lines("moeforge_batch_rows", f'model="{_label(m)}"'))
        for name, per_model in gauges.items():
            head(name, "gauge", _GAUGES[name])
            out.extend(f'{name}{{model="{_label(m)}"}} {v:g}' for m, v in sorted(per_model.items()))
        return "\n".join(out) + "\n"


_GAUGES = {
    "moeforge_tokens_per_second": f"Tokens generated per second over the last {Metrics.RATE_WINDOW_S:g} s.",
    "moeforge_requests_in_flight": "HTTP generation requests admitted and not yet answered.",
    "moeforge_queue_depth": "Choices waiting for a decode slot.",
    "moeforge_running": "Choices being decoded.",
}


# ---- the scheduler ------------------------------------------------------------------------------------


@dataclass
class _Event:
    """What the worker sends a request: new text for choice ``index``, its completion once it is done,
    or an error."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    completion: Completion | None = None
    error: APIError | None = None


@dataclass(eq=False)
class _Job:
    """One choice of one request: the engine row it decodes and where its events go."""

    index: int
    row: Row
    stream: bool
    queue: asyncio.Queue[_Event]
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False  # set on the event loop, read by the worker (a bool store is atomic)
    sent_text: int = 0
    sent_ids: int = 0
    enqueued: float = field(default_factory=time.monotonic)

    def emit(self, event: _Event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass(eq=False)
class _Running:
    batch: Any  # the engine's decode batch
    jobs: list[_Job]


class Scheduler:
    """The worker thread that owns one engine: batches waiting jobs and steps the running batches."""

    def __init__(self, engine: Engine, *, name: str, max_running: int, batch_wait_s: float, metrics: Metrics):
        self.engine, self.name, self.metrics = engine, name, metrics
        self.max_running, self.batch_wait_s = max_running, batch_wait_s
        self.running = 0  # jobs in running batches (written by the worker only)
        self._step_s = 0.0  # moving average of one decode step's duration
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._batches: list[_Running] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"moeforge-serve[{self.name}]", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, jobs: list[_Job]) -> None:
        with self._cond:
            if self._stopping or not self.alive:
                raise APIError(503, "the server is shutting down; retry later", type="server_error")
            self._waiting.extend(jobs)
            self._cond.notify_all()

    # ---- worker thread ----

    def _run(self) -> None:
        log.info("scheduler for %s started (max_batch %d)", self.name, self.engine.max_batch)
        gone = APIError(503, "the server is shutting down; retry later", type="server_error")
        try:
            while (jobs := self._admit()) is not None:
                if jobs:
                    self._start(jobs)
                for entry in list(self._batches):
                    self._advance(entry)
        except Exception as exc:  # a bug: fail what is pending; /health reports the dead worker
            log.exception("the scheduler for %s crashed", self.name)
            gone = APIError(500, f"the generation worker crashed: {type(exc).__name__}", type="server_error")
        finally:
            for job in [*self._waiting, *(j for e in self._batches for j in e.jobs)]:
                job.emit(_Event(job.index, error=gone))
            self._waiting.clear()
            self._batches.clear()
            self.running = 0

    def _admit(self) -> list[_Job] | None:
        """The jobs to start as a new batch now (maybe none), or None when the server stops."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if any(j.cancelled for j in self._waiting):
                    self._waiting = deque(j for j in self._waiting if not j.cancelled)
                if self._waiting or self._batches:
                    break
                self._cond.wait()
            room = min(self.engine.max_batch, self.max_running - self.running)
            if not self._batches:  # idle: give companions a moment to arrive
                deadline = self._waiting[0].enqueued + self.batch_wait_s
                while (
                    len(self._waiting) < room
                    and not self._stopping
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self._cond.wait(left)
            elif (
                room <= 0
                or not self._waiting
                or (
                    min(len(self._waiting), room) < self.engine.max_batch
                    and time.monotonic() - self._waiting[0].enqueued < self._busy_wait()
                )
            ):
                return []  # let arrivals (and free slots) gather while the running batches step
            take: list[_Job] = []
            while self._waiting and len(take) < room:
                job = self._waiting.popleft()
                if not job.cancelled:
                    take.append(job)
            return take

    def _busy_wait(self) -> float:
        # Every running batch costs a forward per token, so while the engine is busy a new batch is worth
        # starting once it is full, or once its oldest job has waited a few steps' time.
        return max(self.batch_wait_s, BUSY_WAIT_STEPS * self._step_s)

    def _start(self, jobs: list[_Job]) -> None:
        try:
            batch = self.engine._start([j.row for j in jobs])  # prefill + each row's first token
        except Exception as exc:
            self._fail(jobs, exc)
            return
        self.metrics.observe_batch(self.name, len(jobs), sum(len(j.row.prompt) for j in jobs))
        self.metrics.observe_step(self.name, len(jobs))
        entry = _Running(batch, jobs)
        self._batches.append(entry)
        self.running += len(jobs)
        self._deliver(entry)

    def _advance(self, entry: _Running) -> None:
        live = 0
        for job in entry.jobs:
            if job.cancelled:
                job.row.finish_reason = "stop"  # the engine skips it and drops it from the batch
            else:
                live += 1
        if live:
            start = time.perf_counter()
            try:
                self.engine._step(entry.batch)
            except Exception as exc:
                self._fail(entry.jobs, exc)
                self._retire(entry, entry.jobs)
                return
            self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - start)
            self.metrics.observe_step(self.name, live)
        self._deliver(entry)

    def _deliver(self, entry: _Running) -> None:
        """Send each job its new text or its completion; retire finished and cancelled jobs."""
        tok = self.engine.tokenizer
        done = []
        for job in entry.jobs:
            row = job.row
            if job.cancelled:
                done.append(job)
            elif row.finish_reason is not None:
                c = row.completion(tok)
                lp = c.logprobs[job.sent_ids :] if c.logprobs is not None else None
                job.emit(_Event(job.index, c.text[job.sent_text :], c.token_ids[job.sent_ids :], lp, c))
                done.append(job)
            elif job.stream:
                upto = len(row.text) - stop_holdback(row.text, row.params.stop)
                if upto > job.sent_text or (tok is None and len(row.tokens) > job.sent_ids):
                    lp = row.logprobs[job.sent_ids :] if row.params.logprobs else None
                    job.emit(
                        _Event(job.index, row.text[job.sent_text : upto], row.tokens[job.sent_ids :], lp)
                    )
                    job.sent_text, job.sent_ids = upto, len(row.tokens)
        if done:
            self._retire(entry, done)

    def _retire(self, entry: _Running, jobs: list[_Job]) -> None:
        gone = set(map(id, jobs))
        entry.jobs = [j for j in entry.jobs if id(j) not in gone]
        self.running -= len(jobs)
        if not entry.jobs:
            self._batches.remove(entry)

    def _fail(self, jobs: list[_Job], exc: Exception) -> None:
        log.exception("generation failed for a batch of %d on %s", len(jobs), self.name, exc_info=exc)
        err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
        for job in jobs:
            job.emit(_Event(job.index, error=err))


# ---- the app ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Served:
    """One model the server serves: its engine, worker, default system prompt and admission counter."""

    name: str
    engine: Engine
    scheduler: Scheduler
    system_prompt: str | None
    created: int
    in_flight: int = 0  # requests admitted and not yet answered (event loop only)


class _Call:
    """One admitted request: its jobs, their event queue, its deadline and its slot (freed once)."""

    def __init__(self, served: _Served, jobs: list[_Job], deadline: float, timeout: float) -> None:
        self.served, self.jobs, self.deadline, self.timeout = served, jobs, deadline, timeout
        self.queue = jobs[0].queue
        self.open = True

    async def next_event(self, hang_up: asyncio.Future[None] | None = None) -> _Event:
        """The next event; 504 at the deadline; 499 (nobody reads it) once ``hang_up`` is done."""
        get = asyncio.ensure_future(self.queue.get())
        waits = {get} if hang_up is None else {get, hang_up}
        got = False
        try:
            left = max(0.0, self.deadline - time.monotonic())
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            got = get.done()
        finally:  # also when the caller is cancelled (a disconnected stream)
            if not got:
                get.cancel()
        if not got:
            self.close()
            if hang_up is not None and hang_up.done():
                raise APIError(499, "the client closed the connection", type="client_closed_request")
            raise APIError(
                504,
                f"the request did not finish within the server's timeout of {self.timeout:g} s; "
                "ask for fewer tokens (max_tokens) or retry when the server is less busy",
                type="timeout_error",
                code="timeout",
            )
        event = get.result()
        if event.error is not None:
            self.close()
            raise event.error
        return event

    def close(self) -> None:
        if self.open:
            self.open = False
            for job in self.jobs:
                job.cancelled = True
            self.served.in_flight -= 1


class _SSEResponse(StreamingResponse):
    """A server-sent-events response that frees its request's slot however the stream ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Middleware:
    """Pure ASGI (streaming-safe): the API key check on ``/v1/*`` and per-endpoint request metrics."""

    ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")

    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None) -> None:
        self.app, self.metrics = app, metrics
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = (
            path
            if path in self.ENDPOINTS
            else "/v1/models/{id}"
            if path.startswith("/v1/models/")
            else "other"
        )
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and path.startswith("/v1/") and not self._authorized(scope, self.key):
                err = APIError(
                    401,
                    "missing or incorrect API key; send it as the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await err.response({"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)

    @staticmethod
    def _authorized(scope: Scope, key: bytes) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
        return False


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message for pydantic errors (at most three) and the first error's parameter."""
    parts, params = [], []
    for e in errors[:3]:
        loc = [str(p) for p in e["loc"] if p != "body"]
        where = ".".join(loc)
        if e["type"] == "json_invalid":
            return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        if e["type"] == "extra_forbidden":
            parts.append(f"unrecognized request argument: {where}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = (
                ""
                if isinstance(got, (dict, list)) or got is None or e["type"] == "missing"
                else f" (got {_clip(repr(got))})"
            )
            parts.append(f"{where}: {msg}{shown}" if where else msg)
        params.append(where or None)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, params[0] if params else None


class _API:
    """What the routes do: resolve the model, validate against its context, admit, and answer (whole or
    streamed). ``create_app`` registers the public coroutines as routes."""

    def __init__(
        self,
        served: dict[str, _Served],
        metrics: Metrics,
        max_concurrency: int,
        max_queue: int,
        timeout: float,
    ) -> None:
        self.served, self.metrics, self.timeout = served, metrics, timeout
        self.max_concurrency, self.max_queue = max_concurrency, max_queue

    # ---- routes ----

    async def health(self) -> JSONResponse:
        ok = all(s.scheduler.alive for s in self.served.values())
        models = {
            s.name: {
                "in_flight": s.in_flight,
                "queue_depth": s.scheduler.queue_depth,
                "running": s.scheduler.running,
            }
            for s in self.served.values()
        }
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "models": models}, status_code=200 if ok else 503
        )

    async def metrics_text(self) -> PlainTextResponse:
        served = self.served
        gauges = {
            "moeforge_tokens_per_second": {n: self.metrics.tokens_per_second(n) for n in served},
            "moeforge_requests_in_flight": {n: s.in_flight for n, s in served.items()},
            "moeforge_queue_depth": {n: s.scheduler.queue_depth for n, s in served.items()},
            "moeforge_running": {n: s.scheduler.running for n, s in served.items()},
        }
        text = self.metrics.render(gauges)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=s.name, created=s.created) for s in self.served.values()])

    async def get_model(self, model_id: str) -> ModelCard:
        s = self._model(model_id)
        return ModelCard(id=s.name, created=s.created)

    async def completions(
        self, body: CompletionRequest, request: HTTPRequest
    ) -> CompletionResponse | Response:
        s = self._model(body.model)
        prompts, n = body.prompts(), body.n or 1
        if n * len(prompts) > MAX_CHOICES:
            msg = f"{len(prompts)} prompts × n={n} is over {MAX_CHOICES} choices per request"
            raise APIError(400, msg, param="n")
        parts, prompt_tokens = [], 0
        for prompt in prompts:
            try:
                ids = s.engine.encode(prompt) if isinstance(prompt, str) else prompt
            except EngineError as exc:
                raise APIError(400, f"{exc}; this model takes token-id prompts", param="prompt") from None
            if not ids:
                raise APIError(400, "a prompt encodes to no tokens; send at least one token", param="prompt")
            max_tokens = self._max_tokens(s, len(ids), body.max_tokens, "max_tokens", "prompt")
            parts.append((ids, body.sampling(max_tokens, logprobs=body.logprobs is not None)))
            prompt_tokens += len(ids)
        call = self._admit(s, self._jobs(s, parts, n, bool(body.stream)))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def response(choices: list[CompletionChoice], use: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(id=rid, created=created, model=s.name, choices=choices, usage=use)

        def choice(e: _Event) -> CompletionChoice:
            lp = (
                None
                if e.logprobs is None
                else CompletionLogprobs(tokens=self._texts(s, e.token_ids), token_logprobs=e.logprobs)
            )
            reason = e.completion.finish_reason if e.completion is not None else None
            return CompletionChoice(index=e.index, text=e.text, logprobs=lp, finish_reason=reason)

        if body.stream:
            tail = (lambda k: response([], _usage(prompt_tokens, k))) if body.include_usage else None
            return await self._sse(call, [], lambda e: response([choice(e)]), tail)
        done = await self._collect(call, request)
        choices = [choice(_Event(i, c.text, c.token_ids, c.logprobs, c)) for i, c in enumerate(done)]
        return response(choices, _usage(prompt_tokens, sum(c.completion_tokens for c in done)))

    async def chat_completions(
        self, body: ChatCompletionRequest, request: HTTPRequest
    ) -> ChatCompletionResponse | Response:
        s = self._model(body.model)
        asked, param = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            if asked is not None and asked != body.max_completion_tokens:
                raise APIError(
                    400, "max_tokens and max_completion_tokens differ; send one", param="max_tokens"
                )
            asked, param = body.max_completion_tokens, "max_completion_tokens"
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in body.messages
        ]
        system = s.system_prompt if messages[0]["role"] != "system" else None
        try:
            ids = s.engine.encode(s.engine.chat_prompt(messages, system))
            max_tokens = self._max_tokens(s, len(ids), asked, param, "messages")
            params = s.engine.chat_params(body.sampling(max_tokens, logprobs=bool(body.logprobs)))
        except EngineError as exc:
            raise APIError(400, str(exc), param="messages") from None
        call = self._admit(s, self._jobs(s, [(ids, params)], body.n or 1, bool(body.stream)))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(e: _Event) -> ChatLogprobs | None:
            if e.logprobs is None:
                return None
            pairs = zip(self._texts(s, e.token_ids), e.logprobs, strict=False)
            return ChatLogprobs(
                content=[TokenLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in pairs]
            )

        def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=s.name, choices=choices, usage=use)

        def delta(e: _Event) -> ChatCompletionChunk:
            reason = e.completion.finish_reason if e.completion is not None else None
            return chunk(
                [
                    ChatChunkChoice(
                        index=e.index,
                        delta=ChatDelta(content=e.text),
                        logprobs=logprobs(e),
                        finish_reason=reason,
                    )
                ]
            )

        if body.stream:
            head = [
                chunk([ChatChunkChoice(index=j.index, delta=ChatDelta(role="assistant", content=""))])
                for j in call.jobs
            ]
            tail = (lambda k: chunk([], _usage(len(ids), k))) if body.include_usage else None
            return await self._sse(call, head, delta, tail)
        done = await self._collect(call, request)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=logprobs(_Event(i, c.text, c.token_ids, c.logprobs, c)),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(done)
        ]
        use = _usage(len(ids), sum(c.completion_tokens for c in done))
        return ChatCompletionResponse(id=rid, created=created, model=s.name, choices=choices, usage=use)

    # ---- helpers ----

    def _model(self, name: str) -> _Served:
        if name not in self.served:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves: {', '.join(self.served)}",
                param="model",
                code="model_not_found",
            )
        return self.served[name]

    @staticmethod
    def _max_tokens(s: _Served, n_prompt: int, asked: int | None, param: str, what: str) -> int:
        """The tokens to generate at most: ``asked``, else what the context leaves (OpenAI's 16 for
        completions). 400 when the prompt, or the prompt + an explicit ``asked``, exceeds the context."""
        ctx = s.engine.cfg.max_seq_len
        if n_prompt >= ctx:
            raise APIError(
                400,
                f"the {what} has {n_prompt} tokens but the model's context is {ctx} tokens, so at most "
                f"{ctx - 1} fit with room for one new token; shorten the {what}",
                param=what,
                code="context_length_exceeded",
            )
        if asked is not None and n_prompt + asked > ctx:
            raise APIError(
                400,
                f"the model's context is {ctx} tokens but {n_prompt + asked} were requested ({n_prompt} in the "
                f"{what} + {asked} {param}); ask for at most {ctx - n_prompt} tokens or shorten the {what}",
                param=param,
                code="context_length_exceeded",
            )
        if asked is not None:
            return asked
        return min(COMPLETIONS_DEFAULT_MAX_TOKENS, ctx - n_prompt) if what == "prompt" else ctx - n_prompt

    @staticmethod
    def _jobs(
        s: _Served, prompts: list[tuple[list[int], SamplingParams]], n: int, stream: bool
    ) -> list[_Job]:
        """One job per (prompt, choice); the j-th choice of a seeded request samples with seed + j."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue[_Event]()
        jobs = []
        for ids, params in prompts:
            for j in range(n):
                p = (
                    params
                    if params.seed is None or j == 0
                    else params.model_copy(update={"seed": params.seed + j})
                )
                try:
                    row = s.engine._rows([ids], p, stream=stream)[0]  # validates; no torch work
                except EngineError as exc:
                    raise APIError(400, str(exc), param="prompt") from None
                jobs.append(_Job(len(jobs), row, stream, queue, loop))
        return jobs

    def _admit(self, s: _Served, jobs: list[_Job]) -> _Call:
        if s.in_flight >= self.max_concurrency + self.max_queue:
            raise APIError(
                429,
                f"the server is at capacity ({s.in_flight} requests in flight; max_concurrency "
                f"{self.max_concurrency} + max_queue {self.max_queue}); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        s.in_flight += 1
        call = _Call(s, jobs, time.monotonic() + self.timeout, self.timeout)
        try:
            s.scheduler.submit(jobs)
        except APIError:
            call.close()
            raise
        return call

    @staticmethod
    async def _collect(call: _Call, request: HTTPRequest) -> list[Completion]:
        """Every choice's completion. A client that hangs up meanwhile (Starlette does not cancel a
        non-streaming handler) cancels the request, as a disconnected stream does."""

        async def hang_up() -> None:
            while (await request.receive())["type"] != "http.disconnect":  # the body was read already
                pass

        watch = asyncio.ensure_future(hang_up())
        done: dict[int, Completion] = {}
        try:
            while len(done) < len(call.jobs):
                event = await call.next_event(watch)
                if event.completion is not None:
                    done[event.index] = event.completion
        finally:
            watch.cancel()
            call.close()
        return [done[i] for i in range(len(call.jobs))]

    @staticmethod
    async def _sse(
        call: _Call,
        head: list[BaseModel],
        render: Callable[[_Event], BaseModel],
        tail: Callable[[int], BaseModel] | None,
    ) -> Response:
        """Stream ``head``, one chunk per event, ``tail(completion_tokens)`` and ``[DONE]``. The first event
        is awaited before answering, so an error or a timeout before any token still gets its status code;
        a later one ends the stream with an error event (which the openai client raises)."""
        try:
            first = await call.next_event()
        except BaseException:
            call.close()
            raise

        async def events() -> AsyncIterator[str]:
            try:
                for chunk in head:
                    yield f"data: {chunk.model_dump_json()}\n\n"
                event, finished, completion_tokens = first, 0, 0
                while True:
                    yield f"data: {render(event).model_dump_json()}\n\n"
                    if event.completion is not None:
                        finished += 1
                        completion_tokens += event.completion.completion_tokens
                        if finished == len(call.jobs):
                            break
                    try:
                        event = await call.next_event()
                    except APIError as exc:
                        log.warning("a stream ended early: %s", exc.message)
                        yield f"data: {json.dumps(exc.body())}\n\n"
                        return
                if tail is not None:
                    yield f"data: {tail(completion_tokens).model_dump_json()}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on a disconnect, which cancels this generator
                call.close()

        return _SSEResponse(events(), on_close=call.close)

    @staticmethod
    def _texts(s: _Served, ids: list[int]) -> list[str]:
        tok = s.engine.tokenizer
        return [tok.decode([t], skip_special_tokens=False) if tok is not None else str(t) for t in ids]


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    total = prompt_tokens + completion_tokens
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


def create_app(
    engine_or_engines: Engine | Mapping[str, Engine],
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_concurrency: int = 16,
    max_queue: int = 64,
    request_timeout: float = 120.0,
    default_system_prompt: str | Mapping[str, str] | None = None,
    max_batch_wait_ms: float = 10.0,
) -> FastAPI:
    """The OpenAI-compatible app for one engine (named ``model_name``, default its config's name) or a
    mapping ``{model name: engine}``. ``default_system_prompt`` (one for all models, or one per name)
    opens every chat that does not start with a system turn. ``max_concurrency`` choices decode at once;
    requests beyond ``max_concurrency + max_queue`` in flight get 429; ``request_timeout`` seconds → 504.
    ``api_key``: when set, ``/v1/*`` needs ``Authorization: Bearer <key>`` (``/health`` and ``/metrics``
    stay open). The worker threads start and stop with the app's lifespan. Raises :class:`ServeError`
    for bad settings."""
    if isinstance(engine_or_engines, Engine):
        engines = {model_name or engine_or_engines.cfg.name: engine_or_engines}
    elif model_name is not None:
        raise ServeError("model_name names a single engine; with a mapping, its keys are the model names")
    else:
        engines = dict(engine_or_engines)
    if not engines:
        raise ServeError("no engine to serve")
    if max_concurrency < 1 or request_timeout <= 0 or max_queue < 0 or max_batch_wait_ms < 0:
        raise ServeError(
            "need max_concurrency >= 1, request_timeout > 0, max_queue >= 0 and max_batch_wait_ms >= 0 (got "
            f"{max_concurrency}, {request_timeout}, {max_queue}, {max_batch_wait_ms})"
        )
    if api_key == "":
        raise ServeError("api_key is empty; pass a key, or None for no authentication")
    metrics = Metrics()
    served = {}
    for name, engine in engines.items():
        system = (
            default_system_prompt.get(name)
            if isinstance(default_system_prompt, Mapping)
            else default_system_prompt
        )
        scheduler = Scheduler(
            engine,
            name=name,
            max_running=max_concurrency,
            batch_wait_s=max_batch_wait_ms / 1000,
            metrics=metrics,
        )
        served[name] = _Served(name, engine, scheduler, system or None, int(time.time()))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for s in served.values():
            s.scheduler.start()
        try:
            yield
        finally:
            await asyncio.gather(*(asyncio.to_thread(s.scheduler.stop) for s in served.values()))

    app = FastAPI(title="moeforge", summary="OpenAI-compatible moeforge server", lifespan=lifespan)
    app.add_middleware(_Middleware, metrics=metrics, api_key=api_key)
    _error_handlers(app)
    api = _API(served, metrics, max_concurrency, max_queue, request_timeout)
    app.get("/health")(api.health)
    app.get("/metrics", response_class=PlainTextResponse)(api.metrics_text)
    app.get("/v1/models")(api.list_models)
    app.get("/v1/models/{model_id:path}")(api.get_model)
    app.post("/v1/completions", response_model=None)(api.completions)
    app.post("/v1/chat/completions", response_model=None)(api.chat_completions)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's body; request validation errors are 400 (as OpenAI answers), not 422."""

    @app.exception_handler(APIError)
    async def _api_error(_req: HTTPRequest, exc: APIError) -> JSONResponse:
        return exc.response({"Retry-After": "1"} if exc.status in (429, 503) else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        text = f"no route {req.method} {req.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return APIError(
            exc.status_code, text, code="unknown_url" if exc.status_code == 404 else None
        ).response()

    @app.exception_handler(Exception)
    async def _crash(req: HTTPRequest, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", req.url.path, exc_info=exc)
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()


# ---- loading and running ------------------------------------------------------------------------------


def load_engine(path: str | os.PathLike[str], *, device: str | None = None, max_batch: int = 8) -> Engine:
    """An engine for a Hugging Face export directory (``config.json`` + ``*.safetensors``, with
    ``tokenizer.json`` beside them for text), a trainer checkpoint or a training run directory."""
    p = Path(path)
    if not p.exists():
        raise ServeError(
            f"{p}: no such file or directory; pass a checkpoint, a run or an HF export directory"
        )
    if not p.is_dir():
        raise ServeError(f"{p}: is a file; pass the directory holding model.safetensors")
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        from moeforge.model.hf import import_hf
        from moeforge.tokens.tokenizer import load_tokenizer

        model = import_hf(p)
        tokenizer = load_tokenizer(p) if (p / "tokenizer.json").is_file() else None
        if tokenizer is None:
            log.warning("%s: no tokenizer.json; the server takes token-id prompts only", p)
        return Engine(model, tokenizer, device=device, max_batch=max_batch)
    if (p / "state.json").is_file() or (p / "checkpoints").is_dir():
        return Engine.from_checkpoint(p, device=device, max_batch=max_batch)
    raise ServeError(
        f"{p}: neither a Hugging Face export (config.json + model.safetensors) nor a trainer checkpoint "
        "(state.json + model.safetensors) or run directory (checkpoints/)"
    )


def find_system_prompt(path: str | os.PathLike[str]) -> str | None:
    """The identity system turn the model was trained with: the ``identity.system_prompts`` (``*``, else
    ``en``) of the data recipe behind a trainer checkpoint, when its config names the pipeline run
    (``data.run``); None when it cannot be traced."""
    p = Path(path)
    candidates = [p / "state.json", *sorted((p / "checkpoints").glob("*/state.json"))[-1:]]
    for state_file in candidates:
        if not state_file.is_file():
            continue
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            run = ((state.get("config") or {}).get("data") or {}).get("run")
            if not run or not (Path(run) / "recipe.json").is_file():
                return None
            recipe = json.loads((Path(run) / "recipe.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        prompts = (recipe.get("identity") or {}).get("system_prompts") or {}
        return prompts.get("*") or prompts.get("en") or None
    return None


def serve(
    path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    system_prompt: str | None = None,
    max_concurrency: int = 16,
    max_queue: int = 64,
    request_timeout: float = 120.0,
    device: str | None = None,
    max_batch: int = 8,
    max_batch_wait_ms: float = 10.0,
) -> None:
    """Load ``path`` (see :func:`load_engine`) and serve it with uvicorn until interrupted.
    ``system_prompt`` None means the one the model was trained with (:func:`find_system_prompt`), if
    any; ``""`` means none."""
    import uvicorn

    engine = load_engine(path, device=device, max_batch=max_batch)
    if system_prompt is None:
        system_prompt = find_system_prompt(path)
        if system_prompt:
            log.info("default system prompt from the training data: %r", system_prompt)
    name = model_name or engine.cfg.name
    app = create_app(
        engine,
        model_name=name,
        api_key=api_key,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        request_timeout=request_timeout,
        default_system_prompt=system_prompt or None,
        max_batch_wait_ms=max_batch_wait_ms,
    )
    log.info(
        "serving %s as %r on http://%s:%d/v1 (api key %s)", path, name, host, port, "on" if api_key else "off"
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
