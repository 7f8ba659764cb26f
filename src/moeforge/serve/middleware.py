"""HTTP plumbing around the routes: the API key check and per-endpoint request metrics (one ASGI
middleware), and the exception handlers that answer every error, 4xx or 5xx, with OpenAI's error body."""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeforge.serve.metrics import Metrics
from moeforge.serve.schemas import APIError, validation_message

__all__ = ["AuthAndMetrics", "add_error_handlers"]

log = logging.getLogger(__name__)


class AuthAndMetrics:
    """Pure ASGI (streaming-safe): the API key check on ``/v1/*`` (as vLLM, the tokenizer endpoints
    ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` stay open like ``/health``: they run no model
    and tell nothing a tokenizer file would not), the request body limit and per-endpoint request metrics.

    A request body larger than ``max_body_bytes`` is answered 413 without reading more of it than the
    limit: a declared ``Content-Length`` above the limit is refused before any byte is read, and a body
    without one is read up to the limit. Bodies within it are read here and handed to the route whole
    (FastAPI would buffer them anyway), so a multi-megabyte prompt never reaches JSON parsing."""

    ENDPOINTS = (
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/health",
        "/metrics",
    )

    def __init__(
        self, app: ASGIApp, metrics: Metrics, api_key: str | None, max_body_bytes: int | None = None
    ) -> None:
        self.app, self.metrics = app, metrics
        self.key = api_key.encode() if api_key is not None else None
        self.max_body = max_body_bytes

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
            elif self.max_body is not None and scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive, self.max_body)
                if body is None:
                    err = APIError(
                        413,
                        f"request body larger than {self.max_body:,} bytes; send a shorter prompt (the "
                        "server's --max-body-mb sets the limit)",
                        code="request_too_large",
                    )
                    await err.response()(scope, receive, send_status)
                else:
                    await self.app(scope, _replay(body, receive), send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None as soon as it is known to exceed ``limit`` bytes."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to serve
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _authorized(scope: Scope, key: bytes) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
        return False


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read ``body`` once, then the client's own messages (so a
    streaming route still sees the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's body; request validation errors are 400 (as OpenAI answers), not 422."""

    @app.exception_handler(APIError)
    async def _api_error(_req: HTTPRequest, exc: APIError) -> JSONResponse:
        return exc.response({"Retry-After": "1"} if exc.status in (429, 503) else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
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
