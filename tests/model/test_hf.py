"""Hugging Face export/import: logit parity with transformers, round trips, and refusals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeforge.model.config import ModelConfig, load_model_config
from moeforge.model.hf import ExportError, export_hf, hf_layout
from moeforge.model.hf_import import import_hf
from moeforge.model.transformer import MoETransformer

transformers = pytest.importorskip("transformers")

SHRINK = ["vocab_size=128", "d_model=64", "n_layers=2", "max_seq_len=64"]
BASE = {
    "vocab_size": 128,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_hidden": 96,
    "max_seq_len": 64,
}
MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 32}

CONFIGS = {
    "tiny": (lambda: load_model_config("tiny", SHRINK), "mixtral", "MixtralForCausalLM"),
    "partial_shared_gated": (
        lambda: ModelConfig(
            **BASE, moe={**MOE, "layers": [1], "num_shared_experts": 1, "shared_expert_hidden": 48}
        ),
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
    ),
    "shared_ungated": (
        lambda: ModelConfig(
            **BASE,
            moe={**MOE, "num_shared_experts": 2, "shared_expert_hidden": 24, "shared_expert_gate": False},
        ),
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
    ),
    "no_renormalize": (
        lambda: ModelConfig(**BASE, moe={**MOE, "renormalize": False}),
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
    ),
    "dense_tiny": (lambda: load_model_config("dense-tiny", SHRINK), "llama", "LlamaForCausalLM"),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _build(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():  # larger than the default init so the experts' outputs matter in the logits
        for layer in model.moe_layers():
            layer.router.weight.normal_(std=0.5)
            layer.w2.normal_(std=0.1)
    return model


def _hf_load(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _ids(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.filterwarnings(
    "ignore:Initializing zero-element tensors is a no-op"
)  # Qwen2-MoE width-0 shared expert
@pytest.mark.parametrize("case", list(CONFIGS))
def test_exported_model_matches_transformers_logits(case: str, tmp_path: Path) -> None:
    make, layout, arch = CONFIGS[case]
    cfg = make()
    assert hf_layout(cfg) == layout
    model = _build(cfg)
    out = export_hf(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    hf = _hf_load(out)
    assert type(hf).__name__ == arch
    ids = _ids(cfg)
    ours = _logits(model, ids)
    assert (ours - _logits(hf, ids)).abs().max().item() <= 1e-4
    assert ours.std() > 0.05  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("case", ["tiny", "partial_shared_gated", "no_renormalize", "dense_tiny"])
def test_import_of_export_is_the_identity(case: str, tmp_path: Path) -> None:
    model = _build(CONFIGS[case][0]())
    back = import_hf(export_hf(model, tmp_path / "export"))
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    assert back.cfg.tie_embeddings == model.cfg.tie_embeddings
    if model.cfg.tie_embeddings:
        assert back.lm_head.weight is back.embed.weight
    ids = _ids(model.cfg)
    assert torch.equal(_logits(back, ids), _logits(model, ids))


def test_import_of_ungated_shared_expert_export_gives_same_logits(tmp_path: Path) -> None:
    model = _build(CONFIGS["shared_ungated"][0]())
    back = import_hf(export_hf(model, tmp_path / "export"))
    ids = _ids(model.cfg)
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["tiny", "partial_shared_gated", "dense_tiny"])
def test_import_of_transformers_save_pretrained_round_trips(case: str, tmp_path: Path) -> None:
    model = _build(CONFIGS[case][0]())
    hf = _hf_load(export_hf(model, tmp_path / "export"))
    hf.save_pretrained(tmp_path / "saved")
    back = import_hf(tmp_path / "saved")
    ids = _ids(model.cfg)
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["tiny", "partial_shared_gated"])
def test_import_of_fused_expert_keys_round_trips(case: str, tmp_path: Path) -> None:
    """transformers 5 keeps experts fused in memory (``experts.gate_up_proj`` [E, 2F, D]); import reads that too."""
    model = _build(CONFIGS[case][0]())
    exported = export_hf(model, tmp_path / "export")
    hf = _hf_load(exported)
    sd = hf.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((exported / "config.json").read_text())
    back = import_hf(fused)
    ids = _ids(model.cfg)
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_half_awake_ghosts_are_refused(tmp_path: Path) -> None:
    model = _build(load_model_config("ghost-32d", SHRINK))
    with torch.no_grad():
        model.moe_layers()[1].ghost_alpha.fill_(0.5)
    with pytest.raises(ExportError, match="half-awake"):
        export_hf(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_ghosts_dormant_in_some_layers_and_awake_in_others_are_refused(tmp_path: Path) -> None:
    model = _build(load_model_config("ghost-32d", SHRINK))
    with torch.no_grad():
        model.moe_layers()[0].ghost_alpha.fill_(1.0)
    with pytest.raises(ExportError, match="dormant in some layers"):
        export_hf(model, tmp_path / "export")


def test_nonzero_aux_free_bias_is_refused(tmp_path: Path) -> None:
    model = _build(load_model_config("tiny", [*SHRINK, "moe.aux_free_bias_rate=0.01"]))
    export_hf(model, tmp_path / "zero_bias")  # a zero bias routes like transformers: allowed
    with torch.no_grad():
        model.moe_layers()[0].router.expert_bias[2] = 0.01
    with pytest.raises(ExportError, match="aux-free routing bias is non-zero"):
        export_hf(model, tmp_path / "export")


def test_forcing_mixtral_layout_with_shared_experts_is_refused(tmp_path: Path) -> None:
    model = _build(CONFIGS["partial_shared_gated"][0]())
    with pytest.raises(ExportError, match="Mixtral needs every layer MoE, no shared experts") as info:
        export_hf(model, tmp_path / "export", layout="mixtral")
    assert "'qwen2_moe'" in str(info.value)


@pytest.mark.parametrize("preset", ["ghost-32d", "tiny"])
def test_dormant_ghosts_export_only_routed_experts_with_same_logits(preset: str, tmp_path: Path) -> None:
    model = _build(load_model_config(preset, [*SHRINK, "moe.num_ghost_experts=2"]))
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.weight[layer.num_experts :] += 3.0  # would dominate if dormant ghosts leaked
    out = export_hf(model, tmp_path / "export")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["num_local_experts"] == model.cfg.moe.num_experts
    hf = _hf_load(out)
    ids = _ids(model.cfg)
    assert (_logits(model, ids) - _logits(hf, ids)).abs().max().item() <= 1e-4


def test_fully_awake_ghosts_export_as_extra_experts(tmp_path: Path) -> None:
    model = _build(load_model_config("tiny", [*SHRINK, "moe.num_ghost_experts=2"]))
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.ghost_alpha.fill_(1.0)
    out = export_hf(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 6
    ids = _ids(model.cfg)
    assert (_logits(model, ids) - _logits(_hf_load(out), ids)).abs().max().item() <= 1e-4


def test_export_into_existing_directory_needs_overwrite(tmp_path: Path) -> None:
    model = _build(load_model_config("dense-tiny", SHRINK))
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf(model, target)
    assert (target / "keep.txt").exists()
    export_hf(model, target, overwrite=True)
    assert (target / "model.safetensors").is_file()
    assert not (target / "keep.txt").exists()


def test_capacity_factor_export_warns_that_it_is_dropless(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _build(load_model_config("tiny", [*SHRINK, "moe.capacity_factor=1.0"]))
    with caplog.at_level(logging.WARNING, logger="moeforge.model.hf"):
        export_hf(model, tmp_path / "export")
    assert "capacity_factor is not representable" in caplog.text


def test_import_refuses_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no config\.json"):
        import_hf(tmp_path)


def test_import_refuses_rope_scaling_and_stray_weights(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from moeforge.model.config import load_model_config
    from moeforge.model.hf import ExportError, export_hf
    from moeforge.model.hf_import import import_hf
    from moeforge.model.transformer import MoETransformer

    out = tmp_path / "export"
    export_hf(MoETransformer(load_model_config("tiny")), out)
    cfg_file = out / "config.json"
    original = cfg_file.read_text()
    cfg = json.loads(original)
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"rope_parameters\.rope_type='llama3'"):
        import_hf(out)
    cfg_file.write_text(original)
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match=r"q_proj\.bias"):
        import_hf(out)
    del weights["model.layers.0.self_attn.q_proj.bias"]
    del weights["model.norm.weight"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match=r"'model\.norm\.weight' is missing"):
        import_hf(out)
