"""Chats sampled through the engine: the sampler behind preference-pair generation
(``moeforge data pairs generate`` and a curriculum's pair step).

:class:`EngineSampler` takes requests that carry ChatML ``messages`` (a system turn first when there is one)
and their own sampling settings (``temperature``, ``top_p``, ``max_tokens``, ``seed``) — the shape of
:class:`moeforge.data.pairgen.SampleRequest`, read by attribute so this module needs nothing from the data
pipeline — and returns each reply's text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = ["ChatRequest", "EngineSampler"]


class ChatRequest(Protocol):
    messages: list[dict[str, str]]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


class EngineSampler:
    """Replies from a checkpoint through :class:`~moeforge.serve.engine.Engine`, loaded on first use (a
    resumed run with every chunk done never loads it). A request's system turn, if any, is passed as the
    operator's trusted system prompt (its special tokens, an identity token, keep their ids); ``tokens``
    and ``seconds`` count the tokens generated and the time spent so far."""

    def __init__(self, checkpoint: str | Path, *, max_batch: int = 16, device: str = "cpu") -> None:
        self.checkpoint, self.max_batch, self.device = str(checkpoint), max_batch, device
        self.tokens = 0
        self.seconds = 0.0
        self._engine: Any = None

    def __call__(self, requests: Sequence[ChatRequest]) -> list[str]:
        from moeforge.serve.engine import Engine
        from moeforge.serve.sampling import SamplingParams

        if self._engine is None:
            self._engine = Engine.from_checkpoint(
                self.checkpoint, device=self.device, max_batch=self.max_batch
            )
        engine = self._engine
        started = time.perf_counter()
        ids, params = [], []
        for r in requests:
            msgs = list(r.messages)
            system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
            ids.append(engine.chat_ids(msgs, system_prompt=system))
            p = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed)
            params.append(engine.chat_params(p))
        completions = engine.generate(ids, params)
        self.tokens += sum(c.completion_tokens for c in completions)
        self.seconds += time.perf_counter() - started
        return [c.text for c in completions]
