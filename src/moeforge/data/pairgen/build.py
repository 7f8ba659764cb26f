"""The pairs of one prompt from its judged replies, each side with its provenance."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

from moeforge.data.contract import Message, Provenance, RecordMeta, SourceRef, content_hash
from moeforge.data.pairgen.config import GenerateConfig
from moeforge.data.pairgen.items import Item
from moeforge.data.pairgen.judge import expected_answer, identity_check, wrong_answers
from moeforge.data.preference import ModelRef, PreferencePair, SideProvenance

__all__ = [
    "Builder",
    "Reply",
    "diagonal_pairs",
]


def diagonal_pairs(n_good: int, n_bad: int, limit: int) -> list[tuple[int, int]]:
    """The first ``limit`` (good, bad) index pairs along the diagonals of good × bad: (0, 0), (1, 1), …,
    then (0, 1), (1, 2), …, so each reply is used as evenly as possible."""
    if not n_good or not n_bad:
        return []
    combos = sorted(product(range(n_good), range(n_bad)), key=lambda gb: ((gb[1] - gb[0]) % n_bad, gb[0]))
    return combos[:limit]


@dataclass
class Reply:
    text: str
    ok: bool
    note: str
    seed: int


def _distinct(replies: list[Reply]) -> list[Reply]:
    """Non-blank replies, the first of each normalized text, in sample order."""
    seen: set[str] = set()
    out = []
    for r in replies:
        h = content_hash(text=r.text)
        if r.text.strip() and h not in seen:
            seen.add(h)
            out.append(r)
    return out


@dataclass
class Builder:
    cfg: GenerateConfig
    model: ModelRef

    def model_side(self, reply: Reply, generator: str) -> SideProvenance:
        cfg = self.cfg
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
        return SideProvenance(
            kind="model",
            model=self.model,
            sampling={**sampling, "seed": reply.seed},
            generator=generator,
            note=reply.note,
        )

    def dataset_side(self, generator: str) -> SideProvenance:
        return SideProvenance(
            kind="dataset", dataset=self.cfg.dataset, generator=generator, note="reference solution"
        )

    def pairs(
        self,
        item: Item,
        sides: list[tuple[str, str, SideProvenance, SideProvenance]],
        generator: str,
        extra: dict[str, Any],
    ) -> list[PreferencePair]:
        """One pair per (chosen, rejected, chosen side, rejected side); sides equal after normalization
        (which the checks cannot tell apart) are left out."""
        meta = RecordMeta(
            source=SourceRef(uri=item.uri, line=item.line, offset=item.offset if item.line is None else None),
            family=item.family,
            domain=item.domain,
            license=item.license,
            provenance=Provenance(source_sha256=item.sha256, steps=["pairs:generate", generator]),
            extra={**item.extra, **extra},
        )
        return [
            PreferencePair.create(
                prompt=item.prompt,
                chosen=[Message(role="assistant", content=chosen)],
                rejected=[Message(role="assistant", content=rejected)],
                meta=meta,
                chosen_source=c_side,
                rejected_source=r_side,
            )
            for chosen, rejected, c_side, r_side in sides
            if content_hash(text=chosen) != content_hash(text=rejected)
        ]

    def build(self, item: Item, replies: list[Reply]) -> tuple[list[PreferencePair], str]:
        """The pairs of one prompt and how they were made (or why there are none)."""
        cfg = self.cfg
        usable = _distinct(replies)
        good = [r for r in usable if r.ok]
        bad = [r for r in usable if not r.ok]
        extra = {"samples": len(replies), "passed": sum(r.ok for r in replies)}
        limit = cfg.max_pairs_per_prompt
        if cfg.kind == "identity":
            chosen, note = expected_answer(cfg, item)
            expected = SideProvenance(kind="rule", generator="identity", note=note)
            if bad:
                sides = [(chosen, r.text, expected, self.model_side(r, "identity")) for r in bad[:limit]]
                return self.pairs(item, sides, "identity", extra), "model_failed"
            wrong = next((w for w in wrong_answers(cfg, item) if not identity_check(cfg, w)[0]), None)
            if wrong is None:
                return [], "no_wrong_answer"
            made = SideProvenance(
                kind="rule",
                generator="identity",
                note=f"rule-made wrong answer: the model passed the check on all {len(replies)} replies",
            )
            return self.pairs(item, [(chosen, wrong, expected, made)], "identity", extra), "rule_made"
        if cfg.kind == "reference":
            generator = f"reference:{cfg.rule}"
            ref = self.dataset_side(generator)
            sides = [(item.reference or "", r.text, ref, self.model_side(r, generator)) for r in bad[:limit]]
            return self.pairs(item, sides, generator, extra), (
                "reference_vs_sample" if bad else "no_worse_reply"
            )
        generator = f"verifiable:{cfg.dataset}"
        if good and bad:
            sides = [
                (
                    good[g].text,
                    bad[b].text,
                    self.model_side(good[g], generator),
                    self.model_side(bad[b], generator),
                )
                for g, b in diagonal_pairs(len(good), len(bad), limit)
            ]
            return self.pairs(item, sides, generator, extra), "correct_vs_incorrect"
        if good:
            return [], "all_correct"
        if not bad:
            return [], "no_reply"
        if not cfg.reference_fallback or item.reference is None:
            return [], "none_correct"
        ref = self.dataset_side(generator)
        sides = [(item.reference, r.text, ref, self.model_side(r, generator)) for r in bad[:limit]]
        return self.pairs(item, sides, generator, extra), "reference_fallback"
