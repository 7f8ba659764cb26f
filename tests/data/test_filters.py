"""Cleaning and quality filters: each rule drops what the paper says, with a named reason."""

from __future__ import annotations

import pytest

from moeforge.data.contract import Message, Provenance, Record, RecordMeta, SourceRef
from moeforge.data.filters import (
    FilterConfig,
    apply_filters,
    c4_lines,
    gopher_quality,
    gopher_repetition,
    normalize_text,
)

PROSE = (
    "The old town was quiet in the early morning, and the baker had already opened his shop. "
    "Children walked to school with their parents, talking about the games they would play later. "
    "A light rain began to fall, but nobody seemed to mind it very much at all. "
    "By noon the sun had returned, and the market square was full of people buying bread, fruit and flowers "
    "for the festival that would begin in the evening with music and dancing."
)


def _rec(text=None, messages=None, domain="prose", lang=None):
    meta = RecordMeta(
        source=SourceRef(uri="x"),
        family="f",
        domain=domain,
        lang=lang,
        provenance=Provenance(source_sha256="0" * 64),
    )
    return Record.create(meta=meta, text=text, messages=messages)


def test_normalize_text_nfc_controls_spaces_and_blank_lines():
    raw = "Cafe\u0301\x07  au\t\tlait  \r\n\r\n\r\n\r\nnext\u00a0line \n"
    assert normalize_text(raw) == "Café au lait\n\nnext line"


def test_good_prose_passes_gopher_quality_and_repetition():
    cfg = FilterConfig()
    assert gopher_quality(PROSE, cfg)[0] is None
    assert gopher_repetition(PROSE, cfg)[0] is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Too short to be a document.", "gopher_quality:word_count"),
        (" ".join(["a"] * 60), "gopher_quality:mean_word_length"),
        (PROSE + " #tag" * 30, "gopher_quality:symbol_word_ratio"),
        (
            "\n".join(f"- item number {i} of the list and more words" for i in range(20)),
            "gopher_quality:bullet_lines",
        ),
        (" ".join(["12345"] * 30) + " " + PROSE, "gopher_quality:alpha_words"),
        (" ".join(f"word{i} zebra quickly" for i in range(30)), "gopher_quality:stop_words"),
    ],
)
def test_gopher_quality_rules(text, reason):
    assert gopher_quality(text, FilterConfig())[0] == reason


def test_stop_word_rule_is_skipped_for_known_non_english():
    text = " ".join(f"слово{i} дом река" for i in range(30))
    assert gopher_quality(text, FilterConfig(), lang="ru")[0] is None
    assert gopher_quality(text, FilterConfig(), lang=None)[0] == "gopher_quality:stop_words"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\n".join(["Buy now and save a lot of money today."] * 5 + [PROSE]), "gopher_repetition:dup_lines"),
        (PROSE + " " + " ".join(["the festival"] * 40), "gopher_repetition:top_2gram"),
    ],
)
def test_gopher_repetition_rules(text, reason):
    assert gopher_repetition(text, FilterConfig())[0] == reason


def test_c4_line_rules():
    cfg = FilterConfig(c4_lines=True, c4_min_sentences=3)  # PROSE has four sentences
    page = (
        "Menu\nHome | About\n" + PROSE + "\nThis site uses cookies to help you.\nEnable javascript to see it."
    )
    kept, reason, removed = c4_lines(page, cfg)
    assert reason is None and removed == 4 and kept == PROSE
    assert c4_lines("Lorem ipsum dolor sit amet. " * 5, cfg)[1] == "c4:lorem_ipsum"
    assert c4_lines(PROSE + "\nfunction f() { return 1; }", cfg)[1] == "c4:curly_bracket"
    assert c4_lines("One sentence only here. And a second one.", cfg)[1] == "c4:too_few_sentences"
    assert c4_lines(PROSE, FilterConfig(c4_lines=True))[1] == "c4:too_few_sentences"  # default: at least 5


def test_apply_filters_keeps_cleaned_record_with_scores_and_new_id():
    rec = _rec(text="  " + PROSE.replace(". ", ".  ") + "\x00 ")
    out = apply_filters(rec, FilterConfig())
    assert out.reason is None and out.record is not None
    assert out.record.text == normalize_text(rec.text) and out.record.id != rec.id
    assert out.record.meta.quality["words"] > 50 and out.record.meta.provenance.steps[-1] == "filters"


