"""GGUF checkpoints in: llama.cpp's single-file format read as a Hugging Face config and state dict.

:func:`read_gguf` turns a ``.gguf`` file into what :func:`moeforge.model.hf_import.model_from_hf` takes — a
``config.json``-style dict and float32 tensors under transformers' key names — so GGUF and safetensors
imports share one mapping onto our model. Quantized tensors (Q4_0, Q4_1, Q8_0, the K-quants, …) are
dequantized by the ``gguf`` package, the format's own reader; nothing here decodes blocks by hand.

Architectures: ``llama`` (Llama, Mistral, SmolLM; Mixtral when it has experts), ``qwen2`` (with its q/k/v
biases) and ``qwen2moe``. Two
things llama.cpp's converter changed are undone: the Q and K projections of ``llama`` files are stored
with their rows permuted for llama.cpp's interleaved RoPE (we restore the rotate-half order transformers
and moeforge use), and experts are stored stacked (``ffn_gate_exps`` ``[E, F, D]``) rather than one
tensor per expert. Anything the file describes that moeforge's model cannot compute — RoPE scaling, a
sliding window, attention biases, another architecture — is refused by name (:class:`GGUFError`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["GGUFError", "GGUFModel", "read_gguf", "read_gguf_metadata"]

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen2moe")

# GGUF tensor name (after ``blk.N.``) → transformers' name (after ``model.layers.N.``)
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_EXPERT_STACKS = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFError(ValueError):
    """The file is not a GGUF moeforge can import; the message names the field and what is allowed."""


@dataclass
class GGUFModel:
    """A GGUF file read as Hugging Face parts: ``config`` (a ``config.json`` dict), ``state`` (float32
    tensors under transformers' names), ``metadata`` (every scalar key/value of the file; arrays are
    given as their length, except the tokenizer's, which :mod:`moeforge.tokens.gguf_tokenizer` reads),
    and ``tensor_types`` (how many tensors of each ggml type the file stored, e.g. ``{"Q4_1": 210}``)."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, int] = field(default_factory=dict)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise GGUFError("reading GGUF files needs the gguf package: pip install 'moeforge[hf]'") from exc
    return gguf


def _open(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: no such file")
    with p.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{p}: not a GGUF file (its first bytes are not 'GGUF')")
    try:
        return _gguf().GGUFReader(str(p))
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError on a damaged file
        raise GGUFError(f"{p}: damaged or truncated GGUF file ({type(exc).__name__}: {exc})") from exc


def read_gguf_metadata(path: str | os.PathLike[str], *, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """The file's key/value metadata. Array values are returned whole for the keys in ``arrays`` and as
    their length otherwise (a vocabulary has tens of thousands of entries)."""
    return _metadata(_open(path), arrays)


def _metadata(reader: Any, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    gguf = _gguf()
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        is_array = f.types and f.types[0] == gguf.GGUFValueType.ARRAY
        if is_array and key not in arrays:
            out[key] = len(f.data)
        else:
            out[key] = f.contents()
    return out


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (per head, interleaved pairs → the two rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(meta: dict[str, Any], arch: str, n_experts: int, tied: bool, path: Path) -> dict[str, Any]:
    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise GGUFError(f"{path}: metadata field {full!r} is missing")
            return default
        return meta[full]

    d = int(get("embedding_length", required=True))
    n_heads = int(get("attention.head_count", required=True))
    problems = []
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none") and not (scaling == "linear" and get("rope.scaling.factor", 1.0) == 1.0):
        problems.append(f"{arch}.rope.scaling.type={scaling!r} (moeforge has plain RoPE only)")
    if get("attention.sliding_window"):
        problems.append(
            f"{arch}.attention.sliding_window={get('attention.sliding_window')} (no sliding window)"
        )
    key_len = get("attention.key_length")
    if key_len is not None and int(key_len) != d // n_heads:
        problems.append(f"{arch}.attention.key_length={key_len} differs from embedding_length / head_count")
    rope_dims = get("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != d // n_heads:
        problems.append(f"{arch}.rope.dimension_count={rope_dims} (partial RoPE; moeforge rotates every dim)")
    if problems:
        raise GGUFError(f"{path}: cannot import: " + "; ".join(problems))
    vocab = get("vocab_size") or meta.get("tokenizer.ggml.tokens")
    if vocab is None:
        raise GGUFError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    common: dict[str, Any] = {
        "vocab_size": int(vocab),
        "hidden_size": d,
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "moeforge_name": str(meta.get("general.name") or meta.get("general.basename") or arch),
    }
    if arch == "qwen2moe":
        shared = int(get("expert_shared_feed_forward_length", 0))
        return {
            **common,
            "model_type": "qwen2_moe",
            "intermediate_size": int(get("feed_forward_length", shared or 1)),
            "moe_intermediate_size": int(get("expert_feed_forward_length", required=True)),
            "shared_expert_intermediate_size": shared,
            "num_experts": n_experts,
            "num_experts_per_tok": int(get("expert_used_count", required=True)),
            "norm_topk_prob": False,
            "qkv_bias": False,
        }
    if arch == "qwen2":
        return {
            **common,
            "model_type": "qwen2",
            "intermediate_size": int(get("feed_forward_length", required=True)),
        }
    if n_experts:
        return {
            **common,
            "model_type": "mixtral",
            "intermediate_size": int(get("feed_forward_length", required=True)),
            "num_local_experts": n_experts,
            "num_experts_per_tok": int(get("expert_used_count", required=True)),
        }
    return {
        **common,
        "model_type": "llama",
        "intermediate_size": int(get("feed_forward_length", required=True)),
    }


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Read and dequantize a GGUF model file (see the module docstring). Raises :class:`GGUFError`."""
    p = Path(path)
    reader = _open(p)
    gguf = _gguf()
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(
            f"{p}: general.architecture={arch!r} is not supported; moeforge imports {', '.join(SUPPORTED_ARCHS)} "
            "(Llama, Mistral, SmolLM, Qwen2, Mixtral and Qwen2-MoE files)"
        )
    names = {t.name for t in reader.tensors}
    qkv = (".attn_q.bias", ".attn_k.bias", ".attn_v.bias")
    biases = sorted(n for n in names if n.endswith(".bias") and not n.endswith(qkv))
    if biases:
        raise GGUFError(
            f"{p}: has bias tensors ({', '.join(biases[:3])}…); moeforge has biases on q/k/v only (Qwen2)"
        )
    qkv_bias = any(n.endswith(qkv) for n in names)
    if qkv_bias and arch == "llama":
        raise GGUFError(
            f"{p}: a llama file with q/k/v bias tensors; moeforge imports those as qwen2 files only"
        )
    n_experts = int(meta.get(f"{arch}.expert_count", 0) or 0)
    cfg = _config(meta, arch, n_experts, tied="output.weight" not in names, path=p)
    if arch == "qwen2moe":
        cfg["qkv_bias"] = qkv_bias
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    moe_prefix = "block_sparse_moe." if cfg["model_type"] == "mixtral" else "mlp."
    types: Counter[str] = Counter()
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        types[qtype.name] += 1
        shape = tuple(int(x) for x in reversed(t.shape))
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, qtype), dtype=np.float32).reshape(shape)
        except NotImplementedError as exc:
            raise GGUFError(
                f"{p}: tensor {t.name} has type {qtype.name}, which gguf cannot dequantize"
            ) from exc
        name = t.name
        if name in _TOP_NAMES:
            state[_TOP_NAMES[name]] = torch.from_numpy(w.copy())
            continue
        parts = name.split(".", 2)
        if parts[0] != "blk" or len(parts) != 3:
            raise GGUFError(f"{p}: tensor {name!r} has no place in a {arch} model")
        i, rest = int(parts[1]), parts[2]
        prefix = f"model.layers.{i}."
        if arch == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
            w = _unpermute(w, n_heads if rest == "attn_q.weight" else n_kv)
        if rest in _EXPERT_STACKS:  # [E, F, D] or [E, D, F] stacked experts → one tensor per expert
            hf = _EXPERT_STACKS[rest]
            if cfg["model_type"] == "mixtral":
                hf = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[hf]
            for j in range(w.shape[0]):
                state[f"{prefix}{moe_prefix}experts.{j}.{hf}.weight"] = torch.from_numpy(w[j].copy())
            continue
        if rest == "ffn_gate_inp_shexp.weight":
            w = w.reshape(1, -1)  # stored as a [D] vector; transformers keeps a [1, D] linear
        hf_name = _BLOCK_NAMES.get(rest)
        if hf_name is None:
            raise GGUFError(f"{p}: tensor {name!r} has no place in a {arch} model")
        if hf_name.startswith("mlp.") and n_experts:
            hf_name = moe_prefix + hf_name.removeprefix("mlp.")
        state[prefix + hf_name] = torch.from_numpy(w.copy())
    log.info("read %s: %s, %d tensors (%s)", p, cfg["model_type"], len(reader.tensors), dict(types))
    return GGUFModel(config=cfg, state=state, metadata=meta, tensor_types=dict(sorted(types.items())))
