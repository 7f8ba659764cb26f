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

Scoring (:class:`ScoreJob`: a prompt's every token's log-probability, for ``echo`` with ``logprobs``)
runs on the same worker, between decode steps: each round takes the waiting scoring jobs as one
:meth:`Engine.score` call (batched by length, shared contexts computed once), bounded in tokens. While
decode batches run (or jobs wait to start one), a round's scoring is sized from the measured scoring
rate to take about ``SCORE_SLICE_S``, so a stream's next token waits at most that long (or one
sequence, if longer: a sequence is scored whole); an otherwise idle worker scores up to
``SCORE_BATCH_TOKENS`` tokens at once. A long scoring queue therefore slows running streams by a bounded
gap per token instead of stopping them, and decoding never starves scoring.

Cancellation (a timeout, or a client that disconnects) sets ``Job.cancelled`` on the event loop; the
worker reads it before every step: a waiting job is dropped, a running one's request is cancelled and
leaves its batch, so its slot is free within one step. The worker drives the engine only through its
step-by-step API (``Engine.start_batch``, ``Batch.step``, ``Request.cancel``) and ``Engine.score``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from moeforge.serve.batch import Batch
from moeforge.serve.engine import Engine, EngineError
from moeforge.serve.metrics import Metrics
from moeforge.serve.request import Completion, Request, TopLogprobs
from moeforge.serve.schemas import APIError
from moeforge.serve.scoring import TokenScores

__all__ = ["BUSY_WAIT_STEPS", "SCORE_BATCH_TOKENS", "SCORE_SLICE_S", "Event", "Job", "Scheduler", "ScoreJob"]

log = logging.getLogger(__name__)

BUSY_WAIT_STEPS = 8  # while batches run, a waiting job starts a partial batch after this many steps' time
SCORE_BATCH_TOKENS = 8192  # tokens scored in one round when no decode batch runs
SCORE_SLICE_S = 0.05  # while decode batches run, one round's scoring takes about this long
_FIRST_SCORE_TOKENS = 256  # the busy round's budget before the scoring rate has been measured


