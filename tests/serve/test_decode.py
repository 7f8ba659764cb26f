"""The CPU decode path (moeforge.serve.decode): its one-token steps give the model's own logits for every
model feature and batch shape, its prepacked linears equal ``x @ W.T`` whichever kernel serves them, it
notices weight changes, and the engine only uses it where it applies."""

from __future__ import annotations

import pytest
import torch

from moeforge.model.config import load_model_config
from moeforge.model.layers import RMSNorm
from moeforge.model.router import Router
from moeforge.model.transformer import MoETransformer
from moeforge.serve import decode
from moeforge.serve.decode import Decoder, _Packed
from moeforge.serve.engine import Engine, EngineError
from moeforge.serve.sampling import SamplingParams

VARIANTS = {
    "moe top-2": [],
    "dense": ["moe=null"],
    "top-1 straight-through": ["moe.top_k=1", "moe.straight_through=true"],
    "no renormalize": ["moe.renormalize=false"],
    "aux-free bias": ["moe.aux_free_bias_rate=0.01"],
    "ghost experts": ["moe.num_ghost_experts=2"],
    "shared expert, mixed layers": [
        "moe.num_shared_experts=1",
        "moe.shared_expert_hidden=64",
        "moe.layers=[1,3]",
    ],
    "capacity factor": ["moe.capacity_factor=1.0"],
    "untied": ["tie_embeddings=false"],
    "q/k/v biases": ["qkv_bias=true"],
}


def _model(overrides: list[str], seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(load_model_config("tiny", overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)  # they start at 0, which would hide a bias the decode path drops
        for layer in model.moe_layers():
            layer.router.weight.normal_(std=0.5)  # decisive routing: ties would make choices arbitrary
            if layer.router.aux_free_bias_rate:
                layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
            if layer.num_ghost:
                layer.ghost_alpha.copy_(torch.tensor([0.5, 0.0]))  # one ghost half awake, one dormant
    return model


def _compare(
    model: MoETransformer, prompts_BT: torch.Tensor, steps: int, rows: int = 8, pad: int = 0
) -> None:
    """Prefill, then ``steps`` tokens through the Decoder and through the model's forward from equal
    caches; logits must agree. ``pad`` left-pads row 0 by that many masked key slots."""
    b, t = prompts_BT.shape
    dec = Decoder(model, rows)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        caches = [model.new_cache(b, t + steps + 1) for _ in range(2)]
        kp = torch.ones(b, t + steps + 1, dtype=torch.bool)
        kp[0, :pad] = False
        for c in caches:
            model(prompts_BT, cache=c, key_padding_BS=kp[:, :t] if pad else None)
        positions = torch.full((b,), t) - torch.tensor([pad] + [0] * (b - 1))
        ids = torch.randint(0, model.cfg.vocab_size, (b,), generator=gen)
        for _ in range(steps):
            mask = kp[:, : caches[0].length + 1] if pad else None
            ours = dec.step(ids, positions, caches[0], mask)
            ref = model(ids[:, None], positions_BT=positions[:, None], cache=caches[1], key_padding_BS=mask)
            torch.testing.assert_close(ours, ref.logits[:, -1], rtol=1e-4, atol=1e-5)
            for layer in range(model.cfg.n_layers):
                torch.testing.assert_close(caches[0].k[layer], caches[1].k[layer], rtol=1e-4, atol=1e-5)
            ids, positions = ours.argmax(-1), positions + 1


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_decode_steps_equal_the_model_forward(variant: str, batch: int) -> None:
    model = _model(VARIANTS[variant])
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(0))
    _compare(model, prompts, steps=4)


def test_decode_steps_with_left_padding_and_more_rows_than_the_packing() -> None:
    model = _model([])
    prompts = torch.randint(0, model.cfg.vocab_size, (5, 6), generator=torch.Generator().manual_seed(2))
    _compare(model, prompts, steps=3, rows=2, pad=2)  # 5 rows on a 2-row packing: chunked GEMMs


@pytest.mark.parametrize("kind", ["mkl", "onednn", "plain"])
@pytest.mark.parametrize("gemv", [True, False])
def test_packed_linear_equals_x_times_w_transposed_for_any_row_count(
    kind: str, gemv: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = torch.randn(48, 32)
    if kind != "mkl":  # take the faster kernels away to reach the fallbacks
        monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", _unavailable, raising=False)
    if kind == "plain":
        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", _unavailable, raising=False)
    lin = _Packed(w, rows=4, gemv=gemv)
    if kind != "plain" and lin.kind == "plain":
        pytest.skip(f"this torch build has no {kind} prepacked linear")
    assert lin.kind == kind
    for m in (1, 2, 4, 7):
        x = torch.randn(m, 32)
        torch.testing.assert_close(lin(x), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_a_kernel_that_disagrees_on_the_probe_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "_close", lambda got, ref: False)
    lin = _Packed(torch.randn(16, 8), rows=4)
    assert lin.kind == "plain"
    x = torch.randn(3, 8)
    torch.testing.assert_close(lin(x), x @ lin.wt_IO)


def _unavailable(*args: object, **kwargs: object) -> None:
    raise RuntimeError("not in this build")


def test_decoder_rebuilds_after_the_weights_change() -> None:
    model = _model([])
    dec = Decoder(model)
    assert not dec.refresh()
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # tied: the embedding doubles too
        model.moe_layers()[0].w13.mul_(-1.0)
    assert dec.refresh()
    assert not dec.refresh()
    prompts = torch.randint(0, model.cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(3))
    _compare(model, prompts, steps=2)
    # an engine checks before every batch: its output follows the changed model (untied: with tied
    # embeddings a random model's argmax is the last input token whatever the weights)
    model = _model(["tie_embeddings=false"])
    engine = Engine(model)
    before = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6))[0].token_ids
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight))
    after = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6))[0].token_ids
    slow = Engine(model, fast_decode=False).generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6))
    assert after == slow[0].token_ids
    assert after != before


