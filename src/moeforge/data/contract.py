"""The dataset contract: one :class:`Record` per document between every pipeline stage.

A record holds either a chat (``messages``: ChatML turns) or plain ``text``, a content-hash ``id`` and
``meta`` (where it came from, what it is, what was done to it). The id rule is exact and tested:

    normalize(s) = NFC(s).lower().strip()
    content      = normalize(text)                                     for text records
                 = "\\n".join(normalize(turn.content) for turn in messages)  for chats, in turn order
    id           = "sha256:" + sha256(content as UTF-8).hexdigest()

Order is kept on purpose: sorting the turns (as the original contract did) made two conversations
with swapped questions and answers collide, and dedup then dropped one of them. See
docs/DATASET_CONTRACT.md for the field reference; ``moeforge data schema`` prints the JSON Schema.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

__all__ = [
    "CONTRACT_VERSION",
    "Message",
    "Provenance",
    "Record",
    "RecordMeta",
    "SourceRef",
    "content_hash",
    "normalize_for_hash",
    "record_json_schema",
]

CONTRACT_VERSION = 1

Role = Literal["system", "user", "assistant"]
Split = Literal["train", "valid", "test"]
PiiStatus = Literal["clean", "scrubbed", "requires_review"]
_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
_HEX_PATTERN = r"^[0-9a-f]{64}$"
_ID_FROM_CONTENT = "moeforge.record.id_from_content"  # validation context key: Record.create's own call


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def normalize_for_hash(s: str) -> str:
    """Unicode NFC, lower-case, strip surrounding whitespace."""
    return unicodedata.normalize("NFC", s).lower().strip()


def content_hash(
    *, text: str | None = None, messages: list[Message] | list[dict[str, Any]] | None = None
) -> str:
    """The record id for ``text`` or ``messages`` (exactly one), by the rule in the module docstring."""
    if (text is None) == (messages is None):
        raise ValueError("content_hash needs exactly one of text= or messages=")
    if text is not None:
        content = normalize_for_hash(text)
    else:
        assert messages is not None
        contents = [m.content if isinstance(m, Message) else str(m["content"]) for m in messages]
        content = "\n".join(normalize_for_hash(c) for c in contents)
    return "sha256:" + hashlib.sha256(content.encode("utf-8")).hexdigest()


class Message(_Strict):
    """One ChatML turn."""

    role: Role
    content: str = Field(min_length=1, description="the turn's text; never empty")

    @model_validator(mode="after")
    def _not_blank(self) -> Message:
        if not self.content.strip():
            raise ValueError(f"{self.role} turn has only whitespace; every turn needs content")
        return self


class SourceRef(_Strict):
    """Where a record was read: the input's URI and the position inside it."""

    uri: str = Field(min_length=1, description="file path, s3://, https:// or hf:// name of the input")
    line: int | None = Field(default=None, ge=1, description="1-based line (JSONL, CSV, TXT lines)")
    offset: int | None = Field(
        default=None, ge=0, description="byte offset or row index where lines do not apply"
    )


class Provenance(_Strict):
    """What produced the record: the input's bytes, the steps applied, the recipe."""

    source_sha256: str = Field(pattern=_HEX_PATTERN, description="sha256 of the input file's bytes")
    steps: list[str] = Field(default_factory=list, description="pipeline steps applied, in order")
    recipe_hash: str | None = Field(default=None, description="sha256 of the resolved recipe")


class RecordMeta(_Strict):
    """Everything about a record but its content. ``source``, ``family``, ``domain`` and
    ``provenance`` are required from ingestion on; the rest is filled in by the stage that knows it."""

    source: SourceRef
    family: str = Field(min_length=1, description="dataset family, e.g. gsm8k; the unit of holdout")
    domain: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description="code, math, prose, chat …")
    lang: str | None = Field(default=None, description="ISO 639-1 code from language ID")
    lang_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    license: str | None = Field(default=None, description="SPDX id or the source's licence name")
    split: Split | None = Field(default=None, description="set by the split stage")
    pii: dict[str, int] = Field(default_factory=dict, description="placeholders inserted, per PII type")
    pii_status: PiiStatus | None = Field(default=None)
    quality: dict[str, float] = Field(default_factory=dict, description="filter scores by name")
    cluster: str | None = Field(
        default=None, description="duplicate-cluster id; a cluster never crosses splits"
    )
    provenance: Provenance
    extra: dict[str, Any] = Field(
        default_factory=dict, description="source fields mapped into meta by a format"
    )


class Record(_Strict):
    """One document: ``messages`` (a chat) or ``text``, never both; ``id`` is the content hash."""

    id: str = Field(pattern=_HASH_PATTERN)
    messages: list[Message] | None = Field(default=None, min_length=1)
    text: str | None = Field(default=None, min_length=1)
    meta: RecordMeta

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Record:
        if (self.messages is None) == (self.text is None):
            raise ValueError("a record has exactly one of 'messages' (a chat) or 'text'")
        if info.context is not None and info.context.get(_ID_FROM_CONTENT):
            return self  # create() hashed these very arguments a moment ago (a third of ingest's cost)
        expected = content_hash(text=self.text, messages=self.messages)
        if self.id != expected:
            raise ValueError(f"id does not match the content: expected {expected} (got {self.id})")
        return self

    @classmethod
    def create(
        cls, *, meta: RecordMeta, text: str | None = None, messages: list[Message] | None = None
    ) -> Record:
        """Build a record, computing its id from the content (once: the validator trusts it)."""
        digest = content_hash(text=text, messages=messages)
        return cls.model_validate(
            {"id": digest, "text": text, "messages": messages, "meta": meta}, context={_ID_FROM_CONTENT: True}
        )

    def contents(self) -> list[str]:
        """The record's text as a one-item list, or its turns' contents in order."""
        return [self.text] if self.text is not None else [m.content for m in self.messages or []]

    def with_content(self, *, text: str | None = None, messages: list[Message] | None = None) -> Record:
        """A copy with new content (e.g. after PII scrubbing) and the id recomputed."""
        return Record.create(meta=self.meta, text=text, messages=messages)


def record_json_schema() -> dict[str, Any]:
    """JSON Schema of a record line, for validating outputs with other tools."""
    schema = Record.model_json_schema()
    schema["$id"] = f"urn:moeforge:record:v{CONTRACT_VERSION}"
    schema["description"] = (
        f"One moeforge dataset record (contract v{CONTRACT_VERSION}). The id must equal the content hash "
        "described in docs/DATASET_CONTRACT.md; JSON Schema cannot express that check."
    )
    return schema
