"""Each module's decode form (``prepare_for_decode``) computes its training forward for one new token per
row: the norms, RoPE, attention with a KV cache, the dense MLP, the MoE layer on both of its paths, the
router's fused selection, and the whole model — prefill, then step by step through the decode form, equal
to the forward over the whole sequence. All in float32, eval mode, router noise off; tolerance
``rtol=1e-4, atol=1e-5`` (the forms fold norm weights into matrices and apply combine weights before the
down projection, so rounding differs by about 1e-6 relative)."""

from __future__ import annotations

import pytest
import torch

from moeforge.model.config import MoEConfig, load_model_config
from moeforge.model.layers import (
    Attention,
    DecodeLinear,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rope,
    apply_rope_decode,
)
from moeforge.model.moe import MoEDecode, MoELayer
from moeforge.model.transformer import MoETransformer

TOL = {"rtol": 1e-4, "atol": 1e-5}
D = 32


def _norm(seed: int = 0) -> RMSNorm:
    norm = RMSNorm(D)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(D, generator=torch.Generator().manual_seed(seed)))
    return norm


# --- norms and RoPE --------------------------------------------------------------------------------


def test_rmsnorm_normalize_times_its_weight_is_the_norm() -> None:
    norm = _norm()
    x = 3 * torch.randn(5, D)
    torch.testing.assert_close(norm.normalize(x) * norm.weight, norm(x), rtol=1e-6, atol=1e-6)


def test_rope_decode_rotates_like_apply_rope_at_any_position() -> None:
    rope = RotaryEmbedding(16, max_seq_len=64)
    positions_B = torch.tensor([0, 5, 63, 17])
    x_BHD = torch.randn(4, 3, 16)
    cos, sin = rope(positions_B[:, None])  # [B, 1, Dh]
    ref = apply_rope(x_BHD[:, :, None], cos, sin)[:, :, 0]
    got = apply_rope_decode(x_BHD, rope.prepare_for_decode().at(positions_B))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


# --- attention with a cache ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "qkv_bias"),
    [(4, 4, False), (4, 2, False), (4, 1, False), (4, 2, True)],
    ids=["mha", "gqa", "mqa", "gqa+bias"],
)
def test_attention_decode_steps_equal_the_causal_forward(n_heads: int, n_kv: int, qkv_bias: bool) -> None:
    torch.manual_seed(0)
    attn, norm, rope = (
        Attention(D, n_heads, n_kv, qkv_bias).eval(),
        _norm(),
        RotaryEmbedding(D // n_heads, 32),
    )
    if qkv_bias:
        with torch.no_grad():
            for p in (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias):
                p.normal_(std=0.5)
    b, t, prefill = 3, 9, 4
    x_BTD = torch.randn(b, t, D)
    pos_BT = torch.arange(t).expand(b, t)
    form, tables = attn.prepare_for_decode(norm), rope.prepare_for_decode()
    cache = KVCache(1, b, n_kv, D // n_heads, t)
    with torch.no_grad():
        full = x_BTD + attn(norm(x_BTD), rope(pos_BT))
        attn(norm(x_BTD[:, :prefill]), rope(pos_BT[:, :prefill]), cache=cache)
        cache.advance(prefill)
        for i in range(prefill, t):
            got = form.step(x_BTD[:, i], tables.at(pos_BT[:, i]), None, cache, 0)
            cache.advance(1)
            torch.testing.assert_close(got, full[:, i], **TOL)


# --- MLPs ------------------------------------------------------------------------------------------


def test_swiglu_decode_is_the_residual_plus_the_mlp_of_the_normed_rows() -> None:
    torch.manual_seed(0)
    mlp, norm = SwiGLU(D, 48), _norm()
    x = torch.randn(5, D)
    with torch.no_grad():
        torch.testing.assert_close(mlp.prepare_for_decode(norm).step(x), x + mlp(norm(x)), **TOL)


MOE = {
    "top-2": {},
    "top-1": {"top_k": 1},
    "top-1 straight-through": {"top_k": 1, "straight_through": True},
    "no renormalize": {"renormalize": False},
    "shared expert, gated": {"num_shared_experts": 1, "shared_expert_hidden": 24},
    "shared experts, ungated": {
        "num_shared_experts": 2,
        "shared_expert_hidden": 8,
        "shared_expert_gate": False,
    },
    "ghost experts": {"num_ghost_experts": 2},
    "aux-free bias": {"aux_free_bias_rate": 0.01},
    "capacity factor": {"capacity_factor": 1.0},
    "router noise (off in eval)": {"router_noise_std": 1.0},
    "8 experts": {"num_experts": 8},
}


def _moe(**overrides: object) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 16, **overrides}))
    with torch.no_grad():
        layer.w13.normal_(std=0.3)
        layer.w2.normal_(std=0.3)
        layer.router.weight.normal_(std=0.5)  # decisive routing: near-ties would make choices arbitrary
        if layer.router.aux_free_bias_rate:
            layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, layer.w13.shape[0]))
        if layer.num_ghost:
            layer.ghost_alpha.copy_(torch.tensor([0.5, 0.0]))  # one ghost half awake, one dormant
        if layer.shared_gate is not None:
            layer.shared_gate.weight.normal_(std=0.5)
    return layer.eval()


