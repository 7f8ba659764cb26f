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

Run: ``python benchmarks/generate.py [--new-tokens 64] [--repeats 3] [--quick]``.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 24 new tokens, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.new_tokens, args.repeats = "tiny", 24, 2
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = load_model_config(args.preset)
    model = MoETransformer(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "hf")).eval()
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
    summary: dict[str, object] = {"preset": args.preset, "threads": torch.get_num_threads()}
    for b in (int(x) for x in args.batches.split(",")):
        prompts = torch.randint(2, cfg.vocab_size, (b, args.prompt_len), generator=gen).tolist()
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
        summary[f"match_batch{b}"] = all(t == tokens["moeforge"] for t in tokens.values())
    summary.update(target_batch1=1.5, target_batch8=2.0, load_avg=os.getloadavg()[0])
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
