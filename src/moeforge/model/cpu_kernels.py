"""Fused host kernels for the MoE layer, compiled from ``csrc/moe_kernels.c`` with the system C compiler.

The grouped SwiGLU's activation, composed from ATen ops, makes two passes over memory in the forward
(SiLU, then the product) and three in the backward, with an allocation between them; these kernels make
one each way and keep nothing but the pre-activation for the backward (the sigmoid is recomputed, which
costs less than reading a saved SiLU back). The grouped SwiGLU's host backends
(:mod:`moeforge.model.dispatch`) call them for contiguous float32 CPU tensors; anything else, or a
machine where they cannot be built, takes the ATen ops (same values to float rounding).

The layer's combine (each token's weighted sum of its ``k`` expert rows) and the backward of its gather
(each token's sum of its ``k`` rows' gradients) are one kernel, :func:`gather_sum`: it reads a token's
rows through the inverse of the sort, in parallel over tokens, where ``index_add_`` scatters into zeros;
:func:`combine_backward` is the combine's backward in one pass over the rows.

Built at first use, in well under a second: ``$CC`` (else ``gcc``, else ``cc``) with ``-O3
-march=native`` and OpenMP, into ``<cache>/kernels/`` (:func:`moeforge.io.cache_base`) under a name that
hashes the source, the flags, the compiler's version and the CPU's feature flags, so a cache shared
between different machines never loads a build for another CPU. The library is written to a temporary
file, fsynced and renamed into place; a cached build that no longer loads is deleted. Once loaded it must reproduce the ATen ops on a small input before it is
used. A failed build is logged once (with the compiler's message) and the ATen ops are used.
``MOEFORGE_CPU_KERNELS=0`` turns the kernels off.

The kernels parallelize with OpenMP over rows and run with ``torch.get_num_threads()`` threads. They link
the ``libgomp.so.1`` that torch has already loaded (same soname), so they share its thread pool rather
than starting a second one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moeforge.io import cache_base, fsync_dir

__all__ = [
    "KernelBuildError",
    "available",
    "build",
    "combine_backward",
    "gather_sum",
    "swiglu_backward",
    "swiglu_forward",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "moe_kernels.c"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
# (extra flags, libraries): first with glibc's vector expf on x86-64 (the loops vectorize), then without
# and last without OpenMP (one thread, where the compiler has no OpenMP runtime)
_VARIANTS = [([], ["-lm"]), (["-fno-openmp"], ["-lm"])]
_VARIANTS_X86 = [(["-DMOEFORGE_LIBMVEC"], ["-lmvec", "-lm"]), *_VARIANTS]
_OFF = ("0", "false", "no", "off")


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (no compiler, a compile error, a failed self-check)."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _compiler(cc: str | None) -> str:
    found = cc or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not found:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    return found


def _cpu_features() -> str:
    """The CPU's feature flags line (part of the build's cache key: -march=native depends on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"could not run {cmd[0]}: {exc}") from exc


