"""The attention layer's output path (§3.7) is dsv4.ops.grouped_oproj's formula: inverse RoPE,
then one map per group of heads; its kernel only without gradients."""

from __future__ import annotations

import pytest
import torch

import dsv4
import dsv4.layers.attention as attention
from dsv4.layers.rope import apply_rope


def _layer(dtype):
    torch.manual_seed(1)
    cfg = dsv4.ModelConfig.tiny()
    layer = attention.Attention(cfg, 0).to(dtype)
    torch.nn.init.normal_(layer.wo_a.weight, std=0.05)
    return layer


def _einsum(layer, o, pos, freqs):
    """The formula as the official Attention.forward writes it."""
    T = o.shape[0]
    o = apply_rope(o, pos[:, None], freqs, inverse=True)
    o = o.view(T, layer.o_groups, -1)
    w = layer.wo_a.weight.view(layer.o_groups, layer.o_lora_rank, -1)
    return torch.einsum("tgd,grd->tgr", o.double(), w.double())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_project_is_the_official_formula(dtype, tol):
    layer = _layer(dtype)
    T = 9
    o = torch.randn(T, layer.n_heads, layer.head_dim).to(dtype)
    pos = torch.tensor([0, 1, 2, 7, 100, 101, 4095, 5000, 65000])
    freqs = layer.freqs(o.device)
    z = layer._project(o, pos, freqs)
    assert z.shape == (T, layer.o_groups, layer.o_lora_rank) and z.dtype == dtype
    want = _einsum(layer, o, pos, freqs)
    err = ((z.double() - want).abs().max() / want.abs().max()).item()
    assert err < tol, err


def test_project_takes_no_kernel_with_gradients(monkeypatch):
    """The grouped_oproj kernel has no backward: with gradients the layer keeps the reference
    formula, and gradients reach wo_a and o."""
    asked = []
    monkeypatch.setattr(attention, "use_kernels",
                        lambda x, ops, unsupported=None: asked.append(ops) or True)
    layer = _layer(torch.float32)
    o = torch.randn(4, layer.n_heads, layer.head_dim, requires_grad=True)
    pos = torch.arange(4)
    z = layer._project(o, pos, layer.freqs(o.device))
    z.square().sum().backward()
    assert not asked
    assert o.grad is not None and o.grad.abs().sum() > 0
    assert layer.wo_a.weight.grad is not None and layer.wo_a.weight.grad.abs().sum() > 0
    with torch.no_grad():
        z2 = layer._project(o, pos, layer.freqs(o.device))
    assert asked == [("grouped_oproj",)]
    torch.testing.assert_close(z2, z.detach(), rtol=1e-6, atol=1e-6)
