"""Building blocks: RMSNorm, rotary embeddings, attention with KV cache, document masks, GQA."""

from __future__ import annotations

import pytest
import torch

from moeforge.model.layers import (
    Attention,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rope,
    build_attention_mask,
)

D, H, KV = 32, 4, 2
HD = D // H


def _rope_reference(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * i / head_dim)
    ang = positions.double()[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def _attend(attn: Attention, rope: RotaryEmbedding, x: torch.Tensor, **kw) -> torch.Tensor:
    B, T, _ = x.shape
    pos = torch.arange(T).expand(B, T)
    return attn(x, rope(pos), **kw)


# --- RMSNorm ---------------------------------------------------------------------------------------


def test_rmsnorm_matches_reference_formula() -> None:
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16)
    ref = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-5)


def test_rmsnorm_output_is_scale_invariant_and_has_unit_rms() -> None:
    norm = RMSNorm(64, eps=1e-8)
    x = torch.randn(4, 64)
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm(1000.0 * x), y, atol=1e-5, rtol=1e-5)


def test_rmsnorm_computes_variance_in_fp32_for_bf16_input() -> None:
    norm = RMSNorm(256).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256))
    x = (3 * torch.randn(64, 256)).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    fp32_path = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(
        torch.bfloat16
    )
    assert torch.equal(y, fp32_path)
    # sanity: the all-bf16 computation rounds differently, so the equality above is a real check
    bf16_path = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    assert not torch.equal(y, bf16_path)


# --- RoPE ------------------------------------------------------------------------------------------


def test_rope_uses_rotate_half_convention() -> None:
    x = torch.randn(2, 3, 5, HD)
    cos, sin = torch.randn(2, 5, HD), torch.randn(2, 5, HD)
    x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
    c, s = cos[:, None], sin[:, None]
    expected = torch.cat(
        [x1 * c[..., : HD // 2] - x2 * s[..., : HD // 2], x2 * c[..., HD // 2 :] + x1 * s[..., HD // 2 :]],
        dim=-1,
    )
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_tables_at_positions_match_formula(theta: float) -> None:
    rope = RotaryEmbedding(HD, max_seq_len=64, theta=theta)
    pos = torch.tensor([[0, 1, 7, 63], [5, 5, 2, 40]])
    cos, sin = rope(pos)
    ref_cos, ref_sin = _rope_reference(pos, HD, theta)
    assert cos.shape == (2, 4, HD)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-5, rtol=0)


def test_rope_tables_grow_past_max_seq_len() -> None:
    rope = RotaryEmbedding(HD, max_seq_len=4)
    assert rope.cos_cached.shape[0] == 4
    pos = torch.tensor([[3, 10, 100]])
    cos, sin = rope(pos)
    assert rope.cos_cached.shape[0] >= 101
    ref_cos, ref_sin = _rope_reference(pos, HD, 10000.0)
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-4, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-4, rtol=0)


def test_rope_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding(HD, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, HD), torch.randn(1, 1, 1, HD)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q, *rope(torch.tensor([[m]])))
        kn = apply_rope(k, *rope(torch.tensor([[n]])))
        return (qm * kn).sum()

    torch.testing.assert_close(score(7, 3), score(34, 30), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)


# --- attention -------------------------------------------------------------------------------------


def test_build_attention_mask_is_none_for_plain_causal_and_single_cached_token() -> None:
    assert build_attention_mask(8, 0) is None
    assert build_attention_mask(1, 5) is None


def test_build_attention_mask_chunk_after_cache_is_causal_in_absolute_positions() -> None:
    mask = build_attention_mask(3, 2)
    assert mask is not None
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_build_attention_mask_with_doc_ids_blocks_other_documents() -> None:
    doc = torch.tensor([[0, 0, 1, 1, 1]])
    mask = build_attention_mask(5, 0, doc)
    assert mask is not None and mask.shape == (1, 1, 5, 5)
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)
    with pytest.raises(ValueError, match="document masking"):
        build_attention_mask(1, 4, torch.zeros(1, 1, dtype=torch.long))


def test_build_attention_mask_key_padding_hides_padded_keys() -> None:
    pad = torch.tensor([[0, 1, 1, 1]])
    mask = build_attention_mask(4, 0, key_padding_BS=pad)
    assert mask is not None
    assert not mask[0, 0, :, 0].any()
    assert mask[0, 0, 3, 1:].all()


def test_attention_with_kv_cache_token_by_token_equals_full_causal_forward() -> None:
    attn = Attention(D, H, KV)
    rope = RotaryEmbedding(HD, max_seq_len=16)
    x = torch.randn(2, 9, D)
    full = _attend(attn, rope, x)

    cache = KVCache(1, 2, KV, HD, max_len=16)
    outs = []
    for t in range(9):
        pos = torch.full((2, 1), t)
        outs.append(attn(x[:, t : t + 1], rope(pos), cache=cache, layer=0))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_attention_is_causal_future_tokens_do_not_change_past_outputs() -> None:
    attn = Attention(D, H, KV)
    rope = RotaryEmbedding(HD, max_seq_len=16)
    x = torch.randn(1, 8, D)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, D)
    a, b = _attend(attn, rope, x), _attend(attn, rope, y)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_kv_cache_overflow_raises() -> None:
    cache = KVCache(1, 1, KV, HD, max_len=2)
    k = torch.zeros(1, KV, 3, HD)
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.update(0, k, k)


def test_doc_mask_token_outputs_do_not_change_when_another_document_changes() -> None:
    attn = Attention(D, H, KV)
    rope = RotaryEmbedding(HD, max_seq_len=16)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]])
    mask = build_attention_mask(8, 0, doc)
    x = torch.randn(1, 8, D)
    y = x.clone()
    y[:, :3] = torch.randn(1, 3, D)  # change document 0 only
    a, b = _attend(attn, rope, x, mask=mask), _attend(attn, rope, y, mask=mask)
    torch.testing.assert_close(a[:, 3:], b[:, 3:], atol=0, rtol=0)
    assert not torch.allclose(a[:, :3], b[:, :3])
    # without the document mask, later documents do see document 0
    c, d = _attend(attn, rope, x), _attend(attn, rope, y)
    assert not torch.allclose(c[:, 3:], d[:, 3:])


def test_gqa_equals_mha_with_repeated_kv_weights() -> None:
    gqa = Attention(D, H, KV)
    mha = Attention(D, H, H)
    group = H // KV
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(KV, HD, D)
            getattr(mha, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(H * HD, D))
    rope = RotaryEmbedding(HD, max_seq_len=16)
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(_attend(gqa, rope, x), _attend(mha, rope, x), atol=1e-6, rtol=1e-5)


def test_swiglu_matches_formula() -> None:
    mlp = SwiGLU(D, 24)
    x = torch.randn(5, D)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    ref = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    torch.testing.assert_close(mlp(x), ref)


def test_rope_tables_grown_after_bf16_cast_still_match_formula() -> None:
    rope = RotaryEmbedding(64, max_seq_len=16).to(torch.bfloat16)
    pos = torch.tensor([[1000]])
    cos, _ = rope(pos)
    ref_cos, _ = _rope_reference(pos, 64, 10000.0)
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-2, rtol=0)
