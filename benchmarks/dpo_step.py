"""DPO training step: moeforge's ``Preference("dpo")`` objective against TRL's ``DPOTrainer`` (in its default
mode, with a reference forward every step, and with ``precompute_ref_log_probs``), on the same model, data
and batches, fp32 on CPU, in one process. Each TRL step is timed inside ``trainer.train()`` and the
moeforge step on the same batch runs right before or right after it, the order alternating step by step;
a figure is the median step, and a ratio is the median of the per-step ratios (TRL's time ÷ moeforge's
on the same batch, which is the ratio of tokens/s). Before any timing, the two sides' policy log-probs,
reference caches, first-step DPO loss and every parameter gradient of that loss must agree.

Model: a preset (``small`` by default: 8 experts top-2, d_model 384, 6 layers, vocab 32,000), randomly
initialized with seed 0 and exported with ``moeforge.model.hf.export_hf`` (Mixtral layout); TRL trains the
export loaded by ``AutoModelForCausalLM.from_pretrained``, so both start from the same weights. Data:
``--pairs`` synthetic chat preference pairs (deterministic for ``--seed``: a user question, a longer
on-topic answer as *chosen*, a vaguer one as *rejected*), a byte-level BPE with ChatML tokens trained on
them, encoded once with ``moeforge.tokens.pairs.encode_pair``. TRL gets the same token ids in its tokenized
columns (``prompt_ids``, ``chosen_ids``, ``rejected_ids``; its own tokenization pass is skipped, nothing
else of the trainer is changed), so a step sees the same ``--batch`` pairs on both sides, in the same order
(TRL's sampler set to ``sequential``).

Three contenders, fp32 on CPU, no activation checkpointing (TRL's config defaults to bf16 autocast and
gradient checkpointing; both are turned off so the two sides do the same arithmetic):

- **moeforge**: the trainer's step — ``Preference("dpo", beta=0.1)(model, batch)``, ``backward``, grad
  clipping at ``OptimConfig().grad_clip``, AdamW (``build_optimizer``) ``step``, ``zero_grad`` and
  ``router_step``. The reference log-probs come from ``reference_logps``, run once over all pairs before
  training (the reference model is not in memory during steps).
- **trl**: ``DPOTrainer`` in its default mode: the frozen reference model runs a forward on every step.
- **trl_precomputed**: ``DPOTrainer(precompute_ref_log_probs=True)``: reference log-probs once, up front.

Both sides add their MoE auxiliary loss, each its own definition: moeforge ``lb_coef·ΣLB + z_coef·ΣZ`` over
layers, TRL ``router_aux_loss_coef`` (= lb_coef, 0.01) × Mixtral's load-balancing loss. Optimizer settings
are matched (lr 3e-4 constant, betas 0.9/0.95, eps 1e-8, weight decay 0.1, clip 1.0); each side keeps its own
AdamW implementation (moeforge: torch's default; TRL: ``adamw_torch_fused``, its default).

A TRL step is timed from its ``on_step_begin`` callback (the batch is already collated) to ``on_step_end``
(after clipping, ``optimizer.step``, the scheduler and ``zero_grad``): TRL's real loop, metrics and all.
The moeforge step on the same batch (timed, on a pre-collated batch) runs in ``on_step_end`` on even steps
and in ``on_step_begin``, before TRL's timer starts, on odd ones — the harness's rotated interleaving, done
inside TRL's loop (``_harness.interleave`` cannot drive ``trainer.train()``). Two phases: TRL default with
moeforge, then TRL precomputed with moeforge; ``--warmup`` steps of each phase are untimed, ``--rounds``
(``--steps``) are timed. Tokens per step are the pairs' sequence tokens (prompt + side, both sides of every
pair, no padding), the same count for all contenders (checked every step against TRL's attention mask).
The one-off reference pass over all pairs is timed on its own (moeforge ``reference_logps``; TRL
``_precompute_ref_logps``, which also writes its Arrow cache) and also amortized over one epoch of the
pairs: ``step + reference / (pairs / batch)``.

Output check before timing (exit 1 when it fails), on the first batch with the untrained weights: the
policies' summed log-probs (``atol 1e-3``: sums over hundreds of tokens in fp32), the two reference caches
over all pairs (``atol 1e-3``), the first step's DPO loss (``atol 1e-4``; at step 0 the policy is the
reference, so it is log 2 on both sides) and, the non-trivial part, the gradients of that DPO loss (MoE aux
off on both sides for this one backward), every parameter mapped to its transformers counterpart and
divided by that tensor's largest TRL gradient (``atol 1e-4``). The aux terms are compared too and differ
by definition (recorded with the reason).

Goal (issue 20): moeforge ≥ 1.5 × TRL's default mode in tokens/s. Run: ``python benchmarks/dpo_step.py
[--quick] [--threads 1] [--busy 2]`` (``--quick``: ``tiny`` preset, shorter texts, three timed steps per
phase; JSON to a temp directory).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402
from _harness import Mismatch, Results, Timing, check_same, cpu_hog, paired_ratio  # noqa: E402
from moeforge.model.config import load_model_config  # noqa: E402
from moeforge.model.hf import export_hf  # noqa: E402
from moeforge.model.sizing import count_params  # noqa: E402
from moeforge.model.transformer import MoETransformer  # noqa: E402
from moeforge.tokens.pairs import EncodedPair, collate_pairs, encode_pair  # noqa: E402
from moeforge.tokens.tokenizer import BASE_SPECIALS, CHAT_TEMPLATE, token_ids  # noqa: E402
from moeforge.train.config import OptimConfig  # noqa: E402
from moeforge.train.objectives import Preference, sequence_logps  # noqa: E402
from moeforge.train.optim import build_optimizer  # noqa: E402
from moeforge.train.reference import reference_logps  # noqa: E402

GOAL = 1.5  # moeforge tokens/s at least this × TRL's (default mode)
BETA = 0.1
TOL_LOGPS = 1e-3  # summed log-probs (hundreds of tokens), fp32
TOL_LOSS = 1e-4
TOL_GRAD = 1e-4  # |Δgrad| / max |grad| of the tensor

# --- synthetic preference data ---------------------------------------------------------------------

TOPICS = {
    "sourdough bread": "starter flour hydration proofing crust oven dough crumb",
    "a vegetable garden": "soil compost seedlings watering sunlight mulch pests harvest",
    "a home network": "router firmware password bandwidth cables signal devices updates",
    "learning the violin": "bow posture scales intonation rosin strings practice teacher",
    "a small business budget": "revenue expenses invoices taxes savings suppliers cash margins",
    "marathon training": "mileage pace recovery shoes hydration intervals sleep injuries",
    "a Python project": "tests packages functions errors logging modules types reviews",
    "a bicycle repair": "chain brakes gears tyres spokes cables bearings saddle",
    "moving to a new city": "rent neighbourhood transport documents friends movers utilities jobs",
    "a camping trip": "tent weather water maps stove food boots first_aid",
}
VERBS = "check adjust measure clean plan compare replace protect record test"
ADJS = "careful steady simple regular gentle small clear patient consistent quiet"
ASK = (
    "I have been struggling with {t} for a few weeks and I am not sure what I am doing wrong.",
    "My friend told me that {t} is easy, but every time I try, something about the {a} goes wrong.",
    "I want to get better at {t} before the end of the month and I have about an hour a day.",
    "Last time I tried, the {a} and the {b} both caused problems and I could not tell which came first.",
    "I read a few guides about {t}, but they disagree about the {a} and I am confused.",
)
QUESTION = (
    "Can you explain step by step how to handle the {a} and the {b}?",
    "What should I {v} first, and how do I know when the {a} is right?",
    "Which mistakes do beginners make with the {a}, and how can I avoid them?",
    "Could you give me a short plan for the next two weeks?",
)
GOOD = (
    "Start by taking a {j} look at the {a}: {v} it before you change anything else.",
    "Keep the {a} {j} and write down what you did, so you can {v} the {b} later.",
    "A common mistake is to {v} the {a} and the {b} at the same time; change one thing per try.",
    "If the {a} still looks wrong after a day, {v} the {b} and give it another {j} attempt.",
    "Most people see a clear difference within a week when they {v} the {a} every day.",
    "For {t}, the {a} matters more than the {b}, so spend most of your time there.",
    "Set a {j} routine: {v} the {a} in the morning and the {b} in the evening.",
    "When you are unsure, {v} the {a} against a known good example before moving on.",
)
BAD = (
    "It depends on many things, so it is hard to say.",
    "You could {v} the {a}, or maybe not, it is up to you.",
    "Just try harder with the {b} and it will work out eventually.",
    "Some people think the {a} matters, others think it does not.",
    "I would not worry about {t} too much.",
    "Maybe watch a video about the {b} or ask someone else.",
)


def _fill(rng: random.Random, template: str, topic: str, words: tuple[str, ...]) -> str:
    a, b = rng.sample(words, 2)
    return template.format(t=topic, a=a, b=b, v=rng.choice(VERBS.split()), j=rng.choice(ADJS.split()))


def _sentences(rng: random.Random, pool: tuple[str, ...], n: int, topic: str, words: tuple[str, ...]) -> str:
    return " ".join(_fill(rng, rng.choice(pool), topic, words) for _ in range(n))


def synthetic_pairs(
    n: int, seed: int, scale: float
) -> list[tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]]:
    """``n`` (prompt, chosen, rejected) chats, deterministic for ``seed``; ``scale`` multiplies the sentence
    counts (at 1.0: prompts of 2-6 sentences, chosen answers of 3-10, rejected of 2-8)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        words = tuple(w.replace("_", " ") for w in TOPICS[topic].split())
        k = lambda lo, hi: max(1, round(rng.randint(lo, hi) * scale))  # noqa: E731
        prompt = []
        if rng.random() < 0.5:
            prompt.append(
                {"role": "system", "content": "You are a helpful assistant. Answer clearly and concretely."}
            )
        user = (
            _sentences(rng, ASK, k(1, 4), topic, words)
            + " "
            + _sentences(rng, QUESTION, k(1, 2), topic, words)
        )
        prompt.append({"role": "user", "content": user})
        chosen = _sentences(rng, GOOD, k(3, 10), topic, words)
        rejected = _sentences(rng, BAD + GOOD[:2], k(2, 8), topic, words)
        out.append(
            (prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}])
        )
    return out


