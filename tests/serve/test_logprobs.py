"""Scoring through the server: ``echo`` + ``logprobs`` on ``/v1/completions`` equal :meth:`Engine.score`
(and the model's full forward), generated tokens' logprobs and top tokens equal the engine's, the
tokenizer endpoints lm-eval's remote tokenizer reads, the context length in ``/v1/models``, scoring that
does not stall a stream, and lm-eval's own ``local-completions`` model end to end against uvicorn."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from live_server import LiveServer as BaseLiveServer

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("tokenizers")

from moeforge.model.config import load_model_config  # noqa: E402
from moeforge.model.transformer import MoETransformer  # noqa: E402
from moeforge.serve.api import create_app  # noqa: E402
from moeforge.serve.engine import Engine  # noqa: E402
from moeforge.serve.sampling import SamplingParams  # noqa: E402

MODEL = "tiny-scorer"
KEY = "sk-score-key"
PROSE = (
    "The river ran past the old mill where the miller kept his accounts in a leather book. "
    "Le meunier comptait ses sacs: 5 € — naïve café. "
)
CHAT = [{"role": "user", "content": "How many sacks did the miller count?"}]


class LiveServer(BaseLiveServer):
    """The shared live server with an authenticated POST."""

    def post(self, path: str, body: object, key: str | None = KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(make_bpe):
    return make_bpe(PROSE)


def _model(tokenizer, *overrides: str) -> MoETransformer:
    """The tiny preset, untied, seed 0, its vocabulary the tokenizer's (so the model's argmax is always a
    token the server can generate); every call builds the same weights."""
    torch.manual_seed(0)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    cfg = load_model_config("tiny", ["tie_embeddings=false", f"vocab_size={vocab}", *overrides])
    return MoETransformer(cfg).eval()


@pytest.fixture(scope="module")
def reference(tokenizer) -> Engine:
    """An engine with the served model's weights, for the test thread only."""
    return Engine(_model(tokenizer), tokenizer)


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[LiveServer]:
    app = create_app(Engine(_model(tokenizer), tokenizer, max_batch=16), model_name=MODEL, api_key=KEY)
    with LiveServer(app) as live:
        yield live


