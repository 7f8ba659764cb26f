"""GGUF import: logit and tokenizer parity with transformers' own GGUF loader, and refusals by field name.

The fixture writes tiny llama GGUF files the way llama.cpp's ``convert_hf_to_gguf.py`` does — the same
metadata keys, tensor names, Q/K rows permuted for llama.cpp's interleaved RoPE, some tensors stored as
Q8_0, F16 and F32 — from a random transformers ``LlamaForCausalLM`` and a tiny byte-level BPE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moeforge.model import gguf as mf_gguf
from moeforge.model.gguf import GGUFError, read_gguf, read_gguf_metadata
from moeforge.model.hf_import import model_from_hf
from moeforge.pretrained import ModelImportError, import_model, load_model
from moeforge.tokens.chat_spec import load_chat_spec
from moeforge.tokens.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

Q8_0 = gguf.GGMLQuantizationType.Q8_0
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
    "Hello world! hello there, how are you today? I am fine, thank you.",
    "user assistant system: the model answers questions about rivers and mills.",
    "Numbers like 2024 and 1234567 and 42 appear in text; 3.14 is pi.",
]
TEXTS = [
    "Hello world, the quick brown fox!",
    "  leading spaces and\nnew lines\n\nhere",
    "user: how are you today? assistant: fine.",
    "<|im_start|>user\nHi<|im_end|>\n",
]
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 96


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bpe() -> tuple[list[str], list[str]]:
    """(tokens by id, merges as 'a b') of a tiny byte-level BPE: 3 control tokens, 256 bytes, merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    blob = json.loads(tok.to_str())
    vocab: dict[str, int] = blob["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in blob["model"]["merges"]]
    assert any(m.split(" ")[0].isdigit() for m in merges)  # digit merges exist: the pre-tokenizer matters
    return tokens, merges


def _hf_llama(vocab_size: int, *, tied: bool, theta: float, seed: int = 0) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tied,
        initializer_range=0.1,  # Q·K scores well away from 0, so a wrong permutation shows in the logits
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of Q/K rows (convert_hf_to_gguf.py)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(
    path: Path,
    model: Any,
    bpe: tuple[list[str], list[str]],
    *,
    arch: str = "llama",
    pre: str = "smollm",
    tokenizer_model: str = "gpt2",
    kv: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    template: str | None = SMOLLM_TEMPLATE,
) -> Path:
    """Write ``model`` as llama.cpp's converter would: metadata, permuted Q/K (llama files only; qwen2 files
    keep Q/K as they are and carry the q/k/v biases), mixed Q8_0/F16/F32 tensors."""
    cfg = model.config
    tokens, merges = bpe
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name("Tiny Llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    if template is not None:
        w.add_chat_template(template)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    def put(name: str, arr: np.ndarray, kind: str) -> None:
        if kind == "q8_0":
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), Q8_0), raw_dtype=Q8_0)
        elif kind == "f16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, arr.astype(np.float32))

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    put("token_embd.weight", sd["model.embed_tokens.weight"], "q8_0")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        mat = "f32" if i == 0 else "q8_0"  # layer 0 exact: its weights must come back bit for bit
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], "f32")
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _permute(q, cfg.num_attention_heads), _permute(k, cfg.num_key_value_heads)
        put(f"blk.{i}.attn_q.weight", q, mat)
        put(f"blk.{i}.attn_k.weight", k, mat)
        for name in ("q", "k", "v"):
            if p + f"self_attn.{name}_proj.bias" in sd:
                put(f"blk.{i}.attn_{name}.bias", sd[p + f"self_attn.{name}_proj.bias"], "f32")
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], "f16" if i == 0 else mat)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], mat)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], "f32")
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], mat)
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], mat)
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], mat)
    put("output_norm.weight", sd["model.norm.weight"], "f32")
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"], "q8_0")
    for name, arr in (extra_tensors or {}).items():
        put(name, arr, "f32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


VARIANTS = {
    "tied-smollm-theta1e4": {"tied": True, "theta": 10000.0, "pre": "smollm"},
    "untied-default-theta5e5": {"tied": False, "theta": 500000.0, "pre": "default"},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def gguf_file(request: pytest.FixtureRequest, bpe, tmp_path_factory) -> tuple[Path, Any, dict]:
    v = VARIANTS[request.param]
    model = _hf_llama(len(bpe[0]), tied=v["tied"], theta=v["theta"])
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, bpe, pre=v["pre"])
    return path, model, v


@pytest.fixture(scope="module")
def plain_gguf(bpe, tmp_path_factory) -> tuple[Path, Any]:
    model = _hf_llama(len(bpe[0]), tied=False, theta=10000.0, seed=1)
    return write_gguf(tmp_path_factory.mktemp("plain") / "tiny.gguf", model, bpe), model


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _hf_gguf_model(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def _tokenizer_meta(path: Path) -> dict[str, Any]:
    return read_gguf_metadata(
        path, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    )


def _hf_gguf_tokenizer(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# ---- parity with transformers ------------------------------------------------------------------------


def test_read_gguf_logits_equal_transformers_gguf_load(gguf_file) -> None:
    path, hf_src, v = gguf_file
    g = read_gguf(path)
    assert g.config["model_type"] == "llama"
    assert g.config["tie_word_embeddings"] is v["tied"]
    assert g.config["rope_theta"] == v["theta"]
    assert g.config["num_key_value_heads"] == KV_HEADS
    assert g.tensor_types["Q8_0"] > 0 and g.tensor_types["F32"] > 0 and g.tensor_types["F16"] == 1
    ours = model_from_hf(g.config, g.state, str(path)).eval()
    assert (ours.lm_head.weight is ours.embed.weight) is v["tied"]
    ref = _hf_gguf_model(path)
    assert ref.config.tie_word_embeddings is v["tied"]
    ids = _ids(ours.cfg.vocab_size)
    a, b = _logits(ours, ids), _logits(ref, ids)
    assert (a - b).abs().max().item() <= 1e-4
    assert a.std() > 0.05
    # and close to the unquantized source model (Q8_0 error only)
    assert (a - _logits(hf_src, ids)).abs().max().item() < 0.2


def test_unpermuted_f32_weights_equal_the_source_exactly(gguf_file) -> None:
    """Layer 0's Q/K are stored F32 and permuted: undoing the permutation must restore them bit for bit."""
    path, hf_src, _ = gguf_file
    state = read_gguf(path).state
    src = hf_src.state_dict()
    for name in ("q_proj", "k_proj", "o_proj"):
        key = f"model.layers.0.self_attn.{name}.weight"
        assert torch.equal(state[key], src[key]), key
    v = "model.layers.0.self_attn.v_proj.weight"  # F16: equal to the source rounded to half
    assert torch.equal(state[v], src[v].half().float())


def test_skipping_the_unpermutation_changes_the_logits(plain_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity test is sensitive to the Q/K row order: without the un-permutation logits differ."""
    path, _ = plain_gguf
    ref = _hf_gguf_model(path)
    monkeypatch.setattr(mf_gguf, "_unpermute", lambda w, n: w)
    g = read_gguf(path)
    wrong = model_from_hf(g.config, g.state, str(path)).eval()
    ids = _ids(wrong.cfg.vocab_size)
    assert (_logits(wrong, ids) - _logits(ref, ids)).abs().max().item() > 1e-3


def test_import_model_writes_a_checkpoint_with_parity_and_tokenizer(gguf_file, tmp_path: Path) -> None:
    path, _, v = gguf_file
    out = import_model(path, tmp_path / "ckpt")
    model, state = load_model(out)
    ids = _ids(model.cfg.vocab_size)
    assert (_logits(model, ids) - _logits(_hf_gguf_model(path), ids)).abs().max().item() <= 1e-4
    prov = state["provenance"]
    assert prov["format"] == "gguf" and prov["gguf_name"] == "Tiny Llama"
    assert set(prov["sha256"]) == {path.name} and prov["tensor_types"]["Q8_0"] > 0
    assert model.cfg.tie_embeddings is v["tied"]
    tok_dir = out / "tokenizer"
    assert {p.name for p in tok_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "chat.json"}
    spec = load_chat_spec(tok_dir)
    assert spec.format == "chatml" and spec.default_system_prompt == SMOLLM_SYSTEM
    assert state["chat"]["default_system_prompt"] == SMOLLM_SYSTEM
    tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<|im_start|>" and tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["chat_template"] == SMOLLM_TEMPLATE
    assert not list(tmp_path.glob(".*"))  # no scratch or temporary directories left


def test_tokenizer_ids_equal_transformers_gguf_tokenizer(gguf_file) -> None:
    path, _, _ = gguf_file
    ours, config = tokenizer_from_gguf(_tokenizer_meta(path), path)
    ref = _hf_gguf_tokenizer(path)
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False).ids == want, text
        assert ours.decode(want, skip_special_tokens=False) == text
    assert ours.token_to_id("<|im_end|>") == 2
    assert ours.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert config["pad_token"] == "<|im_end|>"
    assert set(config["additional_special_tokens"]) == set(SPECIALS)


def test_digits_follow_the_pre_tokenizer(gguf_file) -> None:
    """'smollm' splits every digit on its own (llama.cpp and SmolLM2's tokenizer.json); 'default' is GPT-2's
    split and then equals transformers' GGUF tokenizer, which has no 'smollm' rule."""
    path, _, v = gguf_file
    ours, _ = tokenizer_from_gguf(_tokenizer_meta(path), path)
    text = "In 2024 we had 1234567 apples and 42 pears."
    ids = ours.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text
    digit_tokens = [t for t in (ours.id_to_token(i) for i in ids) if any(c.isdigit() for c in t)]
    if v["pre"] == "smollm":
        assert all(len(t) == 1 for t in digit_tokens)
        assert len(digit_tokens) == len("2024" + "1234567" + "42")
    else:
        assert ids == _hf_gguf_tokenizer(path).encode(text, add_special_tokens=False)
        assert any(len(t) > 1 for t in digit_tokens)  # the corpus merged digits: GPT-2's split keeps them


# ---- refusals --------------------------------------------------------------------------------------------


def test_tied_embeddings_detected_when_output_weight_is_absent(bpe, tmp_path: Path) -> None:
    tied = write_gguf(tmp_path / "t.gguf", _hf_llama(len(bpe[0]), tied=True, theta=1e4), bpe)
    untied = write_gguf(tmp_path / "u.gguf", _hf_llama(len(bpe[0]), tied=False, theta=1e4), bpe)
    assert read_gguf(tied).config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in read_gguf(tied).state
    assert read_gguf(untied).config["tie_word_embeddings"] is False


def _assert_refused(src: Path, tmp_path: Path, pattern: str) -> None:
    """import_model raises ModelImportError naming the file and ``pattern``, and writes nothing."""
    out = tmp_path / "out"
    with pytest.raises(ModelImportError, match=pattern) as info:
        import_model(src, out)
    assert str(src) in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.fixture(scope="module")
def small_hf(bpe) -> Any:
    return _hf_llama(len(bpe[0]), tied=True, theta=1e4)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"arch": "gptneox"}, r"general\.architecture='gptneox' is not supported"),
        ({"kv": {"llama.rope.scaling.type": "yarn"}}, r"llama\.rope\.scaling\.type='yarn'"),
        ({"kv": {"llama.attention.sliding_window": 32}}, r"llama\.attention\.sliding_window=32"),
        ({"kv": {"llama.rope.dimension_count": 8}}, r"llama\.rope\.dimension_count=8"),
        (
            {"extra_tensors": {"blk.0.ffn_up.bias": np.zeros(FFN, np.float32)}},
            r"bias tensors \(blk\.0\.ffn_up\.bias",
        ),
        (
            {"extra_tensors": {"blk.0.attn_q.bias": np.zeros(HIDDEN, np.float32)}},
            r"llama file with q/k/v bias tensors",
        ),
        ({"extra_tensors": {"blk.0.mystery.weight": np.zeros(4, np.float32)}}, r"'blk\.0\.mystery\.weight'"),
    ],
    ids=["arch", "yarn", "sliding-window", "partial-rope", "mlp-bias", "llama-qkv-bias", "unknown-tensor"],
)
def test_model_refusals_name_the_field(small_hf, bpe, tmp_path: Path, kwargs, pattern) -> None:
    src = write_gguf(tmp_path / "bad.gguf", small_hf, bpe, **kwargs)
    with pytest.raises(GGUFError, match=pattern):
        read_gguf(src)
    _assert_refused(src, tmp_path, pattern)


def test_linear_rope_scaling_of_factor_one_is_plain_rope(small_hf, bpe, tmp_path: Path) -> None:
    kv = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0}
    src = write_gguf(tmp_path / "ok.gguf", small_hf, bpe, kv=kv)
    assert read_gguf(src).config["model_type"] == "llama"
    kv["llama.rope.scaling.factor"] = 2.0
    src = write_gguf(tmp_path / "bad.gguf", small_hf, bpe, kv=kv)
    with pytest.raises(GGUFError, match=r"rope\.scaling\.type='linear'"):
        read_gguf(src)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"pre": "falcon"}, r"tokenizer\.ggml\.pre='falcon' is not a pre-tokenizer moeforge knows"),
        ({"tokenizer_model": "llama"}, r"tokenizer\.ggml\.model='llama'"),
    ],
    ids=["pre", "sentencepiece"],
)
def test_tokenizer_refusals_name_the_field(small_hf, bpe, tmp_path: Path, kwargs, pattern) -> None:
    src = write_gguf(tmp_path / "bad.gguf", small_hf, bpe, **kwargs)
    read_gguf(src)  # the weights are fine; the tokenizer is what cannot be rebuilt
    with pytest.raises(GGUFTokenizerError, match=pattern):
        tokenizer_from_gguf(_tokenizer_meta(src), src)
    _assert_refused(src, tmp_path, pattern)


def test_truncated_file_is_refused(plain_gguf, tmp_path: Path) -> None:
    data = plain_gguf[0].read_bytes()
    src = tmp_path / "cut.gguf"
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="damaged or truncated"):
        read_gguf(src)
    _assert_refused(src, tmp_path, "damaged or truncated")


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(src)
    _assert_refused(src, tmp_path, "not a GGUF file")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="no such file"):
        import_model(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_qwen2_gguf_with_qkv_biases_matches_transformers(bpe, tmp_path: Path) -> None:
    """A qwen2 file: Q/K stored unpermuted, q/k/v biases; logits equal transformers' GGUF load."""
    cfg = transformers.Qwen2Config(
        vocab_size=len(bpe[0]), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(3)
    src = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    path = write_gguf(tmp_path / "qwen2.gguf", src, bpe, arch="qwen2", pre="qwen2")
    g = read_gguf(path)
    assert g.config["model_type"] == "qwen2"
    ours = model_from_hf(g.config, g.state, str(path)).eval()
    assert ours.cfg.qkv_bias
    ids = _ids(ours.cfg.vocab_size)
    assert (_logits(ours, ids) - _logits(_hf_gguf_model(path), ids)).abs().max().item() <= 1e-4
