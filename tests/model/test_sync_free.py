"""The MoE layer's forward and backward never read a device value on the host.

On a GPU every such read (``.item()``, ``.tolist()``, ``bool(t)``, a boolean-mask index, ``nonzero``)
stalls the CPU until the GPU catches up. With CUDA present the layer runs under
``torch.cuda.set_sync_debug_mode("error")``, which turns any synchronizing call into an error; on CPU,
where nothing synchronizes, a torch-function mode counts the same calls instead. Both run the layer with
the device-offset backend (``grouped_mm``) the GPU uses, dropless and with a capacity, with awake ghost
experts, and with the routing statistics on (they stay tensors until a log step reads them).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from moeforge.model.config import MoEConfig
from moeforge.model.dispatch import has_grouped_mm
from moeforge.model.moe import MoELayer

D, FH = 32, 16
_HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.numpy,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.unique,
}


class CountHostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host (by name), boolean-mask indexing too."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _HOST_READS:
            self.reads[getattr(func, "__name__", str(func))] += 1
        elif func is torch.Tensor.__getitem__ and _bool_index(args[1] if len(args) > 1 else None):
            self.reads["__getitem__[bool mask]"] += 1
        elif (
            func is torch.repeat_interleave
            and "output_size" not in (kwargs or {})
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
        ):
            self.reads["repeat_interleave (no output_size)"] += 1
        return func(*args, **(kwargs or {}))


def _bool_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


CASES = {
    "dropless": {},
    "capacity": {"capacity_factor": 0.5},
    "ghosts awake, capacity": {"num_ghost_experts": 2, "capacity_factor": 1.0},
    "top-1, aux-free bias, noise": {"top_k": 1, "aux_free_bias_rate": 0.01, "router_noise_std": 0.3},
}


def _layer(device: torch.device, **moe: Any) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": FH, "dispatch": "grouped_mm", **moe})
    layer = MoELayer(D, cfg).to(device).train()
    if cfg.num_ghost_experts:
        layer.ghost_alpha.fill_(0.5)
    return layer


def _step(layer: MoELayer, device: torch.device) -> torch.Tensor:
    x = torch.randn(2, 24, D, device=device, requires_grad=True)
    y, stats = layer(x)
    assert stats is not None
    loss = y.square().mean() + stats.lb_loss + stats.z_loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("moe", CASES.values(), ids=CASES.keys())
def test_no_host_reads_in_the_moe_forward_and_backward_on_cpu(moe: dict[str, Any]) -> None:
    cpu = torch.device("cpu")
    if not has_grouped_mm(cpu, torch.float32, (D, FH)):
        pytest.skip("this torch has no grouped_mm kernel on CPU")
    layer = _layer(cpu, **moe)
    _step(layer, cpu)  # warm-up: the noise schedule reads its step count once per step, not per forward
    with CountHostReads() as mode:
        _step(layer, cpu)
    assert mode.reads == Counter(), f"host reads in the MoE layer: {dict(mode.reads)}"


def test_the_counter_sees_host_reads() -> None:
    with CountHostReads() as mode:
        t = torch.arange(4)
        t.sum().item()
        t.tolist()
        _ = t[t > 1]
    assert mode.reads == Counter({"item": 1, "tolist": 1, "__getitem__[bool mask]": 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU test above stands in for it)")
@pytest.mark.parametrize("moe", CASES.values(), ids=CASES.keys())
def test_no_synchronizing_call_on_cuda(moe: dict[str, Any]) -> None:
    cuda = torch.device("cuda")
    layer = _layer(cuda, **moe).to(torch.bfloat16)
    _step(layer, cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(layer, cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
