"""Regenerate docs/PERFORMANCE.md from the benchmarks' JSON (``make bench-report``).

Every figure in that document comes from a file in ``benchmarks/results/`` that a script in
``benchmarks/`` wrote through ``_harness.Results``: its rows, tables, goals, output checks and the
machine's state at the start and the end. The only hand-written text is ``benchmarks/notes/<name>.md``
(what bounds a figure, what a profile showed) and it may not contain figures — the report refuses a
note with a number followed by a unit, so a figure can never be typed by hand and go stale.

``--check`` exits 1 when docs/PERFORMANCE.md is not what the results render to (the test suite runs it).
Results from ``--quick`` runs are refused.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NOTES = ROOT / "benchmarks" / "notes"
DOC = ROOT / "docs" / "PERFORMANCE.md"

# The order of sections; benchmarks not listed follow alphabetically.
ORDER = [
    "moe_layer",
    "dispatch_sweep",
    "train_step",
    "generate",
    "pipeline",
    "tokenize_pack",
    "loader",
    "near_dedup",
    "semantic_dedup",
    "decontam",
    "langid",
    "dpo_step",
    "eval",
]
# section titles for benchmarks that have no results yet (a results file carries its own)
TITLES = {
    "moe_layer": "MoE layer, forward + backward: moeforge vs transformers' MixtralSparseMoeBlock",
    "dispatch_sweep": "MoE dispatch backends over group sizes and padding, and auto's pick",
    "train_step": "Training step: MoE vs dense of equal active parameters, MFU",
    "generate": "Decode: the engine vs transformers generate()",
    "pipeline": "Data pipeline vs datatrove",
    "tokenize_pack": "Tokenize + pack + write vs raw tokenizers encode_batch",
    "loader": "Loader vs a training step",
    "near_dedup": "MinHash near-duplicates vs datasketch and datatrove",
    "semantic_dedup": "Semantic near-duplicates",
    "decontam": "Decontamination",
    "langid": "Language ID: py3langid vs lingua",
    "dpo_step": "DPO step vs TRL DPOTrainer",
    "eval": "lm-eval scoring: --model moeforge vs lm-eval's hf backend",
}

FIGURE = re.compile(r"\d[\d.,]*\s*(?:×|%|x\b|ms\b|µs\b|s\b|docs/s|tokens/s|tok/s|GFLOP|MB/s|MB\b|GB\b|min\b)")


class ReportError(ValueError):
    pass


def _docstring_intro(benchmark: str) -> str:
    """The first paragraph of the script's docstring (what it compares)."""
    path = ROOT / "benchmarks" / f"{benchmark}.py"
    if not path.exists():
        return ""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def _title_of(benchmark: str) -> str:
    """A section title for a benchmark without results."""
    return TITLES.get(benchmark, benchmark)


def load_results(results: Path = RESULTS) -> dict[str, list[dict[str, Any]]]:
    by_bench: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ReportError(f"{path}: not JSON ({exc})") from exc
        for key in ("benchmark", "rows", "goals", "machine_start"):
            if key not in doc:
                raise ReportError(f"{path}: no '{key}' (not written by benchmarks/_harness.py)")
        if doc.get("quick"):
            raise ReportError(f"{path}: a --quick run; rerun without --quick before reporting it")
        doc["_file"] = path.name
        by_bench.setdefault(doc["benchmark"], []).append(doc)
    for docs in by_bench.values():
        docs.sort(key=lambda d: d.get("variant", ""))
    return by_bench


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def _short_cpu(model: str) -> str:
    """``AMD EPYC 7B13`` -> ``AMD EPYC``, ``Intel(R) Xeon(R) Processor`` -> ``Intel Xeon``: the vendor and
    family, enough to tell the goal rows' machines apart."""
    words = [w.replace("(R)", "").replace("(TM)", "") for w in model.split()]
    return " ".join(w for w in words[:2] if w) or "?"


def _machine_line(doc: dict[str, Any]) -> str:
    s, e = doc["machine_start"], doc.get("machine_end", {})
    threads = s.get("torch_threads")
    parts = [
        f"{s.get('cpus_usable', s.get('cpus'))} CPUs of {s.get('cpu_model', '?')}",
        f"torch {s['torch']}, {threads} threads" if "torch" in s else "",
        f"load {s['load_avg'][0]} at start, {e['load_avg'][0]} at end" if e else f"load {s['load_avg'][0]}",
        f"beside {doc['busy_processes']} busy-looping processes" if doc.get("busy_processes") else "no hog",
        s.get("time", ""),
        f"rev {doc['rev']}" if doc.get("rev") else "",
    ]
    env = s.get("env_threads") or {}
    if env:
        parts.append(", ".join(f"{k}={v}" for k, v in env.items()))
    return " · ".join(p for p in parts if p)