@pytest.mark.parametrize("variant", MOE)
@pytest.mark.parametrize("batch", [1, 3, 8])  # one row; few rows (chosen experts); many (all experts)
def test_moe_decode_equals_the_layer_forward(variant: str, batch: int) -> None:
    layer, norm = _moe(**MOE[variant]), _norm()
    x = torch.randn(batch, D)
    with torch.no_grad():
        ref = x + layer(norm(x), stats=False)[0]
        torch.testing.assert_close(layer.prepare_for_decode(norm).step(x), ref, **TOL)


def test_moe_decode_takes_both_expert_paths() -> None:
    """3 rows × top-2 on 8 experts run only the chosen ones; on 4 experts all of them (with zero weights)."""
    calls: list[int] = []

    def counting(weight_OI: torch.Tensor, gemv: bool = True) -> DecodeLinear:
        lin = DecodeLinear(weight_OI)

        class Counted:
            nbytes = lin.nbytes

            def __call__(self, x: torch.Tensor) -> torch.Tensor:
                calls.append(x.shape[0])
                return lin(x)

        return Counted()  # type: ignore[return-value]

    for experts, expect_stacked in ((8, False), (4, True)):
        calls.clear()
        layer, norm = _moe(num_experts=experts), _norm()
        x = torch.randn(3, D)
        with torch.no_grad():
            got = layer.prepare_for_decode(norm, counting).step(x)
            torch.testing.assert_close(got, x + layer(norm(x), stats=False)[0], **TOL)
        assert bool(calls) == expect_stacked


@pytest.mark.parametrize("variant", ["top-2", "top-1", "no renormalize", "ghost experts", "aux-free bias"])
def test_router_select_for_decode_picks_what_select_from_logits_picks(variant: str) -> None:
    layer = _moe(**MOE[variant])
    alpha = layer.ghost_alpha if layer.num_ghost else None
    logits = torch.randn(64, layer.w13.shape[0]) * 3
    idx, w = layer.router.select_for_decode(logits, alpha)
    ref_idx, ref_w = layer.router.select_from_logits(logits, alpha)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-6)


def test_moe_decode_counts_only_the_copies_it_made() -> None:
    layer = _moe()
    form = layer.prepare_for_decode(_norm())
    assert isinstance(form, MoEDecode)
    stacked = layer.w13.numel() + layer.w2.numel() + layer.router.weight.numel()
    assert form.nbytes == 4 * stacked  # float32, plain layout


# --- the whole model -------------------------------------------------------------------------------

MODELS = {
    "moe top-2": [],
    "moe top-1": ["moe.top_k=1"],
    "dense": ["moe=null"],
    "shared expert, mixed dense/moe layers": [
        "moe.num_shared_experts=1",
        "moe.shared_expert_hidden=64",
        "moe.layers=[1,3]",
    ],
    "ghost experts": ["moe.num_ghost_experts=2"],
    "multi-head (no gqa)": ["n_kv_heads=4"],
    "multi-query": ["n_kv_heads=1"],
    "untied": ["tie_embeddings=false"],
    "dense untied": ["moe=null", "tie_embeddings=false"],
    "q/k/v biases": ["qkv_bias=true"],
    "router noise (off in eval)": ["moe.router_noise_std=1.0"],
}


def _model(overrides: list[str]) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(load_model_config("tiny", overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
            elif p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))  # norms away from 1: a dropped norm weight shows
        for layer in model.moe_layers():
            layer.router.weight.normal_(std=0.5)
            if layer.num_ghost:
                layer.ghost_alpha.copy_(torch.tensor([0.5, 0.0]))
    return model


