"""The one way every benchmark here times things, checks outputs and records its figures.

A figure is only worth printing when the two sides did the same work on the same machine state. So:

- :func:`interleave` runs every contender once per round, the order rotated (or shuffled) round by
  round, so a burst of background load lands on all of them; it keeps every sample, and a
  :class:`Timing` reports the median and the spread (``(max - min) / median``), not a lucky best.
- :func:`paired_ratio` divides the two sides' times *within* each round and takes the median of those
  ratios: a round where the machine was busy slows both.
- :func:`check_same` compares the outputs before any time is reported; a benchmark that cannot make
  them equal says what differs (``difference``) instead of staying quiet.
- :func:`machine` records the load average (1, 5, 15 min), the CPUs this process may use, torch's
  thread settings and the thread environment, at the start and the end of a run.
- :func:`measure_peak_flops` measures the matmul peak *in this run, with this run's threads*, so an MFU
  divides by a ceiling measured under the same conditions (a cached peak measured once on a quiet or
  busy machine is how MFU came out at 190%).
- :class:`Results` prints one JSON line per figure and writes the run's JSON to ``benchmarks/results/``,
  which ``benchmarks/report.py`` (``make bench-report``) turns into docs/PERFORMANCE.md.
- :func:`cpu_hog` starts N busy processes, for figures "with the machine busy".

Every script takes ``--quick`` (small sizes, few rounds: checks the script works; its JSON is marked
``quick`` and the report refuses it), ``--rounds`` and ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1

__all__ = [
    "Mismatch",
    "Ratio",
    "Results",
    "Timing",
    "add_common_args",
    "check_same",
    "cpu_hog",
    "interleave",
    "machine",
    "measure_peak_flops",
    "paired_ratio",
]


# --------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The state a figure was measured in: load, usable CPUs, thread settings, versions."""
    state: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "env_threads": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")
            if k in os.environ
        },
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.__version__
        state["torch_threads"] = torch.get_num_threads()
        state["torch_interop_threads"] = torch.get_num_interop_threads()
    return state


def git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip() or None
    if rev and dirty.stdout.strip():
        rev += "+dirty"
    return rev


# --------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Every sample of one contender (seconds per call)."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """``(max - min) / median``: how far apart the rounds were (0.1 = 10%)."""
        return (max(self.samples) - min(self.samples)) / self.median if self.samples else float("nan")

    def rate(self, work: float) -> float:
        """``work`` per second at the median."""
        return work / self.median

    def as_dict(self, digits: int = 6) -> dict[str, Any]:
        return {
            "median_s": round(self.median, digits),
            "best_s": round(self.best, digits),
            "spread": round(self.spread, 3),
            "rounds": len(self.samples),
        }


def interleave(
    contenders: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    inner: int = 1,
    before: Callable[[str], None] | None = None,
    sync: Callable[[], None] | None = None,
    shuffle: bool = False,
) -> dict[str, Timing]:
    """Time each contender ``rounds`` times, one call of each per round, the order rotated every round.

    ``warmup`` untimed rounds come first. A sample is the mean of ``inner`` back-to-back calls (for
    calls too short to time alone). ``before(name)`` runs untimed before each sample (clearing an output
    directory, say); ``sync`` runs inside the timed region after the calls (a CUDA synchronize).
    ``shuffle``: each round in a fresh order (seeded: the same orders every run) instead of a rotation.
    A rotation gives every contender every position but always the same predecessor; where what one
    contender leaves behind (its freed memory, the cache) changes the next one's time, shuffling spreads
    that over all of them instead of charging it to one.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(contenders)
    out = {n: Timing(n) for n in names}
    rng = random.Random(0)
    for r in range(warmup + rounds):
        k = r % len(names)
        order = rng.sample(names, len(names)) if shuffle else names[k:] + names[:k]
        for name in order:
            fn = contenders[name]
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            if sync is not None:
                sync()
            dt = (time.perf_counter() - t0) / inner
            if r >= warmup:
                out[name].samples.append(dt)
    return out


@dataclass
class Ratio:
    """How many times faster ``ours`` is than ``theirs``: the median over rounds of theirs/ours."""

    median: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {
            "ratio": round(self.median, 3),
            "ratio_low": round(self.low, 3),
            "ratio_high": round(self.high, 3),
        }


def paired_ratio(ours: Timing, theirs: Timing) -> Ratio:
    """Speed-up of ``ours`` over ``theirs``, round by round (>1: ours is faster)."""
    pairs = [t / o for o, t in zip(ours.samples, theirs.samples, strict=True)]
    return Ratio(statistics.median(pairs), min(pairs), max(pairs))


# --------------------------------------------------------------------------------------------- outputs
class Mismatch(AssertionError):
    """The contenders' outputs differ: no time is reported for work that was not the same."""


