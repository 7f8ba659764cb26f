"""How many threads a decode step runs on: chosen from the batch size and from how busy the machine is.

A decode step is a few dozen small operations per layer, and torch runs each multi-threaded operation as
an OpenMP parallel region that ends in a barrier. When every thread has a core, that is cheap; when
another process holds one of the cores, the thread the scheduler put behind it reaches the barrier a
time slice late, and every thread waits for it, once per operation. Measured on the 2-core machine the
benchmarks run on, beside two busy-looping processes: a batch-1 step of ``small`` took about three
times longer on 2 threads than on 1 (benchmarks/notes/generate.md). The penalty is about the same in
absolute terms for any engine that makes that many calls, so it hurts a fast step the most.

So the thread count follows the cores *free* for this process: ``cpus - others``, where ``others`` is
the CPU time the rest of the machine used in the last fraction of a second (from ``/proc/stat``, minus
this process's own CPU time; steal time counts as used), rounded down. :func:`choose_threads` is that
rule, a pure function; :class:`LoadMonitor` measures ``others``; :class:`DecodeThreads` applies the
count around each step (and, through :meth:`DecodeThreads.hold`, which ``Engine.generate`` and
``Engine.stream`` open, around the sampling between steps too) and puts the caller's setting back. ``Engine(decode_threads=N)`` or the
environment variable ``MOEFORGE_DECODE_THREADS`` fixes the count instead.

The thread count only changes the order of float32 sums inside a GEMM, never which operations run: the
logits agree to float rounding whatever the count (``tests/serve/test_threads.py``).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import time
from collections.abc import Iterator

import torch

__all__ = ["ENV_VAR", "DecodeThreads", "LoadMonitor", "choose_threads", "threads_from_env", "usable_cpus"]

ENV_VAR = "MOEFORGE_DECODE_THREADS"

# a core counts as free when the rest of the machine leaves at least this much of it
FREE_CORE = 0.75


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_threads(batch: int | None, cpus: int, others: float, *, one_row: int | None = None) -> int:
    """Threads for a decode step of ``batch`` rows on ``cpus`` usable CPUs while the rest of the machine
    keeps ``others`` CPUs busy (fractions allowed); ``batch`` None for work that is not a decode step
    (a prefill). ``one_row``: the most threads a one-row step may use (None: no limit).

    One thread per core left free (``cpus - others``; a core counts as free from ``FREE_CORE`` of it
    on), never more than ``cpus`` nor fewer than one."""
    if cpus < 1 or (batch is not None and batch < 1):
        raise ValueError(f"batch and cpus must be >= 1 (got batch={batch}, cpus={cpus})")
    free = math.floor(cpus - max(0.0, others) + (1.0 - FREE_CORE))
    n = max(1, min(cpus, free))
    if batch == 1 and one_row is not None:
        n = max(1, min(n, one_row))
    return n


def threads_from_env(value: str | None = None) -> int | None:
    """``MOEFORGE_DECODE_THREADS`` as a thread count: None when unset, empty or ``auto``."""
    raw = os.environ.get(ENV_VAR) if value is None else value
    if raw is None or raw.strip().lower() in ("", "auto"):
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a positive integer or 'auto' (got {raw!r})") from None
    if n < 1:
        raise ValueError(f"{ENV_VAR} must be a positive integer or 'auto' (got {raw!r})")
    return n


def _machine_busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine spent busy, wall seconds) from ``/proc/stat``'s first line, steal
    included; None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK"), time.monotonic()


class LoadMonitor:
    """CPUs the rest of the machine keeps busy, averaged over the last moments: the machine's busy CPU
    time (``/proc/stat``) minus this process's own (``time.process_time``), per wall second, sampled at
    most every ``interval`` seconds and smoothed (half the weight on the newest interval). Where
    ``/proc/stat`` is missing, the 1-minute load average minus this process's threads stands in."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._last = self._sample()
        self._value: float | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        machine = _machine_busy_seconds()
        if machine is None:
            return None
        return machine[0], time.process_time(), machine[1]

    def _initial(self) -> float:
        """Before a first interval has passed: runnable tasks now, less this one."""
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"procs_running"):
                        return max(0.0, float(line.split()[1]) - 1.0)
        except OSError:
            pass
        try:
            return max(0.0, os.getloadavg()[0] - torch.get_num_threads())
        except OSError:
            return 0.0

    def others(self) -> float:
        """CPUs' worth of work the rest of the machine is doing (0 on a quiet machine)."""
        if self._last is None:  # no /proc/stat: the load average, which counts our own threads too
            try:
                return max(0.0, os.getloadavg()[0] - torch.get_num_threads())
            except OSError:
                return 0.0
        now = time.monotonic()
        if now - self._last[2] < self.interval:
            return self._value if self._value is not None else self._initial()
        sample = self._sample()
        if sample is None:
            return self._value or 0.0
        machine0, own0, wall0 = self._last
        machine1, own1, wall1 = sample
        self._last = sample
        if wall1 <= wall0:
            return self._value or 0.0
        latest = max(0.0, ((machine1 - machine0) - (own1 - own0)) / (wall1 - wall0))
        self._value = latest if self._value is None else 0.5 * (self._value + latest)
        return self._value


