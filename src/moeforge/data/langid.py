"""Language identification: language code + confidence per record, offline.

The model is py3langid's (a naive-Bayes byte n-gram classifier with 140 labels — ISO 639-1 codes, plus
ISO 639-3 codes where no two-letter code exists, e.g. ``pcm`` — shipped inside the pip package as a
NumPy archive, loaded without pickle). Its probabilities are normalized
(``norm_probs=True``), so ``lang_confidence`` is a probability in [0, 1]. The choice against lingua,
with the figures measured on ``../shared/data``, is in docs/PERFORMANCE.md.

Records of the domains in ``skip_domains`` (code, by default: its "language" is a programming
language, set from the file extension by the code format) are passed through unlabelled. A record
whose label is not in ``keep`` is dropped as ``langid:not_kept``; one below ``min_confidence`` as
``langid:low_confidence``.
"""

from __future__ import annotations

import copy
import logging
from functools import lru_cache
from typing import Any

from pydantic import Field, field_validator

from moeforge.config import StrictModel
from moeforge.data.contract import Record

__all__ = ["LangIdConfig", "apply_langid", "detect", "known_languages"]

log = logging.getLogger(__name__)


class LangIdConfig(StrictModel):
    """Language ID settings of a recipe."""

    enabled: bool = True
    keep: list[str] = Field(default_factory=list, description="languages to keep; empty keeps all")
    min_confidence: float = Field(
        default=0.5, ge=0.0, le=1.0, description="drop labelled records less confident than this"
    )
    candidates: list[str] = Field(
        default_factory=list,
        description="restrict the classifier to these languages (more accurate when the set is known)",
    )
    skip_domains: list[str] = Field(default_factory=lambda: ["code"], description="domains left unlabelled")
    max_chars: int = Field(default=1500, ge=64, description="classify at most this many leading characters")

    @field_validator("keep", "candidates")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if not v:  # nothing to check: don't load the model just to validate an empty list
            return v
        unknown = sorted(set(v) - set(known_languages()))
        if unknown:
            raise ValueError(
                f"unknown language code(s) {unknown}; py3langid knows {', '.join(known_languages())}"
            )
        return v


@lru_cache(maxsize=1)
def known_languages() -> tuple[str, ...]:
    return tuple(sorted(_identifier(()).labels))


@lru_cache(maxsize=8)
def _identifier(candidates: tuple[str, ...]) -> Any:
    """The model (loaded once per process, ~1 s); a candidate set gets a shallow copy restricted to it."""
    if candidates:
        ident = copy.copy(_identifier(()))  # set_languages rebinds the class tables; the DFA is shared
        ident.set_languages(list(candidates))
        return ident
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:  # pragma: no cover - py3langid is a core dependency
        raise RuntimeError("language ID needs py3langid; reinstall moeforge (make setup)") from exc
    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    log.debug("loaded py3langid model (%d languages)", len(ident.labels))
    return ident


def detect(text: str, candidates: tuple[str, ...] = (), max_chars: int = 1500) -> tuple[str, float]:
    """``(lang, confidence)`` of ``text``; ``("und", 0.0)`` for text with no letters to go on."""
    sample = text[:max_chars]
    if not any(c.isalpha() for c in sample):
        return "und", 0.0
    lang, conf = _identifier(tuple(sorted(candidates))).classify(sample)
    return str(lang), min(max(float(conf), 0.0), 1.0)


def apply_langid(record: Record, cfg: LangIdConfig) -> tuple[Record | None, str | None]:
    """Label ``record`` with lang + confidence; return ``(record, None)`` or ``(None, drop_reason)``."""
    if record.meta.domain in cfg.skip_domains:
        return record, None
    body = "\n".join(record.contents())
    lang, conf = detect(body, tuple(cfg.candidates), cfg.max_chars)
    if conf < cfg.min_confidence or lang == "und":
        return None, "langid:low_confidence"
    if cfg.keep and lang not in cfg.keep:
        return None, "langid:not_kept"
    meta = record.meta.model_copy(
        update={
            "lang": lang,
            "lang_confidence": round(conf, 4),
            "provenance": record.meta.provenance.model_copy(
                update={"steps": [*record.meta.provenance.steps, "langid"]}
            ),
        }
    )
    return record.model_copy(update={"meta": meta}), None