def _describe_difference(a: Any, b: Any, *, atol: float, rtol: float, path: str = "") -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return f"{path or 'output'}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.dtype.is_floating_point or b.dtype.is_floating_point:
            a64, b64 = a.detach().double(), b.detach().double()
            diff = (a64 - b64).abs()
            bound = atol + rtol * b64.abs()
            if bool((diff > bound).any()):
                return f"{path or 'output'}: max abs difference {float(diff.max()):.3g} (atol {atol}, rtol {rtol})"
            return None
        if not torch.equal(a, b):
            n = int((a != b).sum())
            return f"{path or 'output'}: {n} of {a.numel()} elements differ"
        return None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return f"{path or 'output'}: keys {sorted(set(a) ^ set(b))[:5]} on one side only"
        for k in a:
            d = _describe_difference(a[k], b[k], atol=atol, rtol=rtol, path=f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path or 'output'}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _describe_difference(x, y, atol=atol, rtol=rtol, path=f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float):
        return None if abs(a - b) <= atol + rtol * abs(b) else f"{path or 'output'}: {a!r} vs {b!r}"
    return None if a == b else f"{path or 'output'}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


def check_same(
    outputs: Mapping[str, Any],
    reference: str,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    allowed: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Compare every output with ``outputs[reference]``: returns ``{name: "same" | what differs}``.

    A difference raises :class:`Mismatch` unless ``allowed`` names that contender with the reason the
    difference is expected (a quantized peer, say); then the difference is returned and recorded.
    """
    allowed = dict(allowed or {})
    verdict: dict[str, str] = {}
    ref = outputs[reference]
    for name, out in outputs.items():
        if name == reference:
            continue
        diff = _describe_difference(out, ref, atol=atol, rtol=rtol)
        if diff is None:
            verdict[name] = "same"
        elif name in allowed:
            verdict[name] = f"differs ({allowed[name]}): {diff}"
        else:
            raise Mismatch(f"{name} does not produce what {reference} does: {diff}")
    return verdict


# --------------------------------------------------------------------------------------------- peak
def measure_peak_flops(
    seconds: float = 1.0, n: int = 1024, dtype: str = "float32", device: str = "cpu"
) -> float:
    """Matmul FLOP/s achievable now, with the threads torch has now: the median of repeated square
    ``n × n`` products after a warm-up (a median, like every other figure here)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, dtype=dt, device=device)
    b = torch.randn(n, n, dtype=dt, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 200):
        t0 = time.perf_counter()
        a @ b
        sync()
        samples.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(samples)


