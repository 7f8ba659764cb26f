"""Fault injection for the reliability suite (``tests/faults/``): deterministic crash and disk-full
points inside moeforge's own write paths.

Every place where a crash could leave something half-done calls :func:`point` with a short name
(before a temporary file is written, before the rename that commits it, after it). Unless the
``MOEFORGE_FAULTS`` environment variable is set, a point costs one dictionary lookup and does nothing.
With it set, the points are counted in each process and the N-th one fails as asked::

    MOEFORGE_FAULTS=kill@17        SIGKILL this process at the 17th point
    MOEFORGE_FAULTS=enospc@5       raise OSError(ENOSPC) at the 5th point (a full disk)
    MOEFORGE_FAULTS=stop@3         SIGSTOP this process at the 3rd point (a test then acts while it is
                                   paused there — e.g. starts a second invocation — and sends SIGCONT)
    MOEFORGE_FAULTS=killonce@2:/tmp/m  SIGKILL at the 2nd point, in the first process to get there only:
                                   it creates /tmp/m (exclusively), so a retried task runs through
    MOEFORGE_FAULTS=count:/tmp/f   count only; append "pid name" per point to /tmp/f

A test runs a command once with ``count:`` to learn how many points it passes, then draws seeded
points from that range. Child processes inherit the variable and count their own points.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["point"]

_counter = 0
_spec: tuple[str, str] | None = None
_parsed = False


def _parse() -> tuple[str, str] | None:
    raw = os.environ.get("MOEFORGE_FAULTS", "")
    if not raw:
        return None
    if raw.startswith("count:"):
        return ("count", raw[len("count:") :])
    action, _, at = raw.partition("@")
    if action == "killonce":
        n, _, marker = at.partition(":")
        if n.isdigit() and marker:
            return (action, at)
    elif action in ("kill", "enospc", "stop") and at.isdigit():
        return (action, at)
    raise ValueError(
        f"MOEFORGE_FAULTS={raw!r}: expected kill@N, killonce@N:PATH, enospc@N, stop@N or count:PATH"
    )


def point(name: str) -> None:
    """A fault point (see the module docstring); a no-op unless ``MOEFORGE_FAULTS`` is set."""
    global _counter, _spec, _parsed
    if not _parsed:
        _spec, _parsed = _parse(), True
    if _spec is None:
        return
    _counter += 1
    action, arg = _spec
    if action == "count":
        with open(arg, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {_counter} {name}\n")
        return
    if action == "killonce":
        n, _, marker = arg.partition(":")
        if _counter != int(n):
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process (or an earlier attempt) took the one kill
        os.kill(os.getpid(), signal.SIGKILL)
    if _counter != int(arg):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once a SIGCONT arrives; the run goes on
        return
    raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
