"""The inference engine: batched KV-cache decoding of a :class:`MoETransformer` with per-request sampling.

Batching. Prompts of different lengths share one KV cache of ``P + N`` slots (``P`` the longest prompt,
``N`` the most new tokens any row may take) and are *left-padded*: row ``b``'s prompt fills slots
``[P - L_b, P)`` and its new tokens the slots from ``P`` on, so every row writes the same slot at every
step and one forward serves the whole batch. A key-padding mask hides the empty slots, and RoPE positions
are per row (``slot - (P - L_b)``), so each row sees exactly the keys and positions it would see alone.
Prompts are prefilled in groups of equal length without padding (a padded *query* would have no key to
attend to, and SDPA returns NaN for it) and their keys and values copied into the shared cache; a batch
whose prompts all have one length needs neither the copy nor the mask.

Per step the engine runs one forward of ``[B, 1]`` tokens, samples all rows with one vectorized
:class:`~moeforge.serve.sampling.BatchSampler` call and moves the chosen ids to the CPU with one
``tolist()`` for the stop checks. Rows finish independently (stop token, stop string, ``max_tokens`` or
the model's context); once at most half of the batch is still running, the finished rows are dropped
from the cache, and the loop ends when every row is done.

Batched results equal unbatched ones up to float rounding (different matmul shapes), with one caveat:
an MoE model with a ``capacity_factor`` drops tokens depending on what else is in the forward, as in
training. The engine is not thread-safe; a server serializes calls into it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from moeforge.config import format_validation_error
from moeforge.model.config import ModelConfig
from moeforge.model.layers import KVCache
from moeforge.model.transformer import MoETransformer
from moeforge.serve.sampling import (
    BatchSampler,
    Completion,
    FinishReason,
    IncrementalDetokenizer,
    Request,
    SamplingParams,
    stop_holdback,
)
from moeforge.tokens.pack import render_chat

__all__ = ["Completion", "Engine", "EngineError", "PromptTooLongError", "SamplingParams", "StreamChunk"]

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")


class EngineError(ValueError):
    """A request or checkpoint the engine cannot serve; the message says what is wrong and what is allowed."""


class PromptTooLongError(EngineError):
    """A prompt leaves no room for a new token in the model's context (``max_seq_len``)."""


