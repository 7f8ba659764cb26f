"""A decode batch: requests of any prompt lengths prefilled into one KV cache and advanced one token a step.

Prompts of different lengths share one KV cache of ``P + N`` slots (``P`` the longest prompt, ``N`` the
most new tokens any row may take) and are *left-padded*: row ``b``'s prompt fills slots ``[P - L_b, P)``
and its new tokens the slots from ``P`` on, so every row writes the same slot at every step and one
forward serves the whole batch. A key-padding mask hides the empty slots, and RoPE positions are per row
(``slot - (P - L_b)``), so each row sees exactly the keys and positions it would see alone. Prompts are
prefilled in groups of equal length without padding (a padded *query* would have no key to attend to,
and SDPA returns NaN for it) and their keys and values copied into the shared cache; a batch whose
prompts all have one length needs neither the copy nor the mask.

Per step the batch runs one forward of ``[B, 1]`` tokens (through the engine's CPU
:class:`~moeforge.serve.decode.Decoder` when it has one), samples all rows with one vectorized
:class:`~moeforge.serve.sampling.BatchSampler` call and moves the chosen ids to the CPU with one
``tolist()`` for the stop checks. Log-probabilities (the chosen token's, and the ``top_logprobs`` most
likely tokens) are computed only in steps where a running row asks for them. Rows finish independently (stop token, stop string, ``max_tokens`` or
the model's context) or are cancelled; once at most half of the batch is still running, the done rows
are dropped from the cache.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from moeforge.model.layers import KVCache
from moeforge.model.transformer import MoETransformer
from moeforge.serve.decode import Decoder
from moeforge.serve.request import Request
from moeforge.serve.sampling import BatchSampler
from moeforge.serve.threads import DecodeThreads

__all__ = ["Batch", "prefill"]


@dataclass(eq=False, repr=False)  # the repr would print the model
class Batch:
    """Requests decoding together; made by :meth:`Engine.start_batch`, which prefills them and picks
    each one's first token. :meth:`step` generates the next token of every request still running.

    ``requests`` are the rows still in the cache: done rows (finished or cancelled) stay until at most
    half of the rows run, then leave together. A batch cannot take new requests once it has started.
    Not thread-safe: one thread steps a batch and cancels its requests.
    """

    model: MoETransformer
    vocab_limit: int | None  # ids from here on are never sampled (the tokenizer lacks them)
    requests: list[Request]
    cache: KVCache
    sampler: BatchSampler
    key_padding_BS: torch.Tensor | None
    positions_B: torch.Tensor
    next_B: torch.Tensor
    decoder: Decoder | None = None  # the CPU decode path (moeforge.serve.decode), else the model's forward
    threads: DecodeThreads | None = None  # the thread policy of a forward step (the decoder has its own)
    steps: int = 0  # tokens sampled per row so far, the prefill's included

    @property
    def finished(self) -> bool:
        """Whether every request is done, so :meth:`step` has nothing left to do."""
        return all(r.done for r in self.requests)

    @torch.inference_mode()
    def step(self) -> None:
        """One forward and one new token for every running request; a no-op once :attr:`finished`."""
        if self.finished:
            return
        cache = self.cache
        kp = self.key_padding_BS[:, : cache.length + 1] if self.key_padding_BS is not None else None
        if self.decoder is not None:
            logits_BV = self.decoder.step(self.next_B, self.positions_B, cache, kp)
        else:
            scope = self.threads.use(len(self.requests)) if self.threads is not None else nullcontext()
            with scope:
                logits_BV = self.model(
                    self.next_B[:, None],
                    positions_BT=self.positions_B[:, None],
                    cache=cache,
                    key_padding_BS=kp,
                ).logits[:, -1]
        self.positions_B = self.positions_B + 1
        self._pick(logits_BV)

    def _pick(self, logits_BV: torch.Tensor) -> None:
        """Sample the next token of every row, update the rows, and drop done rows when few remain."""
        logits_BV = logits_BV.float()
        # log-probabilities only when a row asks: the model's own distribution over its whole vocabulary
        # (before the vocabulary limit, penalties, temperature and filters), as scoring reports them
        live_params = [r.params for r in self.requests if not r.done]
        k = max((p.top_logprobs for p in live_params), default=0)
        logp_BV = torch.log_softmax(logits_BV, -1) if k or any(p.logprobs for p in live_params) else None
        if self.vocab_limit is not None:
            logits_BV[:, self.vocab_limit :] = float("-inf")
        tokens_B = self.sampler.sample(logits_BV, self.steps)
        self.steps += 1
        lp = top_ids = top_lps = None
        if logp_BV is not None:
            lp = logp_BV.gather(1, tokens_B[:, None]).squeeze(1).tolist()
            if k:
                values, ids = torch.topk(logp_BV, min(k, logp_BV.shape[-1]), dim=-1)
                top_ids, top_lps = ids.tolist(), values.tolist()
        for i, (row, tok) in enumerate(zip(self.requests, tokens_B.tolist(), strict=True)):
            if not row.done:
                top = None
                if top_ids is not None and top_lps is not None and row.params.top_logprobs:
                    top = list(zip(top_ids[i], top_lps[i], strict=True))
                row.accept(tok, lp[i] if lp is not None else None, top)
        self.next_B = tokens_B
        live = [i for i, r in enumerate(self.requests) if not r.done]
        if live and len(live) <= len(self.requests) // 2:
            idx = torch.tensor(live, device=tokens_B.device)
            self.cache.keep_rows(idx)
            self.sampler.keep_rows(idx)
            self.requests = [self.requests[i] for i in live]
            self.next_B, self.positions_B = tokens_B[idx], self.positions_B[idx]
            if self.key_padding_BS is not None:
                self.key_padding_BS = self.key_padding_BS[idx] if any(r.pad for r in self.requests) else None


@torch.inference_mode()
def prefill(
    model: MoETransformer,
    requests: list[Request],
    vocab_limit: int | None = None,
    decoder: Decoder | None = None,
    threads: DecodeThreads | None = None,
) -> Batch:
    """Prefill ``requests`` into a fresh left-padded cache on the model's device and pick each one's
    first token; the caller has validated them (:meth:`Engine.prepare`). Decode steps go through
    ``decoder`` when given, else through the model's forward on ``threads``' count per step."""
    cfg, dev = model.cfg, model.embed.weight.device
    P = max(len(r.prompt) for r in requests)
    cache = model.new_cache(len(requests), P + max(r.max_new for r in requests))
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        r.pad = P - len(r.prompt)
        groups.setdefault(len(r.prompt), []).append(i)
    if len(groups) == 1:
        ids = torch.tensor([r.prompt for r in requests], device=dev)
        logits_BV = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
    else:
        logits_BV = torch.empty(len(requests), cfg.vocab_size, device=dev)
        for length, members in groups.items():
            idx = torch.tensor(members, device=dev)
            part = model.new_cache(len(members), length)
            ids = torch.tensor([requests[i].prompt for i in members], device=dev)
            logits_BV[idx] = model(ids, cache=part, logits_to_keep=1).logits[:, -1].float()
            for layer in range(cfg.n_layers):
                cache.k[layer][idx, :, P - length : P] = part.k[layer]
                cache.v[layer][idx, :, P - length : P] = part.v[layer]
        cache.advance(P)
    key_padding = None
    if len(groups) > 1:
        key_padding = torch.ones(len(requests), cache.max_len, dtype=torch.bool, device=dev)
        for i, r in enumerate(requests):
            key_padding[i, : r.pad] = False
    sampler = BatchSampler.build(
        [r.params for r in requests],
        [r.prompt for r in requests],
        [r.max_new for r in requests],
        cfg.vocab_size,
        dev,
    )
    positions = torch.tensor([len(r.prompt) for r in requests], device=dev)
    batch = Batch(
        model,
        vocab_limit,
        list(requests),
        cache,
        sampler,
        key_padding,
        positions,
        positions,
        decoder,
        threads=None if decoder is not None else threads,
    )
    batch._pick(logits_BV)  # sets next_B
    return batch