def build(cc: str | None = None, cache_dir: Path | None = None) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernels, then check them against the ATen ops.
    Raises :class:`KernelBuildError` with the reason when any step fails."""
    compiler = _compiler(cc)
    version = _run([compiler, "--version"])
    if version.returncode != 0:
        raise KernelBuildError(f"{compiler} --version failed: {version.stderr.strip()[-500:]}")
    source = SOURCE.read_bytes()
    variants = _VARIANTS_X86 if platform.machine() in ("x86_64", "AMD64") else _VARIANTS
    directory = (cache_dir or cache_base()) / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra, libs in variants:
        flags = [*_FLAGS, *extra]
        key = hashlib.sha256(
            b"\0".join(
                [source, " ".join(flags + libs).encode(), version.stdout.encode(), _cpu_features().encode()]
            )
        ).hexdigest()[:16]
        path = directory / f"moe_kernels-{key}.so"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            t0 = time.perf_counter()
            done = _run([compiler, *flags, str(SOURCE), "-o", tmp, *libs])
            if done.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-800:]}")
                continue
            with open(tmp, "rb") as fh:  # on disk before the rename makes it the cached build
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(directory)
            log.info("compiled the MoE host kernels in %.2f s: %s", time.perf_counter() - t0, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            path.unlink(missing_ok=True)  # a damaged cached build: the next process compiles it again
            errors.append(f"loading {path}: {exc}")
            continue
        _declare(lib)
        _self_check(lib)
        return lib
    raise KernelBuildError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.moeforge_swiglu_forward.argtypes = [ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.moeforge_swiglu_forward.restype = None
    lib.moeforge_swiglu_backward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.moeforge_swiglu_backward.restype = None
    lib.moeforge_gather_sum.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.moeforge_gather_sum.restype = None
    lib.moeforge_combine_backward.argtypes = [ptr] * 6 + [i64] * 5 + [ctypes.c_int]
    lib.moeforge_combine_backward.restype = None


def _self_check(lib: ctypes.CDLL) -> None:
    """Each kernel against the composed ATen ops on a small input (both signs, large magnitudes)."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(5, 2 * 37, generator=gen) * 6
    ga = torch.randn(5, 37, generator=gen)
    g, u = h[:, :37], h[:, 37:]
    # the combine of 3 tokens x top-2 over 6 rows sorted by expert, and its backward
    y, w = torch.randn(6, 37, generator=gen), torch.rand(6, generator=gen)
    go = torch.randn(3, 37, generator=gen)
    order = torch.tensor([4, 0, 2, 5, 1, 3])  # assignment ids (j*3 + n) in row order
    token, pos = order % 3, torch.argsort(order)
    gy, gw = _combine_backward(lib, go, y, w, token, True, 1)
    checks = {
        "SwiGLU forward": (_forward(lib, h, 1), F.silu(g) * u),
        "SwiGLU backward": (
            _backward(lib, h, ga, 1),
            torch.cat([torch.ops.aten.silu_backward(ga * u, g), ga * F.silu(g)], 1),
        ),
        "combine": (
            _gather_sum(lib, y, w, pos, 3, 1),
            torch.zeros(3, 37).index_add_(0, token, y * w[:, None]),
        ),
        "gather backward": (_gather_sum(lib, y, None, pos, 3, 1), torch.zeros(3, 37).index_add_(0, token, y)),
        "combine backward": (gy, go[token] * w[:, None]),
        "combine weight gradient": (gw, (go[token] * y).sum(-1)),
    }
    for what, (got, want) in checks.items():
        if got is None or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            diff = "missing" if got is None else f"max difference {float((got - want).abs().max()):.3g}"
            raise KernelBuildError(f"the compiled {what} does not reproduce the ATen ops ({diff})")


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("MOEFORGE_CPU_KERNELS", "1").lower() not in _OFF:
                try:
                    _lib = build()
                except KernelBuildError as exc:
                    log.warning("MoE host kernels unavailable, using the ATen ops: %s", exc)
            _tried = True
    return _lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def _plain(t: torch.Tensor) -> bool:
    """A dense CPU tensor whose memory is there to read: not a subclass (a functional collective's
    ``AsyncCollectiveTensor`` has its data only after a wait, which a raw pointer would skip)."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous()


def _eligible(*ts: torch.Tensor) -> bool:
    return all(_plain(t) and t.dtype == torch.float32 for t in ts)


def _forward(lib: ctypes.CDLL, h: torch.Tensor, threads: int) -> torch.Tensor:
    f = h.shape[-1] // 2
    a = h.new_empty(*h.shape[:-1], f)
    lib.moeforge_swiglu_forward(h.data_ptr(), a.data_ptr(), h.numel() // (2 * f), f, 2 * f, f, threads)
    return a


def _backward(lib: ctypes.CDLL, h: torch.Tensor, ga: torch.Tensor, threads: int) -> torch.Tensor:
    f = h.shape[-1] // 2
    gh = torch.empty_like(h)
    n = h.numel() // (2 * f)
    lib.moeforge_swiglu_backward(h.data_ptr(), ga.data_ptr(), gh.data_ptr(), n, f, 2 * f, f, 2 * f, threads)
    return gh


def swiglu_forward(h: torch.Tensor) -> torch.Tensor | None:
    """``silu(g) · u`` for ``h = [g, u]`` (last dimension split in halves), or None when the kernels do not
    apply (not contiguous float32 on the CPU, empty, or not built)."""
    if h.numel() == 0 or h.shape[-1] % 2 or not _eligible(h):
        return None
    lib = _load()
    return None if lib is None else _forward(lib, h, torch.get_num_threads())


def swiglu_backward(h: torch.Tensor, ga: torch.Tensor) -> torch.Tensor | None:
    """``dL/dh = [dL/dg, dL/du]`` given ``dL/da`` for ``a = silu(g) · u``, or None when the kernels do not
    apply (see :func:`swiglu_forward`)."""
    if h.numel() == 0 or h.shape[-1] % 2 or ga.shape != (*h.shape[:-1], h.shape[-1] // 2):
        return None
    if not _eligible(h, ga):
        return None
    lib = _load()
    return None if lib is None else _backward(lib, h, ga, torch.get_num_threads())


def _gather_sum(
    lib: ctypes.CDLL, src: torch.Tensor, w: torch.Tensor | None, pos: torch.Tensor, n: int, threads: int
) -> torch.Tensor:
    d = src.shape[-1]
    out = src.new_empty(n, d)
    wp = None if w is None else w.data_ptr()
    lib.moeforge_gather_sum(
        src.data_ptr(), wp, pos.data_ptr(), out.data_ptr(), n, pos.shape[0] // n, d, d, d, threads
    )
    return out


def _combine_backward(
    lib: ctypes.CDLL,
    g: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    token: torch.Tensor,
    weight_grad: bool,
    threads: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, d = y.shape
    gy = torch.empty_like(y)
    gw = y.new_empty(rows) if weight_grad else None
    gwp = None if gw is None else gw.data_ptr()
    lib.moeforge_combine_backward(
        g.data_ptr(),
        y.data_ptr(),
        w.data_ptr(),
        token.data_ptr(),
        gy.data_ptr(),
        gwp,
        rows,
        d,
        d,
        d,
        d,
        threads,
    )
    return gy, gw


def _indices_ok(*ts: torch.Tensor) -> bool:
    return all(_plain(t) and t.dtype == torch.int64 for t in ts)


def gather_sum(
    src_AD: torch.Tensor, w_A: torch.Tensor | None, pos_A: torch.Tensor, n: int
) -> torch.Tensor | None:
    """``out[t] = Σ_j w[r]·src[r]`` over a token's ``k`` rows ``r = pos[j·n + t]`` (``w`` None: weight 1),
    ``[n, D]``; ``pos_A`` (``A = n·k`` entries, int64) is the inverse of the sort that put the rows in
    expert order. None when the kernels do not apply (see :func:`swiglu_forward`)."""
    if n == 0 or src_AD.dim() != 2 or src_AD.shape[0] != pos_A.shape[0] or pos_A.shape[0] % n:
        return None
    if not _indices_ok(pos_A) or not _eligible(src_AD, *(() if w_A is None else (w_A,))):
        return None
    if w_A is not None and w_A.numel() != src_AD.shape[0]:
        return None
    lib = _load()
    return None if lib is None else _gather_sum(lib, src_AD, w_A, pos_A, n, torch.get_num_threads())


def combine_backward(
    g_ND: torch.Tensor, y_AD: torch.Tensor, w_A: torch.Tensor, token_A: torch.Tensor, weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The combine's backward given ``dL/dout`` ``[N, D]``: ``(dL/dy [A, D], dL/dw [A])`` (the latter None
    unless ``weight_grad``), or None when the kernels do not apply."""
    if y_AD.dim() != 2 or y_AD.shape[0] == 0 or not _eligible(g_ND, y_AD, w_A) or not _indices_ok(token_A):
        return None
    if (
        g_ND.dim() != 2
        or g_ND.shape[1] != y_AD.shape[1]
        or not y_AD.shape[0] == w_A.numel() == token_A.numel()
    ):
        return None
    lib = _load()
    if lib is None:
        return None
    return _combine_backward(lib, g_ND, y_AD, w_A, token_A, weight_grad, torch.get_num_threads())