def test_engine_uses_the_decoder_only_for_float32_cpu_models() -> None:
    model = _model([])
    assert Engine(model).decoder is not None
    assert Engine(model, fast_decode=False).decoder is None
    half = _model([]).to(torch.bfloat16)
    assert Engine(half).decoder is None  # bf16: the model's own forward
    with pytest.raises(EngineError, match="float32 model on CPU"):
        Engine(half, fast_decode=True)
    with pytest.raises(ValueError, match="float32 models on CPU"):
        Decoder(half)


@pytest.mark.parametrize(
    "variant", ["moe top-2", "top-1 straight-through", "no renormalize", "aux-free bias", "ghost experts"]
)
def test_router_select_picks_what_forward_picks(variant: str) -> None:
    model = _model(VARIANTS[variant])
    layer = model.moe_layers()[0]
    router: Router = layer.router
    x = torch.randn(32, model.cfg.d_model)
    alpha = layer.ghost_alpha if layer.num_ghost else None
    with torch.no_grad():
        ref = router(x, alpha, losses=False)
        indices, weights = router.select(x, alpha)
    assert torch.equal(indices, ref.indices)
    assert torch.equal(weights, ref.weights)
    if alpha is not None:
        assert not (indices == layer.num_experts + 1).any()  # the dormant ghost is never chosen


def test_logits_to_keep_gives_the_last_positions_only() -> None:
    model = _model([])
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=2).logits
    assert last.shape == (2, 2, model.cfg.vocab_size)
    torch.testing.assert_close(last, full[:, -2:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, ids, logits_to_keep=1)


def test_rmsnorm_float32_is_bit_identical_to_its_formula() -> None:
    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = 5 * torch.randn(3, 11, 96)
    formula = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    assert torch.equal(norm(x), formula)


def test_row_argmax_equals_torch_argmax_with_ties_nan_and_infinities() -> None:
    from moeforge.serve.sampling import row_argmax

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1024, generator=gen)
    x[1, 700] = x[1, 300] = 50.0  # a tie across blocks: the first wins
    x[2, 10] = x[2, 11] = 50.0  # a tie inside a block
    x[3] = float("-inf")  # nothing but -inf: index 0
    x[4, 900] = float("nan")  # NaN counts as the maximum
    x[5, 5] = float("inf")
    x[6] = 7.0  # all equal
    assert torch.equal(row_argmax(x), x.argmax(-1))
    wide = torch.randn(6, 3, 1024, generator=gen)[:, 1]  # a non-contiguous [B, V] view, as logits[:, -1]
    assert torch.equal(row_argmax(wide), wide.argmax(-1))
    odd = torch.randn(8, 1000, generator=gen)  # not a multiple of the block: torch's argmax
    assert torch.equal(row_argmax(odd), odd.argmax(-1))
