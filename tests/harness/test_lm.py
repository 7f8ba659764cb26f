"""The ``moeforge`` lm-eval model (:mod:`moeforge.harness.lm`) and ``moeforge eval`` (:mod:`moeforge.harness.run`).

A tiny checkpoint (three sentences learnt by heart in a few seconds) is scored against the model's own
forward computed by hand (loglikelihood, rolling windows) and generates the engine's greedy text; user
mistakes are refused with a message; ``run_eval`` writes and merges results, the run summary and the model
card; lm-eval's own ``lm_eval`` command finds the model; and, slow, the numbers equal lm-eval's ``hf``
backend on SmolLM2-135M. The tasks are tiny lm-eval YAMLs written into tmp dirs (``dataset_path: json``,
offline, their datasets cache there too), so nothing here depends on the offline suite in ``configs/eval``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from moeforge.harness.lm import HarnessError, MoeforgeLM
from moeforge.model.config import load_model_config
from moeforge.model.transformer import MoETransformer
from moeforge.serve.sampling import SamplingParams
from moeforge.tokens.tokenizer import load_tokenizer
from moeforge.train.checkpoint import save_checkpoint

# what the tiny model learns by heart, each document followed by the end-of-text token: its greedy text is
# then readable and varied, and it ends
DOCS = [
    "The river ran past the old mill where the miller kept his accounts in a leather book.",
    "Every morning he counted the sacks of grain and wrote the number beside the date.",
    "Anna has 3 apples and buys 6 more, so she has 9 apples now.",
]
TEXT = " ".join(DOCS)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a busy 2-core machine torch's thread pool makes a tiny forward 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ---- a tiny checkpoint with a tokenizer --------------------------------------------------------------


def _save_run(
    run: Path, tokenizer_dir: Path | None, vocab: int, *, state_tokenizer: Path | None = None
) -> MoETransformer:
    """A trainer run at ``run`` (``run/checkpoints/step-00000001``) holding a tiny MoE model that has learnt
    :data:`DOCS` (60 Adam steps, a few seconds) with a copy of ``tokenizer_dir`` in ``run/tokenizer``; without
    one, an untrained model and no tokenizer (``state_tokenizer``: one named by the training config instead).
    Returns the model (eval mode)."""
    cfg = load_model_config("tiny", [f"vocab_size={vocab}"])
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
        eot = tok.token_to_id("<|endoftext|>")
        seqs = [[*tok.encode(d).ids, eot] for d in DOCS]
        n = max(map(len, seqs)) - 1
        x = torch.full((len(seqs), n), eot)
        y = torch.full((len(seqs), n), -100)
        for i, ids in enumerate(seqs):
            x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
            y[i, : len(ids) - 1] = torch.tensor(ids[1:])
        for _ in range(60):
            loss = model(x, y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, run / "tokenizer")
    config: dict = {"name": "harness-test"}
    if state_tokenizer is not None:
        config["data"] = {"tokenizer": str(state_tokenizer)}
    state = {"model_config": cfg.model_dump(mode="json"), "config": config}
    save_checkpoint(run, step=1, model=model, optimizer=opt, state=state, keep_last=1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(token_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MoETransformer]:
    """``(run directory, the same model in memory)``: the model is the hand-computed reference."""
    vocab = load_tokenizer(token_tokenizer).get_vocab_size()
    run = tmp_path_factory.mktemp("harness") / "run"
    return run, _save_run(run, token_tokenizer, vocab)


@pytest.fixture(scope="module")
def lm(tiny: tuple[Path, MoETransformer]) -> MoeforgeLM:
    return MoeforgeLM(checkpoint=str(tiny[0]), batch_size=4)


@pytest.fixture(scope="module")
def tok(tiny: tuple[Path, MoETransformer]):
    return load_tokenizer(tiny[0] / "tokenizer")


def _ll(*pairs: tuple[str, str]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@torch.no_grad()
def _reference(model: MoETransformer, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of log-softmax(model(ctx + cont).logits) over the continuation's tokens, and whether each is the
    argmax: the definition, one unbatched forward, no KV cache."""
    ids = ctx + cont
    logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)
    total, greedy = 0.0, True
    for j, t in enumerate(cont):
        pos = len(ctx) - 1 + j  # the position whose output predicts cont[j]
        total += float(logp[pos, t])
        greedy = greedy and int(logits[pos].argmax()) == t
    return total, greedy


