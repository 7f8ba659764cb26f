"""Formats turn raw items into contract records, or quarantine them naming the field and the problem."""

from __future__ import annotations

import pytest

from moeforge.data.contract import Record, content_hash
from moeforge.data.formats import FormatConfig, strip_calculator_annotations, to_record
from moeforge.data.sources import Quarantined, RawItem, read_source

SHA = "cd" * 32
GSM = {
    "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
    "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72",
    "explanation": "dropped unless mapped",
    "source": "grade-school",
}


def _item(data, uri="in.jsonl", line=1):
    return RawItem(data=data, uri=uri, line=line)


def test_qa_becomes_a_user_assistant_chat_keeping_only_named_fields():
    cfg = FormatConfig(kind="qa", family="gsm8k", domain="math", license="MIT", meta_fields=["source"])
    r = to_record(_item(GSM, line=7), cfg, SHA)
    assert isinstance(r, Record)
    assert [m.role for m in r.messages] == ["user", "assistant"]
    assert r.messages[1].content == GSM["answer"]  # annotations kept by default
    assert r.meta.extra == {"source": "grade-school"}  # explanation dropped
    assert (r.meta.source.uri, r.meta.source.line, r.meta.family, r.meta.license) == (
        "in.jsonl",
        7,
        "gsm8k",
        "MIT",
    )
    assert r.meta.provenance.source_sha256 == SHA and r.meta.provenance.steps == ["format:qa"]
    assert r.id == content_hash(messages=r.messages)


def test_calculator_annotations_can_be_stripped():
    assert strip_calculator_annotations("48/2 = <<48/2=24>>24") == "48/2 = 24"
    cfg = FormatConfig(kind="qa", family="gsm8k", domain="math", strip_calculator_annotations=True)
    r = to_record(_item(GSM), cfg, SHA)
    assert "<<" not in r.messages[1].content and "48+24 = 72" in r.messages[1].content


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"question": "q"}, "missing field 'answer'"),
        ({"question": "q", "answer": None}, "field 'answer' must be a string, got null"),
        ({"question": "q", "answer": 42}, "field 'answer' must be a string, got int"),
        ({"question": "  ", "answer": "a"}, "field 'question' is empty"),
        ("plain text", "needs objects"),
    ],
)
def test_bad_qa_items_are_quarantined_with_the_field(data, error):
    q = to_record(_item(data, line=3), FormatConfig(kind="qa", family="f", domain="math"), SHA)
    assert isinstance(q, Quarantined) and error in q.error and q.line == 3 and q.error.startswith("qa:")


def test_openai_and_sharegpt_chats_map_roles():
    cfg = FormatConfig(kind="chat", family="c", domain="chat")
    openai = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}]}  # fmt: skip
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    a, b = to_record(_item(openai), cfg, SHA), to_record(_item(sharegpt), cfg, SHA)
    assert [m.role for m in a.messages] == ["system", "user", "assistant"]
    assert [m.role for m in b.messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("turns", "error"),
    [
        ([{"role": "narrator", "content": "x"}], "unknown role 'narrator'"),
        (
            [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}],
            "content must be a non-empty",
        ),
        ([{"role": "assistant", "content": "a"}], "alternate user/assistant"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turn 1 is user"),
        ([{"role": "user", "content": "a"}], "no assistant turn"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
            "system turn may only come first",
        ),
        ("not a list", "non-empty list of turns"),
    ],
)
def test_invalid_chats_are_quarantined(turns, error):
    q = to_record(_item({"messages": turns}), FormatConfig(kind="chat", family="c", domain="chat"), SHA)
    assert isinstance(q, Quarantined) and error in q.error


def test_custom_role_map_accepts_other_vocabularies():
    cfg = FormatConfig(kind="chat", family="c", domain="chat", role_map={"q": "user", "a": "assistant"})
    r = to_record(
        _item({"messages": [{"role": "Q", "content": "1+1?"}, {"role": "A", "content": "2"}]}), cfg, SHA
    )
    assert isinstance(r, Record) and [m.role for m in r.messages] == ["user", "assistant"]


def test_text_and_code_formats(tmp_path):
    r = to_record(
        _item("To be, or not to be.", uri="play.txt"),
        FormatConfig(kind="text", family="s", domain="prose"),
        SHA,
    )
    assert r.text == "To be, or not to be."
    obj = to_record(_item({"text": "body"}), FormatConfig(kind="text", family="s", domain="prose"), SHA)
    assert obj.text == "body"
    code = to_record(
        _item("print('hi')\n", uri="lib/x.py"), FormatConfig(kind="code", family="stdlib", domain="code"), SHA
    )
    assert code.meta.extra == {"language": "python"}


def test_missing_meta_field_is_quarantined():
    cfg = FormatConfig(kind="qa", family="f", domain="math", meta_fields=["difficulty"])
    q = to_record(_item(GSM), cfg, SHA)
    assert isinstance(q, Quarantined) and "difficulty" in q.error


@pytest.mark.realdata
def test_gsm8k_and_humaneval_become_records(real_data):
    from moeforge.io import sha256_file

    path = real_data / "gsm8k" / "test.jsonl"
    cfg = FormatConfig(kind="qa", family="gsm8k", domain="math", license="MIT")
    out = [to_record(i, cfg, sha256_file(path)) for i in read_source(path)]
    assert len(out) == 1319 and all(isinstance(r, Record) for r in out)
    assert len({r.id for r in out}) == 1319
    he = real_data / "humaneval" / "HumanEval.jsonl.gz"
    cfg = FormatConfig(
        kind="qa",
        family="humaneval",
        domain="code",
        question_field="prompt",
        answer_field="canonical_solution",
        meta_fields=["task_id"],
    )
    recs = [to_record(i, cfg, sha256_file(he)) for i in read_source(he)]
    assert all(isinstance(r, Record) for r in recs) and recs[0].meta.extra == {"task_id": "HumanEval/0"}
