"""The OpenAI-compatible HTTP server: :func:`create_app` and its routes.

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions`` and
``POST /v1/chat/completions`` with OpenAI's request and response schemas (``stream: true`` sends
server-sent events ending in ``data: [DONE]``), ``GET /health`` and ``GET /metrics`` (Prometheus text).
Every error, 4xx or 5xx, has OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

Prompts. ``/v1/completions`` is a raw-text interface: special-token strings in a text prompt (such as
``<|im_start|>``) become special tokens, as in training text, so a client may write any prompt the model
can read. Chat content is not: ``/v1/chat/completions`` encodes each message's text as plain text
(:meth:`Engine.chat_ids`), so a message cannot fake a turn or an identity token; only the operator's
default system prompt keeps its special tokens.

Limits. At most ``max_concurrency`` choices decode at once and the rest wait; a request that would make
more than ``max_concurrency + max_queue`` requests in flight gets 429 at once. A request not done after
``request_timeout`` seconds gets 504 and its jobs are cancelled (see :mod:`moeforge.serve.calls`).

The rest of the server: :mod:`~moeforge.serve.schemas` (request and response bodies, the error body),
:mod:`~moeforge.serve.scheduler` (the worker thread that batches requests on the engine),
:mod:`~moeforge.serve.calls` (one request while it runs: deadline, cancellation, streaming),
:mod:`~moeforge.serve.middleware` (API key, request metrics, error handlers),
:mod:`~moeforge.serve.metrics` (Prometheus) and :mod:`~moeforge.serve.loading` (:func:`serve`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import Request as HTTPRequest

from moeforge.serve.calls import Call
from moeforge.serve.engine import Engine, EngineError, PromptTooLongError
from moeforge.serve.metrics import Metrics
from moeforge.serve.middleware import AuthAndMetrics, add_error_handlers
from moeforge.serve.sampling import SamplingParams
from moeforge.serve.scheduler import Event, Job, Scheduler
from moeforge.serve.schemas import (
    MAX_CHOICES,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    Usage,
    usage,
)

# Loading a model and running uvicorn (load_engine, serve) live in loading.py, which builds on this module.
__all__ = ["APIError", "ServeError", "create_app"]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context


class ServeError(ValueError):
    """A model path or server setting that cannot be served; the message says what to do."""


@dataclass(eq=False)
class _Served:
    """One model the server serves: its engine, worker, default system prompt and admission counter."""

    name: str
    engine: Engine
    scheduler: Scheduler
    system_prompt: str | None
    created: int
    in_flight: int = 0  # requests admitted and not yet answered (event loop only)


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
                # off the event loop: a long text takes a while to encode and must not stall other requests
                ids = await asyncio.to_thread(s.engine.encode, prompt) if isinstance(prompt, str) else prompt
            except PromptTooLongError as exc:
                raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
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

        def choice(e: Event) -> CompletionChoice:
            lp = (
                None
                if e.logprobs is None
                else CompletionLogprobs(tokens=self._texts(s, e.token_ids), token_logprobs=e.logprobs)
            )
            reason = e.completion.finish_reason if e.completion is not None else None
            return CompletionChoice(index=e.index, text=e.text, logprobs=lp, finish_reason=reason)

        if body.stream:
            tail = (lambda k: response([], usage(prompt_tokens, k))) if body.include_usage else None
            return await call.stream([], lambda e: response([choice(e)]), tail)
        done = await call.collect(request)
        choices = [choice(Event(i, c.text, c.token_ids, c.logprobs, c)) for i, c in enumerate(done)]
        return response(choices, usage(prompt_tokens, sum(c.completion_tokens for c in done)))

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
            # message text cannot forge special tokens; encoded off the event loop like completions
            ids = await asyncio.to_thread(s.engine.chat_ids, messages, system)
            max_tokens = self._max_tokens(s, len(ids), asked, param, "messages")
            params = s.engine.chat_params(body.sampling(max_tokens, logprobs=bool(body.logprobs)))
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except EngineError as exc:
            raise APIError(400, str(exc), param="messages") from None
        call = self._admit(s, self._jobs(s, [(ids, params)], body.n or 1, bool(body.stream)))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(e: Event) -> ChatLogprobs | None:
            if e.logprobs is None:
                return None
            pairs = zip(self._texts(s, e.token_ids), e.logprobs, strict=False)
            return ChatLogprobs(
                content=[TokenLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in pairs]
            )

        def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=s.name, choices=choices, usage=use)

        def delta(e: Event) -> ChatCompletionChunk:
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
            tail = (lambda k: chunk([], usage(len(ids), k))) if body.include_usage else None
            return await call.stream(head, delta, tail)
        done = await call.collect(request)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=logprobs(Event(i, c.text, c.token_ids, c.logprobs, c)),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(done)
        ]
        use = usage(len(ids), sum(c.completion_tokens for c in done))
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
                f"the model's context is {ctx} tokens but {n_prompt + asked} were requested "
                f"({n_prompt} in the {what} + {asked} {param}); ask for at most {ctx - n_prompt} tokens "
                f"or shorten the {what}",
                param=param,
                code="context_length_exceeded",
            )
        if asked is not None:
            return asked
        return min(COMPLETIONS_DEFAULT_MAX_TOKENS, ctx - n_prompt) if what == "prompt" else ctx - n_prompt

    @staticmethod
    def _jobs(s: _Served, prompts: list[tuple[list[int], SamplingParams]], n: int, stream: bool) -> list[Job]:
        """One job per (prompt, choice); the j-th choice of a seeded request samples with seed + j."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue[Event]()
        jobs = []
        for ids, params in prompts:
            for j in range(n):
                p = (
                    params
                    if params.seed is None or j == 0
                    else params.model_copy(update={"seed": params.seed + j})
                )
                try:
                    request = s.engine.prepare(ids, p, stream=stream)  # validates; no model work
                except EngineError as exc:
                    raise APIError(400, str(exc), param="prompt") from None
                jobs.append(Job(len(jobs), request, stream, queue, loop))
        return jobs

    def _admit(self, s: _Served, jobs: list[Job]) -> Call:
        if s.in_flight >= self.max_concurrency + self.max_queue:
            raise APIError(
                429,
                f"the server is at capacity ({s.in_flight} requests in flight; max_concurrency "
                f"{self.max_concurrency} + max_queue {self.max_queue}); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        s.in_flight += 1

        def release() -> None:
            s.in_flight -= 1

        call = Call(jobs, self.timeout, release)
        try:
            s.scheduler.submit(jobs)
        except APIError:
            call.close()
            raise
        return call

    @staticmethod
    def _texts(s: _Served, ids: list[int]) -> list[str]:
        tok = s.engine.tokenizer
        return [tok.decode([t], skip_special_tokens=False) if tok is not None else str(t) for t in ids]


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
    max_body_bytes: int | None = 1 << 20,
) -> FastAPI:
    """The OpenAI-compatible app for one engine (named ``model_name``, default its config's name) or a
    mapping ``{model name: engine}``. ``default_system_prompt`` (one for all models, or one per name)
    opens every chat that does not start with a system turn. ``max_concurrency`` choices decode at once;
    requests beyond ``max_concurrency + max_queue`` in flight get 429; ``request_timeout`` seconds → 504;
    a body above ``max_body_bytes`` (default 1 MiB; None: no limit) → 413 before it is parsed.
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
    app.add_middleware(AuthAndMetrics, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)
    add_error_handlers(app)
    api = _API(served, metrics, max_concurrency, max_queue, request_timeout)
    app.get("/health")(api.health)
    app.get("/metrics", response_class=PlainTextResponse)(api.metrics_text)
    app.get("/v1/models")(api.list_models)
    app.get("/v1/models/{model_id:path}")(api.get_model)
    app.post("/v1/completions", response_model=None)(api.completions)
    app.post("/v1/chat/completions", response_model=None)(api.chat_completions)
    return app