def _split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into ids, by hand: the context's trailing spaces
    move to the continuation; context + continuation is encoded whole and cut at the context's length."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context).ids
    whole = tok.encode(context + continuation).ids
    assert whole[: len(ctx)] == ctx  # the split is clean for these texts
    return ctx, whole[len(ctx) :]


# ---- 1. the numbers: loglikelihood, rolling, generation -----------------------------------------------


def test_loglikelihood_equals_the_models_own_forward(
    lm: MoeforgeLM, tiny: tuple[Path, MoETransformer], tok
) -> None:
    _, model = tiny
    eot = tok.token_to_id("<|endoftext|>")
    assert lm.prefix_token_id == eot and lm.eot_token_id == eot  # no bos_token in moeforge's tokenizer
    pairs = [
        ("The river ran past the old mill", " where the miller kept his accounts"),  # learnt: greedy
        ("Every morning he counted the", " sacks"),  # learnt: greedy
        ("Anna has 3 apples and buys", " 5 more apples."),
        ("Anna has ", "5 apples"),  # a trailing space moves to the continuation
        ("Question: How many apples?\nAnswer:", " 12"),
    ]
    got = lm.loglikelihood(_ll(*pairs), disable_tqdm=True)
    want = [_reference(model, *_split(tok, c, x)) for c, x in pairs]
    assert len(got) == len(pairs)
    for (lp, g), (rlp, rg) in zip(got, want, strict=True):
        assert lp == pytest.approx(rlp, abs=1e-4, rel=1e-5)
        assert g is rg
    assert [g for _, g in want] == [True, True, False, False, False]
    assert len({round(lp, 3) for lp, _ in got}) == len(got)  # distinct numbers, not a constant


def test_an_empty_context_is_conditioned_on_the_prefix_token(
    lm: MoeforgeLM, tiny: tuple[Path, MoETransformer], tok
) -> None:
    _, model = tiny
    cont = "The river ran past the mill"
    ids = tok.encode(cont).ids
    assert ids[0] != lm.prefix_token_id
    [(lp, g)] = lm.loglikelihood(_ll(("", cont)), disable_tqdm=True)
    rlp, rg = _reference(model, [lm.prefix_token_id], ids)
    assert lp == pytest.approx(rlp, abs=1e-4, rel=1e-5) and g is rg
    # the prefix token is a setting: another one gives the other number
    other = MoeforgeLM(checkpoint=str(tiny[0]), engine=lm.engine, prefix_token_id=ids[0] + 1)
    [(lp2, _)] = other.loglikelihood(_ll(("", cont)), disable_tqdm=True)
    assert lp2 == pytest.approx(_reference(model, [ids[0] + 1], ids)[0], abs=1e-4, rel=1e-5)
    assert abs(lp2 - lp) > 1e-3


def test_a_shared_context_gives_the_numbers_of_requests_scored_alone(
    lm: MoeforgeLM, tiny: tuple[Path, MoETransformer], tok
) -> None:
    _, model = tiny
    question = "Question: Anna has 4 apples and buys 7 more. How many apples does she have now?\nAnswer:"
    choices = [" 11", " 12 apples", " 3", " twenty eight"]
    other = [("Every morning he counted", " the sacks"), ("Every morning he counted", " grain")]
    pairs = [(question, c) for c in choices] + other
    together = lm.loglikelihood(_ll(*pairs), disable_tqdm=True)
    alone = [lm.loglikelihood(_ll(p), disable_tqdm=True)[0] for p in pairs]
    for (a, ga), (b, gb), p in zip(together, alone, pairs, strict=True):
        assert a == pytest.approx(b, abs=1e-5), p
        assert ga is gb
        ref = _reference(model, *_split(tok, *p))
        assert a == pytest.approx(ref[0], abs=1e-4, rel=1e-5) and ga is ref[1]


