"""Scoring: the log-probability of each token of a sequence given the tokens before it.

What lm-evaluation-harness's ``loglikelihood`` and ``loglikelihood_rolling`` requests and the
completions API's ``echo`` + ``logprobs`` ask for. :func:`score_sequences` takes token-id sequences and,
for each, the first position to score (``start`` ≥ 1: token 0 has no context), and returns per scored
token its log-probability, whether it is the model's greedy choice (argmax of the logits) and, when asked,
the ``top_k`` most likely tokens with theirs.

How: sequences are sorted by length (longest first) and scored in batches of at most ``max_batch_tokens``
padded tokens, right-padded (a causal model's positions never see the padding after them), one forward
through the blocks; the final norm and the LM head run only on the positions that are scored, in slices
of ``head_rows`` rows, so a 2,000-token document over a 50k vocabulary never holds its full
``[T, V]`` logits. Log-softmax is computed in float32 whatever the model's dtype. A model with a
``capacity_factor`` (token drops depend on the whole batch) scores one sequence per forward, as a request
alone would be.

Sequences that share a prefix — the few-shot context of a multiple-choice question and its answers —
share its computation: with ``share_prefixes`` (the default) sequences are grouped by their first
``start`` tokens' common context, the context runs once into a KV cache and each group's continuations
run on top of it. The numbers equal the unshared forward's up to float rounding (the same operations on
fewer rows; a test pins 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moeforge.model.layers import KVCache, build_attention_mask
from moeforge.model.transformer import MoETransformer

__all__ = ["TokenScores", "score_sequences"]


@dataclass
class TokenScores:
    """Scores of ``ids[start:]`` of one sequence: ``logprobs[i]`` is log p(ids[start+i] | ids[:start+i]),
    ``greedy[i]`` whether that token is the argmax there, ``top[i]`` the ``top_k`` most likely
    ``(id, logprob)`` pairs at that position, most likely first (empty lists when ``top_k`` is 0)."""

    start: int
    ids: list[int]
    logprobs: list[float]
    greedy: list[bool]
    top: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


def _check(model: MoETransformer, seqs: Sequence[Sequence[int]], starts: Sequence[int]) -> None:
    limit = model.cfg.max_seq_len
    vocab = model.cfg.vocab_size
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        if len(s) > limit + 1:  # the last token is only a target, never an input
            raise ValueError(
                f"sequence {i} has {len(s)} tokens; the model's context (max_seq_len) is {limit}, so at most "
                f"{limit + 1} tokens can be scored together (the last one is never an input)"
            )
        if not 1 <= st <= len(s):
            raise ValueError(f"sequence {i}: start must be in 1..{len(s)} (got {st}); token 0 has no context")
        bad = [t for t in s if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"sequence {i} has token ids outside 0..{vocab - 1}: {bad[:5]}")


def _batches(lengths: list[int], order: list[int], max_batch_tokens: int, max_rows: int) -> list[list[int]]:
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:  # longest first: the first row of a batch sets its padded length
        if cur and ((len(cur) + 1) * lengths[cur[0]] > max_batch_tokens or len(cur) >= max_rows):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _head_scores(
    model: MoETransformer,
    h_MD: torch.Tensor,
    targets_M: torch.Tensor,
    top_k: int,
    head_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of ``targets`` at the residual states ``h`` (before the final norm), greedy flags and the
    top-k ids/log-probs, the LM head applied ``head_rows`` rows at a time."""
    lps, greedy, top_ids, top_lps = [], [], [], []
    for a in range(0, h_MD.shape[0], head_rows):
        logits = model.lm_head(model.norm(h_MD[a : a + head_rows])).float()
        logp = F.log_softmax(logits, dim=-1)
        t = targets_M[a : a + head_rows]
        lps.append(logp.gather(1, t[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == t)
        if top_k:
            v, ix = torch.topk(logp, top_k, dim=-1)
            top_ids.append(ix)
            top_lps.append(v)
    return (
        torch.cat(lps),
        torch.cat(greedy),
        torch.cat(top_ids) if top_k else None,
        torch.cat(top_lps) if top_k else None,
    )


def _result(
    seq: Sequence[int],
    start: int,
    lp: torch.Tensor,
    gr: torch.Tensor,
    ti: torch.Tensor | None,
    tl: torch.Tensor | None,
) -> TokenScores:
    top: list[list[tuple[int, float]]] = []
    if ti is not None and tl is not None:
        top = [list(zip(r_i, r_l, strict=True)) for r_i, r_l in zip(ti.tolist(), tl.tolist(), strict=True)]
    return TokenScores(start, list(seq[start:]), lp.tolist(), gr.tolist(), top)


@torch.inference_mode()
def score_sequences(
    model: MoETransformer,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int] | int = 1,
    *,
    top_k: int = 0,
    max_batch_tokens: int = 8192,
    max_rows: int = 64,
    head_rows: int = 512,
    share_prefixes: bool = True,
) -> list[TokenScores]:
    """Score ``sequences[i][starts[i]:]`` for every i (see the module docstring); results in input order.
    Raises ValueError for a sequence longer than the model's context, a start outside ``1..len`` or an id
    outside the vocabulary."""
    seqs = [list(s) for s in sequences]
    st = [starts] * len(seqs) if isinstance(starts, int) else list(starts)
    if len(st) != len(seqs):
        raise ValueError(f"got {len(st)} starts for {len(seqs)} sequences")
    if top_k < 0 or top_k > model.cfg.vocab_size:
        raise ValueError(f"top_k must be in 0..{model.cfg.vocab_size} (got {top_k})")
    _check(model, seqs, st)
    was_training = model.training
    model.eval()
    try:
        device = model.embed.weight.device
        dropless = all(layer.cfg.capacity_factor is None for layer in model.moe_layers())
        results: list[TokenScores | None] = [None] * len(seqs)
        todo = [i for i in range(len(seqs)) if st[i] < len(seqs[i])]
        for i in range(len(seqs)):
            if st[i] >= len(seqs[i]):
                results[i] = TokenScores(st[i], [], [], [], [])
        if share_prefixes and dropless:
            todo = _score_shared(model, seqs, st, todo, results, top_k, max_batch_tokens, max_rows, head_rows)
        lengths = [len(s) for s in seqs]
        order = sorted(todo, key=lambda i: (-lengths[i], i))
        rows = max_rows if dropless else 1
        for batch in _batches(lengths, order, max_batch_tokens, rows):
            T = lengths[batch[0]]
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, : lengths[i]] = torch.tensor(seqs[i])
            ids = ids.to(device)
            h_BTD = model.trunk(ids[:, :-1], model.cfg.n_layers)  # the last position is only a target
            # rows of h that predict each scored token: positions start-1 .. len-2
            sel_r, sel_t = [], []
            for r, i in enumerate(batch):
                n = lengths[i] - st[i]
                sel_r.append(torch.full((n,), r, dtype=torch.long))
                sel_t.append(torch.arange(st[i] - 1, lengths[i] - 1))
            rr, tt = torch.cat(sel_r).to(device), torch.cat(sel_t).to(device)
            targets = ids[rr, tt + 1]
            lp, gr, ti, tl = _head_scores(model, h_BTD[rr, tt], targets, top_k, head_rows)
            a = 0
            for i in batch:
                n = lengths[i] - st[i]
                sl = slice(a, a + n)
                results[i] = _result(
                    seqs[i],
                    st[i],
                    lp[sl],
                    gr[sl],
                    ti[sl] if ti is not None else None,
                    tl[sl] if tl is not None else None,
                )
                a += n
        out = [r for r in results if r is not None]
        assert len(out) == len(seqs)
        return out
    finally:
        model.train(was_training)


