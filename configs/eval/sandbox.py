"""Run model-written code for moeforge_humaneval, in a separate, limited process (pass@1 scoring).

Each candidate program (the problem's prompt + the model's completion + the problem's ``test`` +
``check(entry_point)``) runs as its own ``python -I -S -B`` process (isolated mode, no site-packages: the
standard library only, and no .pyc writes):

* in a fresh temporary directory (its cwd, ``HOME`` and ``TMPDIR``), deleted afterwards, with an empty
  environment and stdin from /dev/null; stdout/stderr go to files there;
* under a wall-clock timeout (``$MOEFORGE_SANDBOX_TIMEOUT`` seconds, default 10) after which its whole
  process group is killed, and resource limits set in ``preexec_fn``: RLIMIT_AS (address space,
  ``$MOEFORGE_SANDBOX_MEMORY_MB``, default 1024), RLIMIT_CPU (the timeout + 1 s), RLIMIT_CORE 0 (no core
  dumps), RLIMIT_FSIZE 16 MiB (largest file it may write), RLIMIT_NOFILE 64;
* with the network blocked twice: where the kernel allows it, the process is put in new user + network
  namespaces (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``: no interface but a down loopback), and a guard
  prepended to the program replaces ``_socket.socket`` (so ``socket.socket``, ``create_connection``,
  ``urllib``, ``asyncio`` ... fail), ``getaddrinfo`` and friends, process creation (``os.system``, ``fork``,
  ``exec*``, ``spawn*``, ``posix_spawn``, ``subprocess``'s ``fork_exec``) and ``os.kill`` with functions that
  raise ``PermissionError``, and makes ``ctypes`` unimportable.

A program passes when it exits 0 *and* prints a per-run random marker written after ``check(...)``, so code
that calls ``sys.exit(0)`` or ``os._exit(0)`` before the checks run does not pass.

Not isolated: the file system (the process can read, and write within RLIMIT_FSIZE, whatever the user
running lm-eval can; it runs as that user, so never run this as root on a machine you care about), and the
guard itself, which lives in the same interpreter as the candidate, so a determined program can get around
it (the namespace, rlimits, timeout and process boundary are what hold then).
Use a container or VM for untrusted models.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_TIMEOUT = 10.0
DEFAULT_MEMORY_MB = 1024
FSIZE_BYTES = 16 * 2**20
NOFILE = 64
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

GUARD = """\
def _moeforge_sandbox_guard():
    # C-level modules only (cheap to import); socket.py and subprocess.py, imported later (a -I -S start-up
    # has not loaded them), take their socket class and fork_exec from these, so they are blocked too
    import _posixsubprocess, _socket, os, posix, sys

    def blocked(*args, **kwargs):
        raise PermissionError("blocked by the moeforge eval sandbox")

    class Blocked:  # stands in for classes: socket.socket subclasses it, so no __dict__ / __weakref__
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            blocked()

    _socket.socket = _socket.SocketType = Blocked
    for name in ("socketpair", "fromfd", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                 "getnameinfo", "dup"):
        if hasattr(_socket, name):
            setattr(_socket, name, blocked)
    for module in (os, posix):
        for name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp",
                     "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp",
                     "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg"):
            if hasattr(module, name):
                setattr(module, name, blocked)
    _posixsubprocess.fork_exec = blocked
    for name in ("ctypes", "_ctypes"):
        sys.modules[name] = None


_moeforge_sandbox_guard()
del _moeforge_sandbox_guard
"""


class RunResult(NamedTuple):
    # not a dataclass: lm-eval execs this file without registering it in sys.modules first, and dataclasses
    # then fail (AttributeError) while resolving the string annotations
    passed: bool
    returncode: int | None
    timed_out: bool
    network_namespace: bool
    stdout: str
    stderr: str


_netns_ok: bool | None = None  # None: not tried yet; False once unshare failed here


def _env_float(var: str, default: float) -> float:
    value = os.environ.get(var)
    return float(value) if value else default


def _limit(kind: int, value: int) -> tuple[int, int]:
    _, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    return value, value


def _preexec(limits: dict[int, tuple[int, int]], netns: bool):
    unshare = ctypes.CDLL(None, use_errno=True).unshare if netns else None

    def setup() -> None:  # runs in the child between fork and exec
        if unshare is not None and unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNET) failed")
        for kind, value in limits.items():
            resource.setrlimit(kind, value)

    return setup


def run_program(
    source: str, *, timeout: float | None = None, memory_mb: float | None = None, guard: bool = True
) -> RunResult:
    """Run ``source`` in the sandbox; passed = exit code 0. ``guard=False`` leaves out the Python-level guard
    (the tests use it to check the process-level limits alone)."""
    global _netns_ok
    timeout = timeout if timeout is not None else _env_float("MOEFORGE_SANDBOX_TIMEOUT", DEFAULT_TIMEOUT)
    memory_mb = (
        memory_mb if memory_mb is not None else _env_float("MOEFORGE_SANDBOX_MEMORY_MB", DEFAULT_MEMORY_MB)
    )
    limits = {
        resource.RLIMIT_AS: _limit(resource.RLIMIT_AS, int(memory_mb * 2**20)),
        resource.RLIMIT_CPU: _limit(resource.RLIMIT_CPU, int(timeout) + 1),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_FSIZE: _limit(resource.RLIMIT_FSIZE, FSIZE_BYTES),
        resource.RLIMIT_NOFILE: _limit(resource.RLIMIT_NOFILE, NOFILE),
    }
    with tempfile.TemporaryDirectory(prefix="moeforge-sandbox-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text((GUARD + "\n" if guard else "") + source, encoding="utf-8")
        env = {"HOME": tmp, "TMPDIR": tmp, "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}
        cmd = [sys.executable, "-I", "-S", "-B", "program.py"]
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            netns = _netns_ok is not False
            try:
                proc = subprocess.Popen(
                    cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, preexec_fn=_preexec(limits, netns),
                )  # fmt: skip
            except subprocess.SubprocessError:
                if not netns:
                    raise
                _netns_ok, netns = False, False
                proc = subprocess.Popen(
                    cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, preexec_fn=_preexec(limits, False),
                )  # fmt: skip
            if netns:
                _netns_ok = True
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, also after a normal exit
                proc.wait()
        stdout = _tail(work / "stdout")
        stderr = _tail(work / "stderr")
    code = None if timed_out else proc.returncode
    return RunResult(code == 0, code, timed_out, netns, stdout, stderr)


def _tail(path: Path, limit: int = 8192) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - limit))
        return fh.read().decode("utf-8", "replace")


def humaneval_program(doc: dict[str, Any], completion: str, marker: str) -> str:
    """The prompt + completion, the problem's tests, the check call, then the pass marker."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\nprint({marker!r})\n"


def check_completion(doc: dict[str, Any], completion: str, **kwargs: Any) -> RunResult:
    marker = f"moeforge-pass-{secrets.token_hex(16)}"
    result = run_program(humaneval_program(doc, completion, marker), **kwargs)
    return result._replace(passed=result.passed and marker in result.stdout.splitlines())


def process_humaneval(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """pass@1: the share of the doc's completions (one, greedy, by default) that pass their tests."""
    passes = [check_completion(doc, completion).passed for completion in results]
    return {"pass@1": sum(passes) / len(passes)}