def test_many_requests_come_back_in_input_order(
    lm: MoeforgeLM, tiny: tuple[Path, MoETransformer], tok
) -> None:
    _, model = tiny
    words = TEXT.split()
    # more than one scoring chunk (64), short and long, with repeated contexts
    pairs = [(" ".join(words[: 2 + i % 9]), " " + " ".join(words[2 + i % 9 : 4 + i % 13])) for i in range(70)]
    got = lm.loglikelihood(_ll(*pairs), disable_tqdm=True)
    assert len(got) == 70
    for (lp, g), p in zip(got, pairs, strict=True):
        ref = _reference(model, *_split(tok, *p))
        assert lp == pytest.approx(ref[0], abs=1e-4, rel=1e-5), p
        assert g is ref[1]


def test_rolling_loglikelihood_is_the_sum_of_disjoint_windows(
    lm: MoeforgeLM, tiny: tuple[Path, MoETransformer], tok
) -> None:
    _, model = tiny
    short = MoeforgeLM(checkpoint=str(tiny[0]), engine=lm.engine, max_length=16)
    assert short.max_length == 16
    ids = tok.encode(TEXT).ids
    assert len(ids) > 3 * 16
    windows = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(
            token_list=ids, prefix_token=short.prefix_token_id, max_seq_len=16, context_len=1
        )
    ]
    assert len(windows) >= 4
    assert [t for _, cont in windows for t in cont] == ids  # every token predicted once
    assert all(len(c) + len(x) <= 17 for c, x in windows)
    want = sum(_reference(model, c, x)[0] for c, x in windows)
    one_window = _reference(model, [short.prefix_token_id], ids)[0]  # the whole text at once differs
    reqs = [
        Instance("loglikelihood_rolling", {}, (TEXT,), 0),
        Instance("loglikelihood_rolling", {}, ("Anna has 3 apples.",), 1),
    ]
    got = short.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert got[0] == pytest.approx(want, abs=1e-3, rel=1e-5)
    assert abs(got[0] - one_window) > 1e-2  # the windows really are cut at 16 tokens
    small = tok.encode("Anna has 3 apples.").ids
    assert got[1] == pytest.approx(_reference(model, [short.prefix_token_id], small)[0], abs=1e-4)
    # with the model's whole context, one window: the text scored in one go
    [full] = lm.loglikelihood_rolling(reqs[:1], disable_tqdm=True)
    assert full == pytest.approx(one_window, abs=1e-3, rel=1e-5)


def test_the_cache_hook_gets_whole_requests_only(lm: MoeforgeLM, tiny: tuple[Path, MoETransformer]) -> None:
    """lm-eval's ``--use_cache`` stores what ``add_partial`` receives: each request's own answer, keyed by
    its arguments; the windows of a rolling request are not requests of their own."""

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple, object]] = []

        def add_partial(self, attr: str, req: tuple, res: object) -> None:
            self.calls.append((attr, tuple(req), res))

    fresh = MoeforgeLM(checkpoint=str(tiny[0]), engine=lm.engine, max_length=16)
    hook = Recorder()
    fresh.set_cache_hook(hook)  # type: ignore[arg-type]
    [total] = fresh.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (TEXT,), 0)], disable_tqdm=True
    )
    assert hook.calls == [("loglikelihood_rolling", (TEXT,), total)]
    hook.calls.clear()
    pairs = [("Anna has", " 3 apples"), ("", "The river")]
    got = fresh.loglikelihood(_ll(*pairs), disable_tqdm=True)
    assert sorted(hook.calls) == sorted(("loglikelihood", p, r) for p, r in zip(pairs, got, strict=True))


def _gen(prompt: str, **kwargs: object) -> Instance:
    return Instance("generate_until", {}, (prompt, dict(kwargs)), 0)


