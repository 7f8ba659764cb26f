"""One admitted HTTP request while its jobs decode: its events, its deadline, its slot, and its answer,
whole (:meth:`Call.collect`) or as server-sent events (:meth:`Call.stream`).

A call's jobs are decode jobs (one per choice) and scoring jobs (one per prompt whose tokens ``echo``
reports with log-probabilities); their results arrive on one queue. A request not done after the
server's ``request_timeout`` gets 504 (mid-stream: an error event) and its jobs are cancelled. A client
that disconnects, streaming or not, cancels its jobs too; the worker then drops them within one decode
step (see :mod:`moeforge.serve.scheduler`). Whichever way a call ends, it frees its slot exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

from pydantic import BaseModel
from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from moeforge.serve.request import Completion
from moeforge.serve.scheduler import Event, Job, ScoreJob
from moeforge.serve.schemas import APIError
from moeforge.serve.scoring import TokenScores

__all__ = ["Call"]

log = logging.getLogger(__name__)


class Call:
    """One admitted request: its jobs (which share one event queue), its deadline, and ``release``, which
    frees its admission slot; :meth:`close` cancels the jobs and calls ``release`` once. ``jobs`` are the
    decode jobs (choice ``i`` is ``jobs[i]``), ``scoring`` the scoring jobs; ``scores`` fills in by the
    scoring job's index as their results arrive."""

    def __init__(
        self,
        jobs: Sequence[Job | ScoreJob],
        timeout: float,
        release: Callable[[], None],
        queue: asyncio.Queue[Event] | None = None,
    ) -> None:
        self.jobs = [j for j in jobs if isinstance(j, Job)]
        self.scoring = [j for j in jobs if isinstance(j, ScoreJob)]
        self.timeout, self.release = timeout, release
        self.deadline = time.monotonic() + timeout
        self.queue = queue if queue is not None else jobs[0].queue  # the jobs' shared queue
        self.scores: dict[int, TokenScores] = {}
        self._held: deque[Event] = deque()  # decode events read while waiting for scores
        self.open = True

    async def next_event(self, hang_up: asyncio.Future[None] | None = None) -> Event:
        """The next decode event (scores are filed in ``scores`` on the way); 504 at the deadline; 499
        (nobody reads it) once ``hang_up`` is done."""
        if self._held:
            return self._held.popleft()
        while True:
            event = await self._next(hang_up)
            if event.scores is None:
                return event
            self.scores[event.index] = event.scores

    async def wait_scores(self, hang_up: asyncio.Future[None] | None = None) -> dict[int, TokenScores]:
        """Every scoring job's scores; decode events that arrive meanwhile are kept for :meth:`next_event`."""
        while len(self.scores) < len(self.scoring):
            event = await self._next(hang_up)
            if event.scores is None:
                self._held.append(event)
            else:
                self.scores[event.index] = event.scores
        return self.scores

    async def _next(self, hang_up: asyncio.Future[None] | None) -> Event:
        """The next event off the queue, decode or scores; raises its error, 504 or 499."""
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
            for job in [*self.jobs, *self.scoring]:
                job.cancelled = True
            self.release()

    async def collect(self, request: HTTPRequest) -> list[Completion]:
        """Every choice's completion (and every scoring job's ``scores``). A client that hangs up meanwhile
        (Starlette does not cancel a non-streaming handler) cancels the request, as a disconnected stream
        does."""

        async def hang_up() -> None:
            while (await request.receive())["type"] != "http.disconnect":  # the body was read already
                pass

        watch = asyncio.ensure_future(hang_up())
        done: dict[int, Completion] = {}
        try:
            while len(done) < len(self.jobs):
                event = await self.next_event(watch)
                if event.completion is not None:
                    done[event.index] = event.completion
            await self.wait_scores(watch)
        finally:
            watch.cancel()
            self.close()
        return [done[i] for i in range(len(self.jobs))]

    async def stream(
        self,
        head: list[BaseModel],
        render: Callable[[Event], BaseModel],
        tail: Callable[[int], BaseModel] | None,
    ) -> StreamingResponse:
        """Stream ``head``, one chunk per event, ``tail(completion_tokens)`` and ``[DONE]``. The first event
        is awaited before answering, so an error or a timeout before any token still gets its status code;
        a later one ends the stream with an error event (which the openai client raises). A call without
        decode jobs (scoring only) streams ``head`` and the tail."""
        try:
            first = await self.next_event() if self.jobs else None
        except BaseException:
            self.close()
            raise

        async def events() -> AsyncIterator[str]:
            try:
                for chunk in head:
                    yield f"data: {chunk.model_dump_json()}\n\n"
                event, finished, completion_tokens = first, 0, 0
                while event is not None:
                    yield f"data: {render(event).model_dump_json()}\n\n"
                    if event.completion is not None:
                        finished += 1
                        completion_tokens += event.completion.completion_tokens
                        if finished == len(self.jobs):
                            break
                    try:
                        event = await self.next_event()
                    except APIError as exc:
                        log.warning("a stream ended early: %s", exc.message)
                        yield f"data: {json.dumps(exc.body())}\n\n"
                        return
                if tail is not None:
                    yield f"data: {tail(completion_tokens).model_dump_json()}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on a disconnect, which cancels this generator
                self.close()

        return _SSEResponse(events(), on_close=self.close)


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
