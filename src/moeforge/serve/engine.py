"""The inference engine: batched KV-cache decoding of a :class:`MoETransformer` with per-request sampling.

Whole requests: :meth:`Engine.generate` completes a list of prompts (split into batches of similar
length), :meth:`Engine.stream` yields one prompt's text as it grows, :meth:`Engine.chat` and
:meth:`Engine.stream_chat` do the same for ChatML messages.

Step by step, for a caller that schedules several requests itself (the server does):

* :meth:`Engine.prepare` validates and tokenizes one prompt into a :class:`Request` (no model work);
* :meth:`Engine.start_batch` prefills up to ``max_batch`` requests together and picks each one's first
  token, returning a :class:`~moeforge.serve.batch.Batch`;
* :meth:`Batch.step` generates the next token of every request still running, until ``batch.finished``;
  each request's ``tokens``, ``text`` and ``finish_reason`` grow meanwhile, and :meth:`Request.completion`
  gives the result;
* :meth:`Request.cancel` ends one request early; its batch drops it (see :mod:`moeforge.serve.batch`).

A batch takes no new requests once started: a caller that wants to decode newcomers while a batch runs
starts another batch and steps both.

Batched results equal unbatched ones up to float rounding (different matmul shapes), with one caveat:
an MoE model with a ``capacity_factor`` drops tokens depending on what else is in the forward, as in
training. The engine is not thread-safe; a server serializes calls into it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeforge.model.transformer import MoETransformer
from moeforge.serve.batch import Batch, prefill
from moeforge.serve.chat import ChatError, chat_messages, chat_text, encode_chat, plain_tokenizer
from moeforge.serve.decode import Decoder, fast_decode_supported
from moeforge.serve.request import Completion, FinishReason, Request
from moeforge.serve.sampling import IncrementalDetokenizer, SamplingParams
from moeforge.serve.scoring import TokenScores, score_sequences
from moeforge.serve.threads import DecodeThreads, threads_from_env
from moeforge.tokens.chat_spec import ChatSpec, apply_default_system, load_chat_spec
from moeforge.tokens.tokenizer import special_token_name

__all__ = ["Engine", "EngineError", "PromptTooLongError", "StreamChunk"]

log = logging.getLogger(__name__)


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


class Engine:
    """Generate from a :class:`MoETransformer`: batched, KV-cached, with per-request sampling settings.

    ``tokenizer`` (a ``tokenizers.Tokenizer``) is needed for text prompts, stop strings, chat and text
    output; without it the engine takes and returns token ids only. ``eos_ids`` end every request not
    marked ``ignore_eos`` (default: the tokenizer's ``<|endoftext|>``). ``max_batch`` rows decode
    together; more prompts are split into batches of similar length. The model is put in eval mode
    (no router noise). Ids the model has but the tokenizer does not (a vocabulary rounded up for
    speed) are never generated. ``fast_decode`` (default: on for a float32 model on CPU) decodes through
    :class:`~moeforge.serve.decode.Decoder`, which keeps a decode-friendly copy of the weights (about 2.5x
    their size) and is 1.7-2x faster on CPU; False uses the model's own forward for every step.
    ``decode_threads`` fixes the thread count of its decode steps on CPU (the decode path's or the
    model's forward); None (default) takes
    ``MOEFORGE_DECODE_THREADS`` if set, else chooses per step from the batch size and how busy the
    machine is (:mod:`moeforge.serve.threads`); torch's own thread setting is back after each step, or
    after the whole batch inside :meth:`generate` and :meth:`stream` (:meth:`decode_scope`).
    """

    def __init__(
        self,
        model: MoETransformer,
        tokenizer: Any = None,
        *,
        device: torch.device | str | None = None,
        max_batch: int = 8,
        eos_ids: Sequence[int] | None = None,
        fast_decode: bool | None = None,
        chat_spec: ChatSpec | None = None,
        tokenizer_config: Mapping[str, Any] | None = None,
        decode_threads: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1 (got {max_batch})")
        self.device = torch.device(device) if device is not None else model.embed.weight.device
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.chat_spec = chat_spec or ChatSpec()
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
        self.tokenizer_config = dict(tokenizer_config or {})
        if eos_ids is None:  # <|endoftext|> and the tokenizer config's eos_token (<|im_end|> for SmolLM2)
            names = ["<|endoftext|>", special_token_name(self.tokenizer_config.get("eos_token"))]
            found = [tokenizer.token_to_id(n) for n in names if n] if tokenizer is not None else []
            eos_ids = sorted({i for i in found if i is not None})
        self.eos_ids = frozenset(eos_ids)
        supported = fast_decode_supported(self.model)
        if fast_decode and not supported:
            raise EngineError("fast_decode needs a float32 model on CPU (on GPU the model's forward is used)")
        if decode_threads is None:
            try:
                decode_threads = threads_from_env()
            except ValueError as exc:
                raise EngineError(str(exc)) from None
        if decode_threads is not None and decode_threads < 1:
            raise EngineError(
                f"decode_threads must be >= 1, or None to choose per step (got {decode_threads})"
            )
        use_decoder = (fast_decode is None and supported) or bool(fast_decode)
        # the thread policy holds on CPU with or without the decode path: the model's own forward makes as
        # many small multi-threaded calls per step, and suffers the same barrier waits on a busy machine
        on_cpu = self.model.embed.weight.device.type == "cpu"
        self.threads: DecodeThreads | None = DecodeThreads(decode_threads) if on_cpu else None
        self.decoder = Decoder(self.model, max_batch, threads=self.threads) if use_decoder else None
        if self.decoder is not None:
            log.info(
                "CPU decode path on: %.0f MB of decode-friendly weights (fast_decode=False to save them)",
                self.decoder.nbytes / 1e6,
            )

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
        fast_decode: bool | None = None,
        decode_threads: int | None = None,
    ) -> Engine:
        """An engine for a trainer checkpoint (``model.safetensors`` + ``state.json`` with ``model_config``)
        or a run directory (its latest checkpoint). ``tokenizer``: a tokenizer, a path to one, or None to
        use a ``tokenizer.json`` in or up to three levels above the checkpoint, else the one the training
        config names. Weights load strictly; a tied LM head may be stored once or twice."""
        from moeforge.pretrained import ModelImportError, find_checkpoint_tokenizer, load_model
        from moeforge.tokens.tokenizer import load_tokenizer, read_tokenizer_config

        dev = torch.device(device) if device is not None else torch.device("cpu")
        try:
            model, state = load_model(path, device=dev)
        except ModelImportError as exc:
            raise EngineError(str(exc)) from None
        ckpt = Path(state["path"]).resolve()
        cfg = model.cfg
        if dtype is not None:
            model.to(dtype)
        if tokenizer is None:
            tokenizer = find_checkpoint_tokenizer(ckpt, state)
            if tokenizer is None:
                log.warning("%s: no tokenizer.json found near the checkpoint; token-id prompts only", ckpt)
        chat_spec = None
        tok_config: dict[str, Any] = {}
        if isinstance(tokenizer, (str, os.PathLike)):
            chat_spec = load_chat_spec(tokenizer)  # an imported model's template: default system turn
            tok_config = read_tokenizer_config(tokenizer)
            tokenizer = load_tokenizer(tokenizer)
        log.info("loaded %s (%s) on %s", ckpt, cfg.name, dev)
        return cls(
            model,
            tokenizer,
            device=dev,
            max_batch=max_batch,
            eos_ids=eos_ids,
            fast_decode=fast_decode,
            chat_spec=chat_spec,
            tokenizer_config=tok_config,
            decode_threads=decode_threads,
        )

    # ---- text -----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of raw ``text``: special-token strings such as ``<|im_start|>`` become their single
        id, as in training text (``/v1/completions`` takes such raw prompts). Chats go through
        :meth:`chat_ids`, which keeps them out of message content."""
        if self.tokenizer is None:
            raise EngineError("a text prompt needs a tokenizer; pass token ids or create the Engine with one")
        self.check_text_fits(len(text), "the prompt")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    @functools.cached_property
    def _longest_token_chars(self) -> int:
        """The longest vocabulary entry in characters: one token covers at most that many characters of
        text (byte-level entries spell one byte per character, and a character is at least one byte)."""
        return max((len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def check_text_fits(self, n_chars: int, what: str) -> None:
        """Raise :class:`PromptTooLongError` when text of ``n_chars`` characters cannot fit the context
        whatever its tokens: it would take more than ``max_seq_len`` tokens even if every token were the
        vocabulary's longest. A cheap bound checked before tokenizing, so a megabyte of text is refused
        without being encoded; prompts that pass are checked exactly after encoding."""
        if self.tokenizer is None:
            return
        bound = self.cfg.max_seq_len * self._longest_token_chars
        if n_chars > bound:
            raise PromptTooLongError(
                f"{what} has {n_chars:,} characters, more than the model's context of {self.cfg.max_seq_len} "
                f"tokens can hold (at most {self._longest_token_chars} characters a token); shorten it"
            )

    def chat_prompt(self, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> str:
        """The ChatML text of ``messages`` (the tokenizer's chat template) opening an assistant turn, with
        a first system turn ``system_prompt`` when given. For reading; decode :meth:`chat_ids`, since
        :meth:`encode` of this text would make special-token strings in the messages special tokens."""
        return chat_text(self._messages(messages, system_prompt))

    def chat_ids(self, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> list[int]:
        """Token ids of :meth:`chat_prompt` in which only the template's markers are special tokens: text
        in ``messages`` (untrusted, from API clients) is tokenized as plain text, so ``<|im_end|>`` or
        ``<|oracle_sys|>`` written in a message can neither end a turn nor claim an identity.
        ``system_prompt`` is the operator's and trusted: its special tokens (an identity token) keep their
        ids. Equal to ``encode(chat_prompt(...))`` when the messages hold no special-token strings."""
        msgs = self._messages(messages, system_prompt)
        self.check_text_fits(sum(len(m["content"]) for m in msgs), "the chat")
        if self.tokenizer is None:
            raise EngineError("chat needs a tokenizer with the ChatML tokens (`moeforge tokenizer train`)")
        try:
            return encode_chat(self.tokenizer, self._plain, msgs, trusted_system=system_prompt is not None)
        except ChatError as exc:
            raise EngineError(str(exc)) from None

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
        return self.generate([self.chat_ids(messages, system_prompt)], self.chat_params(params))[0]

    def stream_chat(
        self,
        messages: Sequence[dict[str, str]],
        params: SamplingParams | None = None,
        *,
        system_prompt: str | None = None,
    ) -> Iterator[StreamChunk]:
        """:meth:`chat`, streamed as :meth:`stream` does."""
        return self.stream(self.chat_ids(messages, system_prompt), self.chat_params(params))

    def _messages(
        self, messages: Sequence[dict[str, str]], system_prompt: str | None
    ) -> list[dict[str, str]]:
        """Checked messages, opened by ``system_prompt`` or else by the model's default system turn (an
        imported template's, see :mod:`moeforge.tokens.chat_spec`) when they have no system turn."""
        if self.chat_spec.format != "chatml":
            raise EngineError(
                f"this model's chat template is not ChatML ({self.chat_spec.reason}); moeforge renders ChatML "
                "only, so use /v1/completions with a prompt rendered by the model's own template"
            )
        try:
            msgs = chat_messages(messages, system_prompt)
        except ChatError as exc:
            raise EngineError(str(exc)) from None
        return apply_default_system(msgs, self.chat_spec)

    @functools.cached_property
    def _plain(self) -> Any:
        """The tokenizer reading special-token strings as text (built on first use: it copies the vocab)."""
        try:
            return plain_tokenizer(self.tokenizer)
        except ChatError as exc:
            raise EngineError(str(exc)) from None

    # ---- generation -----------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[list[int] | str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Complete every prompt (text or token ids); ``params`` is one setting for all or one per prompt.
        Returns the completions in prompt order. Raises :class:`EngineError` for a bad request."""
        if isinstance(prompts, str):
            raise EngineError("prompts must be a list of prompts; wrap a single prompt as [prompt]")
        prompts = list(prompts)
        if not prompts:
            raise EngineError("prompts is empty; pass at least one prompt")
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts):
                raise EngineError(
                    f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts; pass one or one each"
                )
        requests = [
            self._prepare(prompt, p, stream=False, what=f"prompt {i}")
            for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True))
        ]
        order = sorted(
            range(len(requests)), key=lambda i: -len(requests[i].prompt)
        )  # similar lengths pad less
        for start in range(0, len(order), self.max_batch):
            group = [requests[i] for i in order[start : start + self.max_batch]]
            with self.decode_scope(len(group)):
                batch = self.start_batch(group)
                while not batch.finished:
                    batch.step()
        return [r.completion(self.tokenizer) for r in requests]

    def decode_scope(self, rows: int) -> contextlib.AbstractContextManager[int | None]:
        """A scope that runs a batch of ``rows`` requests, prefill, steps and sampling, on the decode
        thread policy's count (:mod:`moeforge.serve.threads`), and puts the caller's torch thread count
        back when it ends. :meth:`generate` and :meth:`stream` use it; a caller stepping batches itself
        wraps its :meth:`start_batch` and :meth:`Batch.step` calls in it (outside it, only each step's
        forward follows the policy). A no-op off the CPU."""
        if self.threads is None:
            return contextlib.nullcontext()
        return self.threads.hold(rows)

    def stream(self, prompt: list[int] | str, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Complete one prompt, yielding text as it is generated. Text that could be the start of a stop
        string is held back until it is known not to be one, so a stop string never appears, even in part."""
        request = self.prepare(prompt, params, stream=True)
        with self.decode_scope(1):  # held per call: the consumer's code runs between the chunks
            batch = self.start_batch([request])
        sent_text = sent_ids = 0
        while request.finish_reason is None:
            upto = request.stable_text_len()
            if upto > sent_text:
                yield StreamChunk(request.text[sent_text:upto], request.tokens[sent_ids:])
                sent_text, sent_ids = upto, len(request.tokens)
            with self.decode_scope(1):
                batch.step()
        completion = request.completion(self.tokenizer)
        yield StreamChunk(
            completion.text[sent_text:], request.tokens[sent_ids:], request.finish_reason, completion
        )

    # ---- scoring --------------------------------------------------------------------------------------

    def score(
        self,
        sequences: Sequence[list[int] | str],
        starts: Sequence[int] | int = 1,
        *,
        top_k: int = 0,
    ) -> list[TokenScores]:
        """The log-probability of every token of each sequence (text or ids) from ``starts[i]`` on, given
        the tokens before it, with greedy flags and the ``top_k`` alternatives: what ``echo`` + ``logprobs``
        and lm-eval's loglikelihood requests need (:func:`moeforge.serve.scoring.score_sequences`: batched
        by length, shared contexts computed once). Raises :class:`EngineError` for a bad request."""
        if isinstance(sequences, str):
            raise EngineError("sequences must be a list; wrap a single sequence as [sequence]")
        ids = [self.encode(s) if isinstance(s, str) else s for s in sequences]
        for i, x in enumerate(ids):
            if not isinstance(x, (list, tuple)) or not all(isinstance(t, int) for t in x):
                raise EngineError(f"sequence {i} must be a string or a list of token ids")
            if not x:
                raise EngineError(f"sequence {i} is empty")
        try:
            return score_sequences(self.model, ids, starts, top_k=top_k)
        except ValueError as exc:
            raise EngineError(str(exc)) from None

    # ---- step by step ---------------------------------------------------------------------------------

    def prepare(
        self, prompt: list[int] | str, params: SamplingParams | None = None, *, stream: bool = False
    ) -> Request:
        """A :class:`Request` for ``prompt`` (text or token ids), validated and tokenized, for
        :meth:`start_batch`; no model work. ``stream``: keep the text as it grows (else it is decoded once
        at the end, unless stop strings need it). Raises :class:`EngineError` (:class:`PromptTooLongError`
        when the prompt leaves no room in the context)."""
        return self._prepare(prompt, params or SamplingParams(), stream=stream, what="the prompt")

    def start_batch(self, requests: Sequence[Request]) -> Batch:
        """Prefill up to ``max_batch`` new requests together and pick each one's first token (a request
        may finish right there). Step the returned batch until ``batch.finished``."""
        requests = list(requests)
        if not 1 <= len(requests) <= self.max_batch:
            raise EngineError(f"a batch takes 1 to max_batch={self.max_batch} requests (got {len(requests)})")
        for i, r in enumerate(requests):
            if r.tokens or r.done:
                raise EngineError(f"request {i} has already run; prepare a new one")
        if self.decoder is not None:
            self.decoder.refresh()  # the model's weights may have changed since the last batch
        return prefill(self.model, requests, self.vocab_limit, self.decoder, self.threads)

    def _prepare(self, prompt: list[int] | str, p: SamplingParams, *, stream: bool, what: str) -> Request:
        limit = self.cfg.max_seq_len
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
            raise EngineError(f"{what} must be a string or a list of token ids (got {type(prompt).__name__})")
        if not ids:
            raise EngineError(f"{what} is empty; a prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise EngineError(f"{what} has token ids outside 0..{self.cfg.vocab_size - 1}: {bad[:5]}")
        if len(ids) >= limit:
            raise PromptTooLongError(
                f"{what} has {len(ids)} tokens; the model's context (max_seq_len) is {limit}, "
                f"so a prompt may have at most {limit - 1} tokens"
            )
        if p.stop and self.tokenizer is None:
            raise EngineError(f"{what}: stop strings need a tokenizer; use stop_token_ids instead")
        # text is kept while decoding only when stop strings or a stream need it; else decoded once
        needs_text = self.tokenizer is not None and (stream or bool(p.stop))
        detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens) if needs_text else None
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
        max_new = min(p.max_tokens, limit - len(ids))  # the context ends generation as "length"
        return Request(list(ids), p, max_new, stop_ids, detok)
