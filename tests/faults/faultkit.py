"""Helpers of the fault-injection suite (tests/faults): one small pipeline → tokens → train → export chain, built
once per session through the CLI (each reference run doubles as the run that counts its fault points),
and helpers to run ``moeforge`` with ``MOEFORGE_FAULTS`` set and to check what it left behind.

Every command runs as a subprocess of ``sys.executable -m moeforge`` with one torch thread (two of them
run side by side on a 2-core machine, and every run of a command — reference, killed, resumed — uses
the same thread count, so CPU training is bit-exact between them).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

MOEFORGE = [sys.executable, "-m", "moeforge"]
SEED = 14  # issue 14: every seeded choice of fault points in this directory uses it
KILL_POINTS = 10  # seeded points per command, plus the command's last point
SEQ_LEN = 64
T = TypeVar("T")


# ---- running the CLI ---------------------------------------------------------------------------------


def env(faults: str | None = None, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "MOEFORGE_FAULTS"}
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
    if faults is not None:
        e["MOEFORGE_FAULTS"] = faults
    e.update(extra)
    return e


def cli(args: list[str], *, faults: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``moeforge ARGS`` (optionally with ``MOEFORGE_FAULTS``); never raises for a non-zero exit."""
    return subprocess.run(
        [*MOEFORGE, *args], capture_output=True, text=True, timeout=timeout, env=env(faults), check=False
    )