@dataclass
class StreamChunk:
    """One streamed piece: new ``text`` and the ids generated since the previous chunk. The last chunk
    has ``finish_reason`` and the whole ``completion``; the chunks' texts concatenate to its text."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    completion: Completion | None = None


@dataclass
class _Batch:
    """Decode state of one batch; ``rows[i]`` is batch row ``i`` (finished rows leave when compacted)."""

    rows: list[Request]
    cache: KVCache
    sampler: BatchSampler
    key_padding_BS: torch.Tensor | None
    positions_B: torch.Tensor
    next_B: torch.Tensor
    step: int = 0

    @property
    def finished(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows)


class Engine:
    """Generate from a :class:`MoETransformer`: batched, KV-cached, with per-request sampling settings.

    ``tokenizer`` (a ``tokenizers.Tokenizer``) is needed for text prompts, stop strings, chat and text
    output; without it the engine takes and returns token ids only. ``eos_ids`` end every request not
    marked ``ignore_eos`` (default: the tokenizer's ``<|endoftext|>``). ``max_batch`` rows decode
    together; more prompts are split into batches of similar length. The model is put in eval mode
    (no router noise). Ids the model has but the tokenizer does not (a vocabulary rounded up for
    speed) are never generated.
    """

    def __init__(
        self,
        model: MoETransformer,
        tokenizer: Any = None,
        *,
        device: torch.device | str | None = None,
        max_batch: int = 8,
        eos_ids: Sequence[int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1 (got {max_batch})")
        self.device = torch.device(device) if device is not None else model.embed.weight.device
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.vocab_limit: int | None = None
        if tokenizer is not None:
            n = tokenizer.get_vocab_size(with_added_tokens=True)
            if n > self.cfg.vocab_size:
                raise EngineError(
                    f"the tokenizer has {n} tokens but the model's vocab_size is {self.cfg.vocab_size}; "
                    "use the tokenizer the model was trained with"
                )
            self.vocab_limit = n if n < self.cfg.vocab_size else None
        if eos_ids is None:
            eos = tokenizer.token_to_id("<|endoftext|>") if tokenizer is not None else None
            eos_ids = [] if eos is None else [eos]
        self.eos_ids = frozenset(eos_ids)

    # ---- loading --------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        tokenizer: Any = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_batch: int = 8,
        eos_ids: Sequence[int] | None = None,
    ) -> Engine:
        """An engine for a trainer checkpoint (``model.safetensors`` + ``state.json`` with ``model_config``)
        or a run directory (its latest checkpoint). ``tokenizer``: a tokenizer, a path to one, or None to
        use a ``tokenizer.json`` in or up to three levels above the checkpoint, else the one the training
        config names. Weights load strictly; a tied LM head may be stored once or twice."""
        from moeforge.tokens.tokenizer import load_tokenizer
        from moeforge.train.checkpoint import latest_checkpoint, load_checkpoint

        ckpt = Path(path).resolve()
        if not (ckpt / "model.safetensors").is_file() and (ckpt / "checkpoints").is_dir():
            ckpt = latest_checkpoint(ckpt) or ckpt
        state_file = ckpt / "state.json"
        if not state_file.is_file() or not (ckpt / "model.safetensors").is_file():
            raise EngineError(f"{ckpt}: not a checkpoint (needs model.safetensors and state.json)")
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if "model_config" not in state:
            raise EngineError(f"{state_file}: has no model_config; was it written by `moeforge train`?")
        try:
            cfg = ModelConfig.model_validate(state["model_config"])
        except ValidationError as exc:
            raise EngineError(format_validation_error(exc, f"{state_file} model_config")) from exc
        dev = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):  # the weights come from the file: skip the random init
            model = MoETransformer(cfg)
        model.to_empty(device=dev)
        if cfg.tie_embeddings:  # to_empty gives each module its own tensor
            model.lm_head.weight = model.embed.weight
        model.rope.reset(device=dev)  # a non-persistent buffer: rebuilt, never loaded
        load_checkpoint(ckpt, model, restore_rng_state=False)
        if dtype is not None:
            model.to(dtype)
        if tokenizer is None:
            tokenizer = _find_tokenizer(ckpt, state)
            if tokenizer is None:
                log.warning("%s: no tokenizer.json found near the checkpoint; token-id prompts only", ckpt)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        log.info("loaded %s (%s) on %s", ckpt, cfg.name, dev)
        return cls(model, tokenizer, device=dev, max_batch=max_batch, eos_ids=eos_ids)

    # ---- text -----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens such as ``<|im_start|>`` become their single id)."""
        if self.tokenizer is None:
            raise EngineError("a text prompt needs a tokenizer; pass token ids or create the Engine with one")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def chat_prompt(self, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> str:
        """The ChatML text of ``messages`` (the tokenizer's chat template) opening an assistant turn."""
        msgs = list(messages)
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or m.get("role") not in CHAT_ROLES
                or not isinstance(m.get("content"), str)
            ):
                roles = ", ".join(CHAT_ROLES)
                raise EngineError(
                    f"messages[{i}] must be {{'role': one of {roles}, 'content': str}} (got {m!r})"
                )
        if system_prompt is not None:
            if msgs and msgs[0]["role"] == "system":
                raise EngineError(
                    "system_prompt was given but messages[0] is already a system turn; pass one"
                )
            msgs.insert(0, {"role": "system", "content": system_prompt})
        if not msgs:
            raise EngineError("messages is empty; a chat needs at least one turn")
        return render_chat(msgs) + "<|im_start|>assistant\n"

    def chat_params(self, params: SamplingParams | None = None) -> SamplingParams:
        """``params`` with the ChatML turn end ``<|im_end|>`` and ``<|endoftext|>`` added as stop tokens."""
        params = params or SamplingParams()
        ids = (
            [self.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")] if self.tokenizer else []
        )
        if not ids or ids[0] is None:
            raise EngineError(
                "chat needs a tokenizer with the ChatML token <|im_end|> (`moeforge tokenizer train`)"
            )
        extra = [i for i in ids if i is not None and i not in params.stop_token_ids]
        return params.model_copy(update={"stop_token_ids": [*params.stop_token_ids, *extra]})

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        params: SamplingParams | None = None,
        *,
        system_prompt: str | None = None,
    ) -> Completion:
        """The assistant's reply to ``messages``; it stops at ``<|im_end|>``, which the text leaves out."""
        return self.generate([self.chat_prompt(messages, system_prompt)], self.chat_params(params))[0]

    def stream_chat(
        self,
        messages: Sequence[dict[str, str]],
        params: SamplingParams | None = None,
        *,
        system_prompt: str | None = None,
    ) -> Iterator[StreamChunk]:
        """:meth:`chat`, streamed as :meth:`stream` does."""
        return self.stream(self.chat_prompt(messages, system_prompt), self.chat_params(params))

    # ---- generation -----------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[list[int] | str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Complete every prompt (text or token ids); ``params`` is one setting for all or one per prompt.
        Returns the completions in prompt order. Raises :class:`EngineError` for a bad request."""
        rows = self._rows(prompts, params, stream=False)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].prompt))  # similar lengths pad less
        for start in range(0, len(order), self.max_batch):
            batch = self._start([rows[i] for i in order[start : start + self.max_batch]])
            while not batch.finished:
                self._step(batch)
        return [r.completion(self.tokenizer) for r in rows]

    def stream(self, prompt: list[int] | str, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Complete one prompt, yielding text as it is generated. Text that could be the start of a stop
        string is held back until it is known not to be one, so a stop string never appears, even in part."""
        row = self._rows([prompt], params, stream=True)[0]
        batch = self._start([row])
        sent_text = sent_ids = 0
        while row.finish_reason is None:
            upto = len(row.text) - stop_holdback(row.text, row.params.stop)
            if upto > sent_text:
                yield StreamChunk(row.text[sent_text:upto], row.tokens[sent_ids:])
                sent_text, sent_ids = upto, len(row.tokens)
            self._step(batch)
        completion = row.completion(self.tokenizer)
        yield StreamChunk(completion.text[sent_text:], row.tokens[sent_ids:], row.finish_reason, completion)

    # ---- internals ------------------------------------------------------------------------------------

    def _rows(
        self,
        prompts: Sequence[list[int] | str],
        params: SamplingParams | Sequence[SamplingParams] | None,
        *,
        stream: bool,
    ) -> list[Request]:
        if isinstance(prompts, str):
            raise EngineError("prompts must be a list of prompts; wrap a single prompt as [prompt]")
        prompts = list(prompts)
        if not prompts:
            raise EngineError("prompts is empty; pass at least one prompt")
        if params is None or isinstance(params, SamplingParams):
            per_row = [params or SamplingParams()] * len(prompts)
        else:
            per_row = list(params)
            if len(per_row) != len(prompts):
                raise EngineError(
                    f"got {len(per_row)} SamplingParams for {len(prompts)} prompts; pass one or one each"
                )
        limit = self.cfg.max_seq_len
        rows = []
        for i, (prompt, p) in enumerate(zip(prompts, per_row, strict=True)):
            ids = self.encode(prompt) if isinstance(prompt, str) else prompt
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise EngineError(
                    f"prompt {i} must be a string or a list of token ids (got {type(prompt).__name__})"
                )
            if not ids:
                raise EngineError(f"prompt {i} is empty; a prompt needs at least one token")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise EngineError(f"prompt {i} has token ids outside 0..{self.cfg.vocab_size - 1}: {bad[:5]}")
            if len(ids) >= limit:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens; the model's context (max_seq_len) is {limit}, "
                    f"so a prompt may have at most {limit - 1} tokens"
                )
            if p.stop and self.tokenizer is None:
                raise EngineError(f"prompt {i}: stop strings need a tokenizer; use stop_token_ids instead")
            # text is kept while decoding only when stop strings or a stream need it; else decoded once
            needs_text = self.tokenizer is not None and (stream or bool(p.stop))
            detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens) if needs_text else None
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
            max_new = min(p.max_tokens, limit - len(ids))  # the context ends generation as "length"
            rows.append(Request(list(ids), p, max_new, stop_ids, detok))
        return rows

    @torch.inference_mode()
    def _start(self, rows: list[Request]) -> _Batch:
        """Prefill ``rows`` into a fresh left-padded cache and pick each row's first token."""
        model, dev = self.model, self.device
        P = max(len(r.prompt) for r in rows)
        cache = model.new_cache(len(rows), P + max(r.max_new for r in rows))
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            r.pad = P - len(r.prompt)
            groups.setdefault(len(r.prompt), []).append(i)
        if len(groups) == 1:
            ids = torch.tensor([r.prompt for r in rows], device=dev)
            logits_BV = model(ids, cache=cache).logits[:, -1]
        else:
            logits_BV = torch.empty(len(rows), self.cfg.vocab_size, device=dev)
            for length, members in groups.items():
                idx = torch.tensor(members, device=dev)
                part = model.new_cache(len(members), length)
                ids = torch.tensor([rows[i].prompt for i in members], device=dev)
                logits_BV[idx] = model(ids, cache=part).logits[:, -1].float()
                for layer in range(self.cfg.n_layers):
                    cache.k[layer][idx, :, P - length : P] = part.k[layer]
                    cache.v[layer][idx, :, P - length : P] = part.v[layer]
            cache.advance(P)
        key_padding = None
        if len(groups) > 1:
            key_padding = torch.ones(len(rows), cache.max_len, dtype=torch.bool, device=dev)
            for i, r in enumerate(rows):
                key_padding[i, : r.pad] = False
        sampler = BatchSampler.build(
            [r.params for r in rows],
            [r.prompt for r in rows],
            [r.max_new for r in rows],
            self.cfg.vocab_size,
            dev,
        )
        positions = torch.tensor([len(r.prompt) for r in rows], device=dev)
        batch = _Batch(rows, cache, sampler, key_padding, positions, next_B=positions)  # next_B: set by _pick
        self._pick(batch, logits_BV)
        return batch

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        """One decode step for every row still in the batch."""
        cache = batch.cache
        kp = batch.key_padding_BS[:, : cache.length + 1] if batch.key_padding_BS is not None else None
        out = self.model(
            batch.next_B[:, None], positions_BT=batch.positions_B[:, None], cache=cache, key_padding_BS=kp
        )
        batch.positions_B = batch.positions_B + 1
        self._pick(batch, out.logits[:, -1])

    def _pick(self, batch: _Batch, logits_BV: torch.Tensor) -> None:
        """Sample the next token of every row, update the rows, and drop finished rows when few remain."""
        logits_BV = logits_BV.float()
        if self.vocab_limit is not None:
            logits_BV[:, self.vocab_limit :] = float("-inf")
        tokens_B = batch.sampler.sample(logits_BV, batch.step)
        batch.step += 1
        want_lp = any(r.params.logprobs for r in batch.rows)
        lp = (
            torch.log_softmax(logits_BV, -1).gather(1, tokens_B[:, None]).squeeze(1).tolist()
            if want_lp
            else None
        )
        for i, (row, tok) in enumerate(zip(batch.rows, tokens_B.tolist(), strict=True)):
            if row.finish_reason is None:
                row.accept(tok, lp[i] if lp is not None else None)
        batch.next_B = tokens_B
        live = [i for i, r in enumerate(batch.rows) if r.finish_reason is None]
        if live and len(live) <= len(batch.rows) // 2:
            idx = torch.tensor(live, device=self.device)
            batch.cache.keep_rows(idx)
            batch.sampler.keep_rows(idx)
            batch.rows = [batch.rows[i] for i in live]
            batch.next_B, batch.positions_B = tokens_B[idx], batch.positions_B[idx]
            if batch.key_padding_BS is not None:
                batch.key_padding_BS = batch.key_padding_BS[idx] if any(r.pad for r in batch.rows) else None


def _find_tokenizer(ckpt: Path, state: dict[str, Any]) -> Path | None:
    """A tokenizer directory near ``ckpt`` (itself, ``checkpoints/``, the run, the run's parent), else the
    ``data.tokenizer`` of the training config saved in ``state``, if it still exists."""
    for d in [ckpt, *list(ckpt.parents)[:3]]:
        for cand in (d, d / "tokenizer"):
            if (cand / "tokenizer.json").is_file():
                return cand
    configured = ((state.get("config") or {}).get("data") or {}).get("tokenizer")
    if configured and (Path(configured) / "tokenizer.json").is_file():
        return Path(configured)
    return None
