"""Token loader throughput against what one training step of the ``small`` preset consumes, on this machine:
``TokenLoader.next_batch()`` on synthetic pretraining and SFT shards (mid-epoch, across an epoch boundary,
and whole epochs) and a full training step of ``small`` on the same batch size and sequence length, timed
interleaved round by round in one process. A figure is the median round; the ratio is loader tokens/s ÷
training-step tokens/s, the median of the per-round ratios. Before timing, the loader's batches are checked
field by field against the samples as they were written.

Data: two synthetic token directories in the format ``moeforge data tokenize`` writes (Megatron shards,
``.mask`` / ``.dom`` sidecars and ``manifest.json``), ``--samples`` samples of ``seq_len + 1`` = 1025
tokens (``small``'s ``max_seq_len`` 1024), ids drawn from ``small``'s 32k vocabulary, three domains:

- ``pretrain``: documents of log-normal length (median ~600 tokens) concatenated and cut into full
  blocks, so a sample holds 1-10 segments and only the last one is short; no loss mask;
- ``sft``: chats of log-normal length (median ~300 tokens) packed whole into blocks (next fit, ~80 %
  full, so the loader pads every row), with the second half of every chat in the loss mask.

Loader contenders, single-threaded numpy as in training (the loader has no workers), warm page cache (the
shards were just written); one sample is a chunk of ``next_batch()`` calls, reported per batch:

- ``<mode>/mid_epoch``: shuffled batches inside one epoch (after ``--skip`` untimed batches), about
  ``--batches`` over all rounds;
- ``<mode>/epoch_boundary``: a window of ``--batches`` batches around the end of epoch 0, including the
  batch that straddles it (``--samples`` is not a multiple of the batch size) and so draws epoch 1's
  permutation; the loader's state is restored before each round (``load_state_dict``, untimed);
- ``<mode>/epochs``: ``--epochs`` whole shuffled epochs back to back.

Training: ``small`` (fp32, ``torch.get_num_threads()`` threads) on batches from the ``pretrain`` loader with
document masking (``doc_ids`` / ``positions``): forward, ``loss + aux_loss`` backward, AdamW step,
``router_step``; its batches are fetched before timing. Tokens are input positions, ``batch × seq_len``,
for both, so per round the ratio of times is the ratio of tokens/s.

Output check (exact): the first batches, the batch straddling the epoch boundary and the last batch of a
whole epoch of each mode, against a per-row reference built from what was written (tokens padded with the
pad id, labels ``-100`` off the loss mask and on padding, segment ids and positions restarting at every
document, the domain); the loader's sample indices come from a twin sampler with the same seed. Goal
(issue 20): the slowest loader case at least 100 × the training step's tokens/s.
Run: ``python benchmarks/loader.py [--quick] [--batch-size 8] [--samples 5003] [--rounds 3] [--busy 2]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402
from _harness import Mismatch, Results, check_same, cpu_hog, interleave, paired_ratio  # noqa: E402
from moeforge.io import atomic_write_text  # noqa: E402
from moeforge.model.config import load_model_config  # noqa: E402
from moeforge.model.transformer import MoETransformer  # noqa: E402
from moeforge.tokens.loader import IGNORE_INDEX, PAD_DOC_ID, TokenDataset, TokenLoader  # noqa: E402
from moeforge.tokens.shards import IndexedShardWriter, token_dtype  # noqa: E402
from moeforge.tokens.tokenize import FORMAT_VERSION  # noqa: E402

DOMAINS = ["code", "math", "prose"]
EOS_ID, PAD_ID, FIRST_ORDINARY_ID = 0, 1, 64  # the shards hold random ids ≥ 64: no specials
GOAL = 100.0  # the slowest loader case's tokens/s at least this × the training step's
CASES = ("mid_epoch", "epoch_boundary", "epochs")


def _segments_of_stream(doc_lens: np.ndarray, block: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut documents laid end to end into ``samples`` blocks (the last one short): ``(segment_lengths,
    sample_of_segment)``, a segment ending at every document end and every block boundary."""
    total = samples * block - block // 3
    doc_ends = np.cumsum(doc_lens)
    cuts = np.union1d(doc_ends[doc_ends < total], np.arange(block, total, block))
    bounds = np.concatenate([[0], cuts, [total]])
    return np.diff(bounds), bounds[:-1] // block


