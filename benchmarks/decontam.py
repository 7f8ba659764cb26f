"""Decontamination: recall and precision on benchmark items planted in real prose, and throughput.

Corpus (from ``$MOEFORGE_REAL_DATA``, else ``../shared/data`` beside the project root): Shakespeare
(``tinyshakespeare/input.txt``, paragraphs on blank lines) and RusLit (``ruslit/<author>/*.txt``, one
paragraph per line), grouped into documents of about ``DOC_CHARS`` characters. Benchmarks: GSM8K test
(``gsm8k/test.jsonl``, question + answer) and HumanEval (``humaneval/HumanEval.jsonl.gz``, prompt +
canonical solution).

Planting (seed 0): a share ``PLANT_SHARE`` of the documents each receives one item of GSM8K (70%) or
HumanEval (30%), inserted between two words at a random position, as one of four variants:

- ``whole``: the item's full text (question + answer; prompt + solution);
- ``question``: GSM8K's question alone, HumanEval's prompt alone;
- ``excerpt30``: a run of 30 consecutive words (whitespace tokens) of the item;
- ``excerpt12``: a run of 12 words — shorter than the 13-gram, so no n-gram method at n = 13 can find it;
  reported on its own and left out of the overall recall;

each lightly re-formatted at random: case (upper, lower, title), whitespace (newlines → spaces, spaces
doubled, re-wrapped at 60 columns, or code re-indented with tabs), punctuation (commas and periods
dropped, quotes made typographic, "?" → "."). The ground truth is which document holds which item.

Systems, each asked "which benchmark does this document contain?":

- ``moeforge``: :class:`moeforge.data.decontam.DecontamIndex` (``find``, and ``contains_any`` for speed);
- ``reference``: a plain-Python implementation of the same rule (per-character normalization with
  :mod:`unicodedata`, n-gram tuples in a dict) — a cross-check of the hashing, not a competitor;
- ``datatrove``: ``NGramsDecontFilter`` run as is, on an index made by ``NGramsDecontIndexer``'s own
  ``compute_hashes`` (query = question/prompt, label = answer/solution, query and overlap n-grams on,
  n = 13). The indexer step itself cannot be used offline: constructing it requires ``lighteval``, and
  its ``run`` loads the tasks from the Hugging Face Hub. datatrove needs its own environment; pass its
  interpreter with ``--datatrove-python`` (e.g. a venv with ``pip install datatrove==0.10.1 spacy``).

Printed: one JSON line per system × benchmark (planted, found, recall, false positives, precision, and
for moeforge recall per variant and whether the right item was named), per system speed (docs/s, MB/s
of UTF-8, single-threaded, systems taking turns over chunks of documents), per system index build time
and memory, and the machine's load average before and after. ``--markdown`` prints tables instead;
``--quick`` uses a quarter of the corpus. Run: ``python benchmarks/decontam.py [--quick] [--markdown]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

SEED = 0
DOC_CHARS = 3000
PLANT_SHARE = 0.15
DECOY_SHARE = 0.10  # of the other documents: a GSM8K *train* item, which is not contamination
NGRAM = 13
MIN_ITEM_WORDS = 8
MAX_ITEM_FREQUENCY = 10
VARIANTS = ("whole", "question", "excerpt30", "excerpt12")
SCORED_VARIANTS = ("whole", "question", "excerpt30")  # excerpt12 is shorter than the n-gram
CHUNK = 200  # documents per timing turn


@dataclass(frozen=True)
class Item:
    benchmark: str
    item_id: str
    query: str  # GSM8K question / HumanEval prompt
    label: str  # GSM8K answer / HumanEval canonical solution

    @property
    def text(self) -> str:
        return self.query + "\n" + self.label


@dataclass
class Doc:
    text: str
    source: str
    planted: Item | None = None
    decoy: Item | None = None
    variant: str | None = None
    reformat: list[str] = field(default_factory=list)


# --- data -------------------------------------------------------------------------------------------


def data_dir() -> Path:
    env = os.environ.get("MOEFORGE_REAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_gsm8k(root: Path, split: str) -> list[Item]:
    items = []
    with (root / "gsm8k" / f"{split}.jsonl").open(encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            if line.strip():
                row = json.loads(line)
                items.append(Item("gsm8k", f"{split}.jsonl:{no}", row["question"], row["answer"]))
    return items


def load_items(root: Path) -> list[Item]:
    items = load_gsm8k(root, "test")
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                items.append(Item("humaneval", row["task_id"], row["prompt"], row["canonical_solution"]))
    return items


def _group(paragraphs: list[str], source: str, sep: str) -> list[Doc]:
    docs, buf, size = [], [], 0
    for p in paragraphs:
        buf.append(p)
        size += len(p)
        if size >= DOC_CHARS:
            docs.append(Doc(sep.join(buf), source))
            buf, size = [], 0
    if buf:
        docs.append(Doc(sep.join(buf), source))
    return docs


def load_corpus(root: Path) -> list[Doc]:
    text = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    docs = _group([p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()], "shakespeare", "\n\n")
    for path in sorted((root / "ruslit").glob("*/*.txt")):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        docs.extend(_group(lines, f"ruslit/{path.parent.name}/{path.stem}", "\n"))
    return docs


# --- planting ---------------------------------------------------------------------------------------


def _excerpt(text: str, n_words: int, rng: random.Random) -> str:
    tokens = text.split()
    if len(tokens) <= n_words:
        return " ".join(tokens)
    start = rng.randrange(len(tokens) - n_words + 1)
    return " ".join(tokens[start : start + n_words])


def _reformat(text: str, code: bool, rng: random.Random) -> tuple[str, list[str]]:
    applied = []
    case = rng.choice(["upper", "lower", "title", "keep"])
    if case != "keep":
        text = getattr(text, case)()
        applied.append(case)
    space = rng.choice(["join_lines", "double_spaces", "rewrap", "tabs" if code else "keep"])
    if space == "join_lines":
        text = re.sub(r"\s*\n\s*", " ", text)
    elif space == "double_spaces":
        text = text.replace(" ", "  ")
    elif space == "rewrap":
        words, lines, line = text.split(), [], ""
        for w in words:
            if len(line) + len(w) > 60:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        text = "\n".join([*lines, line])
    elif space == "tabs":
        text = text.replace("    ", "\t")
    if space != "keep":
        applied.append(space)
    punct = rng.choice(["drop_commas_periods", "curly_quotes", "question_to_period", "keep"])
    if punct == "drop_commas_periods":
        text = re.sub(r"[,.](\s|$)", r"\1", text)
    elif punct == "curly_quotes":
        text = text.replace("'", "’").replace('"', "“")
    elif punct == "question_to_period":
        text = text.replace("?", ".")
    if punct != "keep":
        applied.append(punct)
    return text, applied


def _insert(doc: Doc, body: str, rng: random.Random) -> None:
    gaps = [m.start() for m in re.finditer(r"\s", doc.text)] or [len(doc.text)]
    at = rng.choice(gaps)
    doc.text = doc.text[:at] + "\n" + body + "\n" + doc.text[at:]


def plant(docs: list[Doc], items: list[Item], decoys: list[Item], rng: random.Random) -> None:
    by_bench = defaultdict(list)
    for it in items:
        by_bench[it.benchmark].append(it)
    for doc in docs:
        if rng.random() >= PLANT_SHARE:
            if rng.random() < DECOY_SHARE:
                doc.decoy = rng.choice(decoys)
                body, doc.reformat = _reformat(doc.decoy.text, False, rng)
                _insert(doc, body, rng)
            continue
        item = rng.choice(by_bench["gsm8k" if rng.random() < 0.7 else "humaneval"])
        variant = rng.choice(VARIANTS)
        body = {
            "whole": item.text,
            "question": item.query,
            "excerpt30": _excerpt(item.text, 30, rng),
            "excerpt12": _excerpt(item.text, 12, rng),
        }[variant]
        body, applied = _reformat(body, item.benchmark == "humaneval", rng)
        _insert(doc, body, rng)
        doc.planted, doc.variant, doc.reformat = item, variant, applied


# --- systems ----------------------------------------------------------------------------------------

Detect = Callable[[str], set[str]]  # document text → the benchmarks it contains


@cache
def _ref_char(c: str) -> str:
    if c.isspace():
        return " "
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", c).casefold())
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] in "LN")


def ref_words(text: str) -> list[str]:
    return "".join(map(_ref_char, text)).split()


class Reference:
    """The rule of moeforge.data.decontam written plainly: word tuples in a dict, no hashing."""

    def __init__(self, items: list[Item]) -> None:
        owners: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for k, it in enumerate(items):
            words = ref_words(it.text)
            if len(words) >= NGRAM:
                for i in range(len(words) - NGRAM + 1):
                    owners[tuple(words[i : i + NGRAM])].add(k)
            elif len(words) >= MIN_ITEM_WORDS:
                owners[tuple(words)].add(k)
        self.grams = {
            g: {items[k].benchmark for k in ks} for g, ks in owners.items() if len(ks) <= MAX_ITEM_FREQUENCY
        }
        self.lengths = sorted({len(g) for g in self.grams}, reverse=True)

    def detect(self, text: str) -> set[str]:
        words = ref_words(text)
        found: set[str] = set()
        for n in self.lengths:
            for i in range(len(words) - n + 1):
                hit = self.grams.get(tuple(words[i : i + n]))
                if hit:
                    found |= hit
        return found


def build_moeforge(items: list[Item]) -> tuple[Any, dict[str, Any]]:
    from moeforge.data.decontam import BenchmarkItem, DecontamConfig, DecontamIndex

    cfg = DecontamConfig(ngram=NGRAM, min_item_words=MIN_ITEM_WORDS, max_item_frequency=MAX_ITEM_FREQUENCY)
    tracemalloc.start()
    t0 = time.perf_counter()
    index = DecontamIndex.from_items([BenchmarkItem(it.benchmark, it.item_id, it.text) for it in items], cfg)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    stats = index.stats()
    return index, {
        "kind": "index",
        "system": "moeforge",
        "build_s": round(seconds, 3),
        "ngrams": stats["ngrams"],
        "state_mb": round(stats["bytes"] / 1e6, 2),
        "bytes_per_ngram": stats["bytes_per_ngram"],
        "build_peak_mb": round(peak / 1e6, 1),
        "note": "build from items in memory (file loading not timed)",
    }


def build_reference(items: list[Item]) -> tuple[Reference, dict[str, Any]]:
    tracemalloc.start()
    t0 = time.perf_counter()
    ref = Reference(items)
    seconds = time.perf_counter() - t0
    current = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return ref, {
        "kind": "index",
        "system": "reference",
        "build_s": round(seconds, 3),
        "ngrams": len(ref.grams),
        "state_mb": round(current / 1e6, 1),
        "bytes_per_ngram": round(current / max(1, len(ref.grams)), 1),
        "note": "dict of word tuples; memory = Python objects alive after the build (tracemalloc)",
    }


def time_systems(
    detectors: dict[str, Detect], docs: list[Doc]
) -> dict[str, tuple[list[set[str]], float, float]]:
    """Run every detector over ``docs`` in chunks, taking turns so that they share the machine's noise;
    (results, wall seconds, CPU seconds) per detector."""
    results: dict[str, list[set[str]]] = {name: [] for name in detectors}
    seconds = dict.fromkeys(detectors, 0.0)
    cpu = dict.fromkeys(detectors, 0.0)
    for detect in detectors.values():
        for d in docs[:5]:
            detect(d.text)
    names = list(detectors)
    for k, start in enumerate(range(0, len(docs), CHUNK)):
        chunk = docs[start : start + CHUNK]
        for name in names[k % len(names) :] + names[: k % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            out = [detectors[name](d.text) for d in chunk]
            seconds[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            results[name].extend(out)
    return {name: (results[name], seconds[name], cpu[name]) for name in names}


# --- datatrove (in its own interpreter) --------------------------------------------------------------


def datatrove_child(inp: str, out: str) -> None:
    """Build datatrove's index with NGramsDecontIndexer.compute_hashes and run NGramsDecontFilter."""
    from types import SimpleNamespace

    import numpy as np
    from datatrove.data import Document
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter, NGramsDecontIndexer
    from datatrove.utils.hashing import create_hash_func
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    job = json.loads(Path(inp).read_text(encoding="utf-8"))
    cfg = NGramsDecontConfig(n_grams=job["ngram"], find_query_ngrams=True, find_overlap_ngrams=True)
    # NGramsDecontIndexer(...) refuses to exist without lighteval; its compute_hashes only needs these three
    shim = SimpleNamespace(
        tokenizer=load_word_tokenizer("en"), config=cfg, hash_func=create_hash_func(cfg.hash_config)
    )
    t0 = time.perf_counter()
    hashes: dict[str, set[int]] = defaultdict(set)
    for it in job["items"]:
        hashes[it["benchmark"]].update(NGramsDecontIndexer.compute_hashes(shim, it["label"], it["query"]))
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as folder:
        for task, hs in hashes.items():
            np.array(sorted(hs), dtype=cfg.hash_config.np_descr).tofile(Path(folder) / f"{task}.index.hashes")
        filt = NGramsDecontFilter(folder, config=cfg, language="en")
        t1 = time.perf_counter()
        filt.load_index_hashes()
        load_s = time.perf_counter() - t1
        results, seconds, cpu = [], 0.0, 0.0
        for k, text in enumerate(job["docs"]):
            doc = Document(text=text, id=str(k))
            t2, c2 = time.perf_counter(), time.process_time()
            kept = filt.filter(doc)
            seconds += time.perf_counter() - t2
            cpu += time.process_time() - c2
            results.append(
                None
                if kept is True
                else [doc.metadata.get("contaminated_task"), doc.metadata.get("contaminated_ngram")]
            )
    from importlib.metadata import version

    Path(out).write_text(
        json.dumps(
            {
                "version": version("datatrove"),
                "build_s": build_s,
                "load_s": load_s,
                "ngrams": sum(len(h) for h in hashes.values()),
                "seconds": seconds,
                "cpu_seconds": cpu,
                "results": results,
                "rss_mb": _peak_rss_mb(),
            }
        ),
        encoding="utf-8",
    )


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