def train_bpe(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE with the project's base special tokens (ChatML included), as ``tests/conftest.py``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BASE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# --- contenders ------------------------------------------------------------------------------------


@dataclass
class Timings:
    name: str
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def sequence_tokens(pairs: list[EncodedPair]) -> int:
    """Tokens of a batch as both sides count them: prompt + side, for both sides of every pair."""
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


@dataclass
class Ours:
    model: MoETransformer
    objective: Preference
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, torch.Tensor]]
    batch_tokens: list[int]
    clip: float | None

    def step(self, index: int) -> tuple[float, float, float]:
        """One optimizer step on batch ``index`` as the trainer takes it; (wall s, CPU s, DPO loss)."""
        batch = self.batches[index]
        t0, c0 = time.perf_counter(), time.process_time()
        res = self.objective(self.model, batch)
        res.loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.router_step()
        return time.perf_counter() - t0, time.process_time() - c0, float(res.scalars["loss"])


def _trl_classes() -> tuple[type, type]:
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's trainer on columns that are already token ids (its tokenization pass would re-render the
        chats); records the one-off reference pass time and each step's token count."""

        reference_s: float | None = None
        step_tokens: list[int]

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # type: ignore[override]
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):  # type: ignore[override]
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.reference_s = time.perf_counter() - t0
            return out

        def training_step(self, model, inputs, *args, **kwargs):  # type: ignore[override]
            self.step_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    class Interleave(TrainerCallback):
        """Times TRL's optimizer steps and runs one moeforge step on the same batch beside each: after it on
        even steps, before TRL's timer starts on odd ones."""

        def __init__(self, trainer_tokens: list[int], ours: Ours, warmup: int, trl: Timings, mine: Timings):
            self.trainer_tokens = trainer_tokens
            self.ours, self.warmup, self.trl, self.mine = ours, warmup, trl, mine
            self.t0 = self.c0 = 0.0
            self.losses: list[float] = []
            self.ours_first: tuple[float, float, float] | None = None

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.ours_first = None
            if state.global_step % 2 == 1:
                self.ours_first = self.ours.step(state.global_step % len(self.ours.batches))
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            index = (state.global_step - 1) % len(self.ours.batches)
            tokens = self.ours.batch_tokens[index]
            if self.trainer_tokens[-1] != tokens:
                raise RuntimeError(
                    f"step {state.global_step}: TRL's batch has {self.trainer_tokens[-1]} tokens, ours {tokens}"
                )
            ours_wall, ours_cpu, loss = self.ours_first or self.ours.step(index)
            self.losses.append(loss)
            if state.global_step > self.warmup:
                for t, w, c in ((self.trl, wall, cpu), (self.mine, ours_wall, ours_cpu)):
                    t.times.append(w)
                    t.cpu_times.append(c)
                    t.tokens.append(tokens)

    return PretokenizedDPOTrainer, Interleave