def test_apply_filters_drops_with_reason_and_skips_quality_for_code():
    short = _rec(text="def f():\n    return 1\n", domain="code")
    assert apply_filters(short, FilterConfig()).record is not None  # code: no prose rules
    assert apply_filters(_rec(text="Tiny."), FilterConfig()).reason == "gopher_quality:word_count"
    assert apply_filters(_rec(text=PROSE), FilterConfig(max_chars=100)).reason == "length:too_long"
    assert apply_filters(_rec(text=PROSE), FilterConfig(gopher_quality=False, gopher_repetition=False)).record


def test_chat_turns_are_cleaned_each():
    chat = _rec(
        messages=[
            Message(role="user", content=" Hi\x07 there "),
            Message(role="assistant", content="Hello!"),
        ],
        domain="math",
    )
    out = apply_filters(chat, FilterConfig())
    assert [m.content for m in out.record.messages] == ["Hi there", "Hello!"]


@pytest.mark.realdata
def test_shakespeare_paragraphs_are_accounted_for(real_data):
    from moeforge.data.formats import FormatConfig, to_record
    from moeforge.data.sources import RawItem, read_source

    cfg = FormatConfig(kind="text", family="shakespeare", domain="prose")
    items = [i for i in read_source(real_data / "tinyshakespeare" / "input.txt") if isinstance(i, RawItem)][
        :2000
    ]
    outcomes = [apply_filters(to_record(i, cfg, "0" * 64), FilterConfig()) for i in items]
    kept = [o for o in outcomes if o.record is not None]
    dropped = [o for o in outcomes if o.record is None]
    assert len(kept) + len(dropped) == len(items)
    assert all(o.reason and ":" in o.reason for o in dropped)
    assert kept, "long speeches pass the prose rules"
    assert "gopher_quality:word_count" in {o.reason for o in dropped}  # short speaker turns


def _normalize_reference(s: str) -> str:
    """normalize_text as plain regexes over the whole text, without the ASCII shortcuts."""
    import unicodedata

    from moeforge.data import filters

    s = unicodedata.normalize("NFC", s).replace("\r\n", "\n").replace("\r", "\n")
    s = filters._CONTROL.sub("", s)
    s = filters._TRAILING.sub("\n", filters._SPACES.sub(" ", s))
    return filters._BLANKS.sub("\n\n", s).strip()


def test_normalize_text_shortcuts_give_exactly_the_regex_result():
    import random

    pieces = ["a", "b", " ", "  ", "\t", "\n", "\n\n\n", " \n", "\t\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c",
              "\x1f", "\x00", "\x7f", "\x85", "\u00a0", "\u2003", "\u3000", "\u2028", "e\u0301", "é", "日",
              "\u2014", "\u1680", "\u202f", "\u205f", "\u2029", "\u200b"]  # fmt: skip
    for seed in range(3000):
        rng = random.Random(seed)
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert normalize_text(s) == _normalize_reference(s), repr(s)


def test_gopher_word_counts_are_the_same_with_and_without_the_word_memo(monkeypatch):
    """The per-process word memo (bounded) changes no count: full, it tests new words every time."""
    from moeforge.data import filters

    text = "The cat, (the) dog and THE bird. 42 — ½ é x1 'and' the, AND"
    cfg = FilterConfig()
    monkeypatch.setattr(filters, "_WORD_FLAGS", filters._WordFlags(limit=0))
    uncached = gopher_quality(text, cfg)
    assert len(filters._WORD_FLAGS) == 0
    monkeypatch.setattr(filters, "_WORD_FLAGS", filters._WordFlags(limit=3))
    assert gopher_quality(text, cfg) == gopher_quality(text, cfg) == uncached
    assert len(filters._WORD_FLAGS) == 3
    _, scores = uncached
    assert scores["stop_words"] == 7  # The, (the), THE, and, 'and', the,, AND
    assert scores["alpha_words_ratio"] == 12 / 15  # all but "42", "—" and "½"
