"""The OpenAI-compatible HTTP server: :func:`create_app` and its routes.

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``, each with its context length
``max_model_len``), ``POST /v1/completions`` and ``POST /v1/chat/completions`` with OpenAI's request and
response schemas (``stream: true`` sends server-sent events ending in ``data: [DONE]``), vLLM's
``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` (what lm-eval's remote tokenizer
reads), ``GET /health`` and ``GET /metrics`` (Prometheus text). Every error, 4xx or 5xx, has OpenAI's
body ``{"error": {"message", "type", "param", "code"}}``.

Scoring. ``/v1/completions`` takes ``echo`` and ``logprobs`` 0..20 (OpenAI's legacy ``logprobs`` object,
see :mod:`~moeforge.serve.logprobs`): with ``echo`` the prompt's tokens come first, the first without a
log-probability, and ``max_tokens: 0`` scores the prompt without generating — what lm-eval's
``local-completions`` model sends for loglikelihoods. A prompt's scores are computed by the worker
(:meth:`Engine.score`, batched with other requests' prompts, between decode steps: see
:mod:`~moeforge.serve.scheduler`); the generated tokens' log-probabilities and top tokens are recorded
by the decode batch, only for requests that ask.

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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import Request as HTTPRequest

from moeforge.serve.calls import Call
from moeforge.serve.engine import Engine, EngineError, PromptTooLongError
from moeforge.serve.logprobs import Offsets, TokenTexts, finite, generated_logprobs, joined, prompt_logprobs
from moeforge.serve.metrics import Metrics
from moeforge.serve.middleware import AuthAndMetrics, add_error_handlers
from moeforge.serve.request import Completion
from moeforge.serve.sampling import SamplingParams
from moeforge.serve.scheduler import Event, Job, Scheduler, ScoreJob
from moeforge.serve.schemas import (
    MAX_CHOICES,
    MAX_SCORING_CHOICES,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
    usage,
)
from moeforge.tokens.tokenizer import CHAT_TEMPLATE, special_token_name

# Loading a model and running uvicorn (load_engine, serve) live in loading.py, which builds on this module.
__all__ = ["ServeError", "create_app"]

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
    texts: TokenTexts = field(init=False)  # each token id's text, for logprobs

    def __post_init__(self) -> None:
        self.texts = TokenTexts(self.engine.tokenizer)

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created, max_model_len=self.engine.cfg.max_seq_len)


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
                "scoring_queue": s.scheduler.scoring_depth,
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
        return ModelList(data=[s.card() for s in self.served.values()])

    async def get_model(self, model_id: str) -> ModelCard:
        return self._model(model_id).card()

    async def completions(
        self, body: CompletionRequest, request: HTTPRequest
    ) -> CompletionResponse | Response:
        s = self._model(body.model)
        prompts, n, echo, top = body.prompts(), body.n or 1, bool(body.echo), body.logprobs
        score_only = body.max_tokens == 0
        if score_only and not echo:
            raise APIError(
                400,
                "max_tokens 0 generates nothing; send echo: true with it to score the prompt (its tokens' "
                "logprobs), or ask for at least 1 token",
                param="max_tokens",
            )
        # echo requests that generate at most a token are scoring (lm-eval batches them): more per request
        scoring = echo and body.max_tokens is not None and body.max_tokens <= 1
        limit = MAX_SCORING_CHOICES if scoring else MAX_CHOICES
        if n * len(prompts) > limit:
            msg = f"{len(prompts)} prompts × n={n} is over {limit} choices per request"
            if not scoring:
                msg += f" ({MAX_SCORING_CHOICES} for echo requests with max_tokens 0 or 1)"
            raise APIError(400, msg, param="n")
        encoded: list[list[int]] = []
        parts: list[tuple[list[int], SamplingParams]] = []
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
            encoded.append(ids)
            if score_only:
                self._check_scored(s, ids)
            else:
                max_tokens = self._max_tokens(s, len(ids), body.max_tokens, "max_tokens", "prompt")
                parts.append(
                    (ids, body.sampling(max_tokens, logprobs=top is not None, top_logprobs=top or 0))
                )
        queue, loop = asyncio.Queue[Event](), asyncio.get_running_loop()
        jobs: list[Job | ScoreJob] = [*self._jobs(s, parts, n, bool(body.stream), queue)]
        if echo and top is not None:  # the prompt's logprobs: one scoring job per prompt, for all n choices
            jobs += [ScoreJob(i, ids, top, queue, loop) for i, ids in enumerate(encoded)]
        call = self._admit(s, jobs, queue)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(map(len, encoded))
        prompt_texts = [p if isinstance(p, str) else "" for p in prompts]

        def response(choices: list[CompletionChoice], use: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(id=rid, created=created, model=s.name, choices=choices, usage=use)

        def echoed(i: int) -> tuple[str, CompletionLogprobs | None]:
            """Prompt ``i``'s text and (with logprobs) its tokens' logprobs, once its text is known."""
            lp = None
            if top is not None:
                lp = prompt_logprobs(s.texts, encoded[i], call.scores[i], prompt_texts[i])
            return prompt_texts[i], lp

        def decoded_prompts() -> None:  # token-id prompts are echoed as their text, special tokens included
            tok = s.engine.tokenizer
            for i, p in enumerate(prompts):
                if not isinstance(p, str) and tok is not None:
                    prompt_texts[i] = tok.decode(encoded[i], skip_special_tokens=False)

        if body.stream:
            try:
                await call.wait_scores()
                if echo:
                    await asyncio.to_thread(decoded_prompts)
                heads = [echoed(i) for i in range(len(prompts))] if echo else []
            except BaseException:
                call.close()
                raise
            head = [
                response(
                    [
                        CompletionChoice(
                            index=i * n + j,
                            text=text,
                            logprobs=lp,
                            finish_reason="length" if score_only else None,
                        )
                    ]
                )
                for i, (text, lp) in enumerate(heads)
                for j in range(n)
            ]
            offsets: dict[int, tuple[Offsets, list[int]]] = {}  # choice → its offsets, its text's length

            def chunk(e: Event) -> CompletionResponse:
                lp = None
                if top is not None and e.logprobs is not None:
                    base = len(prompt_texts[e.index // n]) if echo else 0
                    track, seen = offsets.setdefault(e.index, (Offsets(s.engine.tokenizer, True, base), [0]))
                    seen[0] += len(e.text)
                    lp = generated_logprobs(s.texts, e.token_ids, e.logprobs, e.top, track, seen[0])
                reason = e.completion.finish_reason if e.completion is not None else None
                return response(
                    [CompletionChoice(index=e.index, text=e.text, logprobs=lp, finish_reason=reason)]
                )

            tail = (lambda k: response([], usage(prompt_tokens, k))) if body.include_usage else None
            return await call.stream(head, chunk, tail)

        done = await call.collect(request)

        def choices() -> list[CompletionChoice]:
            if echo:
                decoded_prompts()
            out = []
            for i in range(len(prompts)):
                text, lp = echoed(i) if echo else ("", None)
                for j in range(n):
                    c = None if score_only else done[i * n + j]
                    out.append(self._choice(s, i * n + j, text, lp, c, top is not None))
            return out

        use = usage(prompt_tokens, sum(c.completion_tokens for c in done))

        def body_json() -> bytes:
            return response(choices(), use).model_dump_json().encode()

        # token texts, offsets and the JSON of long prompts take a while: off the event loop (FastAPI would
        # encode a returned model field by field on it, a stall for every stream)
        return Response(await asyncio.to_thread(body_json), media_type="application/json")

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
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            ids = await self._chat_ids(s, body.messages)
            max_tokens = self._max_tokens(s, len(ids), asked, param, "messages")
            sampling = body.sampling(max_tokens, logprobs=bool(body.logprobs), top_logprobs=top)
            params = s.engine.chat_params(sampling)
        except EngineError as exc:
            raise APIError(400, str(exc), param="messages") from None
        queue = asyncio.Queue[Event]()
        jobs = self._jobs(s, [(ids, params)], body.n or 1, bool(body.stream), queue)
        call = self._admit(s, jobs, queue)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def entry(token_id: int, logprob: float) -> TopLogprob:
            t = s.texts.one(token_id)
            return TopLogprob(token=t, logprob=finite(logprob), bytes=list(t.encode()))

        def logprobs(e: Event) -> ChatLogprobs | None:
            if e.logprobs is None:
                return None
            tops = e.top if e.top is not None else [[] for _ in e.token_ids]
            content = [
                TokenLogprob(**entry(t, lp).model_dump(), top_logprobs=[entry(i, v) for i, v in row])
                for t, lp, row in zip(e.token_ids, e.logprobs, tops, strict=True)
            ]
            return ChatLogprobs(content=content)

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
                logprobs=logprobs(Event(i, c.text, c.token_ids, c.logprobs, c, top=c.top_logprobs)),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(done)
        ]
        use = usage(len(ids), sum(c.completion_tokens for c in done))
        return ChatCompletionResponse(id=rid, created=created, model=s.name, choices=choices, usage=use)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        s = self._model_or_first(body.model)
        tok = self._tokenizer(s)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt (text) or messages (a chat) to tokenize", param="prompt")
        if body.prompt is not None:
            text = body.prompt
            add = body.add_special_tokens is not False  # vLLM's default for a prompt: True
            # any length (lm-eval tokenizes whole documents); the body limit bounds it; off the event loop
            ids = await asyncio.to_thread(lambda: list(tok.encode(text, add_special_tokens=add).ids))
        else:
            if not body.add_generation_prompt:
                raise APIError(
                    400,
                    "add_generation_prompt false is not supported: a chat's tokens open the assistant's "
                    "turn, as /v1/chat/completions feeds them to the model",
                    param="add_generation_prompt",
                )
            try:
                ids = await self._chat_ids(s, body.messages or [])
            except EngineError as exc:
                raise APIError(400, str(exc), param="messages") from None
        strs = [tok.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=s.engine.cfg.max_seq_len, tokens=ids, token_strs=strs
        )

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        s = self._model_or_first(body.model)
        tok = self._tokenizer(s)
        vocab = s.engine.cfg.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids outside 0..{vocab - 1}: {bad[:5]}", param="tokens")
        ids = body.tokens
        return DetokenizeResponse(
            prompt=await asyncio.to_thread(lambda: tok.decode(ids, skip_special_tokens=False))
        )

    async def tokenizer_info(self, model: str | None = None) -> TokenizerInfo:
        s = self._model_or_first(model)
        tok, engine = self._tokenizer(s, status=404), s.engine

        def special(token: str) -> int | None:
            return tok.token_to_id(token)

        # the tokenizer config's bos/eos first, as transformers (and so lm-eval's hf backend) reads them
        named = {k: special_token_name(engine.tokenizer_config.get(f"{k}_token")) for k in ("bos", "eos")}
        eos_id = special(named["eos"]) if named["eos"] else None
        if eos_id is None:
            eos_id = special("<|endoftext|>")
        if eos_id is None or (engine.eos_ids and eos_id not in engine.eos_ids):
            eos_id = min(engine.eos_ids) if engine.eos_ids else None
        # a tokenizer whose post-processor opens every text with a token (Llama's <s>) adds a BOS
        plain, full = (tok.encode("a", add_special_tokens=flag).ids for flag in (False, True))
        added_bos = full[0] if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain else None
        bos_id = special(named["bos"]) if named["bos"] else added_bos
        pad_id = special("<|pad|>")
        unk = getattr(tok.model, "unk_token", None)
        unk_id = special(unk) if isinstance(unk, str) else None

        def text(token_id: int | None) -> str | None:
            return tok.id_to_token(token_id) if token_id is not None else None

        ctx = engine.cfg.max_seq_len
        return TokenizerInfo(
            bos_token=text(bos_id),
            eos_token=text(eos_id),
            pad_token=text(pad_id),
            unk_token=text(unk_id),
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            unk_token_id=unk_id,
            model_max_length=ctx,
            max_model_len=ctx,
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            add_bos_token=added_bos is not None,
            chat_template=CHAT_TEMPLATE if engine.chat_spec.format == "chatml" else None,
        )

    # ---- helpers ----

    def _model_or_first(self, name: str | None) -> _Served:
        """The named model, or the first served one (the tokenizer endpoints' ``model`` is optional)."""
        return self._model(name) if name is not None else next(iter(self.served.values()))

    @staticmethod
    def _tokenizer(s: _Served, status: int = 400) -> Any:
        if s.engine.tokenizer is None:
            raise APIError(
                status,
                f"the model {s.name!r} has no tokenizer; it takes and returns token ids only",
                code="tokenizer_not_available",
            )
        return s.engine.tokenizer

    @staticmethod
    async def _chat_ids(s: _Served, chat: list[ChatMessage]) -> list[int]:
        """A chat's token ids as /v1/chat/completions feeds them (the server's default system turn when
        the chat has none). Message text cannot forge special tokens; encoded off the event loop.
        Raises EngineError (PromptTooLongError: answered 400 ``context_length_exceeded``)."""
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in chat
        ]
        system = s.system_prompt if messages[0]["role"] != "system" else None
        try:
            return await asyncio.to_thread(s.engine.chat_ids, messages, system)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None

    @staticmethod
    def _check_scored(s: _Served, ids: list[int]) -> None:
        """400 for a prompt that cannot be scored: longer than the context, or ids outside the vocabulary."""
        ctx, vocab = s.engine.cfg.max_seq_len, s.engine.cfg.vocab_size
        if len(ids) > ctx:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens but the model's context is {ctx} tokens; shorten it",
                param="prompt",
                code="context_length_exceeded",
            )
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"the prompt has token ids outside 0..{vocab - 1}: {bad[:5]}", param="prompt")

    @staticmethod
    def _choice(
        s: _Served,
        index: int,
        echoed: str,
        echoed_lp: CompletionLogprobs | None,
        c: Completion | None,
        with_logprobs: bool,
    ) -> CompletionChoice:
        """Choice ``index``: the echoed prompt (text and logprobs; "" and None without echo), then the
        completion ``c`` (None: scored only, nothing generated)."""
        lp = None
        if with_logprobs:
            parts = [echoed_lp] if echoed_lp is not None else []
            if c is not None and c.logprobs is not None:
                offsets = Offsets(s.engine.tokenizer, True, base=len(echoed))
                parts.append(
                    generated_logprobs(s.texts, c.token_ids, c.logprobs, c.top_logprobs, offsets, len(c.text))
                )
            lp = joined(parts)
        text = echoed + (c.text if c is not None else "")
        reason = c.finish_reason if c is not None else "length"
        return CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=reason)

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
    def _jobs(
        s: _Served,
        prompts: list[tuple[list[int], SamplingParams]],
        n: int,
        stream: bool,
        queue: asyncio.Queue[Event],
    ) -> list[Job]:
        """One job per (prompt, choice), choice ``i·n + j``; the j-th choice of a seeded request samples
        with seed + j. Their events go to ``queue``."""
        loop = asyncio.get_running_loop()
        jobs: list[Job] = []
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

    def _admit(self, s: _Served, jobs: Sequence[Job | ScoreJob], queue: asyncio.Queue[Event]) -> Call:
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

        call = Call(jobs, self.timeout, release, queue)
        try:
            s.scheduler.submit(jobs)
        except APIError:
            call.close()
            raise
        return call


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
    app.post("/tokenize")(api.tokenize)
    app.post("/detokenize")(api.detokenize)
    app.get("/tokenizer_info")(api.tokenizer_info)
    return app
