"""Preference pairs: the model and its id rule, the layouts pair_from_item reads, every quarantine reason,
the pair statistics and the prompt-leakage check."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from moeforge.data.contract import Message, Provenance, RecordMeta, SourceRef, content_hash
from moeforge.data.preference import (
    REASONS,
    PairProblem,
    PreferencePair,
    SideProvenance,
    leakage,
    pair_from_item,
    pair_id,
    pair_stats,
)
from moeforge.data.recipe import SplitConfig
from moeforge.data.sources import Quarantined, RawItem
from moeforge.data.split import assign_split

SHA = "cd" * 32


def _meta(family: str = "ultrafeedback", uri: str = "prefs.jsonl", line: int = 1) -> RecordMeta:
    return RecordMeta(
        source=SourceRef(uri=uri, line=line),
        family=family,
        domain="chat",
        provenance=Provenance(source_sha256=SHA, steps=["read"]),
    )


def _read(data, **kw):
    kw.setdefault("meta_factory", lambda _d: _meta())
    return pair_from_item(data, **kw)


def _u(text: str) -> Message:
    return Message(role="user", content=text)


def _a(text: str) -> Message:
    return Message(role="assistant", content=text)


def _pair(prompt: str, chosen: str, rejected: str, **meta_kw) -> PreferencePair:
    return PreferencePair.create(
        prompt=[_u(prompt)],
        chosen=[_a(chosen)],
        rejected=[_a(rejected)],
        meta=_meta(**meta_kw),
        chosen_source=SideProvenance(kind="dataset", dataset="d"),
        rejected_source=SideProvenance(kind="model", model="ckpt/step-100", sampling={"temperature": 0.7}),
    )


# --- layouts -------------------------------------------------------------------------------------------


def test_standard_strings_become_one_user_and_one_assistant_turn():
    p = _read({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"})
    assert isinstance(p, PreferencePair)
    assert p.prompt == [_u("What is 2+2?")] and p.chosen == [_a("4")] and p.rejected == [_a("5")]
    assert p.meta.provenance.steps == ["read", "format:pair:standard"]
    assert p.chosen_source == p.rejected_source == SideProvenance(kind="dataset", dataset="ultrafeedback")


def test_standard_prompt_may_be_an_hh_transcript_ending_in_an_open_assistant_cue():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a prime.\n\nAssistant:"
    p = _read({"prompt": prompt, "chosen": " 7", "rejected": " 8"})
    assert [m.role for m in p.prompt] == ["user", "assistant", "user"]
    assert p.prompt[-1].content == "Name a prime." and p.chosen == [_a(" 7")]


def test_conversational_prompt_with_system_turn_and_assistant_sides():
    data = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    }
    p = _read(data)
    assert [m.role for m in p.prompt] == ["system", "user"]
    assert p.chosen == [_a("Blue.")] and p.meta.provenance.steps[-1] == "format:pair:conversational"


def test_conversational_without_prompt_takes_the_shared_prefix():
    data = {
        "chosen": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is green."}],
    }  # fmt: skip
    p = _read(data)
    assert p.prompt == [_u("What color is the sky?")]
    assert p.chosen == [_a("It is blue.")] and p.rejected == [_a("It is green.")]


def test_ultrafeedback_binarized_full_conversations_have_the_prompt_stripped():
    q = "How many legs does a spider have?"
    item = {
        "prompt": q,
        "prompt_id": "abc123",
        "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "Eight."}],
        "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "Six."}],
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Eight."}],
        "score_chosen": 9.0,
        "score_rejected": 3.5,
    }

    def meta(d):
        m = _meta()
        return m.model_copy(update={"extra": {"scores": [d["score_chosen"], d["score_rejected"]]}})

    p = _read(item, meta_factory=meta)
    assert p.prompt == [_u(q)] and p.chosen == [_a("Eight.")] and p.rejected == [_a("Six.")]
    assert p.meta.extra == {"scores": [9.0, 3.5]}
    # the repeated prompt is matched after normalization, and may omit the prompt's system turn
    item2 = {**item, "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": q.upper()}]}
    p2 = _read(item2)
    assert [m.role for m in p2.prompt] == ["system", "user"] and p2.chosen == [_a("Eight.")]


def test_sharegpt_from_value_turns_are_read():
    data = {
        "chosen": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
        "rejected": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go away."}],
    }
    p = _read(data)
    assert p.prompt == [_u("Hi")] and p.rejected == [_a("Go away.")]


HH_CHOSEN = (
    "\n\nHuman: I want to bake bread at home. Where do I start?"
    "\n\nAssistant: A simple white loaf is a good first bake. You need flour, water, salt and yeast."
    "\n\nHuman: How long should I knead the dough?"
    "\n\nAssistant: About ten minutes by hand.\n\nYou can tell it is ready when it springs back after a poke."
)
HH_REJECTED = (
    "\n\nHuman: I want to bake bread at home. Where do I start?"
    "\n\nAssistant: A simple white loaf is a good first bake. You need flour, water, salt and yeast."
    "\n\nHuman: How long should I knead the dough?"
    "\n\nAssistant: Just buy bread."
)


def test_hh_transcripts_shared_prefix_is_the_prompt_and_final_turns_the_sides():
    p = _read({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert isinstance(p, PreferencePair)
    assert [m.role for m in p.prompt] == ["user", "assistant", "user"]
    assert p.prompt[0].content == "I want to bake bread at home. Where do I start?"
    assert p.prompt[2].content == "How long should I knead the dough?"
    # a blank line inside a turn stays in that turn
    assert p.chosen == [
        _a("About ten minutes by hand.\n\nYou can tell it is ready when it springs back after a poke.")
    ]
    assert p.rejected == [_a("Just buy bread.")]
    assert p.meta.provenance.steps[-1] == "format:pair:hh"


def test_custom_field_names():
    p = _read({"question": "q", "response_j": "good", "response_k": "bad"},
              prompt_field="question", chosen_field="response_j", rejected_field="response_k")  # fmt: skip
    assert p.prompt == [_u("q")] and p.chosen == [_a("good")] and p.rejected == [_a("bad")]


def test_side_provenance_can_be_given():
    gen = SideProvenance(kind="rule", generator="verifiable:gsm8k", note="reference answer")
    sampled = SideProvenance(
        kind="model", model={"name": "runs/sft", "sha256": "ab" * 32}, sampling={"seed": 3}
    )
    p = _read({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, chosen_source=gen, rejected_source=sampled)
    assert p.chosen_source.generator == "verifiable:gsm8k" and p.rejected_source.model.sha256 == "ab" * 32


# --- quarantine reasons --------------------------------------------------------------------------------

_T = {"role": "user", "content": "q"}
_A = {"role": "assistant", "content": "a"}
_REASON_CASES = [
    ("pair:unknown_layout", "plain text", "must be an object"),
    ("pair:unknown_layout", {"prompt": "q", "chosen": "a"}, "missing field(s) ['rejected']"),
    ("pair:unknown_layout", {"prompt": "q", "chosen": "a", "rejected": [_T]}, "both be strings or both lists"),
    ("pair:unknown_layout", {"chosen": "a", "rejected": "b"}, "need a 'prompt' field"),
    ("pair:unknown_layout", {"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
    ("pair:unknown_layout", {"chosen": HH_CHOSEN, "rejected": "b"}, "only one of chosen/rejected"),
    ("pair:bad_turn", {"chosen": ["x"], "rejected": [_T]}, "chosen[0] must be an object"),
    ("pair:bad_turn", {"chosen": [{"role": "user", "content": 5}], "rejected": [_T]}, "content must be a string"),
    ("pair:bad_turn", {"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": HH_REJECTED}, "Human turn 0 is empty"),
    ("pair:empty_prompt", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ("pair:empty_prompt", {"prompt": [], "chosen": "a", "rejected": "b"}, "empty list"),
    ("pair:empty_prompt", {"prompt": [{"role": "user", "content": " "}], "chosen": "a", "rejected": "b"}, "prompt[0]"),
    ("pair:empty_side", {"prompt": "q", "chosen": " ", "rejected": "b"}, "'chosen' is empty"),
    ("pair:empty_side", {"prompt": "q", "chosen": [_A], "rejected": []}, "'rejected' is an empty list"),
    ("pair:empty_side", {"prompt": "q", "chosen": [_T], "rejected": [_T, {"role": "assistant", "content": "b"}]},
     "chosen has no turn after the prompt"),
    ("pair:empty_side", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace(" Just buy bread.", "")},
     "rejected: Assistant turn 3 is empty"),
    ("pair:role_error", {"prompt": "q", "chosen": [{"role": "narrator", "content": "a"}], "rejected": [_A]},
     "unknown role 'narrator'"),
    ("pair:role_error", {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
     "turn 0 is assistant"),
    ("pair:role_error", {"prompt": [_T, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "must end with a user turn"),
    ("pair:prompt_mismatch", {"prompt": "q", "chosen": [{"role": "user", "content": "other"}, _A], "rejected": [_A]}, "does not repeat the prompt"),
    ("pair:no_shared_prompt", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("bake bread", "fix a bike")},
     "share no opening turns"),
    ("pair:early_divergence", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("good first bake", "bad idea")},
     "differ before their final assistant turn"),
    ("pair:early_divergence", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("knead the dough", "bake it")},
     "differ before their final assistant turn"),
    ("pair:identical_sides", {"prompt": "q", "chosen": "The answer is 4.", "rejected": "  the ANSWER is 4. "},
     "same after normalization"),
    ("pair:identical_sides", {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "same after normalization"),
]  # fmt: skip


@pytest.mark.parametrize(("reason", "data", "needle"), _REASON_CASES)
def test_malformed_items_get_a_reason_and_a_message(reason, data, needle):
    out = _read(data)
    assert isinstance(out, PairProblem), out
    assert out.reason == reason and needle in out.message, str(out)
    assert str(out).startswith(f"{reason}: ")


def test_meta_factory_errors_are_quarantined_as_bad_meta():
    out = _read({"prompt": "q", "chosen": "a", "rejected": "b"}, meta_factory=lambda d: d["score"])
    assert isinstance(out, PairProblem) and out.reason == "pair:bad_meta" and "KeyError" in out.message
    out = _read({"prompt": "q", "chosen": "a", "rejected": "b"}, meta_factory=lambda d: {"family": "f"})
    assert isinstance(out, PairProblem) and out.reason == "pair:bad_meta" and "source" in out.message


def test_every_reason_is_exercised():
    seen = {r for r, _, _ in _REASON_CASES} | {"pair:bad_meta"}
    assert seen == set(REASONS) - {"pair:invalid"}  # pair:invalid is a safety net the checks make unreachable


def test_problem_becomes_a_quarantine_entry():
    item = RawItem(data={"prompt": "q", "chosen": "a", "rejected": "a"}, uri="hh.jsonl", line=7)
    q = _read(item.data).quarantined(item)
    assert isinstance(q, Quarantined) and q.line == 7 and q.uri == "hh.jsonl"
    assert q.error.startswith("pair:identical_sides: ") and '"chosen": "a"' in q.raw


# --- id rule -------------------------------------------------------------------------------------------


def test_id_is_the_hash_of_the_three_part_hashes():
    p = _pair("What is 2+2?", "4", "5")
    parts = [content_hash(messages=t) for t in (p.prompt, p.chosen, p.rejected)]
    expected = "sha256:" + hashlib.sha256(("pair\n" + "\n".join(parts)).encode()).hexdigest()
    assert p.id == expected == pair_id(p.prompt, p.chosen, p.rejected)


def test_id_is_stable_and_normalized_like_content_hash():
    a = _pair("What is 2+2?", "Four", "Five")
    b = _pair("  what IS 2+2?\n", "four ", "FIVE", family="other", uri="elsewhere.jsonl")
    assert a.id == b.id  # content only: case, surrounding space and meta do not count
    assert a.id == _pair("What is 2+2?", "Four", "Five").id
    assert a.id != _pair("What is 2+2?", "Five", "Four").id  # swapping sides is another pair
    decomposed = _pair("Cafe\u0301?", "x", "y")
    assert decomposed.id == _pair("Café?", "x", "y").id  # NFC


def test_parts_cannot_shift_into_each_other():
    # the same turns, split differently between prompt and chosen, give different ids
    a = pair_id([_u("q"), _a("a1"), _u("q2")], [_a("x")], [_a("y")])
    b = pair_id([_u("q")], [_a("a1"), _a("x")], [_a("y")])
    assert a != b
    assert pair_id([_u("q")], [_a("x")], [_a("y")]) != content_hash(messages=[_u("q"), _a("x"), _a("y")])


def test_prompt_hash_is_shared_by_every_pair_of_one_prompt():
    a, b = _pair("Name a prime", "7", "8"), _pair("name a prime ", "11", "12")
    assert a.id != b.id and a.prompt_hash == b.prompt_hash == content_hash(messages=[_u("Name a prime")])
    cfg = SplitConfig(train=0.5, valid=0.25, test=0.25)
    assert assign_split(a.prompt_hash, cfg) == assign_split(b.prompt_hash, cfg)


def test_json_round_trip_keeps_the_pair():
    p = _pair("q", "a", "b")
    assert PreferencePair.model_validate_json(p.model_dump_json()) == p


# --- validation errors name the field ------------------------------------------------------------------


def _fields(p: PreferencePair, **update) -> dict:
    return {**p.model_dump(), **update}


def _locs(exc: ValidationError) -> list[tuple]:
    return [e["loc"] for e in exc.errors()]


def test_validation_errors_name_the_field():
    p = _pair("q", "a", "b")
    cases = [
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, ("prompt",), "end with a user"),
        ({"prompt": []}, ("prompt",), "at least 1"),
        ({"chosen": [{"role": "user", "content": "a"}]}, ("chosen",), "chosen turn 0 is user"),
        ({"rejected": []}, ("rejected",), "at least 1"),
        ({"rejected": [{"role": "assistant", "content": "  "}]}, ("rejected", 0), "whitespace"),
        ({"id": "sha256:xyz"}, ("id",), "pattern"),
        ({"chosen_source": {"kind": "model"}}, ("chosen_source",), "needs 'model'"),
        ({"rejected_source": {"kind": "dataset", "dataset": "d", "temp": 1}}, ("rejected_source", "temp"), "Extra"),
        ({"surprise": 1}, ("surprise",), "Extra"),
    ]  # fmt: skip
    for update, loc, needle in cases:
        with pytest.raises(ValidationError) as ei:
            PreferencePair(**_fields(p, **update))
        err = ei.value.errors()[0]
        assert err["loc"] == loc and needle in err["msg"], (update, err)


def test_model_level_checks_say_what_is_wrong():
    p = _pair("q", "a", "b")
    with pytest.raises(ValidationError, match="id does not match the content"):
        PreferencePair(**_fields(p, id="sha256:" + "0" * 64))
    same = [{"role": "assistant", "content": "A"}]
    with pytest.raises(ValidationError, match="chosen and rejected are the same"):
        PreferencePair(**_fields(p, chosen=same, rejected=[{"role": "assistant", "content": " a"}]))
    with pytest.raises(ValidationError, match="needs 'generator'"):
        SideProvenance(kind="rule")
    assert SideProvenance(kind="model", model="hf:SmolLM2").model.name == "hf:SmolLM2"


# --- statistics and leakage ----------------------------------------------------------------------------


def test_pair_stats_counts_lengths_duplicates_and_contradictions():
    pairs = [
        _pair("p1", "aaaa", "aa", family="hh", uri="hh.jsonl"),  # ratio 2
        _pair("p1", "aaaa", "aa", family="hh", uri="hh.jsonl"),  # exact duplicate
        _pair("p2", "b", "bbbb", family="uf", uri="uf.jsonl"),  # ratio 0.25
        _pair("p2", "bbbb", "b", family="uf", uri="uf.jsonl"),  # the same sides swapped: contradiction
    ]
    s = pair_stats(pairs)
    assert s["pairs"] == 4 and s["prompts"] == 2 and s["pairs_per_prompt_max"] == 2
    assert s["length_ratio_mean"] == pytest.approx((2 + 2 + 0.25 + 4) / 4)
    assert s["length_ratio_median"] == pytest.approx(2.0)
    assert s["chosen_longer_share"] == 0.75
    assert s["chosen_chars_mean"] == pytest.approx(13 / 4) and s["rejected_chars_mean"] == pytest.approx(
        9 / 4
    )
    assert s["duplicate_pairs"] == 1 and s["examples"]["duplicate_pairs"] == [pairs[0].id]
    assert s["duplicate_prompt_pairs"] == 1 and s["examples"]["duplicate_prompt_pairs"] == [
        pairs[2].prompt_hash
    ]
    assert s["by_family"] == {"hh": 2, "uf": 2} and s["by_source"] == {"hh.jsonl": 2, "uf.jsonl": 2}
    assert s["by_side_kind"] == {"dataset/model": 4}


def test_pair_stats_of_nothing():
    s = pair_stats([])
    assert s["pairs"] == 0 and s["length_ratio_mean"] is None and s["duplicate_pairs"] == 0


def test_leakage_reports_prompts_in_more_than_one_split():
    shared_a, shared_b = _pair("shared", "x", "y"), _pair("SHARED ", "z", "w")
    by_split = {
        "test": [shared_b, _pair("t", "x", "y")],
        "train": [shared_a, _pair("only train", "x", "y")],
        "valid": iter([_pair("v", "x", "y")]),  # any iterable
    }
    assert leakage(by_split) == {shared_a.prompt_hash: ["train", "test"]}
    assert leakage({"train": [shared_a, shared_b], "valid": []}) == {}