def _packed_chats(chat_lens: np.ndarray, block: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Chats packed whole, next fit, into ``samples`` blocks: ``(segment_lengths, sample_of_segment)``."""
    # Next fit is sequential by nature; this runs once over the synthetic chats, outside the timing.
    seg_sample = np.empty(chat_lens.size, dtype=np.int64)
    b, used = 0, 0
    for i, n in enumerate(chat_lens.tolist()):
        if used + n > block:
            b, used = b + 1, 0
        seg_sample[i], used = b, used + n
    keep = seg_sample < samples
    return chat_lens[keep], seg_sample[keep]


@dataclass
class Written:
    """What :func:`build_token_dir` wrote, kept in memory: the reference the loader's batches are checked
    against (sample ``s`` holds segments ``seg_ends[s - 1]:seg_ends[s]`` and tokens ``tok_ends[s - 1]:tok_ends[s]``)."""

    tokens: np.ndarray
    seg_lens: np.ndarray
    mask: np.ndarray | None
    domains: np.ndarray
    seg_ends: np.ndarray  # per sample, cumulative segment count
    tok_ends: np.ndarray  # per sample, cumulative token count


def build_token_dir(
    out: Path, mode: str, *, samples: int, seq_len: int, vocab_size: int, seed: int
) -> tuple[Path, Written]:
    """Write a synthetic ``mode`` ("pretrain" | "sft") token directory that :class:`TokenDataset` reads;
    returns it and what was written."""
    rng = np.random.default_rng([seed, mode == "sft"])
    block = seq_len + 1
    if mode == "pretrain":
        doc_lens = np.maximum(8, rng.lognormal(np.log(600), 0.9, size=samples * 4).astype(np.int64))
        seg_lens, seg_sample = _segments_of_stream(doc_lens, block, samples)
    else:
        chat_lens = np.clip(rng.lognormal(np.log(300), 0.6, size=samples * 8), 24, block).astype(np.int64)
        seg_lens, seg_sample = _packed_chats(chat_lens, block, samples)
    dtype = token_dtype(vocab_size)
    tokens = rng.integers(FIRST_ORDINARY_ID, vocab_size, size=int(seg_lens.sum()), dtype=np.int64)
    seg_ends = np.cumsum(seg_lens)
    mask = None
    if mode == "sft":  # the second half of each chat is its "answer"
        seg_start = seg_ends - seg_lens
        in_seg = np.arange(tokens.size) - np.repeat(seg_start, seg_lens)
        mask = (in_seg >= np.repeat(seg_lens // 2, seg_lens)).astype(np.uint8)
    sample_ends = np.searchsorted(
        seg_sample, np.arange(1, samples + 1)
    )  # segments of sample s: [e_{s-1}, e_s)
    tok_ends = seg_ends[sample_ends - 1]
    domains = rng.integers(0, len(DOMAINS), size=samples)
    out.mkdir(parents=True, exist_ok=True)
    writer = IndexedShardWriter(out / "train", dtype, loss_mask=mask is not None, domains=True)
    seg_a = tok_a = 0
    for s in range(samples):
        seg_b, tok_b = int(sample_ends[s]), int(tok_ends[s])
        m = None if mask is None else mask[tok_a:tok_b]
        writer.add_sample(tokens[tok_a:tok_b].astype(dtype), seg_lens[seg_a:seg_b], m, int(domains[s]))
        seg_a, tok_a = seg_b, tok_b
    info = writer.close()
    manifest = {
        "format": FORMAT_VERSION,
        "name": f"synthetic-{mode}",
        "seq_len": seq_len,
        "mode": mode,
        "source": {"name": "benchmarks/loader.py", "seed": seed},
        "tokenizer": {
            "name": "synthetic",
            "vocab_size": vocab_size,
            "eos_id": EOS_ID,
            "pad_id": PAD_ID,
            "dtype": dtype.name,
        },
        "domains": DOMAINS,
        "splits": {
            "train": {
                "prefix": "train",
                "samples": info["samples"],
                "segments": info["segments"],
                "tokens": info["tokens"],
                "packing_efficiency": round(info["tokens"] / (info["samples"] * block), 6),
                "files": info["files"],
            }
        },
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out, Written(tokens, seg_lens, mask, domains, sample_ends, tok_ends)


# --- output check -----------------------------------------------------------------------------------


def reference_batch(w: Written, idx: np.ndarray, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch of samples ``idx`` built row by row from what was written (the loader's fields)."""
    L = seq_len + 1
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("tok", "tgt", "doc", "pos")}
    for s in idx.tolist():
        ta = int(w.tok_ends[s - 1]) if s else 0
        sa = int(w.seg_ends[s - 1]) if s else 0
        toks = w.tokens[ta : int(w.tok_ends[s])]
        segs = w.seg_lens[sa : int(w.seg_ends[s])]
        n = toks.size
        tok = np.full(L, pad_id, dtype=np.int64)
        tok[:n] = toks
        tgt = np.zeros(L, dtype=bool)
        tgt[:n] = True if w.mask is None else w.mask[ta : ta + n].astype(bool)
        doc = np.full(L, PAD_DOC_ID, dtype=np.int64)
        pos = np.empty(L, dtype=np.int64)
        at = 0
        for j, k in enumerate(segs.tolist()):
            doc[at : at + k] = j
            pos[at : at + k] = np.arange(k)
            at += k
        pos[at:] = np.arange(L - at)  # the padding run counts its own positions
        for key, arr in (("tok", tok), ("tgt", tgt), ("doc", doc), ("pos", pos)):
            rows[key].append(arr)
    tok, tgt = np.stack(rows["tok"]), np.stack(rows["tgt"])
    return {
        "input_ids": torch.from_numpy(tok[:, :-1].copy()),
        "labels": torch.from_numpy(np.where(tgt[:, 1:], tok[:, 1:], IGNORE_INDEX)),
        "doc_ids": torch.from_numpy(np.stack(rows["doc"])[:, :-1].copy()),
        "positions": torch.from_numpy(np.stack(rows["pos"])[:, :-1].copy()),
        "domain": torch.from_numpy(w.domains[idx].astype(np.int64)),
    }


