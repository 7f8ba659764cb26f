"""The dataset contract: the content-hash rule, exactly one of text/messages, required meta, the schema."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from moeforge.cli.main import app
from moeforge.data.contract import (
    Message,
    Provenance,
    Record,
    RecordMeta,
    SourceRef,
    content_hash,
    record_json_schema,
)

SHA = "ab" * 32


def _meta(**kw) -> RecordMeta:
    base = dict(
        source=SourceRef(uri="data/train.jsonl", line=3),
        family="gsm8k",
        domain="math",
        provenance=Provenance(source_sha256=SHA),
    )
    return RecordMeta(**{**base, **kw})


def test_text_id_is_sha256_of_nfc_lowercased_stripped_text():
    text = "  Cafe\u0301 AU LAIT\n"  # decomposed é: NFC composes it
    expected = "sha256:" + hashlib.sha256("café au lait".encode()).hexdigest()
    assert content_hash(text=text) == expected


def test_chat_id_joins_normalized_turns_in_order_with_newlines():
    msgs = [Message(role="user", content=" What is 2+2? "), Message(role="assistant", content="FOUR")]
    expected = "sha256:" + hashlib.sha256(b"what is 2+2?\nfour").hexdigest()
    assert content_hash(messages=msgs) == expected


def test_swapped_turns_do_not_collide():
    a = [Message(role="user", content="q"), Message(role="assistant", content="a")]
    b = [Message(role="user", content="a"), Message(role="assistant", content="q")]
    assert content_hash(messages=a) != content_hash(messages=b)


def test_case_and_surrounding_space_do_not_change_the_id():
    assert content_hash(text="Hello World") == content_hash(text="  hello world\n")


def test_content_hash_accepts_plain_dicts_like_messages():
    msgs = [{"role": "user", "content": "Hi"}]
    assert content_hash(messages=msgs) == content_hash(messages=[Message(role="user", content="hi")])


def test_content_hash_needs_exactly_one_kind_of_content():
    with pytest.raises(ValueError, match="exactly one"):
        content_hash()
    with pytest.raises(ValueError, match="exactly one"):
        content_hash(text="a", messages=[{"role": "user", "content": "a"}])


def test_create_computes_the_id_and_round_trips_through_json():
    r = Record.create(text="Some prose.", meta=_meta(domain="prose", lang="en", lang_confidence=0.98))
    again = Record.model_validate_json(r.model_dump_json())
    assert again == r
    assert r.id == content_hash(text="Some prose.")


def test_a_record_with_a_wrong_id_is_rejected_naming_the_expected_id():
    r = Record.create(text="x", meta=_meta())
    data = json.loads(r.model_dump_json())
    data["text"] = "y"
    with pytest.raises(ValidationError, match="id does not match the content: expected sha256:"):
        Record.model_validate(data)


def test_content_is_hashed_once_per_new_record_and_not_at_all_when_a_step_leaves_it(monkeypatch):
    from moeforge.data import contract
    from moeforge.data.filters import FilterConfig, apply_filters
    from moeforge.data.pii import PiiConfig, scrub_record

    calls: list[str | None] = []
    real = contract.content_hash

    def counting(*, text=None, messages=None):
        calls.append(text)
        return real(text=text, messages=messages)

    monkeypatch.setattr(contract, "content_hash", counting)
    text = " ".join(["A plain sentence that the filters and the PII scrubber leave exactly as it is."] * 3)
    r = Record.create(text=text, meta=_meta(domain="prose"))
    assert calls == [text]  # create hashes once; its own validation trusts that id
    kept = apply_filters(r, FilterConfig(quality_domains=[], min_chars=1)).record
    clean = scrub_record(kept, PiiConfig())
    assert calls == [text] and clean.id == kept.id == r.id  # unchanged content: the id stands
    assert clean.meta.provenance.steps == ["filters", "pii"] and clean.meta.pii_status == "clean"
    scrubbed = scrub_record(Record.create(text="write to ann@example.com now", meta=_meta()), PiiConfig())
    assert scrubbed.id == real(text=scrubbed.text) and "ann@example.com" not in (scrubbed.text or "")
    with pytest.raises(ValidationError, match="id does not match"):  # anyone else's id is still checked
        Record.model_validate({"id": r.id, "text": "other", "meta": _meta()})


def test_with_content_recomputes_the_id():
    r = Record.create(text="mail me at a@b.com", meta=_meta())
    scrubbed = r.with_content(text="mail me at <|email|>")
    assert scrubbed.id == content_hash(text="mail me at <|email|>") != r.id
    assert scrubbed.meta == r.meta


@pytest.mark.parametrize(
    "content",
    [
        {"text": "a", "messages": [{"role": "user", "content": "a"}]},
        {},
    ],
)
def test_exactly_one_of_text_or_messages(content):
    with pytest.raises(ValidationError, match="exactly one of 'messages'"):
        Record(id="sha256:" + "0" * 64, meta=_meta(), **content)


def test_unknown_role_and_blank_turns_are_rejected():
    with pytest.raises(ValidationError, match="role"):
        Message(role="narrator", content="hi")
    with pytest.raises(ValidationError, match="only whitespace"):
        Message(role="user", content="   ")


def test_meta_requires_source_family_domain_and_provenance():
    with pytest.raises(ValidationError) as err:
        RecordMeta.model_validate({})
    missing = {e["loc"][0] for e in err.value.errors()}
    assert missing == {"source", "family", "domain", "provenance"}


def test_meta_rejects_bad_values_with_field_names():
    with pytest.raises(ValidationError, match="lang_confidence"):
        _meta(lang_confidence=1.5)
    with pytest.raises(ValidationError, match="split"):
        _meta(split="dev")
    with pytest.raises(ValidationError, match="source_sha256"):
        Provenance(source_sha256="not-a-hash")
    with pytest.raises(ValidationError, match=r"unexpected|extra"):
        RecordMeta.model_validate({**_meta().model_dump(), "colour": "red"})


def test_schema_describes_records_and_cli_prints_it(tmp_path):
    schema = record_json_schema()
    assert schema["required"] == ["id", "meta"]
    assert schema["properties"]["id"]["pattern"] == "^sha256:[0-9a-f]{64}$"
    assert set(schema["$defs"]["Message"]["properties"]["role"]["enum"]) == {"system", "user", "assistant"}
    result = CliRunner().invoke(app, ["data", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads(json.dumps(schema, sort_keys=True))
    out = tmp_path / "record.schema.json"
    assert CliRunner().invoke(app, ["data", "schema", "--out", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["$id"] == "urn:moeforge:record:v1"


def test_contents_lists_the_text_or_the_turns_in_order():
    assert Record.create(meta=_meta(), text="plain").contents() == ["plain"]
    chat = [Message(role="user", content="q?"), Message(role="assistant", content="a.")]
    assert Record.create(meta=_meta(), messages=chat).contents() == ["q?", "a."]
