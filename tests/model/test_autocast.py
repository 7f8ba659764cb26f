"""bf16 autocast: every dispatch backend runs forward and backward and stays close to fp32."""

from __future__ import annotations

import pytest
import torch

from moeforge.model.config import MoEConfig
from moeforge.model.moe import MoELayer


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "padded", "auto"])
def test_moe_layer_under_bf16_autocast_matches_fp32(backend):
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=32, dispatch=backend))
    x = torch.randn(2, 8, 16)
    ref, _ = layer(x)
    x_ac = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x_ac)
    out.float().sum().backward()
    assert layer.w13.grad is not None and layer.w13.grad.dtype == torch.float32
    assert x_ac.grad is not None and torch.isfinite(x_ac.grad).all()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