def _forward_logprobs(model: MoETransformer, ids: list[int]) -> torch.Tensor:
    """``[T-1, V]``: the full forward's log-softmax at the positions that predict ``ids[1:]``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, vocab, (12,), generator=g).tolist()
    return [
        shared + torch.randint(0, vocab, (n,), generator=g).tolist()  # a context and its continuations
        for n in (1, 4, 2)
    ] + [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 2, 30, 7)]


# ---- echo + logprobs ---------------------------------------------------------------------------------


def test_echo_with_max_tokens_0_equals_engine_score_and_the_full_forward(
    server: LiveServer, reference: Engine, tokenizer
) -> None:
    prompts = _prompts(reference.cfg.vocab_size)
    r = server.post(
        "/v1/completions",
        {"model": MODEL, "prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 3, "n": 2},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"] == {
        "prompt_tokens": sum(map(len, prompts)),
        "completion_tokens": 0,
        "total_tokens": sum(map(len, prompts)),
    }
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(2 * len(prompts)))  # prompt i, choice j: i·n + j
    expected = reference.score(prompts, 1, top_k=3)
    for i, (ids, want) in enumerate(zip(prompts, expected, strict=True)):
        first, second = choices[2 * i], choices[2 * i + 1]
        assert first["text"] == second["text"] == tokenizer.decode(ids, skip_special_tokens=False)
        assert first["logprobs"] == second["logprobs"] and first["finish_reason"] == "length"
        lp = first["logprobs"]
        assert lp["tokens"] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(want.logprobs, dtype=torch.float64), atol=1e-5, rtol=0)
        full = _forward_logprobs(reference.model, ids)
        chosen = full.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].double()
        torch.testing.assert_close(got, chosen, atol=1e-4, rtol=0)
        for pos, (top, score_top) in enumerate(zip(lp["top_logprobs"][1:], want.top, strict=True)):
            # the three most likely, plus the chosen token when it is not among them
            assert 3 <= len(top) <= 4
            assert max(top.values()) == pytest.approx(float(full[pos].max()), abs=1e-4)
            assert sorted(top.values(), reverse=True)[:3] == pytest.approx(
                [v for _, v in score_top], abs=1e-5
            )
        offsets = lp["text_offset"]
        assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(first["text"])


def test_echo_with_generation_has_prompt_then_generated_logprobs(
    server: LiveServer, reference: Engine, tokenizer
) -> None:
    prompt = "The river ran past"
    ids = reference.encode(prompt)
    req = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 6, "temperature": 0}
    r = server.post("/v1/completions", req)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    gen = reference.generate(
        [ids], SamplingParams(temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    )[0]
    assert choice["text"] == prompt + gen.text
    lp = choice["logprobs"]
    n_prompt = len(ids)
    assert len(lp["tokens"]) == n_prompt + len(gen.token_ids)
    assert lp["tokens"][n_prompt:] == [
        tokenizer.decode([t], skip_special_tokens=False) for t in gen.token_ids
    ]
    # the prompt's part is Engine.score's
    (scored,) = reference.score([ids], 1, top_k=2)
    assert lp["token_logprobs"][0] is None
    torch.testing.assert_close(
        torch.tensor(lp["token_logprobs"][1:n_prompt]), torch.tensor(scored.logprobs), atol=1e-5, rtol=0
    )
    # the generated part is the decode batch's: greedy, so the chosen token is the most likely one
    assert gen.logprobs is not None and gen.top_logprobs is not None
    torch.testing.assert_close(
        torch.tensor(lp["token_logprobs"][n_prompt:]), torch.tensor(gen.logprobs), atol=1e-4, rtol=0
    )
    for t, chosen_lp, top, engine_top in zip(
        gen.token_ids,
        lp["token_logprobs"][n_prompt:],
        lp["top_logprobs"][n_prompt:],
        gen.top_logprobs,
        strict=True,
    ):
        assert len(top) == 2 and max(top.values()) == chosen_lp  # the greedy token is in it, as its max
        assert engine_top[0][0] == t
        assert list(top.values()) == pytest.approx([v for _, v in engine_top], abs=1e-4)
    offsets = lp["text_offset"]
    assert offsets[:n_prompt][0] == 0 and offsets[n_prompt] == len(prompt)
    assert offsets == sorted(offsets) and offsets[-1] <= len(choice["text"])

    # streamed: the echoed prompt first, then the completion; together the same text and logprobs
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={**req, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as s:
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert chunks[0]["text"] == prompt and chunks[0]["logprobs"]["tokens"] == lp["tokens"][:n_prompt]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in c["logprobs"][key]] == lp[key], key


def test_logprobs_without_echo_and_on_chat_carry_the_top_tokens(
    server: LiveServer, reference: Engine
) -> None:
    r = server.post(
        "/v1/completions",
        {"model": MODEL, "prompt": [5, 17, 99], "logprobs": 0, "max_tokens": 4, "temperature": 0},
    )
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4 and all(len(top) == 1 for top in lp["top_logprobs"])  # the chosen alone
    assert lp["text_offset"][0] == 0

    r = server.post(
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": CHAT,
            "logprobs": True,
            "top_logprobs": 3,
            "max_tokens": 5,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    expected = reference.chat(
        CHAT, SamplingParams(temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    )
    assert expected.top_logprobs is not None
    for entry, engine_top in zip(content, expected.top_logprobs, strict=True):
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
            [v for _, v in engine_top], abs=1e-4
        )
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs: must be in 0..20"),
        ({"prompt": "x", "logprobs": -1}, "logprobs", "logprobs: must be in 0..20"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "send echo: true"),
        ({"prompt": [[1, 2]] * 17, "max_tokens": 2, "echo": True}, "n", "over 16 choices"),
        ({"prompt": [[1, 2]] * 257, "max_tokens": 1, "echo": True}, "n", "over 256 choices"),
        ({"prompt": list(range(257)), "max_tokens": 0, "echo": True}, "prompt", "context is 256 tokens"),
    ],
)
def test_bad_scoring_requests_are_400_with_an_openai_error(
    server: LiveServer, body: dict, param: str, message: str
) -> None:
    r = server.post("/v1/completions", {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (
        error["type"] == "invalid_request_error" and error["param"] == param and message in error["message"]
    )


# ---- tokenizer endpoints and /v1/models ---------------------------------------------------------------


def test_tokenize_round_trips_through_detokenize(server: LiveServer, reference: Engine, tokenizer) -> None:
    text = "The river <|im_start|>ran — naïve café 5 €<|endoftext|>"
    r = server.post("/tokenize", {"prompt": text, "add_special_tokens": False}, key=None)  # open, as vLLM's
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["tokens"] == reference.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == reference.cfg.max_seq_len and got["token_strs"] is None
    assert server.post("/detokenize", {"tokens": got["tokens"]}).json() == {"prompt": text}

    long = PROSE * 20  # longer than the context: lm-eval tokenizes whole documents
    r = server.post("/tokenize", {"prompt": long, "model": MODEL, "return_token_strs": True})
    assert r.json()["tokens"] == tokenizer.encode(long).ids and r.json()["count"] > reference.cfg.max_seq_len
    assert r.json()["token_strs"] == [tokenizer.id_to_token(i) for i in r.json()["tokens"]]

    chat = server.post("/tokenize", {"messages": CHAT}).json()
    assert chat["tokens"] == reference.chat_ids(CHAT)  # what /v1/chat/completions feeds the model
    for body, status in [
        ({"tokens": [1, 10**6]}, 400),
        ({"tokens": "abc"}, 400),
    ]:
        assert server.post("/detokenize", body).status_code == status
    for body in [{}, {"prompt": "a", "messages": CHAT}, {"prompt": "a", "model": "nope"}]:
        r = server.post("/tokenize", body)
        assert r.status_code in (400, 404) and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(
    server: LiveServer, reference: Engine
) -> None:
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == 0
    assert info["pad_token"] == "<|pad|>" and info["bos_token"] is None and info["bos_token_id"] is None
    assert info["model_max_length"] == info["max_model_len"] == reference.cfg.max_seq_len
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|im_start|>" in info["chat_template"]
    assert info["vocab_size"] == reference.tokenizer.get_vocab_size(with_added_tokens=True)

    base = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(base)
    remote = RemoteTokenizer(base)
    assert remote.eos_token_id == 0 and remote.bos_token_id is None
    assert remote.encode("The river") == reference.encode("The river")
    assert remote.decode(reference.encode("The river")) == "The river"


def test_models_report_their_context_length(server: LiveServer, reference: Engine) -> None:
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    (card,) = r.json()["data"]
    assert card["id"] == MODEL and card["max_model_len"] == reference.cfg.max_seq_len
    one = httpx.get(f"{server.url}/v1/models/{MODEL}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert one == card


# ---- scheduling ---------------------------------------------------------------------------------------


def test_scoring_while_a_stream_decodes_does_not_stall_the_stream(tokenizer) -> None:
    """A big scoring request is scored in slices between decode steps: the stream keeps receiving tokens
    while it runs, with gaps far shorter than the scoring takes (bounds are loose: CI machines vary)."""
    engine = Engine(_model(tokenizer, "max_seq_len=4096"), None, eos_ids=[])  # ids only; never stops early
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, engine.cfg.vocab_size, (300,), generator=g).tolist() for _ in range(32)]
    stamps: list[float] = []
    with LiveServer(create_app(engine, model_name=MODEL)) as live:

        def stream() -> None:
            body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3000, "stream": True, "temperature": 0}
            with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        stamps.append(time.monotonic())
                    if done.is_set():
                        return

        done = threading.Event()
        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while len(stamps) < 20:
            assert time.monotonic() < deadline and reader.is_alive(), "the stream did not start"
            time.sleep(0.01)
        t0 = time.monotonic()
        r = live.post(
            "/v1/completions", {"model": MODEL, "prompt": batch, "echo": True, "max_tokens": 0, "logprobs": 0}
        )
        t1 = time.monotonic()
        done.set()
        reader.join(30)
    assert r.status_code == 200, r.text
    assert all(len(c["logprobs"]["tokens"]) == 300 for c in r.json()["choices"])
    during = [t for t in stamps if t0 <= t <= t1]
    gaps = [b - a for a, b in zip([t0, *during], [*during, t1], strict=True)]
    assert len(during) >= 10, f"the stream got {len(during)} tokens in {t1 - t0:.2f} s of scoring"
    assert max(gaps) < max(0.5, (t1 - t0) / 3), f"a {max(gaps):.2f} s gap in {t1 - t0:.2f} s of scoring"


# ---- lm-eval end to end -------------------------------------------------------------------------------


def test_lm_eval_local_completions_against_the_server(
    server: LiveServer, reference: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval's real ``local-completions`` model (tokenizer backend auto → remote: nothing from the Hub)
    computes the same loglikelihoods and greedy flags as Engine.score, and generates as the engine does."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("aiohttp")
    pytest.importorskip("tenacity")
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv(
        "OPENAI_API_KEY", KEY
    )  # the completions requests' key; the tokenizer endpoints are open
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = reference.cfg.max_seq_len
    lm = LocalCompletionsAPI(
        base_url=f"{server.url}/v1/completions", model=MODEL, max_length=ctx, batch_size=3, max_retries=1
    )
    assert lm.tokenizer_backend == "remote"

    greedy = reference.generate(
        [reference.encode("The river ran")], SamplingParams(temperature=0, max_tokens=2)
    )[0]
    pairs = [
        ("The river ran past the", " old mill"),
        ("The river ran past the", " leather book"),
        ("The river ran past the", " café"),
        ("Le meunier", " comptait ses sacs"),
        ("The river ran", reference.tokenizer.decode(greedy.token_ids)),
        ("", "The river"),  # no context: lm-eval puts its prefix token (the EOS) first
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (loglik, is_greedy) in zip(pairs, got, strict=True):
        if context:
            ctx_ids, cont_ids = lm._encode_pair(context, continuation)
        else:
            ctx_ids, cont_ids = [0], reference.encode(continuation)
        (want,) = reference.score([ctx_ids + cont_ids], [len(ctx_ids)])
        assert loglik == pytest.approx(want.total, abs=1e-4)
        assert is_greedy == want.is_greedy
    assert any(flag for _, flag in got) and not all(flag for _, flag in got)

    doc = PROSE * 10  # longer than the context: lm-eval scores it in windows
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])
    windows = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(
            token_list=reference.encode(doc), prefix_token=0, max_seq_len=ctx - 2, context_len=1
        )
    ]
    assert len(windows) > 1
    want = reference.score([c + k for c, k in windows], [len(c) for c, _ in windows])
    assert rolling == pytest.approx(sum(s.total for s in want), abs=1e-3)

    gen_kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    contexts = ["The river ran past", "Le meunier comptait"]
    out = lm.generate_until(
        [Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, c in enumerate(contexts)]
    )
    params = SamplingParams(temperature=0, max_tokens=8, stop=["\n", "<|endoftext|>"])
    assert out == [c.text for c in reference.generate([reference.encode(c) for c in contexts], params)]


def test_the_tokenizer_configs_bos_and_eos_are_what_the_server_reports_and_stops_at(tokenizer) -> None:
    """An imported model's tokenizer config (SmolLM2: bos <|im_start|>, eos <|im_end|>, add_bos_token false)
    is what transformers and lm-eval's hf backend read: /tokenizer_info reports those tokens (so lm-eval's
    remote tokenizer opens rolling windows with the same prefix), adds no BOS, and generation stops at the
    config's eos as well as <|endoftext|>."""
    from fastapi.testclient import TestClient

    conf = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False}
    engine = Engine(_model(tokenizer), tokenizer, tokenizer_config=conf)
    im_start, im_end, eot = (
        tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    )
    assert engine.eos_ids == frozenset({im_end, eot})
    with TestClient(create_app(engine, model_name=MODEL, api_key=KEY)) as client:
        info = client.get("/tokenizer_info").json()
    assert (info["bos_token"], info["bos_token_id"]) == ("<|im_start|>", im_start)
    assert (info["eos_token"], info["eos_token_id"]) == ("<|im_end|>", im_end)
    assert info["add_bos_token"] is False
    plain = Engine(_model(tokenizer), tokenizer)  # a moeforge-trained tokenizer: <|endoftext|> only
    assert plain.eos_ids == frozenset({eot})
