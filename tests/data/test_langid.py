"""Language ID labels records with an ISO code and a confidence, and drops what the recipe does not keep."""

from __future__ import annotations

import pytest

from moeforge.config import ConfigError, validate_config
from moeforge.data.contract import Message, Provenance, Record, RecordMeta, SourceRef
from moeforge.data.langid import LangIdConfig, apply_langid, detect, known_languages

EN = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."
RU = "Мама мыла раму, а папа читал газету в большой светлой комнате у окна."
DE = "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer zusieht."


def _record(text: str | None = None, messages: list[Message] | None = None, domain: str = "prose") -> Record:
    meta = RecordMeta(
        source=SourceRef(uri="in.jsonl", line=1),
        family="f",
        domain=domain,
        provenance=Provenance(source_sha256="ab" * 32, steps=["format:text"]),
    )
    return Record.create(meta=meta, text=text, messages=messages)


@pytest.mark.parametrize(("text", "lang"), [(EN, "en"), (RU, "ru"), (DE, "de")])
def test_detect_labels_clear_sentences(text, lang):
    got, conf = detect(text)
    assert got == lang
    assert 0.5 < conf <= 1.0


@pytest.mark.parametrize("text", ["", "   ", "12345 + 678 = 999 !!!", "-- ** // {} ()"])
def test_text_without_letters_is_undetermined(text):
    assert detect(text) == ("und", 0.0)


@pytest.mark.parametrize("text", [EN, RU, DE, "ok", "Hallo", "x = 1", "日本語のテキスト"])
def test_confidence_is_a_probability(text):
    _, conf = detect(text)
    assert 0.0 <= conf <= 1.0


def test_only_the_leading_max_chars_are_classified():
    assert detect("1234567890 " * 10 + EN, max_chars=100) == ("und", 0.0)
    assert detect("1234567890 " * 10 + EN, max_chars=1500)[0] == "en"


def test_candidates_restrict_the_labels():
    assert detect(DE)[0] == "de"
    lang, conf = detect(DE, candidates=("en", "ru"))
    assert lang in {"en", "ru"} and 0.0 <= conf <= 1.0
    assert detect(RU, candidates=("ru", "en"))[0] == "ru"  # order does not matter


def test_known_languages_are_iso_codes():
    langs = known_languages()
    assert {"en", "ru", "de", "fr", "zh"} <= set(langs)
    assert all(len(code) in (2, 3) and code.islower() for code in langs)


@pytest.mark.parametrize("field", ["keep", "candidates"])
def test_config_rejects_unknown_language_codes(field):
    with pytest.raises(ConfigError, match=rf"{field}: unknown language code\(s\) \['english', 'xx'\]"):
        validate_config(LangIdConfig, {field: ["en", "xx", "english"]})
    assert getattr(LangIdConfig(**{field: ["en", "ru"]}), field) == ["en", "ru"]


def test_apply_langid_labels_lang_and_confidence_and_records_the_step():
    rec = _record(text=EN)
    out, reason = apply_langid(rec, LangIdConfig())
    assert reason is None and out is not None
    assert out.meta.lang == "en" and 0.5 <= out.meta.lang_confidence <= 1.0
    assert out.meta.provenance.steps == ["format:text", "langid"]
    assert out.id == rec.id and out.text == rec.text
    assert rec.meta.lang is None and rec.meta.provenance.steps == ["format:text"]  # input untouched


def test_apply_langid_reads_every_turn_of_a_chat():
    chat = [Message(role="user", content="Как дела?"), Message(role="assistant", content=RU)]
    out, reason = apply_langid(_record(messages=chat, domain="chat"), LangIdConfig())
    assert reason is None and out.meta.lang == "ru"


def test_a_language_not_in_keep_is_dropped_as_not_kept():
    out, reason = apply_langid(_record(text=RU), LangIdConfig(keep=["en", "de"]))
    assert (out, reason) == (None, "langid:not_kept")
    out, reason = apply_langid(_record(text=RU), LangIdConfig(keep=["ru"]))
    assert reason is None and out.meta.lang == "ru"


def test_a_low_confidence_label_is_dropped_as_low_confidence():
    ambiguous = _record(text="ok")
    assert detect("ok")[1] < 0.99
    assert apply_langid(ambiguous, LangIdConfig(min_confidence=0.99)) == (None, "langid:low_confidence")
    out, reason = apply_langid(ambiguous, LangIdConfig(min_confidence=0.0))
    assert reason is None and out.meta.lang is not None


def test_text_without_letters_is_dropped_even_with_no_confidence_floor():
    assert apply_langid(_record(text="1 + 2 = 3"), LangIdConfig(min_confidence=0.0)) == (
        None,
        "langid:low_confidence",
    )


def test_skipped_domains_pass_through_unlabelled():
    code = _record(text="def f(x):\n    return x + 1\n", domain="code")
    out, reason = apply_langid(code, LangIdConfig(keep=["en"], min_confidence=0.99))
    assert reason is None and out is code
    assert out.meta.lang is None and "langid" not in out.meta.provenance.steps
    # with no skipped domains the same record is classified (and here dropped)
    out, reason = apply_langid(code, LangIdConfig(keep=["en"], min_confidence=0.99, skip_domains=[]))
    assert out is None and reason is not None