@dataclass
class Event:
    """What the worker sends a request: new text for choice ``index``, its completion once it is done,
    a scoring job's ``scores`` (``index`` is then the scoring job's), or an error."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    completion: Completion | None = None
    error: APIError | None = None
    top: list[TopLogprobs] | None = None
    scores: TokenScores | None = None


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
class ScoreJob:
    """The scoring of one prompt for one HTTP request: ``ids[1:]``'s log-probabilities (and the ``top_k``
    most likely tokens at each position), sent back as one :class:`Event` with ``scores``."""

    index: int
    ids: list[int]
    top_k: int
    queue: asyncio.Queue[Event]
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False  # set on the event loop, read by the worker
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
        self._score_rate = 0.0  # moving average of tokens scored per second (0: not measured yet)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._scoring: deque[ScoreJob] = deque()
        self._batches: list[_Running] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def scoring_depth(self) -> int:
        """Prompts waiting to be scored."""
        return len(self._scoring)

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

    def submit(self, jobs: Sequence[Job | ScoreJob]) -> None:
        with self._cond:
            if self._stopping or not self.alive:
                raise APIError(503, "the server is shutting down; retry later", type="server_error")
            for job in jobs:
                if isinstance(job, ScoreJob):
                    self._scoring.append(job)
                else:
                    self._waiting.append(job)
            self._cond.notify_all()

    # ---- worker thread ----

    def _run(self) -> None:
        log.info("scheduler for %s started (max_batch %d)", self.name, self.engine.max_batch)
        gone = APIError(503, "the server is shutting down; retry later", type="server_error")
        try:
            while (work := self._admit()) is not None:
                jobs, scoring = work
                if jobs:
                    self._start(jobs)
                if scoring:
                    self._score(scoring)
                for entry in list(self._batches):
                    self._advance(entry)
        except Exception as exc:  # a bug: fail what is pending; /health reports the dead worker
            log.exception("the scheduler for %s crashed", self.name)
            gone = APIError(500, f"the generation worker crashed: {type(exc).__name__}", type="server_error")
        finally:
            pending: list[Job | ScoreJob] = [*self._waiting, *self._scoring]
            for job in [*pending, *(j for e in self._batches for j in e.jobs)]:
                job.emit(Event(job.index, error=gone))
            self._waiting.clear()
            self._scoring.clear()
            self._batches.clear()
            self.running = 0

    def _admit(self) -> tuple[list[Job], list[ScoreJob]] | None:
        """The jobs to start as a new batch now and the scoring jobs to run this round (maybe none of
        either), or None when the server stops."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if any(j.cancelled for j in self._waiting):
                    self._waiting = deque(j for j in self._waiting if not j.cancelled)
                if any(j.cancelled for j in self._scoring):
                    self._scoring = deque(j for j in self._scoring if not j.cancelled)
                if self._waiting or self._batches or self._scoring:
                    break
                self._cond.wait()
            jobs = self._take_jobs()
            # decoding (or about to): scoring gets a time slice, so no stream or waiting job waits long
            return jobs, self._take_scoring(busy=bool(self._batches or jobs or self._waiting))

    def _take_scoring(self, busy: bool) -> list[ScoreJob]:
        """The scoring jobs for this round (lock held): at least one, then more while the round's token
        budget lasts; ``busy``: decode batches run or wait, so the round is sized to take
        ``SCORE_SLICE_S``."""
        if not self._scoring:
            return []
        if not busy:
            budget = SCORE_BATCH_TOKENS
        elif self._score_rate > 0:
            budget = min(SCORE_BATCH_TOKENS, int(self._score_rate * SCORE_SLICE_S))
        else:
            budget = _FIRST_SCORE_TOKENS
        take = [self._scoring.popleft()]
        tokens = len(take[0].ids)
        while self._scoring and tokens + len(self._scoring[0].ids) <= budget:
            job = self._scoring.popleft()
            take.append(job)
            tokens += len(job.ids)
        return take

    def _take_jobs(self) -> list[Job]:
        """The waiting jobs to start as a new decode batch now (maybe none; lock held)."""
        if not self._waiting:
            return []
        room = min(self.engine.max_batch, self.max_running - self.running)
        if not self._batches:  # idle: give companions a moment to arrive (scoring work ends the wait)
            deadline = self._waiting[0].enqueued + self.batch_wait_s
            while (
                len(self._waiting) < room
                and not self._stopping
                and not self._scoring
                and (left := deadline - time.monotonic()) > 0
            ):
                self._cond.wait(left)
            if self._scoring and len(self._waiting) < room and deadline > time.monotonic():
                return []  # score first; the companions' wait goes on next round
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

    def _score(self, jobs: list[ScoreJob]) -> None:
        """Score the prompts of ``jobs`` in one :meth:`Engine.score` call and send each its scores."""
        top_k = max(j.top_k for j in jobs)
        start = time.perf_counter()
        try:
            results = self.engine.score([j.ids for j in jobs], 1, top_k=top_k)
        except EngineError as exc:  # validated by the handler, so not expected; the request's fault
            err = APIError(400, str(exc), param="prompt")
            for job in jobs:
                job.emit(Event(job.index, error=err))
            return
        except Exception as exc:
            self._fail(jobs, exc)
            return
        rate = sum(len(j.ids) for j in jobs) / max(time.perf_counter() - start, 1e-6)
        self._score_rate = rate if self._score_rate == 0 else 0.8 * self._score_rate + 0.2 * rate
        for job, scores in zip(jobs, results, strict=True):
            if scores.top and job.top_k < top_k:
                scores.top = [row[: job.top_k] for row in scores.top]
            job.emit(Event(job.index, scores=scores))

    def _deliver(self, entry: _Running) -> None:
        """Send each job its new text or its completion; retire finished and cancelled jobs."""
        tok = self.engine.tokenizer
        done = []
        for job in entry.jobs:
            req = job.request
            if job.cancelled:
                done.append(job)
            elif req.finish_reason is not None:
                c, sent = req.completion(tok), job.sent_ids
                lp = c.logprobs[sent:] if c.logprobs is not None else None
                top = c.top_logprobs[sent:] if c.top_logprobs is not None else None
                job.emit(Event(job.index, c.text[job.sent_text :], c.token_ids[sent:], lp, c, top=top))
                done.append(job)
            elif job.stream:
                upto, sent = req.stable_text_len(), job.sent_ids
                if upto > job.sent_text or (tok is None and len(req.tokens) > sent):
                    lp = req.logprobs[sent:] if req.params.logprobs else None
                    top = req.top[sent:] if req.params.top_logprobs else None
                    text = req.text[job.sent_text : upto]
                    job.emit(Event(job.index, text, req.tokens[sent:], lp, top=top))
                    job.sent_text, job.sent_ids = upto, len(req.tokens)
        if done:
            self._retire(entry, done)

    def _retire(self, entry: _Running, jobs: list[Job]) -> None:
        gone = set(map(id, jobs))
        entry.jobs = [j for j in entry.jobs if id(j) not in gone]
        self.running -= len(jobs)
        if not entry.jobs:
            self._batches.remove(entry)

    def _fail(self, jobs: Sequence[Job | ScoreJob], exc: Exception) -> None:
        what = "scoring" if isinstance(jobs[0], ScoreJob) else "generation"
        log.exception("%s failed for a batch of %d on %s", what, len(jobs), self.name, exc_info=exc)
        err = APIError(500, f"{what} failed: {type(exc).__name__}: {exc}", type="server_error")
        for job in jobs:
            job.emit(Event(job.index, error=err))
