"""Tokenize + pack + write throughput against raw ``tokenizers`` ``encode_batch`` on the same text.

Corpus: a pipeline run over the real sets of ``$MOEFORGE_REAL_DATA`` (else ``../shared/data``):
Tiny Shakespeare and RusLit as prose, GSM8K train as chats — about 12 MB of text. Without the real data
it falls back to the built-in demo recipe. A 32k byte-level BPE is trained on the run's train split.

Timed, alternating, best of ``--repeats``, all cores (``tokenizers`` uses every core in encode_batch):

- ``raw``: ``Tokenizer.encode_batch`` over the train split's texts, already in memory (chats rendered
  to ChatML), in batches of the same size moeforge uses, and once as a single call over all texts;
- ``moeforge pretrain``: ``tokenize_run`` on the run, reading the zstd record shards, encoding, packing
  into blocks of seq_len + 1 and writing the indexed shards, loss mask, domains and manifest;
- ``moeforge sft``: the same with chat rendering, offsets → assistant loss masks and best-fit packing.

Prints one JSON line per measurement and a summary with ``ratio`` = moeforge tokens/s ÷ the faster raw
variant's (target ≥ 0.85). Run: ``python benchmarks/tokenize_pack.py [--repeats 3] [--seq-len 1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from moeforge.data.pipeline import run_pipeline  # noqa: E402
from moeforge.data.recipe import Recipe, load_recipe  # noqa: E402
from moeforge.data.store import iter_lines  # noqa: E402
from moeforge.tokens.pack import render_chat  # noqa: E402
from moeforge.tokens.tokenize import tokenize_run  # noqa: E402
from moeforge.tokens.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer  # noqa: E402

BATCH = 8192


def real_data() -> Path | None:
    p = Path(os.environ.get("MOEFORGE_REAL_DATA", ROOT.parent / "shared" / "data"))
    return p if (p / "tinyshakespeare" / "input.txt").exists() else None


def build_run(work: Path) -> Path:
    run = work / "run"
    if (run / "manifest.json").exists():
        return run
    data = real_data()
    if data is None:
        recipe = load_recipe(ROOT / "configs" / "data" / "demo.yaml")
    else:
        recipe = Recipe.model_validate(
            {
                "name": "bench-tokenize",
                "sources": [
                    {
                        "path": str(data / "tinyshakespeare" / "input.txt"),
                        "kind": "text",
                        "family": "shakespeare",
                        "domain": "prose",
                        "format": "txt",
                        "txt_mode": "paragraphs",
                    },
                    {
                        "path": str(data / "ruslit"),
                        "include": ["*.txt"],
                        "kind": "text",
                        "family": "ruslit",
                        "domain": "prose",
                        "format": "txt",
                        "txt_mode": "lines",
                    },
                    {
                        "path": str(data / "gsm8k" / "train.jsonl"),
                        "kind": "qa",
                        "family": "gsm8k",
                        "domain": "math",
                    },
                ],
                "langid": {"enabled": False},
                "filters": {"quality_domains": [], "gopher_repetition": False},
                "split": {"train": 0.98, "valid": 0.01, "test": 0.01},
                "gates": {"train_ratio": [0.9, 1.0], "eval_ratio": [0.0, 0.05]},
            }
        )
    run_pipeline(recipe, run, workers=os.cpu_count() or 1)
    return run


def train_texts(run: Path) -> list[str]:
    texts = []
    for f in sorted((run / "records" / "train").glob("*.jsonl.zst")):
        for _, line in iter_lines(f):
            obj = json.loads(line)
            texts.append(obj["text"] if obj.get("text") is not None else render_chat(obj["messages"]))
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=32_000)
    ap.add_argument("--work", type=Path, default=None, help="reuse a work dir (run + tokenizer) across calls")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="moeforge-bench-tok-"))
    work.mkdir(parents=True, exist_ok=True)
    run = build_run(work)
    tok_dir = work / f"tok{args.vocab_size}"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(run, tok_dir, TokenizerConfig(vocab_size=args.vocab_size))
    tok = load_tokenizer(tok_dir)
    texts = train_texts(run)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))  # also warms up
    print(
        json.dumps(
            {"corpus_mb": round(mb, 2), "docs": len(texts), "tokens": n_tokens, "cores": os.cpu_count()}
        )
    )

    best: dict[str, float] = {}

    def record(name: str, seconds: float, extra: dict[str, Any] | None = None) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)
        row = {"system": name, "seconds": round(seconds, 3), "tokens_per_s": round(n_tokens / seconds)}
        print(json.dumps({**row, **(extra or {})}), flush=True)

    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            tok.encode_batch(texts[i : i + BATCH])
        record("raw encode_batch (batches of 8192)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok.encode_batch(texts)
        record("raw encode_batch (one call)", time.perf_counter() - t0)
        for mode in ("pretrain", "sft"):
            out = work / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            res = tokenize_run(run, tok_dir, seq_len=args.seq_len, mode=mode, out=out, splits=("train",))
            dt = time.perf_counter() - t0
            s = res.manifest["splits"]["train"]
            record(
                f"moeforge {mode}",
                dt,
                {"packing_efficiency": s["packing_efficiency"], "samples": s["samples"]},
            )
    raw = min(best["raw encode_batch (batches of 8192)"], best["raw encode_batch (one call)"])
    summary = {
        "summary": "tokenize+pack+write vs raw encode_batch",
        "raw_tokens_per_s": round(n_tokens / raw),
        "pretrain_tokens_per_s": round(n_tokens / best["moeforge pretrain"]),
        "sft_tokens_per_s": round(n_tokens / best["moeforge sft"]),
        "ratio_pretrain": round(raw / best["moeforge pretrain"], 3),
        "ratio_sft": round(raw / best["moeforge sft"], 3),
        "target": 0.85,
        "load_avg": os.getloadavg()[0],
    }
    print(json.dumps(summary), flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
