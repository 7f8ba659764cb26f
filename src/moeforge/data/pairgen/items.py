"""The prompts of a generate run: the dataset's items in the configured window, each with what its replies
are checked against (GSM8K's gold number, a HumanEval problem, an identity prompt's attack)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from moeforge.data.contract import Message
from moeforge.data.formats import strip_calculator_annotations
from moeforge.data.pairgen.config import (
    ADVERSARIAL_PROMPTS,
    BUILTIN_URI,
    INSTRUCTIONS,
    GenerateConfig,
    eval_module,
)
from moeforge.data.sources import RAW_LIMIT, Quarantined, RawItem, expand_inputs, read_source
from moeforge.io import sha256_file

__all__ = [
    "Item",
    "gsm8k_reference",
    "load_items",
]

log = logging.getLogger(__name__)

_FAMILY = {"gsm8k": ("gsm8k", "math", "MIT"), "humaneval": ("humaneval", "code", "MIT")}
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")


@dataclass
class Item:
    index: int  # position among the source's items: the seed's prompt index
    uri: str
    line: int | None
    offset: int | None
    sha256: str
    prompt: list[Message]
    family: str
    domain: str
    license: str | None = None
    gold: str | None = None  # GSM8K's final number
    doc: dict[str, str] | None = None  # a HumanEval problem
    reference: str | None = None  # the dataset's answer as a reply
    attack: str = "identity"  # identity prompts: identity | claim | leak
    lang: str = "en"
    extra: dict[str, Any] = field(default_factory=dict)


def gsm8k_reference(answer: str) -> tuple[str, str]:
    """``(gold, reply)`` of a GSM8K answer: the normalized number after ``####``, and the worked answer
    without calculator annotations ending in "The answer is N." Raises ValueError when there is no number."""
    utils = eval_module("utils")
    if "####" not in answer:
        raise ValueError("the answer has no '#### N' final line")
    body, final = answer.rsplit("####", 1)
    gold = utils.normalize_number(final)
    if gold is None:
        raise ValueError(f"the final answer {final.strip()[:40]!r} is not a number")
    body = strip_calculator_annotations(body).strip()
    return gold, (f"{body}\nThe answer is {gold}." if body else f"The answer is {gold}.")


def _str_field(data: dict[str, Any], name: str) -> str:
    v = data.get(name)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(
            f"field {name!r} must be a non-empty string (fields present: {', '.join(sorted(data))})"
        )
    return v


def _turns(cfg: GenerateConfig, user: str) -> list[Message]:
    system = [Message(role="system", content=cfg.system_prompt)] if cfg.system_prompt else []
    return [*system, Message(role="user", content=user)]


def _instruction(cfg: GenerateConfig) -> str:
    return INSTRUCTIONS[cfg.dataset or ""] if cfg.instruction is None else cfg.instruction


def _item(cfg: GenerateConfig, raw: RawItem, index: int, sha: str) -> Item:
    data = raw.data
    if not isinstance(data, dict):
        raise ValueError("an item must be a JSON object")
    where = {"index": index, "uri": raw.uri, "line": raw.line, "offset": raw.offset, "sha256": sha}
    if cfg.kind == "identity":
        prompt = _str_field(data, "prompt")
        return Item(
            **where,
            prompt=_turns(cfg, prompt),
            family="identity",
            domain="chat",
            attack=str(data.get("attack") or "identity"),
            lang="ru" if _CYRILLIC.search(prompt) else "en",
            extra={"prompt_id": str(data.get("id", index))},
        )
    family, domain, license_ = _FAMILY[cfg.dataset or ""]
    instruction = _instruction(cfg)
    if cfg.dataset == "gsm8k":
        question = _str_field(data, "question")
        gold, reference = gsm8k_reference(_str_field(data, "answer"))
        user = f"{question.strip()}\n\n{instruction}" if instruction else question
        return Item(
            **where,
            prompt=_turns(cfg, user),
            family=family,
            domain=domain,
            license=license_,
            gold=gold,
            reference=reference,
            extra={"gold": gold},
        )
    doc = {k: _str_field(data, k) for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
    code = f"```python\n{doc['prompt']}```"
    return Item(
        **where,
        prompt=_turns(cfg, f"{instruction}\n\n{code}" if instruction else code),
        family=family,
        domain=domain,
        license=license_,
        doc=doc,
        reference=f"```python\n{doc['prompt']}{doc['canonical_solution']}```",
        extra={"task_id": doc["task_id"]},
    )


def load_items(cfg: GenerateConfig) -> tuple[list[Item], list[Quarantined], dict[str, str]]:
    """The window's items, the unreadable ones in it, and sha256 of every source read."""
    assert cfg.path is not None
    sources = {f: sha256_file(f) for f in expand_inputs(cfg.path)}
    entries: list[RawItem | Quarantined] = list(read_source(cfg.path))
    if cfg.kind == "identity" and cfg.identity.adversarial:
        builtin = json.dumps(ADVERSARIAL_PROMPTS, ensure_ascii=False, sort_keys=True).encode("utf-8")
        sources[BUILTIN_URI] = hashlib.sha256(builtin).hexdigest()
        entries += [
            RawItem(data=dict(p), uri=BUILTIN_URI, line=k + 1) for k, p in enumerate(ADVERSARIAL_PROMPTS)
        ]
    end = len(entries) if cfg.limit is None else cfg.offset + cfg.limit
    items: list[Item] = []
    bad: list[Quarantined] = []
    for index in range(cfg.offset, min(end, len(entries))):
        entry = entries[index]
        if isinstance(entry, Quarantined):
            bad.append(entry)
            continue
        try:
            items.append(_item(cfg, entry, index, sources[entry.uri]))
        except ValueError as exc:  # a pydantic ValidationError too
            raw = entry.data if isinstance(entry.data, str) else json.dumps(entry.data, ensure_ascii=False)
            where = cfg.dataset or cfg.kind
            bad.append(
                Quarantined(
                    uri=entry.uri,
                    line=entry.line,
                    offset=entry.offset,
                    error=f"{where}: {exc}",
                    raw=raw[:RAW_LIMIT],
                )
            )
    if bad:
        log.warning("%s: %d unreadable item(s) quarantined (first: %s)", cfg.path, len(bad), bad[0].error)
    return items, bad, sources
