"""Process hygiene for every multi-process command: workers that die with their parent, and a fence
that keeps a stale worker of a killed run from writing into the run that resumed it.

Three pieces:

* :func:`die_with_parent` — called first thing in every worker (pool initializer, torchrun rank). On
  Linux it asks the kernel for ``SIGKILL`` when the parent exits (``PR_SET_PDEATHSIG``); everywhere
  a daemon thread also polls the parent pid and exits the worker when it changes, so an orphan never
  idles for minutes holding files open.
* :func:`spawn_pool` — a ``ProcessPoolExecutor`` on fresh interpreters (``spawn``) whose workers run
  :func:`die_with_parent` before anything else.
* :class:`RunFence` — a run directory's generation. Every invocation that works in a directory takes
  a new generation id; its workers join the generation (a shared ``flock`` on ``DIR/.holders``, held
  for the worker's life) and commit results only under :meth:`RunFence.commit`, which takes
  ``DIR/.commit.lock`` and refuses if the generation moved on or the parent is gone. A new invocation
  refuses to start while any process of an earlier one still holds ``.holders``.

Locks are ``flock``: the kernel drops them with the process, so a killed holder never leaves a
stale lock behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

__all__ = [
    "FenceError",
    "RunFence",
    "die_with_parent",
    "holders_of",
    "spawn_pool",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.5


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make this process exit when ``parent_pid`` (default: the current parent) exits."""
    parent = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable; relying on the parent watch")
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(_POLL_SECONDS)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="moeforge-parent-watch", daemon=True).start()


def _init_worker(parent_pid: int, user_init: Callable[..., Any] | None, user_args: tuple[Any, ...]) -> None:
    die_with_parent(parent_pid)
    if user_init is not None:
        user_init(*user_args)


def spawn_pool(
    max_workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> ProcessPoolExecutor:
    """A process pool on fresh interpreters whose workers die with this process."""
    return ProcessPoolExecutor(
        max_workers=max_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(), initializer, initargs),
    )


def holders_of(path: Path) -> list[int]:
    """Pids of processes with ``path`` open (Linux ``/proc``; empty where that is unavailable)."""
    try:
        target = path.resolve()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                fds = list((proc / "fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(fd)
                except OSError:  # closed while we looked (the listing's own descriptor, for one)
                    continue
                if Path(link) == target:
                    pids.append(int(proc.name))
                    break
        return sorted(pids)
    except OSError:
        return []


class FenceError(ValueError):
    """Processes of an earlier invocation still hold the directory."""


class RunFence:
    """The generation of one invocation in ``directory`` (see the module docstring).

    The parent creates it with :meth:`begin` while holding the directory's exclusive run lock; workers
    call :meth:`join` with the ``generation`` the parent hands them.
    """

    def __init__(self, directory: Path, generation: str, parent_pid: int, holders_fh: Any) -> None:
        self.directory = directory
        self.generation = generation
        self.parent_pid = parent_pid
        self._holders = holders_fh

    @classmethod
    def begin(cls, directory: str | os.PathLike[str], what: str = "run") -> RunFence:
        d = Path(directory)
        fh = open(d / ".holders", "a+")  # noqa: SIM115 - held for the life of the fence
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            pids = holders_of(d / ".holders")
            who = f" (pid {', '.join(map(str, pids))})" if pids else ""
            raise FenceError(
                f"{d}: processes of an earlier {what} still hold this directory{who}. They exit on their "
                "own within a second of noticing their parent is gone; wait and run the command again, "
                "or stop them (kill PID) first"
            ) from None
        generation = uuid.uuid4().hex
        with cls._commit_lock(d):
            tmp = d / ".generation.tmp"
            tmp.write_text(generation + "\n", encoding="utf-8")
            os.replace(tmp, d / ".generation")
        fcntl.flock(fh, fcntl.LOCK_SH)  # this invocation's workers join with shared locks
        return cls(d, generation, os.getpid(), fh)

    @classmethod
    def join(cls, directory: str | os.PathLike[str], generation: str, parent_pid: int) -> RunFence:
        """In a worker: hold the directory for this generation (a shared lock, released at exit)."""
        d = Path(directory)
        fh = open(d / ".holders", "a+")  # noqa: SIM115 - held for the worker's life
        fcntl.flock(fh, fcntl.LOCK_SH)
        return cls(d, generation, parent_pid, fh)

    @staticmethod
    @contextlib.contextmanager
    def _commit_lock(d: Path) -> Iterator[None]:
        with open(d / ".commit.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def current(self) -> str | None:
        try:
            return (self.directory / ".generation").read_text(encoding="utf-8").strip()
        except OSError:
            return None

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        """Hold the commit lock for one commit; raise :class:`FenceError` if this generation is stale."""
        with self._commit_lock(self.directory):
            if self.parent_pid > 0 and os.getpid() != self.parent_pid and os.getppid() != self.parent_pid:
                raise FenceError(f"{self.directory}: the invocation that started this worker is gone")
            if self.current() != self.generation:
                raise FenceError(f"{self.directory}: a newer invocation owns this directory")
            yield

    def release(self) -> None:
        if self._holders is not None:
            self._holders.close()
            self._holders = None


# one fence per worker process, joined lazily by the first task that needs it
_worker_fences: dict[tuple[str, str], RunFence] = {}


def worker_fence(directory: str, generation: str, parent_pid: int) -> RunFence:
    """The fence for ``generation`` in this process (the parent's own, or joined once per worker).

    ``parent_pid`` 0 is a worker outside the invocation's process tree (a Ray task): it checks the
    generation at commit but neither joins ``.holders`` (its worker outlives the run) nor watches a parent."""
    if os.getpid() == parent_pid or parent_pid <= 0:  # the parent itself, or a remote task
        return RunFence(Path(directory), generation, parent_pid, None)
    key = (str(Path(directory).resolve()), generation)
    fence = _worker_fences.get(key)
    if fence is None:
        fence = RunFence.join(directory, generation, parent_pid)
        _worker_fences[key] = fence
    return fence
