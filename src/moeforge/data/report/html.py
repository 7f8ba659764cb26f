"""The HTML and SVG primitives of :mod:`moeforge.data.report`, generic over what they show.

Escaping and number formatting, an HTML table, a horizontal bar chart and a vertical histogram drawn as
inline SVG, a ``<section>`` wrapper, the page's style sheet, its Content-Security-Policy and the colour
palettes. Nothing here reads a run directory or knows the manifest; the output is a pure function of the
arguments (no clock, no machine data), so the report's bytes stay reproducible. Callers pass cells and
chart rows as already-escaped HTML where the docstrings say so; everything else is escaped here.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

__all__ = [
    "CSP",
    "PALETTE",
    "SPLIT_COLOURS",
    "STYLE",
    "escape",
    "fmt_int",
    "fmt_kib",
    "fmt_share",
    "hbar_chart",
    "html_table",
    "section",
    "vhist",
]

SPLIT_COLOURS = {"train": "#4c78a8", "valid": "#f58518", "test": "#54a24b"}
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#bab0ac")
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


# -------------------------------------------------------------------------------------------- formatting


def escape(value: object) -> str:
    """HTML-escape anything that came from the data (quotes too: it may land in an attribute)."""
    return html.escape(str(value), quote=True)


def _n(x: float) -> str:
    """An SVG coordinate: one decimal, stable across runs."""
    return f"{x:.1f}"


def fmt_int(n: float) -> str:
    """A count with thousands separators: 12,345."""
    return f"{int(n):,}"


def fmt_share(x: float) -> str:
    """A share as a percentage with one decimal: 0.4 → 40.0%."""
    return f"{x:.1%}"


def fmt_kib(n: int) -> str:
    """A power-of-two bin edge: 512, 1K, 64K, 1M."""
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K" if n >= 1 << 10 else str(n)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are already-escaped HTML, columns in ``numeric`` are right-aligned."""
    head = "".join(
        f"<th{' class=num' if i in numeric else ''}>{escape(h)}</th>" for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------------ charts


def _legend(series: Sequence[str], colours: Sequence[str], x0: float) -> list[str]:
    out, x = [], x0
    for name, colour in zip(series, colours, strict=True):
        out.append(f'<rect x="{_n(x)}" y="4" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{_n(x + 14)}" y="13">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return out


def hbar_chart(
    rows: Sequence[tuple[str, Sequence[float]]],
    series: Sequence[str],
    label: str,
    *,
    stacked: bool = True,
    fmt: Callable[[float], str] = fmt_int,
    colours: Sequence[str] | None = None,
) -> str:
    """Horizontal bars, one row per ``(name, value per series)``: stacked segments, or one thin bar per
    series (``stacked=False``). Hovering a bar shows its exact value (an SVG ``<title>``)."""
    colours = list(colours or PALETTE[: len(series)])
    label_w = min(max((len(name) for name, _ in rows), default=4) * 7 + 14, 280)
    max_chars = (label_w - 14) // 7
    bar_w, value_w = 460.0, 110
    legend_h = 20 if len(series) > 1 else 0
    row_h = 22 if stacked else 6 + 13 * len(series)
    width, height = label_w + int(bar_w) + value_w, legend_h + row_h * len(rows) + 6
    vmax = max((sum(v) if stacked else max(v, default=0) for _, v in rows), default=0) or 1
    out = [
        f'<svg class="chart" role="img" aria-label="{escape(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
    ]
    if legend_h:
        out += _legend(series, colours, label_w)
    for i, (name, values) in enumerate(rows):
        y = legend_h + i * row_h
        shown = name if len(name) <= max_chars else name[: max_chars - 1] + "…"
        out.append(
            f'<text x="{label_w - 6}" y="{_n(y + row_h / 2 + 4)}" text-anchor="end">{escape(shown)}'
            f"<title>{escape(name)}</title></text>"
        )
        if stacked:
            x = float(label_w)
            for s, v, colour in zip(series, values, colours, strict=True):
                w = v / vmax * bar_w
                if w > 0:
                    out.append(
                        f'<rect class="bar" x="{_n(x)}" y="{_n(y + 3)}" width="{_n(max(w, 1))}" '
                        f'height="{row_h - 6}" fill="{colour}">'
                        f"<title>{escape(name)} · {escape(s)}: {fmt(v)}</title></rect>"
                    )
                x += w
            out.append(f'<text x="{_n(x + 5)}" y="{_n(y + row_h / 2 + 4)}">{fmt(sum(values))}</text>')
        else:
            for j, (s, v, colour) in enumerate(zip(series, values, colours, strict=True)):
                w, by = v / vmax * bar_w, y + 3 + 13 * j
                if w > 0:
                    out.append(
                        f'<rect class="bar" x="{label_w}" y="{by}" width="{_n(max(w, 1))}" height="11" '
                        f'fill="{colour}"><title>{escape(name)} · {escape(s)}: {fmt(v)}</title></rect>'
                    )
                out.append(f'<text x="{_n(label_w + w + 5)}" y="{by + 10}" class="small">{fmt(v)}</text>')
    out.append("</svg>")
    return "".join(out)


def vhist(
    bins: Sequence[str],
    series: Sequence[str],
    counts: Sequence[Sequence[int]],
    label: str,
    *,
    every: int = 1,
    colours: Sequence[str] | None = None,
) -> str:
    """A vertical histogram: ``counts[s][b]`` records of series ``s`` in bin ``b``, stacked; a label under
    every ``every``-th bin."""
    colours = list(colours or PALETTE[: len(series)])
    bw, plot_h, left, top = 24, 150, 56, 24
    width, height = left + bw * len(bins) + 10, top + plot_h + 34
    totals = [sum(c[b] for c in counts) for b in range(len(bins))]
    vmax = max(totals, default=0) or 1
    out = [
        f'<svg class="chart" role="img" aria-label="{escape(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
    ]
    if len(series) > 1:
        out += _legend(series, colours, left)
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        out.append(f'<line class="grid" x1="{left}" x2="{width - 10}" y1="{_n(y)}" y2="{_n(y)}"/>')
        out.append(
            f'<text x="{left - 4}" y="{_n(y + 4)}" text-anchor="end" class="small">'
            f"{fmt_int(vmax * frac)}</text>"
        )
    for b, name in enumerate(bins):
        x, y = left + b * bw, float(top + plot_h)
        for s, c, colour in zip(series, counts, colours, strict=True):
            h = c[b] / vmax * plot_h
            if h > 0:
                y -= h
                out.append(
                    f'<rect class="bar" x="{x + 2}" y="{_n(y)}" width="{bw - 4}" height="{_n(max(h, 1))}" '
                    f'fill="{colour}"><title>{escape(name)} · {escape(s)}: {fmt_int(c[b])}</title></rect>'
                )
        if b % every == 0:
            out.append(
                f'<text x="{_n(x + bw / 2)}" y="{top + plot_h + 14}" text-anchor="middle" class="small">'
                f"{escape(name)}</text>"
            )
    out.append(f'<text x="{left}" y="{height - 4}" class="small">{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


# -------------------------------------------------------------------------------------------------- page


def section(anchor: str, title: str, body: str) -> str:
    """A ``<section id=anchor>`` with an escaped ``<h2>`` title; ``body`` is already-escaped HTML."""
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0 auto;
max-width:1180px;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0}
h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px}nav a{margin-right:12px}code,pre{font:12px ui-monospace,Menlo,Consolas,monospace}
pre{background:#f6f6f6;border:1px solid #e4e4e4;padding:8px;white-space:pre-wrap;word-break:break-word;
max-height:16em;overflow:auto;margin-top:2px}p.family{margin:10px 0 0;color:#555}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px}dt{color:#666}dd{margin:0}
table{border-collapse:collapse;margin:12px 0;font-size:13px}th,td{border-bottom:1px solid #e4e4e4;
padding:3px 10px;text-align:left;vertical-align:top}th{background:#f3f3f3}td.num,th.num{text-align:right}
tbody tr:nth-child(even){background:#fafafa}ul{margin:0;padding-left:16px}
.row{display:flex;flex-wrap:wrap;gap:8px 24px}figure{margin:8px 0}
figcaption{font-weight:600;margin-bottom:4px}
svg.chart{max-width:100%;height:auto}svg.chart text{font:12px system-ui,sans-serif;fill:#333}
svg.chart text.small{font-size:10px;fill:#555}svg.chart line.grid{stroke:#e0e0e0}
.note{color:#555}.not-run{color:#8a6d00;background:#fff8e1;border:1px solid #f0dc9a;padding:6px 10px}
.warn{color:#8a1c1c;background:#fdecea;border:1px solid #f3b9b3;padding:6px 10px}
.pass{color:#1e7b34;font-weight:600}.FAIL{color:#b00020;font-weight:700}.skip{color:#8a6d00}
"""