def test_generate_until_is_the_engines_greedy_cut_at_the_stop_string(lm: MoeforgeLM, tok) -> None:
    prompt = "The river ran past the old mill where"
    ref = lm.engine.generate([tok.encode(prompt).ids], SamplingParams(max_tokens=16, temperature=0))[0]
    assert ref.text == " the miller kept his accounts in a leather book."  # learnt, then end-of-text
    assert ref.finish_reason == "stop" and ref.token_ids[-1] == lm.eot_token_id

    [text] = lm.generate_until([_gen(prompt, until=["@@never@@"], max_gen_toks=16)], disable_tqdm=True)
    assert text == ref.text
    # max_gen_toks: the first n tokens of the same greedy path
    [three] = lm.generate_until([_gen(prompt, until=["@@never@@"], max_gen_toks=3)], disable_tqdm=True)
    assert three == tok.decode(ref.token_ids[:3]) == " the miller kept"
    # a stop string from the middle of the greedy text: the output is what comes before it, without it
    [cut] = lm.generate_until([_gen(prompt, until=[" accounts", "zzz"], max_gen_toks=16)], disable_tqdm=True)
    assert cut == " the miller kept his"
    # several requests with different settings in one call: each its own, in input order
    many = [
        _gen(prompt, until=[" accounts"], max_gen_toks=16),
        _gen("Anna has 3", until=["@@never@@"], max_gen_toks=4),
        _gen(prompt, until=["@@never@@"], max_gen_toks=3),
        _gen("Every morning he counted", until=[" grain"], max_gen_toks=16),
        _gen(prompt, until=[" accounts"], max_gen_toks=16, do_sample=False, temperature=0.0),
    ]
    assert lm.generate_until(many, disable_tqdm=True) == [
        cut,
        " apples and buys 6",
        three,
        " the sacks of",
        cut,
    ]


def test_generate_until_stops_at_the_end_of_text_token(lm: MoeforgeLM, tok) -> None:
    prompt = "Every morning he counted"
    ids = tok.encode(prompt).ids
    raw = lm.engine.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    k = raw.token_ids.index(lm.eot_token_id)  # the learnt document ends; the model would go on after it
    assert 5 < k < 23
    [text] = lm.generate_until([_gen(prompt, until=["@@never@@"], max_gen_toks=24)], disable_tqdm=True)
    assert (
        text == tok.decode(raw.token_ids[:k]) == " the sacks of grain and wrote the number beside the date."
    )
    # the default: no until at all (lm-eval then stops at the end-of-text text itself)
    [plain] = lm.generate_until([_gen(prompt, max_gen_toks=24)], disable_tqdm=True)
    assert plain == text


# ---- 2. mistakes are refused with a message ------------------------------------------------------------


def test_user_mistakes_raise_harness_errors(
    tiny: tuple[Path, MoETransformer], lm: MoeforgeLM, tmp_path: Path
) -> None:
    with pytest.raises(HarnessError, match=r"checkpoint=DIR is required"):
        MoeforgeLM()
    with pytest.raises(HarnessError, match=r"not a checkpoint"):
        MoeforgeLM(checkpoint=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match=r"not a checkpoint"):
        MoeforgeLM(checkpoint=str(tmp_path / "empty"))
    for bad in (0, -2, "many"):
        with pytest.raises(HarnessError, match=r"batch_size must be a positive integer"):
            MoeforgeLM(checkpoint=str(tiny[0]), batch_size=bad)
    with pytest.raises(HarnessError, match=r"max_length must be in 1\.\.256"):
        MoeforgeLM(checkpoint=str(tiny[0]), engine=lm.engine, max_length=1000)
    with pytest.raises(HarnessError, match=r"asks for 300 generated tokens"):
        lm.generate_until([_gen("Anna", until=["\n"], max_gen_toks=300)], disable_tqdm=True)


def test_a_checkpoint_without_a_tokenizer_is_refused(token_tokenizer: Path, tmp_path: Path) -> None:
    vocab = load_tokenizer(token_tokenizer).get_vocab_size()
    run = tmp_path / "a" / "run"  # no tokenizer.json in it or up to three levels above its checkpoint
    _save_run(run, None, vocab)
    with pytest.raises(HarnessError, match=r"no tokenizer found near the checkpoint"):
        MoeforgeLM(checkpoint=str(run))