def _decode(
    model: MoETransformer, ids_BT: torch.Tensor, prefill: int, pads: list[int] | None = None
) -> torch.Tensor:
    """Logits ``[B, T - prefill + 1, V]``: the forward's at the last prompt position, then one decode-form
    step per remaining token. ``pads[b]``: row b's first ``pads[b]`` tokens are padding (masked keys)."""
    b, t = ids_BT.shape
    form = model.prepare_for_decode()
    cache = model.new_cache(b, t)
    pads_B = torch.tensor(pads or [0] * b)
    kp_BS = torch.arange(t)[None, :] >= pads_B[:, None]
    with torch.no_grad():
        if pads is None:
            first = model(ids_BT[:, :prefill], cache=cache).logits[:, -1]
        else:  # each row prefilled alone, unpadded, into its slots of the shared cache (as serving does)
            for r in range(b):
                part = model.new_cache(1, prefill - pads[r])
                model(ids_BT[r : r + 1, pads[r] : prefill], cache=part)
                for layer in range(model.cfg.n_layers):
                    cache.k[layer][r, :, pads[r] : prefill] = part.k[layer][0]
                    cache.v[layer][r, :, pads[r] : prefill] = part.v[layer][0]
            cache.advance(prefill)
            first = torch.zeros(b, model.cfg.vocab_size)  # not compared
        out = [first]
        for i in range(prefill, t):
            kp = kp_BS[:, : cache.length + 1] if pads is not None else None
            out.append(form.step(ids_BT[:, i], i - pads_B, cache, kp))
    return torch.stack(out, 1)


@pytest.mark.parametrize("variant", MODELS)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_prefill_then_decode_steps_equal_the_forward_over_the_whole_sequence(
    variant: str, batch: int
) -> None:
    model = _model(MODELS[variant])
    ids = torch.randint(0, model.cfg.vocab_size, (batch, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(_decode(model, ids, prefill=5), full[:, 4:], **TOL)


def test_capacity_factor_decode_steps_equal_the_cached_forward() -> None:
    """With a capacity factor what a layer drops depends on the tokens in the call, so the reference is
    the forward fed the same one token per row."""
    model = _model(["moe.capacity_factor=1.0"])
    ids = torch.randint(0, model.cfg.vocab_size, (8, 9), generator=torch.Generator().manual_seed(2))
    ref_cache = model.new_cache(8, 9)
    with torch.no_grad():
        model(ids[:, :5], cache=ref_cache)
        ref = [model(ids[:, i : i + 1], cache=ref_cache).logits[:, -1] for i in range(5, 9)]
    torch.testing.assert_close(_decode(model, ids, prefill=5)[:, 1:], torch.stack(ref, 1), **TOL)


def test_left_padded_rows_decode_as_they_would_alone() -> None:
    model = _model([])
    pads = [3, 0, 1]
    ids = torch.randint(0, model.cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(3))
    got = _decode(model, ids, prefill=6, pads=pads)
    with torch.no_grad():
        for r, pad in enumerate(pads):
            alone = model(ids[r : r + 1, pad:]).logits[0]
            torch.testing.assert_close(got[r, 1:], alone[6 - pad :], **TOL)


def test_decode_form_routes_its_laid_out_projections_through_the_linear_factory() -> None:
    """The factory sees the fused q/k/v (norm folded), each MoE layer's stacked experts + router and down
    projections (never one row: gemv=False) and the LM head; nbytes adds up what the form holds."""
    model = _model([])
    seen: list[tuple[tuple[int, ...], bool]] = []

    def recording(weight_OI: torch.Tensor, gemv: bool = True) -> DecodeLinear:
        seen.append((tuple(weight_OI.shape), gemv))
        return DecodeLinear(weight_OI)

    form = model.prepare_for_decode(recording)
    cfg, moe = model.cfg, model.cfg.moe
    assert moe is not None
    qkv = ((cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.d_model)
    up = (moe.num_experts * 2 * moe.expert_hidden + moe.num_experts, cfg.d_model)
    down = (cfg.d_model, moe.num_experts * moe.expert_hidden)
    assert seen == [(qkv, True), (up, False), (down, False)] * cfg.n_layers + [
        ((cfg.vocab_size, cfg.d_model), True)
    ]
    o_proj = cfg.d_model * cfg.n_heads * cfg.head_dim
    assert form.nbytes == 4 * (sum(a * b for (a, b), _ in seen) + cfg.n_layers * o_proj)
