"""The completions API's ``logprobs`` object, OpenAI's legacy format as vLLM serves it: per token its
text, its log-probability, the most likely tokens there and where its text starts in the choice's text.

* ``tokens``: each token's own text (one id decoded alone, special tokens spelled out), so a token that
  holds part of a UTF-8 character reads ``"\\ufffd"``.
* ``token_logprobs``: the model's log-probability of the token (log-softmax of its logits over the whole
  vocabulary, before penalties, temperature and filters); None for an echoed prompt's first token, which
  has no context. ``-inf`` (which JSON cannot carry) is reported as ``-9999.0``, as vLLM does.
* ``top_logprobs``: ``{text: logprob}`` of the ``logprobs`` most likely tokens at that position, most
  likely first, plus the chosen token when it is not among them (so ``logprobs: 0`` gives the chosen
  token alone, and the dictionary's largest value is always the argmax's). Two ids may decode to the
  same text (the pieces of one character both read ``"\\ufffd"``, a special token and its literal
  text …); a dictionary cannot hold both under one key, and vLLM keeps whichever comes last. Here the
  more likely one keeps its text and every later one is keyed ``"token_id:<id>"`` (vLLM's
  ``return_tokens_as_token_ids`` spelling), so no entry is lost and no value is overwritten.
* ``text_offset``: the character offset where the token's text starts in the choice's ``text``: the
  length of the text of the tokens before it (a token that completes a character an earlier token began
  starts where that character does), at most the text's length (a stop string cuts the text, not the
  tokens). With ``echo`` the prompt's tokens come first from 0 and the completion's follow from the
  prompt text's length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from moeforge.serve.request import TopLogprobs
from moeforge.serve.sampling import IncrementalDetokenizer
from moeforge.serve.schemas import CompletionLogprobs
from moeforge.serve.scoring import TokenScores

__all__ = [
    "LOGPROB_FLOOR",
    "Offsets",
    "TokenTexts",
    "finite",
    "generated_logprobs",
    "joined",
    "prompt_logprobs",
]

LOGPROB_FLOOR = -9999.0  # what -inf is reported as (JSON has no infinity)


def finite(logprob: float) -> float:
    """``logprob`` as JSON can carry it: ``-inf`` (and NaN) become :data:`LOGPROB_FLOOR`."""
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


class TokenTexts:
    """Each token id's own text (special tokens spelled out), decoded once per id and kept: at most one
    string per vocabulary entry. Without a tokenizer a token's text is its id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def one(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            tok = self.tokenizer
            text = tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)
            self._cache[token_id] = text
        return text

    def __call__(self, ids: Sequence[int]) -> list[str]:
        return [self.one(t) for t in ids]

    def top(self, top: TopLogprobs, chosen: int, logprob: float) -> dict[str, float]:
        """``{text: logprob}`` of ``top`` (most likely first) and the chosen token when it is not among
        them; a text already taken is keyed ``token_id:<id>`` (see the module docstring)."""
        pairs = list(top)
        if all(i != chosen for i, _ in pairs):
            pairs.append((chosen, logprob))
        out: dict[str, float] = {}
        for token_id, lp in pairs:
            key = self.one(token_id)
            if key in out:
                key = f"token_id:{token_id}"
            out[key] = finite(lp)
        return out


class Offsets:
    """Where each token's text starts, for tokens decoded one after another (a choice's tokens, maybe
    over several streamed chunks): ``base`` + the characters of the tokens before it, at most ``limit``."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool, base: int = 0) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens) if tokenizer is not None else None
        self.base, self.chars = base, 0

    def push(self, ids: Sequence[int], limit: int) -> list[int]:
        """The offsets of ``ids``; ``limit``: the length of the text known so far (without ``base``)."""
        out = []
        for t in ids:
            out.append(self.base + min(self.chars, limit))
            if self.detok is not None:
                self.chars += len(self.detok.push(t))
        return out


def prompt_logprobs(
    texts: TokenTexts, ids: Sequence[int], scores: TokenScores, prompt_text: str
) -> CompletionLogprobs:
    """The echoed prompt's part: every token, the first without a log-probability (no context), the
    rest with ``scores`` (``ids[1:]`` scored, with the top tokens asked for)."""
    assert scores.start == 1 and len(scores.logprobs) == len(ids) - 1
    tops = scores.top or [[] for _ in scores.logprobs]
    return CompletionLogprobs(
        tokens=texts(ids),
        token_logprobs=[None, *(finite(x) for x in scores.logprobs)],
        top_logprobs=[
            None,
            *(texts.top(top, t, lp) for top, t, lp in zip(tops, ids[1:], scores.logprobs, strict=True)),
        ],
        text_offset=Offsets(texts.tokenizer, False).push(ids, len(prompt_text)),
    )


def generated_logprobs(
    texts: TokenTexts,
    ids: Sequence[int],
    logprobs: Sequence[float],
    top: Sequence[TopLogprobs] | None,
    offsets: Offsets,
    limit: int,
) -> CompletionLogprobs:
    """Generated tokens' part: ``logprobs`` and ``top`` as the decode batch recorded them (``top`` None:
    the chosen token alone at each position), offsets from ``offsets`` (see :meth:`Offsets.push`)."""
    tops = top if top is not None else [[] for _ in ids]
    return CompletionLogprobs(
        tokens=texts(ids),
        token_logprobs=[finite(x) for x in logprobs],
        top_logprobs=[texts.top(row, t, lp) for row, t, lp in zip(tops, ids, logprobs, strict=True)],
        text_offset=offsets.push(ids, limit),
    )


def joined(parts: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    """One ``logprobs`` object of consecutive parts (the echoed prompt's, then the completion's)."""
    return CompletionLogprobs(
        tokens=[t for p in parts for t in p.tokens],
        token_logprobs=[x for p in parts for x in p.token_logprobs],
        top_logprobs=[x for p in parts for x in p.top_logprobs or []],
        text_offset=[x for p in parts for x in p.text_offset or []],
    )
