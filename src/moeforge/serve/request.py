"""One request's decoding state: its prompt, the tokens and text generated so far, its stop rules, and
how it ended (:class:`Completion`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from moeforge.serve.sampling import IncrementalDetokenizer, SamplingParams, find_stop, stop_holdback

__all__ = ["Completion", "FinishReason", "Request", "TopLogprobs"]

FinishReason = Literal["stop", "length"]
TopLogprobs = list[tuple[int, float]]  # (token id, log-probability) pairs, most likely first


@dataclass
class Completion:
    """One finished request. ``token_ids`` are the generated ids, including a final stop token;
    ``text`` their text without the stop token or stop string; ``stop_reason`` the stop id or string
    matched (None when the length limit ended it); ``logprobs`` the model's log-probability of each
    generated token (before penalties, temperature and filters) when asked for, and ``top_logprobs`` the
    ``params.top_logprobs`` most likely tokens at each step when asked for."""

    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Request:
    """One prompt being completed; make it with :meth:`Engine.prepare` and decode it in a batch
    (:meth:`Engine.start_batch`, :meth:`Batch.step`).

    A batch calls :meth:`accept` with each new token; readers may watch ``tokens``, ``text`` (kept as it
    grows only when stop strings or streaming need it), ``logprobs``, ``top`` (the most likely tokens at
    each step, when ``params.top_logprobs``) and ``finish_reason`` (set once the request is done). :meth:`cancel` ends it early. ``pad`` is its left padding in its batch's cache.
    """

    prompt: list[int]
    params: SamplingParams
    max_new: int
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer | None
    pad: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[TopLogprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        """Whether the batch has no more work for this request: it finished or was cancelled."""
        return self.finish_reason is not None or self.cancelled

    def cancel(self) -> None:
        """End the request without a completion: its batch skips it from the next step on and drops it
        from the cache with the other finished rows. Call it from the thread that steps the batch."""
        self.cancelled = True

    def stable_text_len(self) -> int:
        """How much of ``text`` is final: all but a tail that could still be the start of a stop string,
        which a stream must hold back (a stop string is never sent, not even in part)."""
        return len(self.text) - stop_holdback(self.text, self.params.stop)

    def accept(self, tok: int, logprob: float | None, top: TopLogprobs | None = None) -> None:
        """Append a generated token (with its log-probability and the most likely tokens, when asked for)
        and apply the stop rules: stop id, stop string, length."""
        self.tokens.append(tok)
        if logprob is not None and self.params.logprobs:
            self.logprobs.append(logprob)
        if top is not None and self.params.top_logprobs:
            self.top.append(top[: self.params.top_logprobs])
        if tok in self.stop_ids:
            self._finish("stop", tok)
            return
        if self.detok is not None:
            checked = len(self.text)
            self.text += self.detok.push(tok)
            if self.params.stop and len(self.text) > checked and self._cut_at_stop(checked):
                return
        if len(self.tokens) >= self.max_new:
            self._finish("length", None)

    def _cut_at_stop(self, checked: int) -> bool:
        hit = find_stop(self.text, self.params.stop, checked)
        if hit is None:
            return False
        self.text = self.text[: hit[0]]
        self.finish_reason, self.stop_reason = "stop", hit[1]
        return True

    def _finish(self, reason: FinishReason, stop: int | None) -> None:
        self.finish_reason, self.stop_reason = reason, stop
        if self.detok is not None:  # held-back text (an unfinished character) may hide a stop string
            checked = len(self.text)
            self.text += self.detok.flush()
            if self.params.stop:
                self._cut_at_stop(checked)

    def completion(self, tokenizer: Any) -> Completion:
        """The finished request as a :class:`Completion` (text decoded now if it was not kept)."""
        if self.finish_reason is None:
            state = "was cancelled" if self.cancelled else "is still running"
            raise RuntimeError(f"completion() of a request that {state}")
        text = self.text
        if self.detok is None and tokenizer is not None:
            ids = self.tokens[:-1] if isinstance(self.stop_reason, int) else self.tokens
            text = tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)
        return Completion(
            prompt_tokens=len(self.prompt),
            token_ids=list(self.tokens),
            text=text,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.params.logprobs else None,
            top_logprobs=list(self.top) if self.params.top_logprobs else None,
        )