def check_loader(ds: TokenDataset, w: Written, batch_size: int, seed: int) -> dict[str, str]:
    """Loader batches against :func:`reference_batch` at the start, across the epoch boundary and at the
    end of an epoch; the sample indices from a twin sampler with the same seed."""
    loader = TokenLoader(ds, batch_size=batch_size, seed=seed)
    twin = TokenLoader(ds, batch_size=batch_size, seed=seed)
    per_epoch = len(ds) // batch_size
    wanted = {0, 1, per_epoch - 1, per_epoch, per_epoch + 1}
    got: list[dict[str, torch.Tensor]] = []
    want: list[dict[str, torch.Tensor]] = []
    for b in range(per_epoch + 2):
        batch = loader.next_batch()
        comp, idx = twin.sampler.take(batch_size)
        if b in wanted:
            assert not comp.any()  # one dataset
            got.append(batch)
            want.append(reference_batch(w, idx, ds.seq_len, ds.pad_id))
    return check_same({"loader": got, "as written": want}, "as written")


# --- timing ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One loader contender: ``batches`` calls of ``next_batch()`` per sample, each call's time kept."""

    mode: str
    case: str
    loader: TokenLoader
    batches: int
    warmup: int  # interleave's untimed rounds: their batch times are not kept
    state: dict[str, Any] | None = None  # restored before every sample (epoch_boundary)
    straddle: int | None = None  # which call of a sample crosses into epoch 1
    calls: int = 0
    batch_times: list[float] = field(default_factory=list)
    straddle_times: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.mode}/{self.case}"

    def before(self) -> None:
        if self.state is not None:
            self.loader.load_state_dict(copy.deepcopy(self.state))

    def run(self) -> None:
        times = []
        for _ in range(self.batches):
            t0 = time.perf_counter()
            self.loader.next_batch()
            times.append(time.perf_counter() - t0)
        self.calls += 1
        if self.straddle is not None:
            assert self.loader.sampler.samplers[0].epoch == 1, "the window must end in epoch 1"
        if self.calls <= self.warmup:
            return
        self.batch_times += times
        if self.straddle is not None:
            self.straddle_times.append(times[self.straddle])


