"""Formats: raw items from :mod:`moeforge.data.sources` → contract :class:`Record` s (or quarantine).

- ``qa``: one question field and one answer field become a user turn and an assistant turn. Only the
  named fields are kept; fields listed in ``meta_fields`` are copied into ``meta.extra``, everything else
  (explanations, reasoning, sources …) is dropped. GSM8K's ``<<48/2=24>>`` calculator annotations are kept
  unless ``strip_calculator_annotations``.
- ``chat``: OpenAI ``messages`` (role/content) or ShareGPT ``conversations`` (from/value); roles are mapped
  (``human`` → user, ``gpt`` → assistant …) and the turns validated: known roles, non-empty content, an
  optional system turn first, then user and assistant alternating from a user turn, and at least one
  assistant turn.
- ``text``: a TXT item, or the ``text_field`` of an object.
- ``code``: like ``text``; the language, from the file extension, goes to ``meta.extra["language"]``.

A recipe can attach an identity (:class:`IdentityConfig`): a system turn per language (e.g. the Oracle
``<|oracle_sys|>…<|author|>…`` prompt) on every chat without one, and an assistant intro (e.g.
``<|oracle_intro|>…``) before the first assistant reply of a seeded fraction of chats. The choice per
record depends only on its id and the seed, so it is the same in every run and every worker; what was
added is recorded in ``meta.extra["identity"]``.

A malformed item never raises: :func:`to_record` returns a :class:`Quarantined` naming the file, line,
field and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import Field

from moeforge.config import StrictModel
from moeforge.data.contract import Message, Provenance, Record, RecordMeta, SourceRef
from moeforge.data.sources import Quarantined, RawItem

__all__ = [
    "DEFAULT_ROLE_MAP",
    "FormatConfig",
    "IdentityConfig",
    "apply_identity",
    "strip_calculator_annotations",
    "to_record",
]

DEFAULT_ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
_CALC = re.compile(r"<<[^<>\n]*>>")
_LANGUAGES = {
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".java": "java", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".rs": "rust", ".go": "go", ".rb": "ruby", ".sh": "shell",
    ".sql": "sql", ".html": "html", ".css": "css", ".md": "markdown", ".txt": "text",
}  # fmt: skip


class FormatConfig(StrictModel):
    """How one source's items become records (one per recipe source)."""

    kind: Literal["qa", "chat", "text", "code"]
    family: str = Field(min_length=1, description="dataset family of every record from this source")
    domain: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description="code, math, prose, chat …")
    license: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    messages_field: str | None = Field(
        default=None, description="chat field; default: messages or conversations"
    )
    role_map: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: dict(DEFAULT_ROLE_MAP)
    )
    text_field: str = "text"
    meta_fields: list[str] = Field(default_factory=list, description="source fields copied into meta.extra")
    strip_calculator_annotations: bool = False


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K calculator annotations: ``48/2 = <<48/2=24>>24`` → ``48/2 = 24``."""
    return _CALC.sub("", text)


class _Bad(ValueError):
    pass


def _field(data: dict[str, Any], name: str) -> str:
    if name not in data:
        raise _Bad(f"missing field {name!r} (fields present: {', '.join(sorted(data)) or 'none'})")
    value = data[name]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise _Bad(f"field {name!r} must be a string, got {kind}")
    if not value.strip():
        raise _Bad(f"field {name!r} is empty")
    return value


def _chat_turns(data: dict[str, Any], cfg: FormatConfig) -> list[Message]:
    name = cfg.messages_field or next((k for k in ("messages", "conversations") if k in data), "messages")
    turns = data.get(name)
    if not isinstance(turns, list) or not turns:
        raise _Bad(f"field {name!r} must be a non-empty list of turns")
    out: list[Message] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _Bad(f"{name}[{i}] must be an object")
        raw_role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        role = cfg.role_map.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise _Bad(
                f"{name}[{i}]: unknown role {raw_role!r}; map it with role_map (known: {sorted(cfg.role_map)})"
            )
        if not isinstance(content, str) or not content.strip():
            raise _Bad(f"{name}[{i}]: content must be a non-empty string")
        out.append(Message(role=role, content=content))
    roles = [m.role for m in out]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise _Bad(f"{name}: a system turn may only come first")
    for i, r in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if r != expected:
            raise _Bad(f"{name}: turns must alternate user/assistant from a user turn; turn {i} is {r}")
    if "assistant" not in body:
        raise _Bad(f"{name}: no assistant turn")
    return out


def _language(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    dot = name.rfind(".")
    return _LANGUAGES.get(name[dot:], "unknown") if dot >= 0 else "unknown"


def to_record(item: RawItem, cfg: FormatConfig, source_sha256: str) -> Record | Quarantined:
    """Turn one raw item into a record by ``cfg``, or quarantine it with the reason."""
    try:
        data = item.data
        extra: dict[str, Any] = {}
        if isinstance(data, dict):
            missing = [f for f in cfg.meta_fields if f not in data]
            if missing:
                raise _Bad(f"meta field(s) {missing} not in the input")
            extra = {f: data[f] for f in cfg.meta_fields}
        text: str | None = None
        messages: list[Message] | None = None
        if cfg.kind == "qa":
            if not isinstance(data, dict):
                raise _Bad("a qa source needs objects with question and answer fields, got plain text")
            answer = _field(data, cfg.answer_field)
            if cfg.strip_calculator_annotations:
                answer = strip_calculator_annotations(answer)
            messages = [
                Message(role="user", content=_field(data, cfg.question_field)),
                Message(role="assistant", content=answer),
            ]
        elif cfg.kind == "chat":
            if not isinstance(data, dict):
                raise _Bad("a chat source needs objects with a messages or conversations list")
            messages = _chat_turns(data, cfg)
        else:
            text = data if isinstance(data, str) else _field(data, cfg.text_field)
            if not text.strip():
                raise _Bad("empty text")
            if cfg.kind == "code":
                extra["language"] = _language(item.uri)
        meta = RecordMeta(
            source=SourceRef(uri=item.uri, line=item.line, offset=item.offset),
            family=cfg.family,
            domain=cfg.domain,
            license=cfg.license,
            provenance=Provenance(source_sha256=source_sha256, steps=[f"format:{cfg.kind}"]),
            extra=extra,
        )
        return Record.create(meta=meta, text=text, messages=messages)
    except (_Bad, ValueError) as exc:
        raw = (
            item.data
            if isinstance(item.data, str)
            else json.dumps(item.data, ensure_ascii=False, default=str)
        )
        return Quarantined(
            uri=item.uri, line=item.line, offset=item.offset, error=f"{cfg.kind}: {exc}", raw=raw[:2000]
        )


class IdentityConfig(StrictModel):
    """System prompt per language and a seeded assistant intro, for chat records."""

    system_prompts: dict[str, str] = Field(
        default_factory=dict, description="language → system turn; key '*' applies to any language"
    )
    intros: dict[str, str] = Field(default_factory=dict, description="language → assistant intro; '*' = any")
    intro_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="share of chats given the intro")
    seed: int = 0


def _pick(table: dict[str, str], lang: str | None) -> str | None:
    return table.get(lang or "", table.get("*"))


def apply_identity(record: Record, cfg: IdentityConfig) -> Record:
    """Add the identity system turn and (for a seeded fraction) the intro; text records pass through."""
    if record.messages is None:
        return record
    messages = list(record.messages)
    added: dict[str, bool] = {}
    system = _pick(cfg.system_prompts, record.meta.lang)
    if system and messages[0].role != "system":
        messages.insert(0, Message(role="system", content=system))
        added["system"] = True
    intro = _pick(cfg.intros, record.meta.lang)
    first_reply = next((i for i, m in enumerate(messages) if m.role == "assistant"), None)
    if intro and cfg.intro_fraction > 0 and first_reply is not None:
        digest = hashlib.sha256(f"{cfg.seed}:{record.id}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < cfg.intro_fraction:
            content = f"{intro}\n{messages[first_reply].content}"
            messages[first_reply] = Message(role="assistant", content=content)
            added["intro"] = True
    if not added:
        return record
    meta = record.meta.model_copy(
        update={
            "extra": {**record.meta.extra, "identity": added},
            "provenance": record.meta.provenance.model_copy(
                update={"steps": [*record.meta.provenance.steps, "identity"]}
            ),
        }
    )
    return Record.create(meta=meta, messages=messages)
