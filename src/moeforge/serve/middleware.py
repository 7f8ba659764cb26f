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