def loader_cases(ds: TokenDataset, mode: str, args: argparse.Namespace) -> list[Case]:
    """The three loader contenders of the module doc for one token directory."""
    B = args.batch_size
    per_epoch = len(ds) // B  # whole batches in epoch 0; batch number ``per_epoch`` straddles the boundary
    samples = args.rounds + args.warmup  # interleave's warm-up rounds call every contender too

    mid = TokenLoader(ds, batch_size=B, seed=0)
    for _ in range(args.skip):
        mid.next_batch()
    chunk = max(1, min(args.batches // args.rounds, (per_epoch - args.skip - 1) // samples))

    edge = TokenLoader(ds, batch_size=B, seed=1)
    half = max(1, min(args.batches // 2, per_epoch // 2))
    for _ in range(per_epoch - half):
        edge.next_batch()
    state = edge.state_dict()

    whole = TokenLoader(ds, batch_size=B, seed=2)
    whole.next_batch()
    return [
        Case(mode, "mid_epoch", mid, chunk, args.warmup),
        Case(mode, "epoch_boundary", edge, 2 * half + 1, args.warmup, state=state, straddle=half),
        Case(mode, "epochs", whole, args.epochs * len(ds) // B, args.warmup),
    ]


def training_step(directory: Path, args: argparse.Namespace) -> Callable[[], None]:
    """Forward + backward + AdamW step of ``small`` on loader batches fetched up front (module doc)."""
    cfg = load_model_config("small")
    ds = TokenDataset(directory, "train")
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    loader = TokenLoader(ds, batch_size=args.batch_size, seed=0)
    batches = [loader.next_batch() for _ in range(args.rounds + args.warmup)]
    calls = iter(range(10**9))

    def step() -> None:
        batch = batches[next(calls) % len(batches)]
        out = model(
            batch["input_ids"], batch["labels"], doc_ids_BT=batch["doc_ids"], positions_BT=batch["positions"]
        )
        assert out.loss is not None and out.aux_loss is not None
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.router_step()

    return step


def _ms(x: float) -> float:
    return round(1e3 * x, 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(ap, rounds=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=5003, help="samples per synthetic token directory")
    ap.add_argument("--batches", type=int, default=400, help="timed batches per loader case, over all rounds")
    ap.add_argument("--skip", type=int, default=100, help="untimed batches before the mid-epoch case")
    ap.add_argument("--epochs", type=int, default=3, help="whole epochs per round in the epochs case")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    ap.add_argument(
        "--steps", dest="rounds", type=int, default=argparse.SUPPRESS, help="the same as --rounds"
    )
    ap.add_argument(
        "--work", type=Path, default=None, help="where to write the token dirs (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.batch_size, args.batches, args.skip, args.epochs = 1003, 1, 40, 10, 1
        args.rounds = min(args.rounds, 2)
    cfg = load_model_config("small")
    seq_len, vocab = cfg.max_seq_len, cfg.vocab_size
    results = Results("loader", args, title="Loader vs a training step")
    with tempfile.TemporaryDirectory(prefix="moeforge-bench-loader-") as tmp:
        work = args.work or Path(tmp)
        dirs: dict[str, Path] = {}
        written: dict[str, Written] = {}
        for mode in ("pretrain", "sft"):
            t0 = time.perf_counter()
            dirs[mode], written[mode] = build_token_dir(
                work / mode, mode, samples=args.samples, seq_len=seq_len, vocab_size=vocab, seed=0
            )
            split = json.loads((dirs[mode] / "manifest.json").read_text())["splits"]["train"]
            results.row(
                build=mode,
                samples=split["samples"],
                segments=split["segments"],
                tokens=split["tokens"],
                packing_efficiency=split["packing_efficiency"],
                seconds=round(time.perf_counter() - t0, 2),
            )
        datasets = {mode: TokenDataset(d, "train") for mode, d in dirs.items()}
        try:
            for mode, ds in datasets.items():
                verdict = check_loader(ds, written[mode], args.batch_size, seed=3)
                results.check(
                    f"{mode}: loader batches (first two, around the epoch boundary) against the samples as "
                    "written, every field, exact",
                    verdict,
                )
        except Mismatch as exc:
            print(f"error: {exc}; no time is reported", file=sys.stderr)
            return 1

        cases = [c for mode, ds in datasets.items() for c in loader_cases(ds, mode, args)]
        by_name = {c.name: c for c in cases}
        contenders: dict[str, Callable[[], None]] = {"train_step": training_step(dirs["pretrain"], args)}
        contenders.update({c.name: c.run for c in cases})

        def before(name: str) -> None:
            if name in by_name:
                by_name[name].before()

        with cpu_hog(args.busy):
            timings = interleave(contenders, args.rounds, warmup=args.warmup, before=before)

    B, T = args.batch_size, seq_len
    tokens = B * T
    train = timings["train_step"]
    results.row(
        contender="train_step",
        preset=cfg.name,
        batch_size=B,
        seq_len=T,
        dtype="float32",
        threads=torch.get_num_threads(),
        **train.as_dict(),
        tokens_per_s=round(train.rate(tokens), 1),
    )
    rows: dict[str, dict[str, Any]] = {}
    for c in cases:
        t = timings[c.name]
        t.samples = [s / c.batches for s in t.samples]  # seconds per batch
        ms = sorted(c.batch_times)
        ratio = paired_ratio(t, train)  # training step time ÷ loader batch time, per round
        rows[c.name] = results.row(
            contender=c.name,
            mode=c.mode,
            case=c.case,
            samples=len(datasets[c.mode]),
            batch_size=B,
            seq_len=T,
            batches_per_round=c.batches,
            **t.as_dict(),
            tokens_per_s=round(t.rate(tokens)),
            batch_ms_p50=_ms(statistics.median(ms)),
            batch_ms_p99=_ms(ms[min(len(ms) - 1, int(0.99 * len(ms)))]),
            batch_ms_max=_ms(ms[-1]),
            **({"straddling_batch_ms": _ms(statistics.median(c.straddle_times))} if c.straddle_times else {}),
            over_train_step=ratio.as_dict(),
        )

    def r(mode: str, case: str) -> dict[str, Any]:
        return rows[f"{mode}/{case}"]

    def ratio_text(row: dict[str, Any]) -> str:
        o = row["over_train_step"]
        return f"{o['ratio']:,.0f} ({o['ratio_low']:,.0f}–{o['ratio_high']:,.0f})"

    results.table(
        f"`TokenLoader.next_batch()` at batch {B} × {T} tokens (median of {args.rounds} rounds, tokens/s), "
        f"and loader tokens/s ÷ the training step's (median of the per-round ratios, lowest–highest round). "
        f"Training step: `{cfg.name}`, fp32, {torch.get_num_threads()} threads, "
        f"{train.median:.3g} s per step, {train.rate(tokens):,.0f} tokens/s.",
        ["case", "pretrain tokens/s", "SFT tokens/s", "pretrain ÷ training step", "SFT ÷ training step"],
        [
            [
                case.replace("_", " "),
                r("pretrain", case)["tokens_per_s"],
                r("sft", case)["tokens_per_s"],
                ratio_text(r("pretrain", case)),
                ratio_text(r("sft", case)),
            ]
            for case in CASES
        ],
    )
    slowest = min(rows.values(), key=lambda x: x["over_train_step"]["ratio"])
    o = slowest["over_train_step"]
    results.goal(
        f"slowest loader case ({slowest['contender']}) tokens/s ÷ training step tokens/s",
        o["ratio"],
        GOAL,
        spread=(o["ratio_low"], o["ratio_high"]),
    )
    p50 = [x["batch_ms_p50"] for x in rows.values()]
    straddle = [x["straddling_batch_ms"] for x in rows.values() if "straddling_batch_ms" in x]
    results.note(
        f"A batch takes {min(p50):.2g}–{max(p50):.2g} ms (per-batch medians over the cases); the batch that "
        f"straddles an epoch boundary {min(straddle):.2g}–{max(straddle):.2g} ms; the slowest single batch "
        f"{max(x['batch_ms_max'] for x in rows.values()):.2g} ms."
    )
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