def ok(args: list[str], **kw: Any) -> subprocess.CompletedProcess:
    proc = cli(args, **kw)
    assert proc.returncode == 0, (
        f"moeforge {' '.join(args)} → {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def count_points(args: list[str], tmp: Path) -> list[str]:
    """Run ``moeforge ARGS`` with ``MOEFORGE_FAULTS=count:…`` (it must succeed) and return the names of
    the fault points its process passed, in order (point ``N`` is ``names[N - 1]``)."""
    log = tmp / f"points-{os.getpid()}-{time.monotonic_ns()}.txt"
    proc = subprocess.Popen(
        [*MOEFORGE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(f"count:{log}")
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"moeforge {' '.join(args)} → {proc.returncode}\n{out}\n{err}"
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert all(int(ln[0]) == proc.pid for ln in lines), "fault points ran in child processes; use -w 1"
    return [ln[2] for ln in lines]


def pick_points(names: list[str], k: int = KILL_POINTS, seed: int = SEED) -> list[int]:
    """``k`` distinct seeded points of ``1..n`` (``names`` from :func:`count_points`, ``n`` of them), plus
    ``n`` itself (after the last commit)."""
    n = len(names)
    assert n >= k, f"only {n} fault points; the suite needs at least {k} per command"
    return sorted({*random.Random(seed).sample(range(1, n + 1), k), n})


def assert_clean_error(
    proc: subprocess.CompletedProcess, *needles: str, codes: Iterable[int] = (1, 2)
) -> None:
    """A user-facing failure: exit code in ``codes``, no traceback, each needle in stderr+stdout."""
    text = proc.stderr + proc.stdout
    assert proc.returncode in tuple(codes), f"exit {proc.returncode}\n{text}"
    assert "Traceback" not in text, text
    for n in needles:
        assert n in text, f"{n!r} not in\n{text}"


def in_parallel(fn: Callable[[T], Any], items: Iterable[T], workers: int = 2) -> None:
    """``fn(item)`` for each item, ``workers`` at a time; the first failure is re-raised."""
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, items):
            pass


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path (for byte-for-byte comparison)."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def temp_leftovers(directory: Path) -> list[str]:
    """Names under ``directory`` of the kind a crash leaves (``.X.tmp``, ``.X.old``, ``.tmp-…``)."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.name.endswith((".tmp", ".old")) or p.name.startswith(".tmp-")
    )


# ---- holding a process at a fault point ------------------------------------------------------------------


@contextlib.contextmanager
def stopped_at(args: list[str], point: int = 1, timeout: float = 120) -> Iterator[subprocess.Popen]:
    """Start ``moeforge ARGS`` with ``MOEFORGE_FAULTS=stop@POINT`` and yield it once it has stopped itself
    there (inside whatever lock it holds by then); on exit it is continued and waited for, and
    ``proc.finished`` is its :class:`subprocess.CompletedProcess` (exit code, stdout, stderr)."""
    proc = subprocess.Popen(
        [*MOEFORGE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(f"stop@{point}"),
    )
    try:
        deadline = time.monotonic() + timeout
        while _state(proc.pid) != "T":
            if proc.poll() is not None:
                out, err = proc.communicate()
                proc.finished = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)  # type: ignore[attr-defined]
                raise AssertionError(f"exited ({proc.returncode}) before its fault point\n{out}\n{err}")
            assert time.monotonic() < deadline, "never reached its stop point"
            time.sleep(0.02)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        if not hasattr(proc, "finished"):
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            proc.finished = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)  # type: ignore[attr-defined]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


# ---- a read-only directory ---------------------------------------------------------------------------


def writable(d: Path) -> bool:
    probe = d / ".probe"
    try:
        probe.write_bytes(b"x")
    except OSError:
        return False
    probe.unlink()
    return True


# ---- the session's chain: data run → tokenizer → tokens → train → export --------------------------------


@dataclass
class Chain:
    base: Path
    recipe: Path
    run: Path  # a finished data run (the reference)
    run_points: list[str]  # the names of the fault points the reference run passed
    tokenizer: Path


def _write_inputs(base: Path) -> Path:
    """Four small QA files (four map tasks, so a data run commits several times) and their recipe."""
    src = base / "in"
    src.mkdir(parents=True)
    sources = []
    for k in range(4):
        rows = [
            {
                "question": f"Problem {i}: a cat has {i} apples and finds {i % 13} more. How many now?",
                "answer": f"{i} + {i % 13} = {i + i % 13}. The cat has {i + i % 13} apples.",
            }
            for i in range(k * 40, k * 40 + 40)
        ]
        f = src / f"p{k}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        sources.append(f"  - {{path: {f}, kind: qa, family: f, domain: math}}")
    recipe = base / "recipe.yaml"
    recipe.write_text(
        "name: faults\nsources:\n" + "\n".join(sources) + "\nlangid: {enabled: false}\n"
        "split: {min_eval_records: 3}\ngates: {train_ratio: [0.8, 0.97], eval_ratio: [0.01, 0.1]}\n",
        encoding="utf-8",
    )
    return recipe


def data_run_args(recipe: Path, out: Path) -> list[str]:
    return ["data", "run", str(recipe), "--out", str(out), "-w", "1"]


def tokenize_args(chain: Chain, out: Path, run: Path | None = None) -> list[str]:
    run = run or chain.run
    return ["data", "tokenize", str(run), "--tokenizer", str(chain.tokenizer), "--seq-len", str(SEQ_LEN),
            "--out", str(out)]  # fmt: skip


@dataclass
class Tokens:
    path: Path
    points: list[str]


TRAIN_CONFIG = """\
name: faults
out_dir: {out}
seed: 3
model: tiny
model_overrides:
  d_model: 32
  n_heads: 4
  n_kv_heads: 2
  n_layers: 2
  ffn_hidden: 64
  max_seq_len: {seq}
  moe: {{num_experts: 4, top_k: 1, expert_hidden: 32, router_noise_std: 0.3, noise_anneal_steps: 20}}
data: {{tokens: {tokens}, seq_len: {seq}}}
steps: 8
micro_batch: 4
grad_accum: 1
log_every: 1
checkpoint_every: 2
keep_last: 2
eval: {{every: 4, max_batches: 1}}
optim: {{lr: 0.003, min_lr: 0.0003, warmup_steps: 2}}
tensorboard: false
peak_flops: 1.0e11
"""


@dataclass
class Trained:
    config: Path
    run: Path
    points: list[str]

    def args(self, out: Path, *extra: str) -> list[str]:
        return ["train", str(self.config), "--set", f"out_dir={out}", *extra]


# metrics that measure the machine, not the model
TIMING_KEYS = ("tokens_per_s", "mfu")


def train_outcome(run: Path) -> dict[str, Any]:
    """What must not change when a run is killed and resumed: the final checkpoint's tensors, the
    checkpoints kept, every metrics line (without timings) and the summary."""
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    final = run / "checkpoints" / ckpts[-1]
    metrics = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        metrics.append({k: v for k, v in m.items() if k not in TIMING_KEYS})
    return {
        "checkpoints": ckpts,
        **{
            name: (final / name).read_bytes()
            for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
        },
        "metrics": metrics,
        "summary": json.loads((run / "summary.json").read_text()),
    }


def export_args(trained: Trained, out: Path, *extra: str) -> list[str]:
    return ["export", "hf", str(trained.run), "--out", str(out), *extra]


@dataclass
class Exported:
    path: Path
    points: list[str]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def build_chain(base: Path) -> Chain:
    from moeforge.tokens.tokenizer import TokenizerConfig, train_tokenizer

    recipe = _write_inputs(base)
    run = base / "data-ref"
    n = count_points(data_run_args(recipe, run), base)
    tok = train_tokenizer(run, base / "tok", TokenizerConfig(vocab_size=400))
    return Chain(base, recipe, run, n, tok)
