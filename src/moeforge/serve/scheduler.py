"""The worker thread that owns one engine and batches the server's requests.

The engine is synchronous and not thread-safe, so each served engine is owned by one worker thread
(:class:`Scheduler`). A handler validates its request on the event loop (tokenizes, checks the context
and the sampling values, so a bad request costs no generation) and submits one :class:`Job` per choice.
The worker starts waiting jobs as a decode batch of up to ``engine.max_batch`` requests and advances
every running batch by one token per round, so a batch started while others run does not wait for them
to finish. A batch cannot take new requests once it runs (the engine's cache is laid out at prefill),
and every running batch costs one forward per round, so: an idle worker waits up to ``batch_wait_s``
after the first arrival for companions; a busy one starts a new batch only when it is full or when its
oldest job has waited ``BUSY_WAIT_STEPS`` decode steps. Streaming and non-streaming jobs share batches:
after each step a streaming job gets its new text (held back while it could still be the start of a
stop string, as ``Engine.stream`` does) and a finished job its completion, as :class:`Event` s through
its event loop's ``call_soon_threadsafe``. Requests that arrive together therefore decode together, and
throughput grows with concurrency up to ``max_batch`` requests per forward.

Cancellation (a timeout, or a client that disconnects) sets ``Job.cancelled`` on the event loop; the
worker reads it before every step: a waiting job is dropped, a running one's request is cancelled and
leaves its batch, so its slot is free within one step. The worker drives the engine only through its
step-by-step API (``Engine.start_batch``, ``Batch.step``, ``Request.cancel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from moeforge.serve.batch import Batch
from moeforge.serve.engine import Engine
from moeforge.serve.metrics import Metrics
from moeforge.serve.request import Completion, Request
from moeforge.serve.schemas import APIError

__all__ = ["BUSY_WAIT_STEPS", "Event", "Job", "Scheduler"]

log = logging.getLogger(__name__)

BUSY_WAIT_STEPS = 8  # while batches run, a waiting job starts a partial batch after this many steps' time


@dataclass
class Event:
    """What the worker sends a request: new text for choice ``index``, its completion once it is done,
    or an error."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    completion: Completion | None = None
    error: APIError | None = None


@dataclass(eq=False)
class Job:
    """One choice of one HTTP request: the engine request it decodes and where its events go."""

    index: int
    request: Request
    stream: bool
    queue: asyncio.Queue[Event]
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False  # set on the event loop, read by the worker (a bool store is atomic)
    sent_text: int = 0
    sent_ids: int = 0
    enqueued: float = field(default_factory=time.monotonic)

    def emit(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass(eq=False)
class _Running:
    batch: Batch
    jobs: list[Job]


class Scheduler:
    """The worker thread that owns one engine: batches waiting jobs and steps the running batches."""

    def __init__(self, engine: Engine, *, name: str, max_running: int, batch_wait_s: float, metrics: Metrics):
        self.engine, self.name, self.metrics = engine, name, metrics
        self.max_running, self.batch_wait_s = max_running, batch_wait_s
        self.running = 0  # jobs in running batches (written by the worker only)
        self._step_s = 0.0  # moving average of one decode step's duration
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
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

    def submit(self, jobs: list[Job]) -> None:
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
                job.emit(Event(job.index, error=gone))
            self._waiting.clear()
            self._batches.clear()
            self.running = 0

    def _admit(self) -> list[Job] | None:
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
            take: list[Job] = []
            while self._waiting and len(take) < room:
                job = self._waiting.popleft()
                if not job.cancelled:
                    take.append(job)
            return take

    def _busy_wait(self) -> float:
        # Every running batch costs a forward per token, so while the engine is busy a new batch is worth
        # starting once it is full, or once its oldest job has waited a few steps' time.
        return max(self.batch_wait_s, BUSY_WAIT_STEPS * self._step_s)

    def _start(self, jobs: list[Job]) -> None:
        try:
            batch = self.engine.start_batch([j.request for j in jobs])  # prefill + each one's first token
        except Exception as exc:
            self._fail(jobs, exc)
            return
        self.metrics.observe_batch(self.name, len(jobs), sum(len(j.request.prompt) for j in jobs))
        self.metrics.observe_step(self.name, len(jobs))
        entry = _Running(batch, jobs)
        self._batches.append(entry)
        self.running += len(jobs)
        self._deliver(entry)

    def _advance(self, entry: _Running) -> None:
        live = 0
        for job in entry.jobs:
            if job.cancelled:
                job.request.cancel()  # the batch skips it and drops it
            else:
                live += 1
        if live:
            start = time.perf_counter()
            try:
                entry.batch.step()
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
            req = job.request
            if job.cancelled:
                done.append(job)
            elif req.finish_reason is not None:
                c = req.completion(tok)
                lp = c.logprobs[job.sent_ids :] if c.logprobs is not None else None
                job.emit(Event(job.index, c.text[job.sent_text :], c.token_ids[job.sent_ids :], lp, c))
                done.append(job)
            elif job.stream:
                upto = req.stable_text_len()
                if upto > job.sent_text or (tok is None and len(req.tokens) > job.sent_ids):
                    lp = req.logprobs[job.sent_ids :] if req.params.logprobs else None
                    job.emit(Event(job.index, req.text[job.sent_text : upto], req.tokens[job.sent_ids :], lp))
                    job.sent_text, job.sent_ids = upto, len(req.tokens)
        if done:
            self._retire(entry, done)

    def _retire(self, entry: _Running, jobs: list[Job]) -> None:
        gone = set(map(id, jobs))
        entry.jobs = [j for j in entry.jobs if id(j) not in gone]
        self.running -= len(jobs)
        if not entry.jobs:
            self._batches.remove(entry)

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        log.exception("generation failed for a batch of %d on %s", len(jobs), self.name, exc_info=exc)
        err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
        for job in jobs:
            job.emit(Event(job.index, error=err))
