"""Identity: a system turn per language on chats without one, and a seeded intro on a fraction of chats."""

from __future__ import annotations

import pytest

from moeforge.config import ConfigError, validate_config
from moeforge.data.contract import Message, Provenance, Record, RecordMeta, SourceRef, content_hash
from moeforge.data.formats import IdentityConfig, apply_identity

SYS = {"en": "<|oracle_sys|>You are Oracle.", "ru": "<|oracle_sys|>Ты Оракул.", "*": "<|oracle_sys|>Oracle."}
INTRO = {"*": "<|oracle_intro|>I am Oracle."}


def _meta(lang: str | None = "en") -> RecordMeta:
    return RecordMeta(
        source=SourceRef(uri="chats.jsonl", line=1),
        family="f",
        domain="chat",
        lang=lang,
        provenance=Provenance(source_sha256="12" * 32, steps=["format:chat"]),
        extra={"topic": "greeting"},
    )


def _chat(i: int = 0, lang: str | None = "en", system: str | None = None) -> Record:
    msgs = [Message(role="user", content=f"Hello number {i}?"), Message(role="assistant", content=f"Hi {i}.")]
    if system:
        msgs.insert(0, Message(role="system", content=system))
    return Record.create(meta=_meta(lang), messages=msgs)


@pytest.mark.parametrize(
    ("lang", "prompt"), [("en", SYS["en"]), ("ru", SYS["ru"]), ("de", SYS["*"]), (None, SYS["*"])]
)
def test_the_system_prompt_of_the_language_or_the_fallback_is_inserted_first(lang, prompt):
    rec = _chat(lang=lang)
    out = apply_identity(rec, IdentityConfig(system_prompts=SYS))
    assert [m.role for m in out.messages] == ["system", "user", "assistant"]
    assert out.messages[0].content == prompt
    assert out.messages[1:] == rec.messages


def test_without_a_fallback_an_unlisted_language_is_left_alone():
    rec = _chat(lang="de")
    assert apply_identity(rec, IdentityConfig(system_prompts={"en": SYS["en"]})) == rec


def test_a_chat_that_has_a_system_turn_keeps_it():
    rec = _chat(system="You are a pirate.")
    out = apply_identity(rec, IdentityConfig(system_prompts=SYS))
    assert out == rec
    assert "identity" not in out.meta.extra


def test_what_was_added_is_recorded_and_the_id_recomputed():
    rec = _chat()
    out = apply_identity(rec, IdentityConfig(system_prompts=SYS, intros=INTRO, intro_fraction=1.0))
    assert out.meta.extra == {"topic": "greeting", "identity": {"system": True, "intro": True}}
    assert out.meta.provenance.steps == ["format:chat", "identity"]
    assert out.messages[2].content == f"{INTRO['*']}\n{rec.messages[1].content}"
    assert out.id == content_hash(messages=out.messages) != rec.id
    Record.model_validate(out.model_dump())  # the whole record still satisfies the contract
    assert rec.meta.extra == {"topic": "greeting"}  # the input is not modified


def test_text_records_pass_through_unchanged():
    rec = Record.create(meta=_meta(), text="plain document text")
    cfg = IdentityConfig(system_prompts=SYS, intros=INTRO, intro_fraction=1.0)
    assert apply_identity(rec, cfg) is rec


def _intro_ids(chats: list[Record], cfg: IdentityConfig) -> set[str]:
    picked = set()
    for rec in chats:
        out = apply_identity(rec, cfg)
        if out.meta.extra.get("identity", {}).get("intro"):
            picked.add(rec.id)
            assert out.messages[-1].content.startswith(INTRO["*"] + "\n")
        else:
            assert out == rec
    return picked


def test_the_intro_goes_to_about_intro_fraction_of_chats_deterministically():
    chats = [_chat(i) for i in range(2000)]
    cfg = IdentityConfig(intros=INTRO, intro_fraction=0.1, seed=0)
    picked = _intro_ids(chats, cfg)
    assert len(picked) / len(chats) == pytest.approx(0.1, abs=0.03)
    # the same choice in another run and in any order: it depends on the record, not its position
    assert (
        _intro_ids(list(reversed(chats)), IdentityConfig(intros=INTRO, intro_fraction=0.1, seed=0)) == picked
    )
    other = _intro_ids(chats, IdentityConfig(intros=INTRO, intro_fraction=0.1, seed=1))
    assert other != picked and len(other) / len(chats) == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_intro_fraction_bounds(fraction):
    chats = [_chat(i) for i in range(400)]
    share = len(_intro_ids(chats, IdentityConfig(intros=INTRO, intro_fraction=fraction))) / len(chats)
    assert share == pytest.approx(fraction, abs=0.07)


def test_intro_fraction_outside_0_1_is_rejected():
    with pytest.raises(ConfigError, match="intro_fraction"):
        validate_config(IdentityConfig, {"intro_fraction": 1.5})


def test_a_chat_without_an_assistant_turn_gets_no_intro_and_does_not_raise():
    rec = Record.create(meta=_meta(), messages=[Message(role="user", content="Only a question?")])
    out = apply_identity(rec, IdentityConfig(intros=INTRO, intro_fraction=1.0))
    assert out.messages == rec.messages
