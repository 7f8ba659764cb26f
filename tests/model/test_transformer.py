"""The full decoder: incremental decoding, loss, aux loss, stats, tying, init, masking, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moeforge.model.config import ModelConfig, load_model_config
from moeforge.model.moe import MoELayer
from moeforge.model.transformer import MoETransformer

SMALL = ["vocab_size=256", "d_model=64", "max_seq_len=64"]


def _model(preset: str, overrides: list[str] | None = None, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(load_model_config(preset, overrides)).eval()


@pytest.mark.parametrize("preset", ["tiny", "dense-tiny"])
def test_incremental_decoding_equals_full_forward(preset: str) -> None:
    model = _model(preset)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        steps = [model(ids[:, :6], cache=cache).logits]
        for t in range(6, 11):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_with_cache_equals_full_forward() -> None:
    model = _model("tiny")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(1, max_len=16)
        chunks = [model(ids[:, s : s + 4], cache=cache).logits for s in (0, 4, 8)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_loss_ignores_positions_labelled_ignore_index() -> None:
    model = _model("tiny", SMALL)
    ids = torch.randint(0, 256, (2, 9))
    labels = torch.randint(8, 256, (2, 9))  # never 7, the custom ignore_index below
    labels[0, :4] = -100
    labels[1, 7:] = -100
    out = model(ids, labels)
    keep = labels != -100
    manual = F.cross_entropy(out.logits[keep], labels[keep])
    assert out.loss is not None
    torch.testing.assert_close(out.loss, manual)
    # what sits at ignored positions is irrelevant, and a custom ignore_index is honoured
    relabelled = labels.clone()
    relabelled[~keep] = 7
    torch.testing.assert_close(model(ids, relabelled, ignore_index=7).loss, manual)
    assert not torch.isclose(model(ids, relabelled).loss, manual)


def test_no_labels_means_no_loss() -> None:
    out = _model("tiny", SMALL)(torch.randint(0, 256, (1, 4)))
    assert out.loss is None
    assert out.logits.shape == (1, 4, 256)


def test_aux_loss_is_weighted_sum_of_lb_and_z_over_moe_layers() -> None:
    model = _model("tiny", [*SMALL, "moe.lb_coef=0.3", "moe.z_coef=0.07"])
    out = model(torch.randint(0, 256, (2, 8)))
    assert sorted(out.moe_stats) == [0, 1, 2, 3]
    lb = sum(s.lb_loss for s in out.moe_stats.values())
    z = sum(s.z_loss for s in out.moe_stats.values())
    torch.testing.assert_close(out.lb_loss, lb)
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.aux_loss, 0.3 * lb + 0.07 * z)


def test_dense_model_has_no_aux_loss_or_stats() -> None:
    out = _model("dense-tiny", SMALL)(torch.randint(0, 256, (1, 5)))
    assert out.aux_loss is None
    assert out.moe_stats == {}


def test_moe_stats_are_keyed_by_moe_layer_index() -> None:
    overrides = [*SMALL, "n_heads=4", "n_kv_heads=4", "ffn_hidden=32", "moe.expert_hidden=16"]
    model = _model("gpt2-moe", overrides)
    assert model.cfg.n_layers == 12
    out = model(torch.randint(0, 256, (1, 6)))
    assert sorted(out.moe_stats) == [8, 9, 10, 11]
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoELayer)] == [8, 9, 10, 11]
    assert all(s.assignments == 6 for s in out.moe_stats.values())  # top-1


def test_tie_embeddings_shares_one_tensor() -> None:
    tied = _model("tiny", SMALL)
    assert tied.lm_head.weight is tied.embed.weight
    names = [n for n, _ in tied.named_parameters()]
    assert "lm_head.weight" not in names
    untied = _model("tiny", [*SMALL, "tie_embeddings=false"])
    assert untied.lm_head.weight is not untied.embed.weight
    assert not torch.equal(untied.lm_head.weight, untied.embed.weight)


def test_scaled_init_of_residual_output_projections() -> None:
    cfg = ModelConfig(
        vocab_size=512,
        d_model=128,
        n_layers=8,
        n_heads=4,
        ffn_hidden=256,
        init_std=0.02,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 256, "layers": [1, 3, 5, 7]},
    )
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)

    def std(suffix: str) -> float:
        ps = [p.detach().reshape(-1) for n, p in model.named_parameters() if n.endswith(suffix)]
        assert ps, suffix
        return torch.cat(ps).std().item()

    for suffix in ("o_proj.weight", "down_proj.weight", ".w2"):
        assert std(suffix) == pytest.approx(out_std, rel=0.05), suffix
    for suffix in ("q_proj.weight", "gate_proj.weight", ".w13", "router.weight", "embed.weight"):
        assert std(suffix) == pytest.approx(0.02, rel=0.05), suffix
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 2 * 8 + 1
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)


def test_doc_ids_masking_changes_later_documents_only() -> None:
    model = _model("tiny", SMALL)
    ids = torch.randint(0, 256, (1, 10))
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    plain = model(ids).logits
    masked = model(ids, doc_ids_BT=doc).logits
    torch.testing.assert_close(masked[:, :4], plain[:, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked[:, 4:], plain[:, 4:], atol=1e-4)
    # with masking, document 1's logits ignore document 0's content
    other = ids.clone()
    other[:, :4] = torch.randint(0, 256, (1, 4))
    torch.testing.assert_close(
        model(other, doc_ids_BT=doc).logits[:, 4:], masked[:, 4:], atol=1e-5, rtol=1e-5
    )


def test_router_step_advances_every_router() -> None:
    model = _model("tiny", SMALL)
    for _ in range(3):
        model.router_step()
    assert [int(m.router.num_steps) for m in model.moe_layers()] == [3, 3, 3, 3]


def test_forward_with_same_seed_is_bitwise_deterministic() -> None:
    overrides = [*SMALL, "moe.router_noise_std=0.5"]
    outs = []
    for _ in range(2):
        model = _model("tiny", overrides).train()
        torch.manual_seed(123)
        ids = torch.randint(0, 256, (2, 8))
        out = model(ids, ids)
        out.loss.backward()
        outs.append((out.logits, out.loss, model.embed.weight.grad))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a, b)


def test_positions_override_shifts_rope() -> None:
    model = _model("tiny", SMALL)
    ids = torch.randint(0, 256, (1, 5))
    default = model(ids).logits
    same = model(ids, positions_BT=torch.arange(5)[None]).logits
    shifted = model(ids, positions_BT=torch.arange(3, 8)[None]).logits
    assert torch.equal(same, default)
    torch.testing.assert_close(shifted, default, atol=1e-4, rtol=1e-4)  # RoPE is relative...
    assert not torch.equal(shifted, default)  # ...but positions are really used
