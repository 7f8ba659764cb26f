"""Token loader throughput against what one training step of the ``small`` preset consumes, on this machine.

Data: two synthetic token directories in the format ``moeforge data tokenize`` writes (Megatron shards,
``.mask`` / ``.dom`` sidecars and ``manifest.json``), ``--samples`` samples of ``seq_len + 1`` = 1025
tokens (``small``'s ``max_seq_len`` 1024), ids drawn from ``small``'s 32k vocabulary, three domains:

- ``pretrain``: documents of log-normal length (median ~600 tokens) concatenated and cut into full
  blocks, so a sample holds 1-10 segments and only the last one is short; no loss mask;
- ``sft``: chats of log-normal length (median ~300 tokens) packed whole into blocks (next fit, ~80 %
  full, so the loader pads every row), with the second half of every chat in the loss mask.

Timed in this process, single-threaded numpy as in training (the loader has no workers), warm page
cache (the shards were just written), each ``TokenLoader.next_batch()`` on its own:

- ``mid_epoch``: shuffled batches inside one epoch (after ``--skip`` untimed batches);
- ``epoch_boundary``: a window of batches around the end of epoch 0, including the batch that
  straddles it (``--samples`` is not a multiple of the batch size) and so draws epoch 1's permutation;
- ``epochs``: ``--epochs`` whole shuffled epochs back to back, as one wall-clock figure.

Training: ``small`` (fp32, ``torch.get_num_threads()`` threads, default) on batches from the
``pretrain`` loader with document masking (``doc_ids`` / ``positions``): forward, ``loss + aux_loss``
backward, AdamW step, ``router_step``; ``--warmup`` untimed steps, then ``--steps`` timed ones.

Tokens are input positions, ``batch × seq_len``, for both. Prints one JSON line per measurement and a
summary with ``ratio`` = the slowest loader measurement's tokens/s ÷ the fastest training step's (the
conservative pairing), ``target: 100``, and the machine's load average before and after.
Run: ``python benchmarks/loader.py [--quick] [--batch-size 8] [--samples 5003] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from moeforge.io import atomic_write_text  # noqa: E402
from moeforge.model.config import load_model_config  # noqa: E402
from moeforge.model.transformer import MoETransformer  # noqa: E402
from moeforge.tokens.loader import TokenDataset, TokenLoader  # noqa: E402
from moeforge.tokens.shards import IndexedShardWriter, token_dtype  # noqa: E402
from moeforge.tokens.tokenize import FORMAT_VERSION  # noqa: E402

DOMAINS = ["code", "math", "prose"]
EOS_ID, PAD_ID, FIRST_ORDINARY_ID = 0, 1, 64  # the shards hold random ids ≥ 64: no specials


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


def build_token_dir(out: Path, mode: str, *, samples: int, seq_len: int, vocab_size: int, seed: int) -> Path:
    """Write a synthetic ``mode`` ("pretrain" | "sft") token directory that :class:`TokenDataset` reads."""
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
    return out


def _batch_times(loader: TokenLoader, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loader.next_batch()
        times.append(time.perf_counter() - t0)
    return times


def _rates(times: list[float], tokens_per_batch: int) -> dict[str, Any]:
    total = sum(times)
    ms = sorted(1e3 * t for t in times)
    return {
        "batches": len(times),
        "tokens_per_s": round(len(times) * tokens_per_batch / total),
        "batches_per_s": round(len(times) / total, 1),
        "batch_ms_p50": round(statistics.median(ms), 4),
        "batch_ms_p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 4),
        "batch_ms_max": round(ms[-1], 4),
    }


def time_loader(directory: Path, mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The three loader measurements of the module doc for one token directory."""
    ds = TokenDataset(directory, "train")
    B, T = args.batch_size, ds.seq_len
    per_epoch = len(ds) // B  # whole batches in epoch 0; batch number ``per_epoch`` straddles the boundary
    common = {"bench": "loader", "mode": mode, "samples": len(ds), "batch_size": B, "seq_len": T}
    rows = []

    loader = TokenLoader(ds, batch_size=B, seed=0)
    _batch_times(loader, args.skip)
    n = min(args.batches, per_epoch - args.skip - 1)
    rows.append({**common, "case": "mid_epoch", **_rates(_batch_times(loader, n), B * T)})

    loader = TokenLoader(ds, batch_size=B, seed=1)
    half = min(args.batches // 2, per_epoch // 2)
    _batch_times(loader, per_epoch - half)
    times = _batch_times(loader, 2 * half + 1)
    assert loader.sampler.samplers[0].epoch == 1, "the window must end in epoch 1"
    crossing = 1e3 * times[half]  # batch ``per_epoch``: the tail of epoch 0 and the head of epoch 1
    rows.append(
        {
            **common,
            "case": "epoch_boundary",
            **_rates(times, B * T),
            "straddling_batch_ms": round(crossing, 4),
        }
    )

    loader = TokenLoader(ds, batch_size=B, seed=2)
    loader.next_batch()
    n = args.epochs * len(ds) // B
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    wall = time.perf_counter() - t0
    rows.append(
        {
            **common,
            "case": "epochs",
            "epochs": args.epochs,
            "batches": n,
            "tokens_per_s": round(n * B * T / wall),
            "batches_per_s": round(n / wall, 1),
        }
    )
    return rows


def time_train_step(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward + AdamW step of ``small`` on loader batches (module doc)."""
    cfg = load_model_config("small")
    ds = TokenDataset(directory, "train")
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    loader = TokenLoader(ds, batch_size=args.batch_size, seed=0)
    B, T = args.batch_size, ds.seq_len

    def step() -> float:
        batch = loader.next_batch()  # outside the timing: the loader is measured on its own
        t0 = time.perf_counter()
        out = model(
            batch["input_ids"], batch["labels"], doc_ids_BT=batch["doc_ids"], positions_BT=batch["positions"]
        )
        assert out.loss is not None and out.aux_loss is not None
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.router_step()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    return {
        "bench": "train_step",
        "preset": cfg.name,
        "vocab_size": cfg.vocab_size,
        "batch_size": B,
        "seq_len": T,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "warmup_steps": args.warmup,
        "steps": len(times),
        "step_s": [round(t, 3) for t in times],
        "tokens_per_s_best": round(B * T / min(times)),
        "tokens_per_s_mean": round(B * T / statistics.fmean(times)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer batches, one epoch, one timed training step")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=5003, help="samples per synthetic token directory")
    ap.add_argument("--batches", type=int, default=400, help="timed batches per loader case")
    ap.add_argument("--skip", type=int, default=100, help="untimed batches before the mid-epoch case")
    ap.add_argument("--epochs", type=int, default=3, help="whole epochs in the epochs case")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument(
        "--work", type=Path, default=None, help="where to write the token dirs (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.skip, args.epochs, args.steps = 100, 20, 1, 1
    seq_len = load_model_config("small").max_seq_len
    vocab = load_model_config("small").vocab_size
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="moeforge-bench-loader-") as tmp:
        work = args.work or Path(tmp)
        dirs = {}
        for mode in ("pretrain", "sft"):
            t0 = time.perf_counter()
            dirs[mode] = build_token_dir(
                work / mode, mode, samples=args.samples, seq_len=seq_len, vocab_size=vocab, seed=0
            )
            split = json.loads((dirs[mode] / "manifest.json").read_text())["splits"]["train"]
            print(
                json.dumps(
                    {
                        "bench": "build",
                        "mode": mode,
                        "samples": split["samples"],
                        "segments": split["segments"],
                        "tokens": split["tokens"],
                        "packing_efficiency": split["packing_efficiency"],
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                ),
                flush=True,
            )
        loader_rows = []
        for mode, d in dirs.items():
            for row in time_loader(d, mode, args):
                loader_rows.append(row)
                print(json.dumps(row), flush=True)
        train = time_train_step(dirs["pretrain"], args)
        print(json.dumps(train), flush=True)
    slowest = min(loader_rows, key=lambda r: r["tokens_per_s"])
    summary = {
        "summary": "loader",
        "loader_tokens_per_s_slowest": slowest["tokens_per_s"],
        "loader_slowest_case": f"{slowest['mode']}/{slowest['case']}",
        "train_step_tokens_per_s_best": train["tokens_per_s_best"],
        "ratio": round(slowest["tokens_per_s"] / train["tokens_per_s_best"], 1),
        "ratio_by_case": {
            f"{r['mode']}/{r['case']}": round(r["tokens_per_s"] / train["tokens_per_s_best"], 1)
            for r in loader_rows
        },
        "target": 100,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