_DATATROVE_SMOKE = (
    "import spacy; from datatrove.utils.hashing import HashConfig, create_hash_func; "
    "from datatrove.pipeline.decont.n_grams import NGramsDecontFilter; create_hash_func(HashConfig())('a b')"
)


def find_datatrove_python(arg: str | None) -> tuple[str | None, list[str]]:
    """An interpreter where datatrove's decontamination runs, and why each other candidate was refused."""
    candidates = [arg] if arg else [sys.executable, os.environ.get("DATATROVE_PYTHON")]
    refused: list[str] = []
    for py in filter(None, candidates):
        proc = subprocess.run([py, "-c", _DATATROVE_SMOKE], capture_output=True, text=True)
        if proc.returncode == 0:
            return py, refused
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        refused.append(f"{py}: {last}")
    return None, refused


def run_datatrove(py: str, items: list[Item], docs: list[Doc]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job = {
            "ngram": NGRAM,
            "items": [{"benchmark": it.benchmark, "query": it.query, "label": it.label} for it in items],
            "docs": [d.text for d in docs],
        }
        inp.write_text(json.dumps(job), encoding="utf-8")
        cmd = [py, str(Path(__file__).resolve()), "--datatrove-child", str(inp), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"datatrove run failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


# --- scoring and output -----------------------------------------------------------------------------


def score(
    system: str, docs: list[Doc], found: list[set[str]], benchmarks: Sequence[str]
) -> list[dict[str, Any]]:
    rows = []
    for bench in benchmarks:
        truth = [d.planted.benchmark if d.planted else None for d in docs]
        planted = [i for i, b in enumerate(truth) if b == bench]
        scored = [i for i in planted if docs[i].variant in SCORED_VARIANTS]
        flagged = [i for i, f in enumerate(found) if bench in f]
        true_pos = sum(1 for i in flagged if truth[i] == bench)
        by_variant = {}
        for v in VARIANTS:
            idx = [i for i in planted if docs[i].variant == v]
            by_variant[v] = {"n": len(idx), "recall": _rate(sum(bench in found[i] for i in idx), len(idx))}
        decoys = [i for i, d in enumerate(docs) if d.decoy and d.decoy.benchmark == bench]
        rows.append(
            {
                "kind": "accuracy",
                "system": system,
                "benchmark": bench,
                "decoys": len(decoys),
                "decoys_flagged": sum(bench in found[i] for i in decoys),
                "planted": len(scored),
                "found": sum(bench in found[i] for i in scored),
                "recall": _rate(sum(bench in found[i] for i in scored), len(scored)),
                "by_variant": by_variant,
                "flagged": len(flagged),
                "false_positives": len(flagged) - true_pos,
                "precision": _rate(true_pos, len(flagged)),
            }
        )
    return rows


def speed_row(system: str, docs: int, mb: float, seconds: float, cpu: float) -> dict[str, Any]:
    return {
        "kind": "speed",
        "system": system,
        "docs_per_s": round(docs / seconds, 1),
        "mb_per_s": round(mb / seconds, 3),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "docs_per_cpu_s": round(docs / cpu, 1),
        "mb_per_cpu_s": round(mb / cpu, 3),
    }


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def misses(docs: list[Doc], found: list[set[str]], n: int) -> list[dict[str, Any]]:
    out = []
    for d, f in zip(docs, found, strict=True):
        if d.planted and d.variant in SCORED_VARIANTS and d.planted.benchmark not in f:
            out.append({"item": d.planted.item_id, "variant": d.variant, "reformat": d.reformat})
    return out[:n]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(rows: list[dict[str, Any]]) -> str:
    env = next(r for r in rows if r["kind"] == "environment")
    lines = [
        f"Corpus: {env['docs']} documents, {env['mb']} MB (UTF-8), {env['planted']} with a test item, "
        f"{env['decoys']} with a GSM8K train item "
        f"({'quick' if env['quick'] else 'full'} run, seed {SEED}); load average "
        f"{env['load_before']} before, {env['load_after']} after, on {env['cpus']} shared CPUs.",
        "",
        "| system | benchmark | planted (≥ 13 words) | recall | whole | question | 30-word excerpt "
        "| 12-word excerpt | flagged | false positives (train decoys flagged / decoys) | precision |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r["kind"] != "accuracy":
            continue
        v = r["by_variant"]
        lines.append(
            f"| {r['system']} | {r['benchmark']} | {r['planted']} | {_pct(r['recall'])} | "
            + " | ".join(f"{_pct(v[k]['recall'])}" for k in VARIANTS)
            + f" | {r['flagged']} | {r['false_positives']} ({r['decoys_flagged']} / {r['decoys']}) "
            f"| {_pct(r['precision'])} |"
        )
    lines += [
        "",
        "| system | docs/s (wall) | MB/s (wall) | wall s | docs per CPU-s | MB per CPU-s | CPU s |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r["kind"] == "speed":
            lines.append(
                f"| {r['system']} | {r['docs_per_s']:,.0f} | {r['mb_per_s']:.2f} | {r['seconds']:.2f} | "
                f"{r['docs_per_cpu_s']:,.0f} | {r['mb_per_cpu_s']:.2f} | {r['cpu_seconds']:.2f} |"
            )
    lines += [
        "",
        "| system | index build s | n-grams | state MB | bytes / n-gram | note |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        if r["kind"] == "index":
            lines.append(
                f"| {r['system']} | {r['build_s']} | {r['ngrams']:,} | {r['state_mb']} | "
                f"{r['bytes_per_ngram']} | {r['note']} |"
            )
    for r in rows:
        if r["kind"] == "agreement":
            lines += ["", f"moeforge vs reference: same verdict on {r['same']}/{r['docs']} documents."]
        if r["kind"] == "skipped":
            lines += ["", f"{r['system']}: skipped — {r['reason']}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a quarter of the corpus")
    p.add_argument("--markdown", action="store_true", help="print markdown tables instead of JSON lines")
    p.add_argument("--datatrove-python", help="interpreter with datatrove + spacy installed (else skipped)")
    p.add_argument("--no-reference", action="store_true", help="skip the plain-Python reference")
    p.add_argument("--show-misses", type=int, default=0, metavar="N", help="print N missed plants to stderr")
    p.add_argument("--datatrove-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.datatrove_child:
        datatrove_child(*args.datatrove_child)
        return 0

    root = data_dir()
    needed = [root / "tinyshakespeare/input.txt", root / "ruslit", root / "gsm8k/test.jsonl"]
    needed.append(root / "humaneval/HumanEval.jsonl.gz")
    missing = [str(x) for x in needed if not x.exists()]
    if missing:
        print(f"skipped: real data missing: {', '.join(missing)} (set MOEFORGE_REAL_DATA to shared/data)")
        return 0
    load_before = os.getloadavg()
    rng = random.Random(SEED)
    items = load_items(root)
    docs = load_corpus(root)
    if args.quick:
        docs = [d for d in docs if rng.random() < 0.25]
    plant(docs, items, load_gsm8k(root, "train"), rng)
    benchmarks = ("gsm8k", "humaneval")

    rows: list[dict[str, Any]] = []
    index, index_row = build_moeforge(items)
    rows.append(index_row)
    detectors: dict[str, Detect] = {
        "moeforge": lambda t: {m.benchmark for m in index.find(t)},
        "moeforge (contains_any)": lambda t: {"any"} if index.contains_any(t) else set(),
    }
    if not args.no_reference:
        ref, ref_row = build_reference(items)
        rows.append(ref_row)
        detectors["reference"] = ref.detect
    timed = time_systems(detectors, docs)
    mb = sum(len(d.text.encode("utf-8")) for d in docs) / 1e6
    for name, (found, seconds, cpu) in timed.items():
        if name != "moeforge (contains_any)":
            rows += score(name, docs, found, benchmarks)
        rows.append(speed_row(name, len(docs), mb, seconds, cpu))
    ours = timed["moeforge"][0]
    contains = timed["moeforge (contains_any)"][0]
    assert [bool(f) for f in ours] == [bool(c) for c in contains], "contains_any disagrees with find"
    if "reference" in timed:
        same = sum(a == b for a, b in zip(ours, timed["reference"][0], strict=True))
        rows.append(
            {"kind": "agreement", "systems": ["moeforge", "reference"], "docs": len(docs), "same": same}
        )
    right_item = sum(
        1
        for d in docs
        if d.planted
        and d.variant in SCORED_VARIANTS
        and any(m.item_id == d.planted.item_id for m in index.find(d.text))
    )
    rows.append(
        {
            "kind": "item_attribution",
            "system": "moeforge",
            "planted": sum(1 for d in docs if d.planted and d.variant in SCORED_VARIANTS),
            "right_item_named": right_item,
        }
    )

    py, refused = find_datatrove_python(args.datatrove_python)
    if py is None:
        rows.append(
            {
                "kind": "skipped",
                "system": "datatrove",
                "reason": "no interpreter runs datatrove's decontamination ("
                + "; ".join(refused or ["datatrove + spacy not installed"])
                + "); pass --datatrove-python (a venv with pip install datatrove==0.10.1 spacy)",
            }
        )
    else:
        dt = run_datatrove(py, items, docs)
        found = [set() if r is None else {r[0]} for r in dt["results"]]
        system = f"datatrove {dt['version']}"
        rows += score(system, docs, found, benchmarks)
        rows.append(speed_row(system, len(docs), mb, dt["seconds"], dt["cpu_seconds"]))
        rows.append(
            {
                "kind": "index",
                "system": system,
                "build_s": round(dt["build_s"] + dt["load_s"], 3),
                "ngrams": dt["ngrams"],
                "state_mb": dt["rss_mb"],
                "bytes_per_ngram": "–",
                "note": "compute_hashes + load_index_hashes (a dict of Python ints); memory = peak RSS of its "
                "process",
            }
        )
        if args.show_misses:
            for m in misses(docs, found, args.show_misses):
                print(f"[datatrove miss] {m}", file=sys.stderr)
            decoy_hits = [(d, r) for d, r in zip(docs, dt["results"], strict=True) if d.decoy and r]
            for d, r in decoy_hits[: args.show_misses]:
                print(f"[datatrove decoy flagged] {d.decoy.item_id if d.decoy else ''}: {r}", file=sys.stderr)
    if args.show_misses:
        for m in misses(docs, ours, args.show_misses):
            print(f"[moeforge miss] {m}", file=sys.stderr)
        flagged = [(d, index.find(d.text)) for d, f in zip(docs, ours, strict=True) if d.decoy and f]
        for d, matches in flagged[: args.show_misses]:
            hits = [(m.item_id, m.ngram) for m in matches]
            print(f"[moeforge decoy flagged] {d.decoy.item_id if d.decoy else ''}: {hits}", file=sys.stderr)
    rows.insert(
        0,
        {
            "kind": "environment",
            "docs": len(docs),
            "mb": round(mb, 2),
            "planted": sum(d.planted is not None for d in docs),
            "decoys": sum(d.decoy is not None for d in docs),
            "quick": args.quick,
            "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
    )
    if args.markdown:
        print(markdown(rows))
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
