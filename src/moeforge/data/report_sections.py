"""The run-level sections of :mod:`moeforge.data.report`: overview, counts, lengths, gates and samples.

Each function returns one ``<section>`` of the page, built from the manifest and the
:class:`~moeforge.data.report_scan._Scan`; here too is the "not run" marker every optional section uses
when its data is absent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from moeforge.data.report_html import (
    SPLIT_COLOURS,
    escape,
    fmt_int,
    fmt_kib,
    hbar_chart,
    html_table,
    section,
    vhist,
)
from moeforge.data.report_scan import _LENGTH_BINS, _SAMPLE_CHARS, _SAMPLES, Key, _Scan
from moeforge.data.split import SPLITS

NOT_RUN = "not run"
TOKENS_NOTE = (
    "≈tokens: an approximation until a tokenizer exists, ceil(4/3 × whitespace words) + 1 per text or "
    "turn, times meta.extra.mix_repeat (as manifest.json counts them)"
)
_CHART_ROWS = 30  # categorical charts show the largest rows; the tables list all of them


def _not_run(why: str) -> str:
    return f'<p class="not-run"><strong>{NOT_RUN}</strong>: {escape(why)}</p>'


# ---------------------------------------------------------------------------------------------- sections


def _overview(manifest: Mapping[str, Any], scan: _Scan) -> str:
    records = manifest.get("records") or {}
    total = sum(int(v) for v in records.values())
    review = sum(int(r.get("records", 0)) for r in manifest.get("review") or [])
    quarantined = int((manifest.get("quarantine") or {}).get("records", 0))
    inputs = manifest.get("inputs") or []
    gates = manifest.get("gates") or []
    failed = [g.get("gate") for g in gates if g.get("verdict") == "FAIL"]
    recipe = manifest.get("recipe") or {}
    facts = [
        ("run", escape(manifest.get("name", "?"))),
        ("description", escape(recipe.get("description") or "—")),
        ("format", f"{escape(manifest.get('format'))}, contract v{escape(manifest.get('contract_version'))}"),
        ("moeforge", escape(manifest.get("moeforge_version", "?"))),
        ("recipe sha256", f"<code>{escape(manifest.get('recipe_sha256', '?'))}</code>"),
        (
            "inputs",
            f"{fmt_int(len(inputs))} files, {fmt_int(sum(int(i.get('size') or 0) for i in inputs))} bytes",
        ),
        (
            "records",
            f"{fmt_int(total)}: " + ", ".join(f"{escape(s)} {fmt_int(records.get(s, 0))}" for s in SPLITS),
        ),
        ("held for PII review", fmt_int(review)),
        ("quarantined", fmt_int(quarantined)),
        (
            "gates",
            NOT_RUN
            if not gates
            else (f'<span class="FAIL">{len(failed)} failed</span>: {escape(", ".join(map(str, failed)))}')
            if failed
            else '<span class="pass">all pass</span>',
        ),
    ]
    body = "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    counts = manifest.get("counts") or []
    expected = Counter({(c["split"], c["family"], c["lang"], c["domain"]): int(c["records"]) for c in counts})
    expected_tokens = Counter(
        {(c["split"], c["family"], c["lang"], c["domain"]): int(c["tokens"]) for c in counts if "tokens" in c}
    )
    warnings = []
    if scan.n_problems:
        more = (
            f" (+{scan.n_problems - len(scan.problems)} more)" if scan.n_problems > len(scan.problems) else ""
        )
        warnings.append("records the report could not read: " + "; ".join(map(escape, scan.problems)) + more)
    tokens_differ = len(expected_tokens) == len(counts) and +expected_tokens != +scan.tokens
    if +expected != +scan.records or tokens_differ:
        warnings.append(
            "the files hold different records or ≈tokens per split × family × lang × domain than "
            "manifest.json says; "
            "run <code>moeforge data verify</code> on this directory"
        )
    body += "".join(f'<p class="warn">{w}</p>' for w in warnings)
    return section("overview", "Overview", body)


def _counts(scan: _Scan) -> str:
    if not scan.records:
        return section(
            "counts", "Records and ≈tokens per split × family × lang × domain", "<p>no records</p>"
        )
    groups = sorted({k[1:] for k in scan.records})

    def rows(c: Counter[Key]) -> list[tuple[str, list[float]]]:
        r = [(" / ".join(g), [float(c[(s, *g)]) for s in SPLITS]) for g in groups]
        return sorted(r, key=lambda t: (-sum(t[1]), t[0]))[:_CHART_ROWS]

    colours = [SPLIT_COLOURS[s] for s in SPLITS]
    more = f" (the {_CHART_ROWS} largest of {len(groups)})" if len(groups) > _CHART_ROWS else ""
    body = (
        f'<p class="note">{escape(TOKENS_NOTE)}. Rows are family / lang / domain{more}; '
        '"und": no language label.</p><div class="row">'
        f"<figure><figcaption>records</figcaption>"
        f"{hbar_chart(rows(scan.records), SPLITS, 'records per family / lang / domain', colours=colours)}"
        "</figure><figure><figcaption>≈tokens</figcaption>"
        f"{hbar_chart(rows(scan.tokens), SPLITS, '≈tokens per family / lang / domain', colours=colours)}"
        "</figure></div>"
    )
    table = [
        [escape(x) for x in k] + [fmt_int(c[k]) for c in (scan.records, scan.tokens, scan.words, scan.chars)]
        for k in sorted(scan.records, key=lambda k: (SPLITS.index(k[0]), k[1:]))
    ]
    table.append(
        ["<strong>total</strong>", "", "", ""]
        + [
            f"<strong>{fmt_int(sum(c.values()))}</strong>"
            for c in (scan.records, scan.tokens, scan.words, scan.chars)
        ]
    )
    body += html_table(
        ["split", "family", "lang", "domain", "records", "≈tokens", "words", "characters"],
        table,
        (4, 5, 6, 7),
    )
    return section("counts", "Records and ≈tokens per split × family × lang × domain", body)


def _lengths(scan: _Scan) -> str:
    labels = ["0"] + [fmt_kib(1 << (i + 3)) for i in range(1, _LENGTH_BINS - 1)] + [f"{fmt_kib(1 << 20)}+"]
    charts, stats = [], []
    for s in SPLITS:
        n = sum(scan.lengths[s])
        chars = sum(v for k, v in scan.chars.items() if k[0] == s)
        charts.append(
            f"<figure><figcaption>{escape(s)}: {fmt_int(n)} records</figcaption>"
            + vhist(
                labels,
                [s],
                [scan.lengths[s]],
                f"characters per record ({s})",
                every=2,
                colours=[SPLIT_COLOURS[s]],
            )
            + "</figure>"
        )
        stats.append([escape(s), fmt_int(n), fmt_int(chars / n if n else 0), fmt_int(scan.longest[s])])
    body = (
        '<p class="note">Bins are powers of two: the bar at 64 counts records of 64–127 characters '
        "(all turns of a chat together).</p>"
        f'<div class="row">{"".join(charts)}</div>'
        + html_table(["split", "records", "mean characters", "longest"], stats, (1, 2, 3))
    )
    return section("lengths", "Characters per record", body)


def _gates(manifest: Mapping[str, Any]) -> str:
    gates = manifest.get("gates")
    if not gates:
        return section("gates", "Gates", _not_run("the manifest has no gate results"))
    rows = [
        [
            escape(g.get("gate")),
            f'<span class="{escape(g.get("verdict"))}">{escape(g.get("verdict"))}</span>',
            escape(g.get("evidence")),
        ]
        for g in gates
    ]
    return section("gates", "Gates", html_table(["gate", "verdict", "evidence"], rows))


def _samples(scan: _Scan) -> str:
    parts = []
    for s in SPLITS:
        recs = "".join(
            f'<p class="family">{escape(fam)}</p><pre>{escape(text)}</pre>'
            for fam, text in sorted(scan.samples[s].items())
        )
        parts.append(f"<h3>{escape(s)}</h3>{recs or '<p>no records</p>'}")
    note = (
        f'<p class="note">The first record of each family in each split (at most {_SAMPLES} families per '
        f"split), cut at {_SAMPLE_CHARS} characters.</p>"
    )
    return section("samples", "Sample records", note + "".join(parts))