class DecodeThreads:
    """The thread count of each decode step: ``fixed`` when given, else :func:`choose_threads` from the
    batch size and :class:`LoadMonitor`'s reading, on at most ``cpus`` threads (default: the usable CPUs,
    and no more than torch's thread count when this is made, which ``OMP_NUM_THREADS`` or
    ``torch.set_num_threads`` may have lowered). :meth:`use` sets it for a step and restores the
    caller's count after it; :meth:`hold` keeps the policy over a whole batch. ``one_row``: the most
    threads a one-row step gets (the decoder sets 1 for an MoE model)."""

    def __init__(
        self,
        fixed: int | None = None,
        *,
        cpus: int | None = None,
        monitor: LoadMonitor | None = None,
        one_row: int | None = None,
    ) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"decode_threads must be >= 1 or None for automatic (got {fixed})")
        self.fixed = fixed
        self.one_row = one_row  # see choose_threads; the decoder sets it for MoE models
        self.cpus = cpus or min(usable_cpus(), torch.get_num_threads())
        self.monitor = monitor if monitor is not None or fixed is not None else LoadMonitor()
        self.last: int | None = None  # the count the latest step ran on
        self.used: collections.Counter[int] = collections.Counter()  # steps run on each count
        self._held = 0  # open hold() scopes

    def threads_for(self, batch: int | None) -> int:
        """The count for a step of ``batch`` rows (None: other work, such as a prefill)."""
        if self.fixed is not None:
            return self.fixed
        assert self.monitor is not None
        return choose_threads(batch, self.cpus, self.monitor.others(), one_row=self.one_row)

    def _set(self, n: int) -> None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self.last = n
        self.used[n] += 1

    @contextlib.contextmanager
    def use(self, batch: int) -> Iterator[int]:
        """Run one decode step on :meth:`threads_for` ``(batch)`` threads; the caller's count is back
        after it, unless a :meth:`hold` is open (then the count stays for what follows the step, such
        as sampling, until the hold ends)."""
        before = torch.get_num_threads()
        n = self.threads_for(batch)
        self._set(n)
        try:
            yield n
        finally:
            if not self._held and torch.get_num_threads() != before:
                torch.set_num_threads(before)

    @contextlib.contextmanager
    def hold(self, batch: int) -> Iterator[int]:
        """Keep the policy's thread count over a whole batch, prefill and sampling included, not just
        over each step's forward: the count for a prefill is set now, every step inside sets its own
        for its batch size and leaves it for the sampling after it, and the caller's count is back when
        the hold ends. A sampling op left on two threads while a busy process holds a core costs a time
        slice a step (``benchmarks/notes/generate.md``). ``batch`` is the batch's row count (the prefill
        takes the free cores whatever it is)."""
        del batch  # the prefill's count depends on the free cores only
        before = torch.get_num_threads()
        n = self.threads_for(None)
        if before != n:
            torch.set_num_threads(n)
        self._held += 1
        try:
            yield n
        finally:
            self._held -= 1
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