def test_the_run_directory_reads_the_tokenizer_config_its_checkpoint_names(
    token_tokenizer: Path, tmp_path: Path
) -> None:
    """A run whose tokenizer is named by its training config (state.json), not copied beside it: the prefix
    and end-of-text tokens come from that tokenizer's config whether the run or its checkpoint is given."""
    tok_dir = tmp_path / "elsewhere" / "deep" / "er" / "tok"
    shutil.copytree(token_tokenizer, tok_dir)
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["bos_token"] = "<|im_start|>"
    cfg_path.write_text(json.dumps(cfg))
    vocab = load_tokenizer(tok_dir).get_vocab_size()
    run = tmp_path / "runs" / "r1"
    _save_run(run, None, vocab, state_tokenizer=tok_dir)
    ckpt = next((run / "checkpoints").iterdir())
    start = load_tokenizer(tok_dir).token_to_id("<|im_start|>")
    by_ckpt = MoeforgeLM(checkpoint=str(ckpt))
    by_run = MoeforgeLM(checkpoint=str(run), engine=by_ckpt.engine)
    assert by_ckpt.prefix_token_id == start
    assert by_run.prefix_token_id == start


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback of a machine without CUDA")
def test_a_cuda_device_falls_back_to_the_cpu_as_hf_does(tiny: tuple[Path, MoETransformer]) -> None:
    """lm-eval's CLI passes device=cuda:0 when --device is not given."""
    lm = MoeforgeLM(checkpoint=str(tiny[0]), device="cuda:0")
    assert lm.device == torch.device("cpu") and lm.engine.device == torch.device("cpu")


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``moeforge ARGS`` in process, through the real entry point: (exit code, stdout, stderr)."""
    from moeforge.cli.main import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["moeforge", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_moeforge_eval_on_a_bad_path_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _cli(monkeypatch, capsys, "eval", str(tmp_path / "nothing"), "--tasks", "x")
    assert code == 2
    assert err.strip().count("\n") == 0 and "error:" in err and "no checkpoint here" in err
    code, _, err = _cli(monkeypatch, capsys, "eval")
    assert code == 2 and err.strip().count("\n") == 0 and "CHECKPOINT is required" in err


@pytest.mark.slow  # lm-eval indexes its thousands of task YAMLs
def test_moeforge_eval_of_an_unknown_task_names_the_offline_suite(
    tiny: tuple[Path, MoETransformer], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moeforge.harness.run import default_tasks_dir

    code, _, err = _cli(
        monkeypatch, capsys, "eval", str(tiny[0]), "--tasks", "no_such_task_xyz", "--limit", "1"
    )
    assert code == 2 and err.strip().count("\n") == 0
    assert "unknown task(s) no_such_task_xyz" in err
    suite = sorted(p.stem for p in default_tasks_dir().glob("moeforge_*.yaml"))
    assert suite, "configs/eval has no moeforge_* task"
    for name in suite:
        assert name in err
    assert not (tiny[0] / "eval").exists()  # nothing written


# ---- 3. run_eval end to end ----------------------------------------------------------------------------


def _write_tasks(root: Path) -> Path:
    """Two tiny offline lm-eval tasks in ``root``: multiple choice (``tiny_mc``, acc) and rolling
    perplexity (``tiny_ppl``), reading JSON lines through the datasets ``json`` builder."""
    root.mkdir(parents=True, exist_ok=True)
    mc = [
        {"q": f"Anna has {a} apples and buys {b} more. How many apples does she have now?",
         "choices": [f" {a + b}", f" {a + b + 1}", f" {a}"], "label": 0}
        for a, b in ((2, 5), (1, 4), (3, 6), (7, 2))
    ]  # fmt: skip
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc), encoding="utf-8")
    texts = [{"text": s.strip() + "."} for s in TEXT.split(".") if s.strip()]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts), encoding="utf-8")
    (root / "tiny_mc.yaml").write_text(
        textwrap.dedent(f"""\
            task: tiny_mc
            dataset_path: json
            dataset_kwargs:
              cache_dir: {root / "hf-datasets"}
              data_files:
                test: {root / "mc.jsonl"}
            output_type: multiple_choice
            test_split: test
            doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
            doc_to_choice: choices
            doc_to_target: label
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            metadata:
              version: 1.0
            """),
        encoding="utf-8",
    )
    (root / "tiny_ppl.yaml").write_text(
        textwrap.dedent(f"""\
            task: tiny_ppl
            dataset_path: json
            dataset_kwargs:
              cache_dir: {root / "hf-datasets"}
              data_files:
                test: {root / "text.jsonl"}
            output_type: loglikelihood_rolling
            test_split: test
            doc_to_text: ""
            doc_to_target: "{{{{text}}}}"
            metric_list:
              - metric: word_perplexity
              - metric: bits_per_byte
            metadata:
              version: 1.0
            """),
        encoding="utf-8",
    )
    return root


@pytest.mark.slow
def test_run_eval_writes_merges_and_reaches_the_summary_and_model_card(
    token_tokenizer: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from moeforge.export import export_checkpoint
    from moeforge.harness.run import eval_dir, read_results, run_eval
    from moeforge.io import sha256_file

    tasks = _write_tasks(tmp_path / "tasks")
    vocab = load_tokenizer(token_tokenizer).get_vocab_size()
    run = tmp_path / "run"
    _save_run(run, token_tokenizer, vocab)
    (run / "summary.json").write_text(json.dumps({"status": "completed", "steps": 1, "tokens_seen": 64}))
    ckpt = next((run / "checkpoints").iterdir())
    assert eval_dir(run) == run / "eval" == eval_dir(ckpt)

    first = run_eval(run, ["tiny_mc"], limit=3, include_path=tasks, batch_size=2)
    assert first.path == run / "eval" / "results.json" and first.path.is_file()
    assert set(first.scores) == {"tiny_mc"} and first.n_samples == {"tiny_mc": 3}
    acc = first.scores["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    # metrics only ("metric,filter" keys), with their stderr; not lm-eval's sample_len / alias
    assert set(first.scores["tiny_mc"]) == {"acc,none", "acc_stderr,none"}
    doc = read_results(run)
    assert doc is not None and doc["format"] == "moeforge.eval/1"
    entry = doc["tasks"]["tiny_mc"]
    assert entry["metrics"]["acc,none"] == acc and entry["n_samples"] == 3 and entry["limit"] == 3
    assert entry["model_sha256"] == sha256_file(ckpt / "model.safetensors")
    assert entry["checkpoint"] == str(ckpt.resolve())

    # the second through `moeforge eval`, on the checkpoint directory this time
    code, out, err = _cli(
        monkeypatch,
        capsys,
        "eval",
        str(ckpt),
        "--tasks",
        "tiny_ppl",
        "--limit",
        "2",
        "--include-path",
        str(tasks),
    )
    assert code == 0, err
    assert "tiny_ppl" in out and "word_perplexity" in out and "results → " in out
    doc = read_results(run)
    assert doc is not None and set(doc["tasks"]) == {"tiny_mc", "tiny_ppl"}  # merged, the first kept
    assert doc["tasks"]["tiny_mc"]["metrics"]["acc,none"] == acc
    ppl = doc["tasks"]["tiny_ppl"]["metrics"]
    assert ppl["word_perplexity,none"] > 1.0 and ppl["bits_per_byte,none"] > 0.0
    assert doc["tasks"]["tiny_ppl"]["n_samples"] == 2

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1  # kept
    assert set(summary["lm_eval"]) == {"tiny_mc", "tiny_ppl"}
    assert summary["lm_eval"]["tiny_mc"]["acc,none"] == acc

    out = export_checkpoint(run, tmp_path / "hf")
    card = (out / "README.md").read_text()
    assert "lm-evaluation-harness" in card
    stderr = first.scores["tiny_mc"]["acc_stderr,none"]
    assert f"| tiny_mc | acc | {acc:.4f} | {stderr:.4f} | 3 | task default |" in card
    assert "sample_len" not in card
    assert f"| tiny_ppl | word_perplexity | {ppl['word_perplexity,none']:.4f} |" in card


# ---- 4. lm-eval's own command line ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_lm_eval_command_runs_the_moeforge_model(
    tiny: tuple[Path, MoETransformer], tmp_path: Path
) -> None:
    pth = Path(sysconfig.get_paths()["purelib"]) / "moeforge-lm-eval.pth"
    if not pth.is_file():
        pytest.skip(f"{pth} is not installed (make setup copies it into site-packages)")
    script = Path(sys.executable).parent / "lm_eval"
    if not script.is_file():
        pytest.skip(f"no lm_eval console script beside {sys.executable}")
    tasks = _write_tasks(tmp_path / "tasks")
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    r = subprocess.run(
        [
            str(script),
            *("--model", "moeforge", "--model_args", f"checkpoint={tiny[0]}"),
            *("--tasks", "tiny_mc", "--include_path", str(tasks), "--limit", "2"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert any("tiny_mc" in line and "acc" in line for line in table), r.stdout
    assert "moeforge (" in r.stdout  # lm-eval's summary line names the model


# ---- 5. parity with lm-eval's hf backend on SmolLM2 --------------------------------------------------------

PARITY_TEXT = " ".join(
    [
        "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
        "far faster than scribes.",
        "Within fifty years, presses were operating in more than two hundred cities across Europe, and "
        "millions of volumes had been printed.",
        "The spread of printed material changed how people learned, argued and worshipped: pamphlets carried "
        "new ideas quickly, scholars could compare identical copies of a text, and vernacular languages gained "
        "standard spellings.",
        "Printers also became merchants, choosing which works to publish and how many copies to risk.",
        "Some titles sold out in weeks; others sat in warehouses for years.",
        "In the centuries that followed, steam power, rotary presses and cheap paper made newspapers "
        "affordable to ordinary workers, and literacy rates rose in step.",
        "Today the same questions that troubled early printers, such as who may publish, who pays, and how "
        "readers can trust what they read, return with every new medium.",
        "Libraries, once chained to monasteries, opened to the public; encyclopedias tried to gather all "
        "knowledge between two covers, and censors struggled to keep up with what the presses produced.",
        "Мы также проверим несколько слов по-русски, чтобы токенизатор встретил кириллицу.",
    ]
)


@pytest.mark.slow
def test_scores_and_generations_equal_lm_evals_hf_backend(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    from lm_eval.models.huggingface import HFLM

    from moeforge.export import export_checkpoint

    hf_dir = export_checkpoint(smollm2_checkpoint, tmp_path / "hf")
    ours = MoeforgeLM(checkpoint=str(smollm2_checkpoint), batch_size=4, max_length=128)
    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=4, max_length=128)
    assert ours.prefix_token_id == theirs.prefix_token_id
    assert ours.eot_token_id == theirs.eot_token_id

    question = "Question: Which animal says moo?\nAnswer:"
    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is ", "Paris"),  # a trailing space in the context
        ("Once upon a time  ", "there was a king."),  # two
        ("Question: What is 2 + 3?\nAnswer:", " 5"),
        *[(question, c) for c in (" a cow", " a dog", " a cat", " a duck that quacks")],
        ("", "Hello world, this is a test."),  # an empty context: the prefix token
        ("def add(a, b):\n    return", " a + b"),
        ("Привет, как", " дела?"),
    ]
    reqs = _ll(*pairs)
    a = ours.loglikelihood(reqs, disable_tqdm=True)
    b = theirs.loglikelihood(reqs, disable_tqdm=True)
    for (la, ga), (lb, gb), p in zip(a, b, pairs, strict=True):
        assert la == pytest.approx(lb, abs=1e-4), p
        assert ga is gb, p
    assert any(g for _, g in b) and len({round(x, 2) for x, _ in b}) > 8  # not degenerate

    n_tokens = len(ours.tok_encode(PARITY_TEXT))
    assert 280 <= n_tokens <= 400, n_tokens  # three windows of 128 tokens or more
    rolling = [Instance("loglikelihood_rolling", {}, (PARITY_TEXT,), 0)]
    [ra] = ours.loglikelihood_rolling(rolling, disable_tqdm=True)
    [rb] = theirs.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert ra == pytest.approx(rb, abs=1e-3)

    gens = [
        _gen("The capital of France is", until=["\n\n"], max_gen_toks=16, do_sample=False),
        _gen("Question: What is 2 + 3?\nAnswer:", until=["Question:"], max_gen_toks=16, do_sample=False),
        _gen("Once upon a time, in a small village,", until=["@@never@@"], max_gen_toks=16),
    ]
    ga = ours.generate_until(gens, disable_tqdm=True)
    gb = theirs.generate_until(gens, disable_tqdm=True)
    assert ga == gb
    assert len(ours.tok_encode(ga[2])) == 16  # the third ran to max_gen_toks
    assert all(t.strip() for t in ga)
