"""lm-evaluation-harness's ``LM`` over moeforge's engine, registered as ``moeforge``.

``lm_eval --model moeforge --model_args checkpoint=DIR`` (after ``import moeforge.harness.lm``, which
``moeforge eval`` and ``python -m moeforge.harness`` do) or ``MoeforgeLM(checkpoint=DIR)`` in Python.

The three request types and what answers them:

- ``loglikelihood`` (multiple choice): lm-eval's own ``TemplateLM`` splits each ``(context,
  continuation)`` into token ids exactly as its ``hf`` backend does (the context's trailing spaces move to
  the continuation; ``context + continuation`` is encoded whole and split at the context's length; an empty
  context is the prefix token). :func:`moeforge.serve.scoring.score_sequences` scores them: sorted by
  length, batched, and every context shared by several continuations computed once.
- ``loglikelihood_rolling`` (perplexity): lm-eval's disjoint rolling windows of ``max_length`` tokens, each
  window scored like a loglikelihood request.
- ``generate_until``: greedy (or the task's sampling settings) through :meth:`Engine.generate`, batched,
  stopping at the task's ``until`` strings and the end-of-text token.

Tokenization follows ``hf`` so scores are comparable with it: ``tok_encode`` applies the tokenizer's own
post-processing unless told not to (``add_special_tokens``), and the prefix token of an empty context is the
tokenizer config's ``bos_token``, else its ``eos_token``, as ``transformers`` loads them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from moeforge.serve.engine import Engine, EngineError
from moeforge.serve.sampling import SamplingParams
from moeforge.serve.scoring import score_sequences
from moeforge.tokens.tokenizer import special_token_name

__all__ = ["HarnessError", "MoeforgeLM"]

log = logging.getLogger(__name__)

# requests scored per call: big enough to batch and share contexts, small enough for a live progress bar
_CHUNK = 64


class HarnessError(ValueError):
    """A model the harness cannot evaluate (no tokenizer, a bad argument); the message says what to do."""


@register_model("moeforge")
class MoeforgeLM(TemplateLM):
    """See the module docstring. ``checkpoint``: a moeforge checkpoint or run directory (imported models
    included). ``batch_size``: rows per generation batch (scoring batches by tokens); ``max_length``: the
    context used for truncation and rolling windows (default the model's ``max_seq_len``);
    ``max_gen_toks``: the generation limit when a task sets none; ``prefix_token_id`` overrides the prefix
    token of empty contexts."""

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        engine: Engine | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            log.warning("moeforge LM: ignoring model_args it does not know: %s", ", ".join(sorted(kwargs)))
        if engine is None:
            if checkpoint is None:
                raise HarnessError(
                    "--model_args checkpoint=DIR is required (a moeforge checkpoint or run directory)"
                )
            rows = _rows(batch_size, max_batch_size)
            try:
                engine = Engine.from_checkpoint(checkpoint, device=_device(device), max_batch=rows)
            except EngineError as exc:
                raise HarnessError(str(exc)) from None
        if engine.tokenizer is None:
            raise HarnessError(
                f"{checkpoint}: no tokenizer found near the checkpoint; lm-eval needs text → tokens "
                "(train from `moeforge data tokenize` output, or import a model with its tokenizer)"
            )
        self.engine = engine
        self._device = engine.device
        self.tokenizer = engine.tokenizer
        self._max_length = int(max_length or engine.cfg.max_seq_len)
        if not 1 <= self._max_length <= engine.cfg.max_seq_len:
            raise HarnessError(
                f"max_length must be in 1..{engine.cfg.max_seq_len}, the model's context (got {self._max_length})"
            )
        self.max_gen_toks = int(max_gen_toks)
        tcfg = engine.tokenizer_config  # what transformers reads: bos/eos as the hf backend sees them
        self._eot = self._resolve_id(special_token_name(tcfg.get("eos_token")))
        if self._eot is None:
            self._eot = min(engine.eos_ids) if engine.eos_ids else self.tokenizer.token_to_id("<|endoftext|>")
        if self._eot is None:
            raise HarnessError("the tokenizer has no end-of-text token (eos_token / <|endoftext|>)")
        bos = self._resolve_id(special_token_name(tcfg.get("bos_token")))
        self._prefix = (
            prefix_token_id if prefix_token_id is not None else (bos if bos is not None else self._eot)
        )

    def _resolve_id(self, name: str | None) -> int | None:
        return self.tokenizer.token_to_id(name) if name else None

    # ---- what TemplateLM asks for ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self._eot)

    @property
    def prefix_token_id(self) -> int:
        return int(self._prefix)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # as hf: the tokenizer's own post-processing unless told; none when the text starts with the prefix
        add = True if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(
            self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
        ):
            add = False
        ids = list(self.tokenizer.encode(string, add_special_tokens=add).ids)
        left = kwargs.get("left_truncate_len")
        return ids[-left:] if left else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens))

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        seqs, starts = [], []
        for _, ctx, cont in requests:
            if not cont:
                raise HarnessError("a loglikelihood request has an empty continuation; nothing to score")
            whole = (ctx + cont)[-(self.max_length + 1) :]  # as hf: keep the last max_length + 1 tokens
            seqs.append(whole)
            starts.append(max(1, len(whole) - len(cont)))
        # keep requests that share a context together (one computation), longest groups first
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), tuple(seqs[i][: starts[i]]), i))
        order = _group_contexts(order, seqs, starts)
        out: list[tuple[float, bool] | None] = [None] * len(seqs)
        with tqdm(total=len(seqs), desc="moeforge loglikelihood", disable=disable_tqdm) as bar:
            for a in range(0, len(order), _CHUNK):
                part = order[a : a + _CHUNK]
                scores = score_sequences(
                    self.engine.model, [seqs[i] for i in part], [starts[i] for i in part]
                )
                for i, s in zip(part, scores, strict=True):
                    out[i] = (s.total, s.is_greedy)
                    key = requests[i][0]
                    if key is not None:  # None: a rolling window, cached by loglikelihood_rolling as a whole
                        self.cache_hook.add_partial("loglikelihood", key, out[i])
                bar.update(len(part))
        return [o for o in out if o is not None]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[int, tuple[None, list[int], list[int]]]] = []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((r, (None, ctx, cont)))
        scores = self._loglikelihood_tokens(
            [(None, ctx, cont) for _, (_, ctx, cont) in windows], disable_tqdm=disable_tqdm
        )
        totals = [0.0] * len(requests)
        for (r, _), (lp, _) in zip(windows, scores, strict=True):
            totals[r] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        with tqdm(total=len(requests), desc="moeforge generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = int(kwargs.pop("max_gen_toks"))
                if max_gen >= self.max_length:
                    raise HarnessError(
                        f"the task asks for {max_gen} generated tokens but the model's context is {self.max_length}"
                    )
                params = _sampling(kwargs, max_gen, until, self.eot_token_id)
                for a in range(0, len(members), self.engine.max_batch):
                    part = members[a : a + self.engine.max_batch]
                    prompts = [
                        self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen) :] for i in part
                    ]
                    for i, c in zip(part, self.engine.generate(prompts, params), strict=True):
                        text = postprocess_generated_text(generation=c.text, stop=until, think_end_token=None)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(part))
        return [o if o is not None else "" for o in out]

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's ChatML text (with an imported model's default system turn), opening an assistant
        turn; lm-eval's ``--apply_chat_template`` uses it. Without the opening when not asked for."""
        try:
            text = self.engine.chat_prompt(chat_history)
        except EngineError as exc:
            raise HarnessError(str(exc)) from None
        opening = "<|im_start|>assistant\n"
        if not add_generation_prompt and text.endswith(opening):
            text = text[: -len(opening)]
        return text

    @property
    def tokenizer_name(self) -> str:
        return "moeforge"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "chatml" if chat_template else None


def _device(device: str | None) -> str:
    """The device to load on: ``device`` when this machine has it, else the CPU. lm-eval's CLI passes
    ``cuda:0`` when ``--device`` is not given; its ``hf`` model falls back to the CPU then, and so does
    this one (with a warning) instead of failing deep in torch."""
    import torch

    if not device:
        return "cpu"
    kind = str(device).split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        log.warning("moeforge LM: device %s asked for but CUDA is not available; using the CPU", device)
        return "cpu"
    if kind == "mps" and not torch.backends.mps.is_available():
        log.warning("moeforge LM: device %s asked for but MPS is not available; using the CPU", device)
        return "cpu"
    return str(device)


def _rows(batch_size: int | str | None, max_batch_size: int | None) -> int:
    if batch_size in (None, "auto") or (isinstance(batch_size, str) and batch_size.startswith("auto")):
        return int(max_batch_size or 8)
    try:
        rows = int(batch_size)
    except (TypeError, ValueError):
        raise HarnessError(f"batch_size must be a positive integer or auto (got {batch_size!r})") from None
    if rows < 1:
        raise HarnessError(f"batch_size must be a positive integer (got {rows})")
    return rows


def _group_contexts(order: Iterable[int], seqs: list[list[int]], starts: list[int]) -> list[int]:
    """``order`` with the requests of one context next to each other (at the first one's place)."""
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i in order:
        by_ctx.setdefault(tuple(seqs[i][: starts[i]]), []).append(i)
    return [i for members in by_ctx.values() for i in members]


def _sampling(kwargs: dict[str, Any], max_gen: int, until: list[str], eot: int) -> SamplingParams:
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
    top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
    top_k = int(kwargs.pop("top_k", 0) or 0)
    seed = kwargs.pop("seed", None)
    if kwargs:
        log.debug("generation settings the engine does not use: %s", ", ".join(sorted(kwargs)))
    return SamplingParams(
        max_tokens=max_gen,
        temperature=temperature,
        top_p=top_p if do_sample else 1.0,
        top_k=top_k if do_sample else 0,
        stop=[s for s in until if s],
        stop_token_ids=[eot],
        seed=int(seed) if seed is not None else None,
    )