_MIN_SHARED = 16  # context tokens a group must share to be run once (see _score_shared)


def _score_shared(
    model: MoETransformer,
    seqs: list[list[int]],
    st: list[int],
    todo: list[int],
    results: list[TokenScores | None],
    top_k: int,
    max_batch_tokens: int,
    max_rows: int,
    head_rows: int,
) -> list[int]:
    """Score the sequences whose context (``seq[:start]``) is shared by at least one other sequence, and
    return the indices left for the plain path.

    Groups are taken a chunk at a time (contexts longest first, within the token budget). The chunk's
    contexts run once, right-padded, into a KV cache with one row per context. Each continuation then gets
    a copy of its context's cache row, and all the chunk's continuations run together on top of those
    rows. RoPE positions continue each row's own context. A key-padding mask hides the cache slots between
    a short context's end and the longest one's, so every row attends exactly to its own context and
    continuation, as it would alone."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in todo:
        groups.setdefault(tuple(seqs[i][: st[i]]), []).append(i)
    # a context shorter than _MIN_SHARED saves next to nothing run once, and the cache path costs a padded
    # batch under a key-padding mask: rolling-perplexity windows (one-token contexts, long continuations)
    # ran slower shared than plain
    rest = [i for c, g in groups.items() if len(g) == 1 or len(c) < _MIN_SHARED for i in g]
    shared = sorted(
        ((c, m) for c, m in groups.items() if len(m) > 1 and len(c) >= _MIN_SHARED),
        key=lambda cm: (-len(cm[0]), cm[1][0]),
    )
    device = model.embed.weight.device
    chunk: list[tuple[tuple[int, ...], list[int]]] = []
    rows = 0
    for ctx, members in shared:
        width = len(shared[0][0]) if not chunk else len(chunk[0][0])
        if chunk and ((len(chunk) + 1) * width > max_batch_tokens or rows + len(members) > 4 * max_rows):
            _run_chunk(model, chunk, seqs, results, top_k, head_rows, device)
            chunk, rows = [], 0
        chunk.append((ctx, members))
        rows += len(members)
    if chunk:
        _run_chunk(model, chunk, seqs, results, top_k, head_rows, device)
    return rest


def _run_chunk(
    model: MoETransformer,
    chunk: list[tuple[tuple[int, ...], list[int]]],
    seqs: list[list[int]],
    results: list[TokenScores | None],
    top_k: int,
    head_rows: int,
    device: torch.device,
) -> None:
    ctx_len = [len(c) for c, _ in chunk]
    C = max(ctx_len)
    pairs = [(g, i) for g, (_, members) in enumerate(chunk) for i in members]
    conts = {i: seqs[i][ctx_len[g] :] for g, i in pairs}
    L = max(len(v) for v in conts.values())
    ids = torch.zeros(len(chunk), C, dtype=torch.long)
    for g, (ctx, _) in enumerate(chunk):
        ids[g, : len(ctx)] = torch.tensor(ctx)
    cache = model.new_cache(len(chunk), C + L)
    h_ctx = _blocks(model, ids.to(device), cache, None, None)  # [G, C, D]
    h_last = h_ctx[torch.arange(len(chunk), device=device), torch.tensor(ctx_len, device=device) - 1]
    h_cont = None
    if L > 1:  # the continuations' inputs: every token but the last, on a copy of their context's row
        cache.keep_rows(torch.tensor([g for g, _ in pairs], device=device))
        cont_ids = torch.zeros(len(pairs), L - 1, dtype=torch.long)
        keep = torch.zeros(len(pairs), C + L - 1, dtype=torch.bool)
        for r, (g, i) in enumerate(pairs):
            n = len(conts[i]) - 1
            if n:
                cont_ids[r, :n] = torch.tensor(conts[i][:-1])
            keep[r, : ctx_len[g]] = True
            keep[r, C:] = True
        positions = torch.tensor([ctx_len[g] for g, _ in pairs])[:, None] + torch.arange(L - 1)[None, :]
        h_cont = _blocks(model, cont_ids.to(device), cache, positions.to(device), keep.to(device))
    hs, targets = [], []
    for r, (g, i) in enumerate(pairs):
        n = len(conts[i])
        hs.append(h_last[g][None])
        if n > 1:
            assert h_cont is not None
            hs.append(h_cont[r, : n - 1])
        targets.append(torch.tensor(conts[i], device=device))
    lp, gr, ti, tl = _head_scores(model, torch.cat(hs), torch.cat(targets), top_k, head_rows)
    o = 0
    for g, i in pairs:
        n = len(conts[i])
        sl = slice(o, o + n)
        results[i] = _result(
            seqs[i],
            ctx_len[g],
            lp[sl],
            gr[sl],
            ti[sl] if ti is not None else None,
            tl[sl] if tl is not None else None,
        )
        o += n


def _blocks(
    model: MoETransformer,
    ids_BT: torch.Tensor,
    cache: KVCache,
    positions_BT: torch.Tensor | None,
    key_padding_BS: torch.Tensor | None,
) -> torch.Tensor:
    """The residual stream after every block for ``ids`` written into ``cache`` after what it holds
    (positions continue the cache unless given), advancing it."""
    B, T = ids_BT.shape
    past = cache.length
    if positions_BT is None:
        positions_BT = torch.arange(past, past + T, device=ids_BT.device).expand(B, T)
    cos_sin = model.rope(positions_BT)
    mask = build_attention_mask(T, past, None, key_padding_BS, device=ids_BT.device)
    x = model.embed(ids_BT)
    for block in model.blocks:
        x, _ = block(x, cos_sin, mask, cache)
    cache.advance(T)
    return x
