"""Tokenize + pack + write throughput against raw ``tokenizers`` ``encode_batch`` on the same texts:
moeforge's ``tokenize_run`` (read the run's zstd record shards, encode, pack into blocks, write the
indexed shards and manifest) in pretrain and SFT modes against the bare encoder over the same texts
already in memory, interleaved round by round, on every core; the tokens written are checked against
the encoder's before any time is reported.

Corpus: a pipeline run over the real sets of ``$MOEFORGE_REAL_DATA`` (else ``../shared/data``): Tiny
Shakespeare and RusLit as prose, GSM8K train as chats. Without the real data it falls back to the
built-in demo recipe. A byte-level BPE (``--vocab-size``, 32k) is trained on the run's train split.
``--quick`` leaves RusLit out and trains a small vocabulary.

Contenders, timed by ``_harness.interleave`` (one call of each per round, the order rotated; medians and
spread; ``tokenizers`` uses every core in ``encode_batch``):

- ``raw encode_batch (batches of 8192)`` and ``raw encode_batch (one call)``: ``Tokenizer.encode_batch``
  over the train split's texts (chats rendered to ChatML), ``add_special_tokens=False`` as moeforge
  calls it, in batches of the size moeforge uses and as a single call; the faster (by median) is the
  reference;
- ``raw encode_batch_fast (one call)``: the same without character offsets, the call moeforge makes
  (packing reads only ids): the ratio against it is what moeforge's reading, packing and writing cost;
- ``moeforge pretrain``: ``tokenize_run`` on the run: reading the zstd record shards, encoding, packing
  into blocks of seq_len + 1 and writing the indexed shards, domains, sha256 and manifest;
- ``moeforge sft``: the same with chat rendering, assistant loss masks and best-fit packing.

The ratio is moeforge tokens/s ÷ the reference's, the median of the per-round ratios
(``_harness.paired_ratio``); issue 20 sets ≥ 0.85 for both modes. Output check: moeforge pretrain writes
exactly the encoder's tokens plus one EOS per document (count and histogram of token ids); SFT the same
plus one EOS per plain-text record, less what it truncates or drops (stated when not zero).

Run: ``python benchmarks/tokenize_pack.py [--rounds 3] [--seq-len 1024] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Results, add_common_args, check_same, cpu_hog, interleave, paired_ratio  # noqa: E402
from moeforge.data.pipeline import run_pipeline  # noqa: E402
from moeforge.data.recipe import Recipe, load_recipe  # noqa: E402
from moeforge.data.store import iter_lines  # noqa: E402
from moeforge.tokens.pack import render_chat  # noqa: E402
from moeforge.tokens.tokenize import tokenize_run  # noqa: E402
from moeforge.tokens.tokenizer import (  # noqa: E402
    TokenizerConfig,
    load_tokenizer,
    token_ids,
    train_tokenizer,
)

BATCH = 8192
TARGET = 0.85
QUICK_VOCAB = 4000
RAW_BATCHES = f"raw encode_batch (batches of {BATCH})"
RAW_ONE = "raw encode_batch (one call)"
RAW_FAST = "raw encode_batch_fast (one call)"
MODES = ("pretrain", "sft")


def real_data() -> Path | None:
    p = Path(os.environ.get("MOEFORGE_REAL_DATA", ROOT.parent / "shared" / "data"))
    return p if (p / "tinyshakespeare" / "input.txt").exists() else None


def build_run(work: Path, quick: bool) -> Path:
    run = work / ("run-quick" if quick else "run")
    if (run / "manifest.json").exists():
        return run
    data = real_data()
    if data is None:
        recipe = load_recipe(ROOT / "configs" / "data" / "demo.yaml")
    else:
        ruslit = {
            "path": str(data / "ruslit"),
            "include": ["*.txt"],
            "kind": "text",
            "family": "ruslit",
            "domain": "prose",
            "format": "txt",
            "txt_mode": "lines",
        }
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
                    *([] if quick else [ruslit]),
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


def train_texts(run: Path) -> tuple[list[str], int]:
    """The train split's texts as moeforge's pretrain mode renders them (chats as ChatML), and how many
    of them are plain text (not chats)."""
    texts, plain = [], 0
    for f in sorted((run / "records" / "train").glob("*.jsonl.zst")):
        for _, line in iter_lines(f):
            obj = json.loads(line)
            if obj.get("text") is not None:
                texts.append(obj["text"])
                plain += 1
            else:
                texts.append(render_chat(obj["messages"]))
    return texts, plain


def written_tokens(out: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Every token of the train split's ``.bin`` (little-endian, the manifest's dtype)."""
    dtype = np.dtype(manifest["tokenizer"]["dtype"]).newbyteorder("<")
    return np.fromfile(out / "train.bin", dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=None, help=f"default 32000 (--quick {QUICK_VOCAB})")
    ap.add_argument("--work", type=Path, default=None, help="reuse a work dir (run + tokenizer) across calls")
    add_common_args(ap, rounds=3)
    ap.add_argument("--repeats", type=int, dest="rounds", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.quick and not any(a.startswith(("--rounds", "--repeats")) for a in given):
        args.rounds = 1
    if args.vocab_size is None:
        args.vocab_size = QUICK_VOCAB if args.quick else 32_000
    work = args.work or Path(tempfile.mkdtemp(prefix="moeforge-bench-tok-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = build_run(work, args.quick)
    tok_dir = work / f"tok{args.vocab_size}{'-quick' if args.quick else ''}"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(run, tok_dir, TokenizerConfig(vocab_size=args.vocab_size))
    tok = load_tokenizer(tok_dir)
    eos_id, _ = token_ids(tok)
    texts, plain = train_texts(run)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    encoded = tok.encode_batch(texts, add_special_tokens=False)  # also warms the encoder up
    raw_ids = np.fromiter(chain.from_iterable(e.ids for e in encoded), dtype=np.int64)
    n_tokens = int(raw_ids.size)
    del encoded
    print(json.dumps({"setup_s": round(time.perf_counter() - t0, 1)}), flush=True)

    results = Results("tokenize_pack", args, title="Tokenize + pack + write vs raw `tokenizers`")
    results.row(
        kind="corpus",
        records=len(texts),
        plain_text_records=plain,
        chats=len(texts) - plain,
        text_mb=round(mb, 2),
        tokens=n_tokens,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        seq_len=args.seq_len,
        cores=os.cpu_count(),
    )
    results.note(
        f"Corpus: the train split of a pipeline run, {len(texts):,} records ({len(texts) - plain:,} of them "
        f"chats), {mb:.1f} MB of text, {n_tokens:,} tokens with a {args.vocab_size:,}-entry byte-level BPE "
        f"trained on it; blocks of {args.seq_len + 1:,} tokens; {os.cpu_count()} cores."
    )

    outs = {mode: work / f"out-{mode}" for mode in MODES}
    last: dict[str, Any] = {}
    bin_sha: dict[str, set[str]] = {mode: set() for mode in MODES}

    def raw_batches() -> None:
        for i in range(0, len(texts), BATCH):
            tok.encode_batch(texts[i : i + BATCH], add_special_tokens=False)

    def raw_one() -> None:
        tok.encode_batch(texts, add_special_tokens=False)

    def raw_fast() -> None:
        tok.encode_batch_fast(texts, add_special_tokens=False)

    def moeforge(mode: str) -> Any:
        def call() -> None:
            res = tokenize_run(
                run, tok_dir, seq_len=args.seq_len, mode=mode, out=outs[mode], splits=("train",)
            )
            last[mode] = res.manifest
            bin_sha[mode].add(res.manifest["splits"]["train"]["files"]["train.bin"]["sha256"])

        return call

    def before(name: str) -> None:
        for mode in MODES:
            if name == f"moeforge {mode}":
                shutil.rmtree(outs[mode], ignore_errors=True)

    contenders = {
        RAW_BATCHES: raw_batches,
        RAW_ONE: raw_one,
        RAW_FAST: raw_fast,
        "moeforge pretrain": moeforge("pretrain"),
        "moeforge sft": moeforge("sft"),
    }
    with cpu_hog(args.busy):
        timings = interleave(contenders, args.rounds, warmup=0 if args.quick else 1, before=before)

    # --- the output check, before any time is reported
    for mode in MODES:  # every round wrote the same bytes
        results.check(
            f"moeforge {mode}: the same train.bin every round",
            "same" if len(bin_sha[mode]) == 1 else f"differs: {len(bin_sha[mode])} different sha256",
        )
        if len(bin_sha[mode]) != 1:
            raise SystemExit(f"moeforge {mode} wrote different tokens in different rounds")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ref_hist = np.bincount(raw_ids, minlength=vocab)
    pre = last["pretrain"]["splits"]["train"]
    pre_tokens = written_tokens(outs["pretrain"], last["pretrain"])
    expect = ref_hist.copy()
    expect[eos_id] += len(texts)
    verdict = check_same(
        {
            "raw encode_batch + one EOS per document": {
                "records": len(texts),
                "tokens": n_tokens + len(texts),
                "histogram of token ids": expect.tolist(),
            },
            "moeforge pretrain": {
                "records": pre["records"],
                "tokens": int(pre_tokens.size),
                "histogram of token ids": np.bincount(pre_tokens, minlength=vocab).tolist(),
            },
        },
        "raw encode_batch + one EOS per document",
    )
    if pre["tokens"] != pre_tokens.size:
        raise SystemExit(f"the manifest counts {pre['tokens']} tokens, train.bin holds {pre_tokens.size}")
    results.check(
        "moeforge pretrain writes the encoder's tokens plus one EOS per document (count, id histogram)",
        verdict,
    )
    sft = last["sft"]["splits"]["train"]
    sft_tokens = written_tokens(outs["sft"], last["sft"])
    cut = {k: sft[k] for k in ("truncated", "dropped_too_long", "dropped_empty") if sft.get(k)}
    expect_sft = ref_hist.copy()
    expect_sft[eos_id] += plain
    why = (
        "SFT cuts chats longer than a block at a turn boundary and drops those with no assistant turn or "
        "none that fits: " + ", ".join(f"{k} {v:,}" for k, v in cut.items())
    )
    verdict = check_same(
        {
            "raw encode_batch + one EOS per plain-text record": {
                "records": len(texts),
                "tokens": n_tokens + plain,
                "histogram of token ids": expect_sft.tolist(),
            },
            "moeforge sft": {
                "records": sft["records"],
                "tokens": int(sft_tokens.size),
                "histogram of token ids": np.bincount(sft_tokens, minlength=vocab).tolist(),
            },
        },
        "raw encode_batch + one EOS per plain-text record",
        allowed={"moeforge sft": why} if cut else None,
    )
    results.check(
        "moeforge sft writes the encoder's tokens plus one EOS per plain-text record (count, id histogram)",
        verdict,
    )

    # --- figures
    ref_name = min((RAW_BATCHES, RAW_ONE), key=lambda n: timings[n].median)
    ref = timings[ref_name]
    table = []
    for name, t in timings.items():
        extra: dict[str, Any] = {}
        if name.startswith("moeforge"):
            s = last[name.split()[1]]["splits"]["train"]
            extra = {"samples": s["samples"], "packing_efficiency": s["packing_efficiency"]}
        r = paired_ratio(t, ref) if t is not ref else None
        results.row(
            system=name,
            **t.as_dict(4),
            tokens_per_s=round(n_tokens / t.median),
            **({"vs": ref_name, **r.as_dict()} if r else {"reference": True}),
            **extra,
        )
        table.append(
            [
                name + (" (reference)" if t is ref else ""),
                round(t.median, 3),
                round(t.spread, 3),
                round(n_tokens / t.median),
                round(r.median, 3) if r else "",
                round(r.low, 3) if r else "",
                round(r.high, 3) if r else "",
            ]
        )
    results.table(
        f"The same {n_tokens:,} tokens: median of {args.rounds} round{'s' if args.rounds > 1 else ''}; "
        "ratio = tokens/s ÷ the reference's, the median of the per-round ratios with the lowest and "
        "highest round",
        ["contender", "median s", "spread", "tokens/s", "ratio", "lowest round", "highest round"],
        table,
    )
    for mode in MODES:
        r = paired_ratio(timings[f"moeforge {mode}"], ref)
        results.goal(
            f"ratio_{mode}: moeforge {mode} tokens/s ÷ {ref_name}", r.median, TARGET, spread=(r.low, r.high)
        )
    other = RAW_ONE if ref_name == RAW_BATCHES else RAW_BATCHES
    r = paired_ratio(timings[ref_name], timings[other])
    results.note(
        f"The reference is {ref_name}: {r.median:.2f}× the speed of {other} (median of the per-round ratios)."
    )
    fast = {mode: paired_ratio(timings[f"moeforge {mode}"], timings[RAW_FAST]) for mode in MODES}
    results.note(
        f"moeforge calls encode_batch_fast (the same ids without character offsets, which packing does not "
        f"read); {RAW_FAST} runs at {paired_ratio(timings[RAW_FAST], ref).median:.2f}× the reference. "
        "Against that same call, the cost of everything moeforge adds around the encoder: "
        + ", ".join(f"{mode} {r.median:.3f} ({r.low:.3f}–{r.high:.3f})" for mode, r in fast.items())
        + "."
    )
    results.note(
        f"moeforge SFT packing efficiency {sft['packing_efficiency']:.1%} ({sft['samples']:,} blocks); "
        f"pretrain {pre['packing_efficiency']:.1%} ({pre['samples']:,} blocks)."
    )
    results.write()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