def measure_read_bandwidth(nbytes: int = 1 << 30, reps: int = 7) -> float:
    """Bytes per second this process reads from memory now, with the threads torch has now: the median of
    ``reps`` sums over an fp32 tensor of ``nbytes`` (far larger than any cache), after a warm-up."""
    import torch

    x = torch.ones(nbytes // 4)
    x.sum()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        samples.append(time.perf_counter() - t0)
    return nbytes / statistics.median(samples)


# Matrix-multiply kernels by profiler op name (self time), prepacked ones included: what a dense ceiling is
# made of. Everything else in a profile is routing, gathers, activation, allocation and autograd glue.
MATMUL_KERNELS = frozenset(
    {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::mv",
     "aten::addmv", "aten::_grouped_mm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear"}
)  # fmt: skip


def profile_shares(fn: Callable[[], Any], calls: int = 1) -> dict[str, Any]:
    """``calls`` calls of ``fn`` under torch.profiler: the shares of self CPU time in matrix-multiply
    kernels (:data:`MATMUL_KERNELS`) and in attention, and the three largest other ops. Shares, not
    times: the profiler's own overhead inflates every op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    ops = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in ops) or 1.0
    gemm = sum(t for k, t in ops if k in MATMUL_KERNELS)
    attn = sum(t for k, t in ops if "attention" in k)
    other = sorted(((t, k) for k, t in ops if k not in MATMUL_KERNELS and "attention" not in k), reverse=True)
    return {
        "gemm_share": round(gemm / total, 3),
        "attention_share": round(attn / total, 3),
        "top_other": ", ".join(f"{k} {t / total:.0%}" for t, k in other[:3]),
    }


# --------------------------------------------------------------------------------------------- load
def _spin(stop: Any, parent: int) -> None:  # pragma: no cover - runs in a child process
    """Busy-loop until ``stop`` is set or the parent is gone (a benchmark killed by a signal, whose
    daemon children would otherwise spin on and skew every later run)."""
    x = 0
    while not stop.is_set() and os.getppid() == parent:
        for _ in range(100_000):
            x += 1


@contextlib.contextmanager
def cpu_hog(processes: int = 2) -> Iterator[None]:
    """``processes`` busy-looping processes for the duration: "the machine busy"."""
    if processes <= 0:
        yield
        return
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop, os.getpid()), daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


# --------------------------------------------------------------------------------------------- results
def add_common_args(ap: argparse.ArgumentParser, *, rounds: int = 5) -> None:
    ap.add_argument(
        "--quick", action="store_true", help="small sizes and few rounds: checks the script works"
    )
    ap.add_argument(
        "--rounds", type=int, default=rounds, help=f"timed rounds per contender (default {rounds})"
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the run's JSON (default benchmarks/results/<name>.json; '-' for none)",
    )
    ap.add_argument("--busy", type=int, default=0, help="run beside this many busy-looping processes")


class Results:
    """Figures of one run: printed as JSON lines as they come, written as one JSON file at the end."""

    def __init__(
        self, benchmark: str, args: argparse.Namespace, *, variant: str = "", title: str = ""
    ) -> None:
        self.benchmark = benchmark
        self.variant = variant
        self.args = args
        self.doc: dict[str, Any] = {
            "schema": SCHEMA,
            "benchmark": benchmark,
            "variant": variant,
            "title": title or benchmark,
            "command": "python " + " ".join([f"benchmarks/{benchmark}.py", *sys.argv[1:]]),
            "quick": bool(getattr(args, "quick", False)),
            "busy_processes": int(getattr(args, "busy", 0) or 0),
            "rev": git_rev(),
            "machine_start": machine(),
            "rows": [],
            "tables": [],
            "goals": [],
            "checks": {},
            "notes": [],
        }

    def row(self, **fields: Any) -> dict[str, Any]:
        """One measured point: printed at once and kept."""
        self.doc["rows"].append(fields)
        print(json.dumps(fields), flush=True)
        return fields

    def table(self, caption: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table for the report, columns in order (build it from the rows above)."""
        self.doc["tables"].append({"caption": caption, "columns": columns, "rows": rows})

    def check(self, what: str, verdict: Mapping[str, str] | str) -> None:
        """The output check's verdict (see :func:`check_same`), recorded beside the figures."""
        self.doc["checks"][what] = dict(verdict) if isinstance(verdict, Mapping) else verdict

    def goal(
        self,
        metric: str,
        value: float,
        target: float,
        *,
        higher_is_better: bool = True,
        spread: tuple[float, float] | None = None,
        unit: str = "×",
    ) -> None:
        """A figure an issue sets a target for; ``spread`` is (low, high) over the rounds."""
        met = value >= target if higher_is_better else value <= target
        entry = {
            "metric": metric,
            "value": round(value, 3),
            "target": target,
            "higher_is_better": higher_is_better,
            "met": bool(met),
            "unit": unit,
        }
        if spread is not None:
            entry["low"], entry["high"] = round(spread[0], 3), round(spread[1], 3)
        self.doc["goals"].append(entry)
        print(json.dumps({"goal": metric, **entry}), flush=True)

    def note(self, text: str) -> None:
        """A sentence the script derives from its own measurements (printed in the report)."""
        self.doc["notes"].append(text)

    def markdown(self) -> str:
        """The run's checks, tables, goals and notes as markdown (a preview of what report.py renders)."""
        lines: list[str] = []
        for what, verdict in self.doc["checks"].items():
            v = (
                "; ".join(f"{k}: {x}" for k, x in verdict.items())
                if isinstance(verdict, dict)
                else str(verdict)
            )
            lines.append(f"- Output check, {what}: {v}")
        for t in self.doc["tables"]:
            lines += [
                "",
                t["caption"],
                "",
                "| " + " | ".join(t["columns"]) + " |",
                "|" + "---|" * len(t["columns"]),
            ]
            lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in t["rows"]]
        for g in self.doc["goals"]:
            lines.append(f"- Goal {g['metric']}: {g['value']} (target {g['target']}, met: {g['met']})")
        lines += [f"- {n}" for n in self.doc["notes"]]
        return "\n".join(lines)

    def path(self) -> Path | None:
        target = getattr(self.args, "json", None)
        if target is not None and str(target) == "-":
            return None
        if target is not None:
            return Path(target)
        name = self.benchmark + (f".{self.variant}" if self.variant else "")
        if self.doc["quick"]:
            return Path(tempfile.gettempdir()) / "moeforge-bench" / f"{name}.quick.json"
        return RESULTS / f"{name}.json"

    def write(self) -> Path | None:
        self.doc["machine_end"] = machine()
        path = self.path()
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        print(json.dumps({"written": str(path)}), flush=True)
        return path