def make_trainer(
    cls: type,
    hf_dir: Path,
    tokenizer: Any,
    dataset: Any,
    args: argparse.Namespace,
    out_dir: Path,
    *,
    precompute: bool,
    max_steps: int,
) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig

    opt = OptimConfig()
    cfg = DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch,
        max_steps=max_steps,
        learning_rate=opt.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_epsilon=opt.eps,
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.grad_clip if opt.grad_clip is not None else 0.0,
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute,
        max_length=None,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=args.device == "cpu",
        train_sampling_strategy="sequential",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    policy = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    trainer = cls(model=policy, args=cfg, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training dict: stdout stays JSON lines
    trainer.step_tokens = []
    return trainer


# --- equality check --------------------------------------------------------------------------------

_BLOCK_KEYS = {
    "attn_norm.weight": ("input_layernorm.weight", False),
    "mlp_norm.weight": ("post_attention_layernorm.weight", False),
    "attn.q_proj.weight": ("self_attn.q_proj.weight", False),
    "attn.k_proj.weight": ("self_attn.k_proj.weight", False),
    "attn.v_proj.weight": ("self_attn.v_proj.weight", False),
    "attn.o_proj.weight": ("self_attn.o_proj.weight", False),
    "mlp.router.weight": ("mlp.gate.weight", False),
    "mlp.w13": ("mlp.experts.gate_up_proj", True),  # ours [E, D, 2F], transformers [E, 2F, D]
    "mlp.w2": ("mlp.experts.down_proj", True),  # ours [E, F, D], transformers [E, D, F]
}


def hf_counterpart(name: str) -> tuple[str, bool]:
    """The transformers (Mixtral, fused experts) parameter of one of ours, and whether it is transposed."""
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if name in top:
        return top[name], False
    if name == "lm_head.weight":
        return name, False
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m is None or m.group(2) not in _BLOCK_KEYS:
        raise KeyError(f"no transformers counterpart for {name}")
    key, transposed = _BLOCK_KEYS[m.group(2)]
    return f"model.layers.{m.group(1)}.{key}", transposed


def scaled_grads(ours: MoETransformer, theirs: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every parameter's gradient on both sides, in transformers' layout, each tensor divided by the largest
    |gradient| of TRL's tensor (so one absolute tolerance fits tensors of any scale); plus the gradient
    norms. Raises when a mapped pair holds different weights (the parameter map would be wrong)."""
    hf = dict(theirs.named_parameters())
    mine: dict[str, Any] = {"grads": {}}
    ref: dict[str, Any] = {"grads": {}}
    norm_ours = norm_theirs = 0.0
    for name, p in ours.named_parameters():
        key, transposed = hf_counterpart(name)
        q = hf[key]
        view = (lambda t: t.transpose(1, 2)) if transposed else (lambda t: t)
        if not torch.equal(view(p.detach()), q.detach()):
            raise RuntimeError(f"{name} and {key} hold different weights: the parameter map is wrong")
        g, h = view(p.grad).double(), q.grad.double()
        scale = h.abs().max().clamp(min=1e-30)
        mine["grads"][name], ref["grads"][name] = g / scale, h / scale
        norm_ours += float(g.pow(2).sum())
        norm_theirs += float(h.pow(2).sum())
    mine["norm"], ref["norm"] = norm_ours**0.5, norm_theirs**0.5
    return mine, ref


def _max_abs(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.double() - torch.as_tensor(b).double()).abs().max())
    return abs(float(a) - float(b))


def equality_check(
    ours: Ours, trainer: Any, ref_ours: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Compare the two sides on the first batch and the reference caches (see the module docstring);
    returns ``{what: verdict}`` for :meth:`Results.check`, raises :class:`Mismatch` on a difference."""
    model, hf = ours.model, trainer.model
    hf.train()  # as Trainer.training_step sets it (no dropout either way)
    batch = ours.batches[0]
    ds = trainer.train_dataset
    inputs = trainer.data_collator([ds[i] for i in range(args.batch)])
    mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    with torch.no_grad():
        lp_ours = sequence_logps(model(batch["input_ids"]).logits, batch["labels"]).double()
        out = hf(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        lp_theirs = out.log_probs.sum(1).double()
    ref_theirs = torch.stack(
        [torch.tensor(ds["ref_chosen_logps"]), torch.tensor(ds["ref_rejected_logps"])], dim=1
    ).double()

    # The first step's loss as each side computes it, with its aux term (no backward).
    with torch.no_grad():
        res = ours.objective(model, batch)
        trl_total = float(trainer.compute_loss(hf, inputs))
    trl_aux = trainer._metrics["train"]["aux_loss"][-1] * trainer.router_aux_loss_coef
    dpo_ours, aux_ours = float(res.scalars["loss"]), float(res.scalars["aux_loss"])

    # Gradients of the DPO loss alone: MoE aux off on both sides for this backward.
    moe = model.cfg.moe
    assert moe is not None
    coefs = (moe.lb_coef, moe.z_coef)
    moe.lb_coef = moe.z_coef = 0.0
    trainer.aux_loss_enabled = False
    try:
        r = ours.objective(model, batch)
        r.loss.backward()
        trl_dpo = trainer.compute_loss(hf, inputs)
        trl_dpo.backward()
        g_ours, g_trl = scaled_grads(model, hf)
    finally:
        moe.lb_coef, moe.z_coef = coefs
        trainer.aux_loss_enabled = True
        model.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0

    def same(what: str, a: Any, b: Any, atol: float, detail: str) -> tuple[str, dict[str, str]]:
        verdict = check_same({"moeforge": a, "trl": b}, "trl", atol=atol)
        return what, {k: f"{v} ({detail})" for k, v in verdict.items()}

    worst = max(g_ours["grads"], key=lambda k: _max_abs(g_ours["grads"][k], g_trl["grads"][k]))
    checks = dict(
        [
            same(
                f"summed policy log-probs of the first batch (atol {TOL_LOGPS:g})",
                lp_ours,
                lp_theirs,
                TOL_LOGPS,
                f"largest difference {_max_abs(lp_ours, lp_theirs):.2g} on sums near {float(lp_ours.mean()):.0f}",
            ),
            same(
                f"reference log-probs over all {int(ref_ours.shape[0])} pairs (atol {TOL_LOGPS:g})",
                ref_ours.double(),
                ref_theirs,
                TOL_LOGPS,
                f"largest difference {_max_abs(ref_ours, ref_theirs):.2g}",
            ),
            same(
                f"first-step DPO loss (atol {TOL_LOSS:g})",
                dpo_ours,
                float(trl_dpo.detach()),
                TOL_LOSS,
                f"{dpo_ours:.6f} vs {float(trl_dpo.detach()):.6f}",
            ),
            same(
                f"gradients of that DPO loss, {len(g_ours['grads'])} parameter tensors mapped to transformers', "
                f"each divided by its largest TRL gradient (atol {TOL_GRAD:g})",
                g_ours["grads"],
                g_trl["grads"],
                TOL_GRAD,
                f"largest relative difference {_max_abs(g_ours['grads'][worst], g_trl['grads'][worst]):.2g} "
                f"in {worst}; gradient norm {g_ours['norm']:.6f} vs {g_trl['norm']:.6f}",
            ),
        ]
    )
    aux = check_same(
        {"moeforge": aux_ours, "trl": trl_aux},
        "trl",
        atol=TOL_LOSS,
        allowed={
            "moeforge": "each side's own definition: moeforge lb_coef·ΣLB + z_coef·ΣZ over layers, padding "
            "routed; TRL router_aux_loss_coef × Mixtral's pooled load-balancing loss, padding masked"
        },
    )
    checks["MoE aux term of the first step (part of every timed step)"] = aux
    checks["_values"] = {
        "dpo_loss": dpo_ours,
        "aux_moeforge": aux_ours,
        "aux_trl": trl_aux,
        "total_moeforge": dpo_ours + aux_ours,
        "total_trl": trl_total,
    }
    return checks


# --- main ------------------------------------------------------------------------------------------


def _timing(t: Timings) -> Timing:
    return Timing(t.name, list(t.times))


def _row(
    name: str, t: Timings, reference_s: float | None, steps_per_epoch: int, extra: dict[str, Any]
) -> dict[str, Any]:
    timing = _timing(t)
    med = timing.median
    row: dict[str, Any] = {
        "contender": name,
        **timing.as_dict(4),
        "tokens_per_step_mean": round(statistics.mean(t.tokens), 1),
        "tokens_per_s": round(statistics.median(k / s for k, s in zip(t.tokens, t.times, strict=True)), 1),
        "cpu_s_median": round(statistics.median(t.cpu_times), 4),
    }
    if reference_s is not None:
        amortized = med + reference_s / steps_per_epoch
        row["reference_pass_s"] = round(reference_s, 3)
        row["step_s_amortized"] = round(amortized, 4)
        row["tokens_per_s_amortized"] = round(statistics.mean(t.tokens) / amortized, 1)
    return {**row, **extra}


def _amortized(t: Timings, reference_s: float, steps_per_epoch: int) -> Timing:
    """Each step's time plus its share of the one-off reference pass over one epoch."""
    return Timing(f"{t.name} amortized", [x + reference_s / steps_per_epoch for x in t.times])


def _ratio_text(r: Any, unit: str = "") -> str:
    return f"{r.median:.3g}{unit} ({r.low:.3g}–{r.high:.3g})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(ap, rounds=4)
    ap.add_argument(
        "--steps", dest="rounds", type=int, default=argparse.SUPPRESS, help="the same as --rounds"
    )
    ap.add_argument("--preset", default="small", help="model preset (every layer MoE: exports as Mixtral)")
    ap.add_argument("--pairs", type=int, default=16, help="preference pairs: one epoch")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (2 × batch sequences)")
    ap.add_argument("--scale", type=float, default=0.75, help="multiplies the texts' sentence counts")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary (at most the preset's)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (the figures' machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.pairs, args.scale = "tiny", 16, 0.5
        args.rounds = min(args.rounds, 3)
    if args.pairs % args.batch:
        ap.error(f"--pairs ({args.pairs}) must be a multiple of --batch ({args.batch})")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient.checkpointing.*")
    for name in ("transformers", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers
    import trl
    from transformers import PreTrainedTokenizerFast

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    device = torch.device(args.device)

    cfg = load_model_config(args.preset)
    if cfg.moe is None:
        ap.error(f"--preset {args.preset} is dense; this benchmark compares MoE DPO steps")
    results = Results("dpo_step", args, title="DPO step: moeforge vs TRL DPOTrainer")
    chats = synthetic_pairs(args.pairs, args.seed, args.scale)
    texts = [m["content"] for chat in chats for part in chat for m in part]
    tok = train_bpe(texts * 4, min(args.vocab, cfg.vocab_size))
    _, pad_id = token_ids(tok)
    pairs = [encode_pair(tok, p, c, r, max_len=cfg.max_seq_len) for p, c, r in chats]
    steps_per_epoch = args.pairs // args.batch
    groups = [pairs[i * args.batch : (i + 1) * args.batch] for i in range(steps_per_epoch)]
    batch_tokens = [sequence_tokens(g) for g in groups]

    torch.manual_seed(args.seed)
    model = MoETransformer(cfg).to(device).train()
    objective = Preference("dpo", device, "fp32", beta=BETA)
    optimizer = build_optimizer(model, OptimConfig())

    with tempfile.TemporaryDirectory(prefix="dpo_step_") as tmp, cpu_hog(args.busy):
        hf_dir = export_hf(model, Path(tmp) / "hf")
        hf_tok = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
        )
        assert hf_tok.pad_token_id == pad_id
        dataset = datasets.Dataset.from_dict(
            {
                "prompt_ids": [p.prompt for p in pairs],
                "chosen_ids": [p.chosen for p in pairs],
                "rejected_ids": [p.rejected for p in pairs],
            }
        )

        trainer_cls, interleave_cls = _trl_classes()
        max_steps = args.warmup + args.rounds
        trl_ref = make_trainer(
            trainer_cls, hf_dir, hf_tok, dataset, args, Path(tmp) / "trl_ref",
            precompute=False, max_steps=max_steps,
        )  # fmt: skip
        # One untimed forward per side first, so neither one-off reference pass pays the process's cold start.
        warm = collate_pairs(groups[0], pad_id=pad_id)
        warm_hf = trl_ref.data_collator([trl_ref.train_dataset[i] for i in range(args.batch)])
        with torch.no_grad():
            model(warm["input_ids"])
            trl_ref.model(input_ids=warm_hf["input_ids"], attention_mask=warm_hf["attention_mask"])

        # The one-off reference passes, before any training step: ours, then TRL's (inside its constructor).
        t0 = time.perf_counter()
        ref = reference_logps(model, pairs, pad_id=pad_id, batch_pairs=args.batch)
        ours_reference_s = time.perf_counter() - t0
        batches = [
            collate_pairs(g, pad_id=pad_id, ref_logps=ref[i * args.batch : (i + 1) * args.batch])
            for i, g in enumerate(groups)
        ]
        ours = Ours(model, objective, optimizer, batches, batch_tokens, OptimConfig().grad_clip)
        trl_pre = make_trainer(
            trainer_cls, hf_dir, hf_tok, dataset, args, Path(tmp) / "trl_pre",
            precompute=True, max_steps=max_steps,
        )  # fmt: skip

        pm = count_params(cfg)
        lengths = [len(p.prompt) + len(s) for p in pairs for s in (p.chosen, p.rejected)]
        setup = results.row(
            setup={
                "model": cfg.name,
                "total_params": pm.total,
                "active_params": pm.active,
                "pairs": args.pairs,
                "batch_pairs": args.batch,
                "steps_per_epoch": steps_per_epoch,
                "sequence_tokens_min_mean_max": [
                    min(lengths),
                    round(statistics.mean(lengths), 1),
                    max(lengths),
                ],
                "tokens_per_step_mean": round(statistics.mean(batch_tokens), 1),
                "tokenizer_vocab": tok.get_vocab_size(),
                "device": str(device),
                "dtype": "float32",
                "threads": torch.get_num_threads(),
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "trl": trl.__version__,
                },
            }
        )["setup"]

        try:
            checks = equality_check(ours, trl_pre, ref, args)
        except Mismatch as exc:
            print(
                f"error: {exc}; moeforge and TRL disagree on the same model and batch, no timing",
                file=sys.stderr,
            )
            return 1
        values = checks.pop("_values")
        results.row(check_values=values)
        for what, verdict in checks.items():
            results.check(what, verdict)

        mine_a, mine_b = Timings("moeforge (phase trl)"), Timings("moeforge (phase trl_precomputed)")
        trl_a, trl_b = Timings("trl"), Timings("trl_precomputed")
        cb_a = interleave_cls(trl_ref.step_tokens, ours, args.warmup, trl_a, mine_a)
        trl_ref.add_callback(cb_a)
        trl_ref.train()
        cb_b = interleave_cls(trl_pre.step_tokens, ours, args.warmup, trl_b, mine_b)
        trl_pre.add_callback(cb_b)
        trl_pre.train()

    mine = Timings("moeforge", mine_a.times + mine_b.times, mine_a.cpu_times + mine_b.cpu_times)
    mine.tokens = mine_a.tokens + mine_b.tokens
    trl_reference_s = trl_pre.reference_s
    assert trl_reference_s is not None
    vs_trl = paired_ratio(_timing(mine_a), _timing(trl_a))
    vs_pre = paired_ratio(_timing(mine_b), _timing(trl_b))
    amort = paired_ratio(_amortized(mine_a, ours_reference_s, steps_per_epoch), _timing(trl_a))
    amort_pre = paired_ratio(
        _amortized(mine_b, ours_reference_s, steps_per_epoch),
        _amortized(trl_b, trl_reference_s, steps_per_epoch),
    )
    rows = {
        "moeforge": _row(
            "moeforge", mine, ours_reference_s, steps_per_epoch,
            {"reference_in_memory": False, "dpo_loss_last": round(cb_b.losses[-1], 5),
             "over_trl": vs_trl.as_dict(), "over_trl_precomputed": vs_pre.as_dict(),
             "amortized_over_trl": amort.as_dict(), "amortized_over_trl_precomputed_amortized": amort_pre.as_dict()},
        ),
        "trl": _row("trl", trl_a, None, steps_per_epoch, {"reference_in_memory": True}),
        "trl_precomputed": _row(
            "trl_precomputed", trl_b, trl_reference_s, steps_per_epoch, {"reference_in_memory": False}
        ),
    }  # fmt: skip
    for row in rows.values():
        results.row(**row)

    def cell(name: str, key: str) -> Any:
        return rows[name].get(key, "–")

    results.table(
        f"`{cfg.name}` ({pm.total / 1e6:.1f} M total, {pm.active / 1e6:.1f} M active), {args.batch} pairs per "
        f"step ({setup['tokens_per_step_mean']:,.0f} tokens on average), fp32, {setup['threads']} threads; "
        f"median of {args.rounds} timed steps per phase (moeforge: both phases). The ratios are medians of the "
        "per-step ratios on the same batch (lowest–highest step); the reference pass is the one-off pass over "
        f"all {args.pairs} pairs, amortized over one epoch of {steps_per_epoch} steps.",
        ["contender", "step s", "spread", "tokens/s", "reference pass s", "amortized tokens/s", "moeforge ÷ it"],
        [
            ["moeforge", cell("moeforge", "median_s"), cell("moeforge", "spread"), cell("moeforge", "tokens_per_s"),
             cell("moeforge", "reference_pass_s"), cell("moeforge", "tokens_per_s_amortized"), "–"],
            ["TRL", cell("trl", "median_s"), cell("trl", "spread"), cell("trl", "tokens_per_s"), "–", "–",
             _ratio_text(vs_trl)],
            ["TRL precomputed", cell("trl_precomputed", "median_s"), cell("trl_precomputed", "spread"),
             cell("trl_precomputed", "tokens_per_s"), cell("trl_precomputed", "reference_pass_s"),
             cell("trl_precomputed", "tokens_per_s_amortized"), _ratio_text(vs_pre)],
        ],
    )  # fmt: skip
    results.goal(
        "moeforge tokens/s ÷ TRL DPOTrainer (default mode) tokens/s",
        vs_trl.median,
        GOAL,
        spread=(vs_trl.low, vs_trl.high),
    )
    results.note(
        f"Counting the one-off reference pass into one epoch, moeforge is {_ratio_text(amort, '×')} TRL's "
        f"default mode, and {_ratio_text(amort_pre, '×')} TRL precomputed with its own pass amortized the same "
        "way (per-step ratios: median, lowest–highest)."
    )
    results.note(
        f"Caching the reference is worth {rows['trl']['median_s'] / rows['trl_precomputed']['median_s']:.3g}× "
        "inside TRL's own figures (median TRL step ÷ median TRL precomputed step, separate phases)."
    )
    t_max = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
    logits_mb = 2 * args.batch * t_max * cfg.vocab_size * 4 / 1e6
    results.note(
        f"moeforge materializes the full [{2 * args.batch}, T, {cfg.vocab_size:,}] fp32 logits: up to "
        f"{logits_mb:,.0f} MB at this data's longest sequence (T = {t_max}), plus a log-softmax copy of the "
        "same size."
    )
    results.note(
        f"Aux terms at step 0: moeforge {values['aux_moeforge']:.3g} (over {cfg.n_layers} layers), TRL "
        f"{values['aux_trl']:.3g}; first-step DPO loss {values['dpo_loss']:.6f} on both sides (log 2)."
    )
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
