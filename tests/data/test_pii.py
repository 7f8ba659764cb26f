"""PII scrubbing: each type is found and replaced, checksums spare ordinary numbers, counts land in meta."""

from __future__ import annotations

import pytest

from moeforge.data.contract import Message, Provenance, Record, RecordMeta, SourceRef
from moeforge.data.pii import PiiConfig, iban_ok, luhn_ok, scrub_record, scrub_text


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("write to jane.doe+news@example.co.uk today", "write to <|email|> today", "email"),
        ("call +1 415-555-0132 or +44 20 7946 0958", "call <|phone|> or <|phone|>", "phone"),
        ("call (415) 555-0132 now", "call <|phone|> now", "phone"),
        ("server 192.168.10.254 is down", "server <|ip|> is down", "ip"),
        ("v6 at 2001:db8:85a3::8a2e:370:7334 works", "v6 at <|ip|> works", "ip"),
        ("card 4111 1111 1111 1111 expires", "card <|credit_card|> expires", "credit_card"),
        ("IBAN GB82 WEST 1234 5698 7654 32 please", "IBAN <|iban|> please", "iban"),
        ("ssn 078-05-1120 on file", "ssn <|ssn|> on file", "ssn"),
        ("key AKIAIOSFODNN7EXAMPLE leaked", "key <|secret|> leaked", "secret"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc.def", "Authorization: <|secret|>", "secret"),
        ("token ghp_" + "a" * 36 + " here", "token <|secret|> here", "secret"),
        (
            "x\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\ny",
            "x\n<|secret|>\ny",
            "secret",
        ),
    ],
)
def test_each_type_is_replaced_by_its_placeholder(text, expected, kind):
    out, counts = scrub_text(text)
    assert out == expected
    assert set(counts) == {kind}


@pytest.mark.parametrize(
    "text",
    [
        "card-like 4111 1111 1111 1112 fails Luhn",
        "IBAN-like GB82 WEST 1234 5698 7654 33 fails mod 97",
        "version 1.2.3.4000 and 999.1.1.1 are not addresses",
        "in 2023 we sold 1,250 units for $3,400.50",
        "ISBN 978-3-16-148410-0",
        "ratio 10:30:50 at 12:45",
    ],
)
def test_ordinary_numbers_are_not_scrubbed(text):
    out, counts = scrub_text(text)
    assert out == text and not counts


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB82 WEST 1234 5698 7654 33") and not iban_ok("XX")


def test_types_can_be_limited():
    out, counts = scrub_text("mail a@b.io from 10.0.0.1", types=["email"])
    assert out == "mail <|email|> from 10.0.0.1" and counts == {"email": 1}


def _meta():
    return RecordMeta(
        source=SourceRef(uri="x"), family="f", domain="chat", provenance=Provenance(source_sha256="0" * 64)
    )


def test_scrub_record_counts_per_type_and_recomputes_id():
    rec = Record.create(
        meta=_meta(),
        messages=[
            Message(
                role="user",
                content="My mail is a@b.io, and this is a long message with plenty of other words around it, "
                "so that one address among them is not dense enough to need a human review of the record.",
            ),
            Message(role="assistant", content="Noted. I will not share it with anyone, of course."),
        ],
    )
    out = scrub_record(rec, PiiConfig())
    assert out.messages[0].content.startswith("My mail is <|email|>,")
    assert out.meta.pii == {"email": 1} and out.meta.pii_status == "scrubbed"
    assert out.id != rec.id and out.meta.provenance.steps[-1] == "pii"


def test_dense_pii_requires_review_and_clean_text_is_marked_clean():
    dense = Record.create(meta=_meta(), text="a@b.io c@d.io e@f.io")
    assert scrub_record(dense, PiiConfig()).meta.pii_status == "requires_review"
    clean = Record.create(meta=_meta(), text="Nothing personal here at all.")
    assert scrub_record(clean, PiiConfig()).meta.pii_status == "clean"


@pytest.mark.realdata
def test_gsm8k_math_is_left_alone(real_data):
    from moeforge.data.sources import RawItem, read_source

    items = [i for i in read_source(real_data / "gsm8k" / "test.jsonl") if isinstance(i, RawItem)]
    hits = sum(sum(scrub_text(i.data["question"] + "\n" + i.data["answer"])[1].values()) for i in items)
    # word problems are full of numbers, prices and times; almost none of it is PII
    assert hits <= len(items) * 0.01
