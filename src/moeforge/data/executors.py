"""Where the data pipeline's tasks run: in this process, in local worker processes, or on Ray.

An :class:`Executor` runs one function over a list of argument tuples and yields ``(index, result)`` as
tasks finish; callers combine results in index order, so the outcome never depends on completion
order or on which executor ran the tasks. The steps themselves (map tasks, near-dup band shards) never
know where they run: they write their outputs under the run directory with temporary names renamed
into place, so a task that is run twice (a retry after its worker died) leaves the same bytes.

* :class:`InlineExecutor` — every task in this process, in order (``workers=1``, library callers).
* :class:`LocalExecutor` — a :func:`moeforge.procs.spawn_pool` of ``workers`` processes (created on
  first use and kept for the run, so the reduce reuses the map's warm workers).
* :class:`RayExecutor` — Ray tasks (``max_retries=3``: a task whose worker dies is run again). It joins
  the Ray instance this process already initialized, else ``recipe.ray.address`` / ``RAY_ADDRESS``
  (an existing cluster: every node must see the run directory at the same path), else starts a local
  instance with ``num_cpus`` CPUs, which it shuts down when the command ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol

from moeforge.procs import spawn_pool

__all__ = [
    "Executor",
    "InlineExecutor",
    "LocalExecutor",
    "RayExecutor",
    "TaskFailed",
    "make_executor",
]

log = logging.getLogger(__name__)


class TaskFailed(Exception):
    """Task ``index`` of an :meth:`Executor.map` raised ``cause``."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"task {index} failed: {type(cause).__name__}: {cause}")
        self.index = index
        self.cause = cause


class Executor(Protocol):
    name: str
    # True when tasks run outside this process tree (a worker cannot check that its parent is alive)
    remote: bool

    def map(self, fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        """Run ``fn(*a)`` for each ``a``; yield ``(index, result)`` as tasks finish. The first failure
        cancels what has not started and raises :class:`TaskFailed`."""
        ...

    def close(self) -> None: ...


class InlineExecutor:
    """Every task in this process, in order."""

    name = "inline"
    remote = False

    def map(self, fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        for i, a in enumerate(args):
            try:
                result = fn(*a)
            except Exception as exc:
                raise TaskFailed(i, exc) from exc
            yield i, result

    def close(self) -> None:
        pass


class LocalExecutor:
    """Tasks in ``workers`` spawned processes that die with this one (one task or one worker: inline)."""

    name = "local"
    remote = False

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        if self.workers <= 1 or len(args) <= 1:
            yield from InlineExecutor().map(fn, args)
            return
        if self._pool is None:
            self._pool = spawn_pool(self.workers)
        futures: dict[Future[Any], int] = {self._pool.submit(fn, *a): i for i, a in enumerate(args)}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(finished, key=futures.__getitem__):
                    exc = f.exception()
                    if exc is not None:
                        raise TaskFailed(futures[f], exc) from exc
                    yield futures[f], f.result()
        finally:
            for p in pending:
                p.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _ray_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)


class RayExecutor:
    """Ray tasks on an instance joined or started on first use (see the module docstring)."""

    name = "ray"
    remote = True
    MAX_RETRIES = 3

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus
        self._owned = False
        self._remote: Any = None

    def _start(self) -> Any:
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("executor: ray needs the ray extra: pip install 'moeforge[ray]'") from exc
        if not ray.is_initialized():
            kw: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if self.address:
                kw["address"] = self.address
            else:
                kw["num_cpus"] = self.num_cpus
            log.info("starting Ray (%s)", self.address or f"local, {self.num_cpus} CPUs")
            ray.init(**kw)
            self._owned = True
        if self._remote is None:
            self._remote = ray.remote(max_retries=self.MAX_RETRIES, retry_exceptions=False, num_cpus=1)(
                _ray_call
            )
        return ray

    def map(self, fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        if not args:
            return
        ray = self._start()
        refs = {self._remote.remote(fn, a): i for i, a in enumerate(args)}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for r in ready:
                    try:
                        result = ray.get(r)
                    except Exception as exc:
                        cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
                        raise TaskFailed(refs[r], cause) from exc
                    yield refs[r], result
        finally:
            for r in pending:
                ray.cancel(r, force=True)

    def close(self) -> None:
        if self._owned:
            import ray

            ray.shutdown()
            self._owned = False
        self._remote = None


def make_executor(
    kind: str, workers: int, address: str | None = None, num_cpus: int | None = None
) -> Executor:
    """The executor a recipe asks for (``local`` or ``ray``) with ``workers`` processes / local Ray CPUs."""
    if kind == "ray":
        return RayExecutor(address, num_cpus or max(1, workers))
    if kind == "local":
        return LocalExecutor(workers)
    raise ValueError(f"unknown executor {kind!r}; use local or ray")
