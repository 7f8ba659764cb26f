"""Preference pairs generated from a checkpoint: verifiable answers, reference vs sample, identity.

Three kinds (``GenerateConfig.kind``), each writing a pair set (:mod:`moeforge.data.pairset`):

- ``verifiable``: a dataset with a checkable answer — GSM8K (the reply's last number against the number
  after ``####``) or HumanEval (the reply's code passes the problem's tests in the sandbox of
  ``configs/eval/sandbox.py``). ``samples`` replies per prompt; a correct reply is chosen over an incorrect
  one. When no reply is correct and ``reference_fallback`` is on, the dataset's answer is chosen instead
  (GSM8K's without the ``<<…>>`` calculator annotations, its ``#### N`` line made "The answer is N.").
- ``reference``: the dataset's answer is chosen over a reply that a named ``rule`` judges worse
  (``wrong_answer``: GSM8K, the final number is not the gold one; ``fails_tests``: HumanEval).
- ``identity``: the prompts of ``configs/eval/identity_prompts.jsonl`` and :data:`ADVERSARIAL_PROMPTS`
  (claim another identity, leak the system prompt). Chosen is the expected answer made from templates
  with ``identity.name`` / ``identity.author`` (who the model is; to a leak attempt, a refusal that quotes
  nothing); rejected is a reply that fails the check — it does not mention the name or author, claims
  another identity (``mentions_identity`` / ``claims_other`` of ``configs/eval/utils.py``), or quotes the
  system prompt (:func:`quotes_system_prompt`) — or, when every reply passes, a rule-made wrong answer.

The checkers are the eval suite's own (``configs/eval/utils.py``, ``sandbox.py``, loaded by path as lm-eval
loads them), so a pair is correct by the same rule the benchmark scores.

**Pairing**, per prompt, over its distinct non-blank replies in sample order: verifiable pairs walk the
diagonals of correct × incorrect — (c0, r0), (c1, r1), …, then (c0, r1), (c1, r2), … — so replies are used
as evenly as possible; the other kinds pair their one chosen answer with the failing replies in order.
Either way at most ``max_pairs_per_prompt`` pairs a prompt. Every side records how it was made
(:class:`~moeforge.data.preference.SideProvenance`: the checkpoint and its sha256, the sampling settings
and the reply's own seed, the verdict as ``note``), every pair where its prompt came from (``meta``).

**Deterministic and resumable.** The prompts are the dataset's items ``offset`` … ``offset + limit - 1`` in
file order (the first ``limit``, not a sample; unreadable items in that window are quarantined). Reply
``j`` of item ``i`` (its position in the file) is drawn with its own seed :func:`sample_seed` (seed, i, j),
so a reply does not depend on what is decoded beside it. Prompts are worked in chunks of
``max(1, batch_size // samples)`` (one engine batch); each finished chunk's replies and verdicts go to
``OUT.partial/samples.jsonl`` as one line, written, flushed and fsynced (a torn last line is dropped on
resume). A rerun continues after the last finished chunk when the sampling settings, the checkpoint's
weights and the dataset's bytes are those of ``OUT.partial/config.json`` and refuses otherwise (``restart``
discards the samples); the pair-building settings (``pairs``, ``max_pairs_per_prompt``,
``reference_fallback``) may change between runs. When every chunk is done the pairs are built, written
with :func:`~moeforge.data.pairset.write_pair_set`, and ``OUT.partial`` is removed. One configuration
gives byte-identical output, resumed or not.

The sampler is injected (:data:`Sampler`); ``moeforge data pairs generate`` passes one backed by the
serving engine, tests a deterministic stand-in.

The package: :mod:`~moeforge.data.pairgen.config` (the configuration, datasets, adversarial prompts,
the eval suite's checkers), :mod:`~moeforge.data.pairgen.items` (the prompts), :mod:`~moeforge.data.pairgen.judge`
(whether a reply passes; identity answers), :mod:`~moeforge.data.pairgen.build` (pairing) and
:mod:`~moeforge.data.pairgen.run` (the chunked, resumable run).
"""

from __future__ import annotations

from moeforge.data.pairgen.build import diagonal_pairs
from moeforge.data.pairgen.config import (
    ADVERSARIAL_PROMPTS,
    EVAL_DIR,
    GenerateConfig,
    IdentitySettings,
    PairGenError,
    eval_module,
    load_generate_config,
)
from moeforge.data.pairgen.items import gsm8k_reference
from moeforge.data.pairgen.judge import quotes_system_prompt, reply_code
from moeforge.data.pairgen.run import GenerateResult, Sampler, SampleRequest, generate_pairs, sample_seed

__all__ = [
    "ADVERSARIAL_PROMPTS",
    "EVAL_DIR",
    "GenerateConfig",
    "GenerateResult",
    "IdentitySettings",
    "PairGenError",
    "SampleRequest",
    "Sampler",
    "diagonal_pairs",
    "eval_module",
    "generate_pairs",
    "gsm8k_reference",
    "load_generate_config",
    "quotes_system_prompt",
    "reply_code",
    "sample_seed",
]