def _goal_value(g: dict[str, Any]) -> str:
    unit = g.get("unit", "×")
    v = f"{_fmt(g['value'])}{unit}"
    if "low" in g:
        v += f" ({_fmt(g['low'])}–{_fmt(g['high'])})"
    return v


def check_note(name: str, text: str) -> None:
    m = FIGURE.search(text)
    if m:
        line = text[: m.start()].count("\n") + 1
        raise ReportError(
            f"benchmarks/notes/{name}.md line {line}: '{m.group(0)}' is a figure; figures come from the "
            "results JSON only — state it in the script (Results.note) or describe it without the number"
        )


def render(results: Path = RESULTS, notes: Path = NOTES) -> str:
    by_bench = load_results(results)
    order = ORDER + sorted(b for b in by_bench if b not in ORDER)
    cpus = sorted({d["machine_start"].get("cpu_model", "?") for docs in by_bench.values() for d in docs})
    machines = (
        f"every section ran on one machine: {cpus[0]}"
        if len(cpus) == 1
        else "the results come from more than one machine of the same size, and a ratio can differ "
        "between them: compare within a section"
    )
    out: list[str] = [
        "# Performance",
        "",
        "<!-- Generated by `make bench-report` (benchmarks/report.py) from benchmarks/results/*.json. "
        "Do not edit: rerun the benchmark, or edit benchmarks/notes/<name>.md for the prose. -->",
        "",
        "Every figure here was written by a script in `benchmarks/` through `benchmarks/_harness.py`: the "
        "contenders run in the same process, interleaved round by round (the order rotated each round, or "
        "shuffled with a fixed seed where the section says so); a figure is the **median** over the rounds "
        "and a ratio is the median of the per-round ratios, with the lowest and highest round beside it. "
        "Both sides' outputs are compared before any time is reported; where they cannot be equal the "
        "difference is stated. Each section names the CPU it ran on "
        f"({machines}), the machine's load at the start and end of its run and the threads used.",
        "",
        "## Goals",
        "",
        "| benchmark | metric | target | measured (rounds' range) | met | machine |",
        "|---|---|---|---|---|---|",
    ]
    for b in order:
        for doc in by_bench.get(b, []):
            for g in doc["goals"]:
                cmp = "≥" if g.get("higher_is_better", True) else "≤"
                unit = g.get("unit", "×")
                busy = (
                    f"beside {doc['busy_processes']} busy processes"
                    if doc.get("busy_processes")
                    else "no hog"
                )
                load = doc["machine_start"]["load_avg"][0]
                cpu = _short_cpu(doc["machine_start"].get("cpu_model", "?"))
                out.append(
                    f"| {b}{' · ' + doc['variant'] if doc.get('variant') else ''} | {g['metric']} | "
                    f"{cmp} {_fmt(g['target'])}{unit} | {_goal_value(g)} | {_fmt(bool(g['met']))} | "
                    f"{cpu}, {busy}, load {load} |"
                )
    missing = [b for b in order if b not in by_bench]
    if missing:
        out += [
            "",
            "Not measured with the harness yet (no results file; their sections below carry no figures): "
            + ", ".join(f"`{b}`" for b in missing)
            + ".",
        ]
    out.append("")
    for b in order:
        docs = by_bench.get(b, [])
        title = docs[0].get("title", b) if docs else _title_of(b)
        out += [f"## {title} (`benchmarks/{b}.py`)", ""]
        intro = _docstring_intro(b)
        if intro:
            out += [intro, ""]
        if not docs:
            out += [f"*No figures yet: `python benchmarks/{b}.py` writes them (`make bench`).*", ""]
        for doc in docs:
            if len(docs) > 1 or doc.get("variant"):
                out += [f"### {doc.get('variant') or doc['_file']}", ""]
            out += [f"`{doc['command']}` — {_machine_line(doc)}", ""]
            for what, verdict in doc.get("checks", {}).items():
                if isinstance(verdict, dict):
                    v = "; ".join(f"{k}: {x}" for k, x in verdict.items())
                else:
                    v = str(verdict)
                out += [f"- Output check, {what}: {v}"]
            if doc.get("checks"):
                out.append("")
            for t in doc.get("tables", []):
                out += [f"{t['caption']}", "", "| " + " | ".join(t["columns"]) + " |"]
                out.append("|" + "---|" * len(t["columns"]))
                for r in t["rows"]:
                    out.append("| " + " | ".join(_fmt(x) for x in r) + " |")
                out.append("")
            for n in doc.get("notes", []):
                out.append(f"- {n}")
            if doc.get("notes"):
                out.append("")
        note = notes / f"{b}.md"
        if note.exists():
            text = note.read_text(encoding="utf-8").strip()
            check_note(b, text)
            out += [text, ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/PERFORMANCE.md is out of date")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=DOC)
    args = ap.parse_args(argv)
    try:
        text = render(args.results)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(
                f"{args.out} is not what benchmarks/results renders to: run `make bench-report`",
                file=sys.stderr,
            )
            return 1
        return 0
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
