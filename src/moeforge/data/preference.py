"""Preference pairs in the dataset contract: one prompt, a chosen answer and a rejected answer.

A :class:`PreferencePair` is the unit of preference data (DPO, IPO, SimPO, reward models). ``prompt`` is
ChatML turns (an optional system turn, then user/assistant alternating from a user turn, ending with a user
turn); ``chosen`` and ``rejected`` are assistant turns (normally one each); ``meta`` is the records'
:class:`RecordMeta`; ``chosen_source`` / ``rejected_source`` say how each side was made (:class:`SideProvenance`).

The id rule is exact and tested (``content_hash`` is the record rule of :mod:`moeforge.data.contract`:
NFC, lower-case, stripped turns joined by ``"\\n"``):

    P  = content_hash(messages=prompt)      # = prompt_hash, the split unit
    C  = content_hash(messages=chosen)
    R  = content_hash(messages=rejected)
    id = "sha256:" + sha256(UTF-8("pair\\n" + P + "\\n" + C + "\\n" + R)).hexdigest()

Each part is reduced to its own fixed-length hash before the three are joined, so no content can shift the
boundary between prompt, chosen and rejected; the ``pair`` tag sets pair ids apart from record ids;
swapping chosen and rejected gives another id. ``prompt_hash`` (P) decides the split: place a pair with
``assign_split(pair.prompt_hash, cfg)`` and every pair of one prompt lands in one split.

:func:`pair_from_item` reads the common layouts (``*_field`` names the fields; defaults prompt/chosen/rejected):

- ``standard`` (TRL): prompt, chosen and rejected are strings → one user turn, one assistant turn per side.
  A prompt string that is a ``Human:``/``Assistant:`` transcript is read as its turns.
- ``conversational`` (TRL): chosen and rejected are lists of turns (role/content or ShareGPT from/value);
  the prompt is a string, a list of turns, or absent. Sides that repeat the prompt (UltraFeedback-binarized
  ships [user, assistant] conversations) have it stripped; without a prompt field the longest shared turn
  prefix that ends in a user turn is the prompt.
- ``hh`` (Anthropic HH-RLHF): chosen and rejected are two ``"\\n\\nHuman: …\\n\\nAssistant: …"`` transcripts;
  the longest shared turn prefix ending in a Human turn is the prompt, the final Assistant turns the sides.

Malformed input never raises: the result is a :class:`PairProblem` with one of the :data:`REASONS` and a
message naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moeforge.data.contract import Message, RecordMeta, content_hash, normalize_for_hash
from moeforge.data.formats import DEFAULT_ROLE_MAP
from moeforge.data.sources import RAW_LIMIT, Quarantined, RawItem

__all__ = [
    "REASONS",
    "ModelRef",
    "PairProblem",
    "PreferencePair",
    "SideProvenance",
    "leakage",
    "pair_from_item",
    "pair_id",
    "pair_stats",
]

REASONS = {
    "pair:unknown_layout": "the fields match no known layout (missing chosen/rejected, wrong types)",
    "pair:bad_turn": "a turn is not an object with string content, or an inner turn is empty",
    "pair:empty_prompt": "the prompt is empty",
    "pair:empty_side": "chosen or rejected is empty or has no turn after the prompt",
    "pair:role_error": "an unknown role, a prompt not ending with a user turn, a non-assistant turn in a side",
    "pair:prompt_mismatch": "a side is a conversation that does not start with the given prompt",
    "pair:no_shared_prompt": "the two transcripts share no prefix ending in a user turn",
    "pair:early_divergence": "the two transcripts differ before their final assistant turn(s)",
    "pair:identical_sides": "chosen and rejected are the same after normalization",
    "pair:bad_meta": "meta_factory refused the item",
    "pair:invalid": "any other validation failure (not expected: the checks above run first)",
}
Layout = Literal["standard", "conversational", "hh"]
_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
_HEX_PATTERN = r"^[0-9a-f]{64}$"
_HH_MARK = re.compile(r"\n\n(Human|Assistant):")
_SPLIT_ORDER = {"train": 0, "valid": 1, "test": 2}
_EXAMPLES = 3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    """The checkpoint that generated a side; a plain string is read as its name."""

    name: str = Field(min_length=1, description="checkpoint path or hub name")
    sha256: str | None = Field(default=None, pattern=_HEX_PATTERN, description="sha256 of the weights")


class SideProvenance(_Strict):
    """How one side of a pair was made. ``dataset`` needs the dataset's name, ``model`` the checkpoint,
    ``rule`` the generator; ``human`` needs nothing."""

    kind: Literal["dataset", "model", "rule", "human"]
    dataset: str | None = Field(default=None, min_length=1, description="dataset the side was taken from")
    generator: str | None = Field(
        default=None, min_length=1, description="what built the pair, e.g. verifiable:gsm8k, identity"
    )
    model: ModelRef | None = Field(default=None, description="checkpoint that sampled the side")
    sampling: dict[str, Any] = Field(default_factory=dict, description="temperature, top_p, seed …")
    note: str | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _needs(self) -> SideProvenance:
        need = {"dataset": "dataset", "model": "model", "rule": "generator"}.get(self.kind)
        if need and getattr(self, need) is None:
            raise ValueError(f"a side of kind {self.kind!r} needs {need!r}")
        return self


def pair_id(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> str:
    """The pair id by the rule in the module docstring."""
    parts = [content_hash(messages=t) for t in (prompt, chosen, rejected)]
    return "sha256:" + hashlib.sha256(("pair\n" + "\n".join(parts)).encode("utf-8")).hexdigest()


def _prompt_problem(turns: list[Message]) -> str | None:
    roles = [m.role for m in turns]
    skip = 1 if roles and roles[0] == "system" else 0
    body = roles[skip:]
    if not body:
        return "the prompt has no user turn"
    for i, r in enumerate(body):
        if r == "system":
            return f"a system turn may only come first (prompt turn {i + skip} is system)"
        if r != ("user" if i % 2 == 0 else "assistant"):
            return f"prompt turns must alternate user/assistant from a user turn; turn {i + skip} is {r}"
    if body[-1] != "user":
        return f"the prompt must end with a user turn (it ends with {body[-1]})"
    return None


def _side_problem(turns: list[Message], name: str) -> str | None:
    bad = next((i for i, m in enumerate(turns) if m.role != "assistant"), None)
    if bad is None:
        return None
    return f"{name} turn {bad} is {turns[bad].role}; a side holds assistant turns only"


class PreferencePair(_Strict):
    """One preference judgement: ``chosen`` is preferred over ``rejected`` as a reply to ``prompt``."""

    id: str = Field(pattern=_HASH_PATTERN, description="pair_id(prompt, chosen, rejected)")
    prompt: list[Message] = Field(min_length=1, description="[system], user, (assistant, user)* turns")
    chosen: list[Message] = Field(min_length=1, description="the preferred assistant turn(s)")
    rejected: list[Message] = Field(min_length=1, description="the dispreferred assistant turn(s)")
    meta: RecordMeta
    chosen_source: SideProvenance
    rejected_source: SideProvenance

    @field_validator("prompt")
    @classmethod
    def _prompt_roles(cls, v: list[Message]) -> list[Message]:
        problem = _prompt_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("chosen", "rejected")
    @classmethod
    def _side_roles(cls, v: list[Message], info: ValidationInfo) -> list[Message]:
        problem = _side_problem(v, str(info.field_name))
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _check(self) -> PreferencePair:
        if content_hash(messages=self.chosen) == content_hash(messages=self.rejected):
            raise ValueError("chosen and rejected are the same after normalization (NFC, lower-case, strip)")
        expected = pair_id(self.prompt, self.chosen, self.rejected)
        if self.id != expected:
            raise ValueError(f"id does not match the content: expected {expected} (got {self.id})")
        return self

    @classmethod
    def create(
        cls,
        *,
        prompt: list[Message],
        chosen: list[Message],
        rejected: list[Message],
        meta: RecordMeta,
        chosen_source: SideProvenance,
        rejected_source: SideProvenance,
    ) -> PreferencePair:
        """Build a pair, computing its id from the content."""
        return cls(
            id=pair_id(prompt, chosen, rejected),
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            meta=meta,
            chosen_source=chosen_source,
            rejected_source=rejected_source,
        )

    @property
    def prompt_hash(self) -> str:
        """``content_hash`` of the prompt turns: the split unit shared by every pair of one prompt."""
        return content_hash(messages=self.prompt)


@dataclass(frozen=True)
class PairProblem:
    """Why an item is not a pair: ``reason`` is a key of :data:`REASONS`, ``message`` names the field."""

    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def quarantined(self, item: RawItem) -> Quarantined:
        """The quarantine entry for ``item``, like :func:`moeforge.data.formats.to_record` writes."""
        data = item.data
        raw = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, default=str)
        return Quarantined(
            uri=item.uri, line=item.line, offset=item.offset, error=str(self), raw=raw[:RAW_LIMIT]
        )


class _Problem(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _turns(value: list[Any], name: str, empty_reason: str) -> list[Message]:
    out: list[Message] = []
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            raise _Problem(
                "pair:bad_turn", f"{name}[{i}] must be an object with role and content, got {_kind(t)}"
            )
        raw_role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        role = DEFAULT_ROLE_MAP.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise _Problem(
                "pair:role_error",
                f"{name}[{i}]: unknown role {raw_role!r} (known: {sorted(DEFAULT_ROLE_MAP)})",
            )
        if not isinstance(content, str):
            raise _Problem("pair:bad_turn", f"{name}[{i}]: content must be a string, got {_kind(content)}")
        if not content.strip():
            raise _Problem(empty_reason, f"{name}[{i}]: empty content")
        out.append(Message(role=role, content=content))
    return out


def _is_hh(s: str) -> bool:
    return s.lstrip().startswith("Human:") and "\n\nAssistant:" in s


def _parse_hh(s: str, name: str, *, open_end: bool) -> list[Message]:
    """``Human:``/``Assistant:`` turns; ``open_end`` allows a final empty ``Assistant:`` (a prompt's cue)."""
    parts = _HH_MARK.split("\n\n" + s.lstrip())  # ["", "Human", text, "Assistant", text, …]
    out: list[Message] = []
    for k in range(1, len(parts), 2):
        role = "user" if parts[k] == "Human" else "assistant"
        content = parts[k + 1].strip()
        last = k + 2 >= len(parts)
        if not content:
            if last and role == "assistant" and open_end:
                break
            reason = "pair:empty_side" if last and role == "assistant" else "pair:bad_turn"
            raise _Problem(reason, f"{name}: {parts[k]} turn {len(out)} is empty")
        out.append(Message(role=role, content=content))
    return out


def _read_prompt(p: Any, name: str) -> list[Message]:
    if isinstance(p, str):
        if not p.strip():
            raise _Problem("pair:empty_prompt", f"field {name!r} is empty")
        return _parse_hh(p, name, open_end=True) if _is_hh(p) else [Message(role="user", content=p)]
    if isinstance(p, list):
        if not p:
            raise _Problem("pair:empty_prompt", f"field {name!r} is an empty list")
        return _turns(p, name, "pair:empty_prompt")
    raise _Problem(
        "pair:unknown_layout", f"field {name!r} must be a string or a list of turns, got {_kind(p)}"
    )


def _same(a: Message, b: Message) -> bool:
    return a.role == b.role and normalize_for_hash(a.content) == normalize_for_hash(b.content)


def _strip_prompt(prompt: list[Message], side: list[Message], name: str) -> list[Message]:
    """``side`` without a repeated prompt (with or without its system turn) in front."""
    heads = [prompt, prompt[1:]] if prompt[0].role == "system" else [prompt]
    for head in heads:
        if len(side) >= len(head) and all(_same(a, b) for a, b in zip(head, side, strict=False)):
            return side[len(head) :]
    if side and side[0].role != "assistant":
        raise _Problem(
            "pair:prompt_mismatch",
            f"{name} starts with a {side[0].role} turn but does not repeat the prompt; a side is either "
            "assistant turns or the prompt followed by them",
        )
    return side


def _split(
    prompt: list[Message] | None, c: list[Message], r: list[Message], names: tuple[str, str]
) -> tuple[list[Message], list[Message], list[Message]]:
    implicit = prompt is None
    if prompt is None:
        k = 0
        while k < min(len(c), len(r)) and _same(c[k], r[k]):
            k += 1
        cut = max((i + 1 for i in range(k) if c[i].role == "user"), default=0)
        if cut == 0:
            raise _Problem(
                "pair:no_shared_prompt",
                f"{names[0]} and {names[1]} share no opening turns ending in a user turn, so there is no "
                f"prompt to read (they differ at turn {k})",
            )
        prompt, cs, rs = c[:cut], c[cut:], r[cut:]
    else:
        cs, rs = _strip_prompt(prompt, c, names[0]), _strip_prompt(prompt, r, names[1])
    for name, side in zip(names, (cs, rs), strict=True):
        if not side:
            raise _Problem("pair:empty_side", f"{name} has no turn after the prompt")
        problem = _side_problem(side, name)
        if problem and implicit:
            raise _Problem(
                "pair:early_divergence",
                f"{names[0]} and {names[1]} differ before their final assistant turn ({problem} after the "
                f"{len(prompt)}-turn shared prompt); a pair compares final answers to one prompt",
            )
        if problem:
            raise _Problem("pair:role_error", problem)
    problem = _prompt_problem(prompt)
    if problem:
        raise _Problem("pair:role_error", problem)
    return prompt, cs, rs


def _read(
    data: dict[str, Any], pf: str, cf: str, rf: str
) -> tuple[Layout, list[Message], list[Message], list[Message]]:
    missing = [f for f in (cf, rf) if f not in data]
    if missing:
        present = ", ".join(sorted(data)) or "none"
        raise _Problem("pair:unknown_layout", f"missing field(s) {missing} (fields present: {present})")
    c, r = data[cf], data[rf]
    prompt = _read_prompt(data[pf], pf) if data.get(pf) is not None else None
    if isinstance(c, str) and isinstance(r, str):
        if _is_hh(c) and _is_hh(r):
            hh_c, hh_r = _parse_hh(c, cf, open_end=False), _parse_hh(r, rf, open_end=False)
            return ("hh", *_split(prompt, hh_c, hh_r, (cf, rf)))
        if _is_hh(c) or _is_hh(r):
            raise _Problem("pair:unknown_layout", f"only one of {cf}/{rf} is a Human:/Assistant: transcript")
        if prompt is None:
            raise _Problem(
                "pair:unknown_layout",
                f"plain-string {cf}/{rf} need a {pf!r} field (a prompt is read from the sides only when they "
                "are lists of turns or Human:/Assistant: transcripts)",
            )
        for name, s in ((cf, c), (rf, r)):
            if not s.strip():
                raise _Problem("pair:empty_side", f"field {name!r} is empty")
        sides = [Message(role="assistant", content=c)], [Message(role="assistant", content=r)]
        return ("standard", *_split(prompt, *sides, (cf, rf)))
    if isinstance(c, list) and isinstance(r, list):
        for name, s in ((cf, c), (rf, r)):
            if not s:
                raise _Problem("pair:empty_side", f"field {name!r} is an empty list")
        turns_c, turns_r = _turns(c, cf, "pair:empty_side"), _turns(r, rf, "pair:empty_side")
        return ("conversational", *_split(prompt, turns_c, turns_r, (cf, rf)))
    raise _Problem(
        "pair:unknown_layout",
        f"{cf} and {rf} must both be strings or both lists of turns (got {_kind(c)} and {_kind(r)})",
    )


def pair_from_item(
    data: dict[str, Any] | str,
    *,
    meta_factory: Callable[[dict[str, Any]], RecordMeta | dict[str, Any]],
    chosen_source: SideProvenance | None = None,
    rejected_source: SideProvenance | None = None,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> PreferencePair | PairProblem:
    """One raw item → a pair, or a :class:`PairProblem`; never raises for bad input.

    ``meta_factory(data)`` gives the meta (source position, family, domain, provenance …) as a RecordMeta
    or its dict; an error it raises becomes ``pair:bad_meta``. The layout read is appended to the
    provenance steps as ``format:pair:<layout>``. A side's provenance defaults to
    ``SideProvenance(kind="dataset", dataset=meta.family)``.
    """
    try:
        if not isinstance(data, dict):
            raise _Problem("pair:unknown_layout", "a preference item must be an object, got plain text")
        layout, prompt, chosen, rejected = _read(data, prompt_field, chosen_field, rejected_field)
        if content_hash(messages=chosen) == content_hash(messages=rejected):
            raise _Problem(
                "pair:identical_sides",
                f"{chosen_field} and {rejected_field} are the same after normalization (NFC, lower-case, strip)",
            )
        try:
            meta = RecordMeta.model_validate(meta_factory(data))
        except (ValueError, KeyError, TypeError) as exc:  # ValidationError is a ValueError
            raise _Problem("pair:bad_meta", f"meta_factory: {type(exc).__name__}: {exc}") from exc
        steps = [*meta.provenance.steps, f"format:pair:{layout}"]
        meta = meta.model_copy(update={"provenance": meta.provenance.model_copy(update={"steps": steps})})
        default = SideProvenance(kind="dataset", dataset=meta.family)
        return PreferencePair.create(
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            meta=meta,
            chosen_source=chosen_source or default,
            rejected_source=rejected_source or default,
        )
    except _Problem as p:
        return PairProblem(p.reason, p.message)
    except ValidationError as exc:
        return PairProblem("pair:invalid", str(exc.errors()[0]["msg"]))


def _chars(turns: list[Message]) -> int:
    return sum(len(m.content) for m in turns)


def pair_stats(pairs: Iterable[PreferencePair]) -> dict[str, Any]:
    """Counts for the gates and the report.

    ``length_ratio_mean`` / ``_median``: chosen characters ÷ rejected characters per pair (> 1: chosen
    answers run longer — the length bias a DPO model learns); ``chosen_longer_share``: pairs whose chosen
    side is longer. ``duplicate_pairs``: pairs beyond the first with the same id. ``duplicate_prompt_pairs``:
    contradictions — couples of pairs with one prompt and the same two sides swapped, each couple counted
    once. ``by_family`` / ``by_source`` (``meta.source.uri``) / ``by_side_kind`` (``chosen/rejected`` kinds)
    count pairs; ``examples`` lists a few ids and prompt hashes for each problem.
    """
    ids: Counter[str] = Counter()
    oriented: set[tuple[str, str, str]] = set()
    per_prompt: Counter[str] = Counter()
    by_family: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    ratios: list[float] = []
    chosen_chars = rejected_chars = chosen_longer = 0
    for p in pairs:
        ids[p.id] += 1
        h = p.prompt_hash
        per_prompt[h] += 1
        oriented.add((h, content_hash(messages=p.chosen), content_hash(messages=p.rejected)))
        cc, rc = _chars(p.chosen), _chars(p.rejected)
        chosen_chars, rejected_chars = chosen_chars + cc, rejected_chars + rc
        ratios.append(cc / rc)
        chosen_longer += cc > rc
        by_family[p.meta.family] += 1
        by_source[p.meta.source.uri] += 1
        by_kind[f"{p.chosen_source.kind}/{p.rejected_source.kind}"] += 1
    n = len(ratios)
    mirrored = sorted({(h, min(c, r), max(c, r)) for h, c, r in oriented if (h, r, c) in oriented})
    duplicates = sorted(i for i, k in ids.items() if k > 1)
    return {
        "pairs": n,
        "prompts": len(per_prompt),
        "pairs_per_prompt_max": max(per_prompt.values(), default=0),
        "chosen_chars_mean": chosen_chars / n if n else None,
        "rejected_chars_mean": rejected_chars / n if n else None,
        "length_ratio_mean": statistics.fmean(ratios) if n else None,
        "length_ratio_median": statistics.median(ratios) if n else None,
        "chosen_longer_share": chosen_longer / n if n else None,
        "duplicate_pairs": sum(k - 1 for k in ids.values()),
        "duplicate_prompt_pairs": len(mirrored),
        "by_family": dict(sorted(by_family.items())),
        "by_source": dict(sorted(by_source.items())),
        "by_side_kind": dict(sorted(by_kind.items())),
        "examples": {
            "duplicate_pairs": duplicates[:_EXAMPLES],
            "duplicate_prompt_pairs": [h for h, _, _ in mirrored[:_EXAMPLES]],
        },
    }


def leakage(pairs_by_split: Mapping[str, Iterable[PreferencePair]]) -> dict[str, list[str]]:
    """Prompt hashes found in more than one split → those splits (train, valid, test first); empty = clean."""
    where: defaultdict[str, set[str]] = defaultdict(set)
    for split, pairs in pairs_by_split.items():
        for p in pairs:
            where[p.prompt_hash].add(split)
    return {h: sorted(s, key=_split_key) for h, s in sorted(where.items()) if len(s) > 1}


def _split_key(split: str) -> tuple[int, str]:
    return _SPLIT_ORDER.get(split, len(_SPLIT_ORDER)), split
