"""Applying the policy to one record: :func:`decontaminate` drops it or cuts out what the index found.

**Policies.** ``drop`` removes a document with any match (reason ``decontam:<benchmark>`` of its first
match). ``cut`` (GPT-3 / NeMo Curator style) removes each matched span plus ``window`` characters on
either side (widened to whole words), which splits the text into pieces; more than ``max_pieces`` pieces
drops the document (``decontam:too_many_pieces``), pieces shorter than ``min_piece_chars`` are
discarded, and the kept pieces are joined by a blank line into one record (its id recomputed,
``meta.extra["decontam"]`` saying what was cut). A document left with no piece is dropped as
``decontam:<benchmark>``. Chats are checked turn by turn and cut within each turn; a chat any of whose
turns is emptied is dropped (an answer whose question was the benchmark's is contaminated too).
Records of ``exempt_families`` (e.g. the benchmark's own held-out copy) pass untouched.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from moeforge.data.contract import Message, Record, RecordMeta
from moeforge.data.decontam.config import TOO_MANY_PIECES, DecontamConfig
from moeforge.data.decontam.index import DecontamIndex, Match, word_edge


def _cut(text: str, matches: list[Match], cfg: DecontamConfig) -> tuple[list[str], int, int]:
    """(kept pieces, pieces before the length filter, characters removed) after cutting every match
    plus ``window`` characters on each side."""
    spans: list[list[int]] = []
    for m in sorted(matches, key=lambda m: m.start_char):
        a = word_edge(text, max(0, m.start_char - cfg.window), -1)
        b = word_edge(text, min(len(text), m.end_char + cfg.window), +1)
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    pieces, prev = [], 0
    for a, b in spans:
        pieces.append(text[prev:a])
        prev = b
    pieces.append(text[prev:])
    pieces = [p.strip() for p in pieces if p.strip()]
    kept = [p for p in pieces if len(p) >= cfg.min_piece_chars]
    return kept, len(pieces), sum(b - a for a, b in spans)


def _with_step(record: Record, extra: dict[str, Any] | None = None) -> RecordMeta:
    update: dict[str, Any] = {
        "provenance": record.meta.provenance.model_copy(
            update={"steps": [*record.meta.provenance.steps, "decontam"]}
        )
    }
    if extra is not None:
        update["extra"] = {**record.meta.extra, "decontam": extra}
    return record.meta.model_copy(update=update)


def decontaminate(
    record: Record, index: DecontamIndex, cfg: DecontamConfig
) -> tuple[Record | None, str | None, list[Match]]:
    """Check ``record`` against ``index`` and apply ``cfg.policy``.

    Returns ``(record, None, matches)`` — unchanged but for the provenance step ``decontam`` when nothing
    matched, cut (new content and id, ``meta.extra["decontam"]``) otherwise — or ``(None, reason,
    matches)`` with reason ``decontam:<benchmark>`` or ``decontam:too_many_pieces``. Records of
    ``cfg.exempt_families``, and every record when ``cfg.enabled`` is false, come back untouched with no
    matches."""
    if not cfg.enabled or record.meta.family in cfg.exempt_families:
        return record, None, []
    turns = record.contents()
    per_turn = [index.find(t) for t in turns]
    if record.messages is not None:
        per_turn = [[replace(m, turn=k) for m in ms] for k, ms in enumerate(per_turn)]
    matches = [m for ms in per_turn for m in ms]
    if not matches:
        return record.model_copy(update={"meta": _with_step(record)}), None, []
    if cfg.policy == "drop":
        return None, f"decontam:{matches[0].benchmark}", matches
    new_turns, pieces, removed = [], 0, 0
    for text, ms in zip(turns, per_turn, strict=True):
        if not ms:
            new_turns.append(text)
            continue
        kept, split_into, cut_chars = _cut(text, ms, cfg)
        if split_into > cfg.max_pieces:
            return None, f"decontam:{TOO_MANY_PIECES}", matches
        if not kept:
            return None, f"decontam:{ms[0].benchmark}", matches
        new_turns.append("\n\n".join(kept))
        pieces += len(kept)
        removed += cut_chars
    pairs = list(dict.fromkeys((m.benchmark, m.item_id) for m in matches))
    extra = {
        "policy": "cut",
        "benchmarks": sorted({b for b, _ in pairs}),
        "items": [list(p) for p in pairs[:20]],
        "matches": len(matches),
        "removed_chars": removed,
        "pieces": pieces,
    }
    meta = _with_step(record, extra)
    if record.text is not None:
        return Record.create(meta=meta, text=new_turns[0]), None, matches
    assert record.messages is not None
    messages = [Message(role=m.role, content=t) for m, t in zip(record.messages, new_turns, strict=True)]
    return Record.create(meta=meta, messages=messages), None, matches
