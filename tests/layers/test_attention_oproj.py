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


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["kernel", "cublas", None])
@pytest.mark.parametrize("T", [5, 2051])
def test_output_projection_paths_within_the_bf16_rule(monkeypatch, mode, T):
    """output_projection with the grouped_oproj kernel (DSV4_OPROJ=kernel), the cuBLAS form
    (q_norm_rope by -angle, then the einsum; DSV4_OPROJ=cublas) and the default rule (the
    cuBLAS form from OPROJ_CUBLAS_MIN_TOKENS tokens): each within 2x the bf16 reference's error
    of the fp32 formula, on V4-Flash's head_dim 512 and rope_dim 64, positions up to 1M."""
    from dsv4.layers.linear import Linear
    from dsv4.layers.rope import rope_frequencies
    from dsv4.ops import grouped_oproj as go

    calls = []
    orig = go.oproj_cublas
    monkeypatch.setattr(go, "oproj_cublas", lambda *a: calls.append(1) or orig(*a))
    if mode is not None:
        monkeypatch.setenv("DSV4_OPROJ", mode)
    H, hd, G, R = 16, 512, 4, 256
    g = torch.Generator().manual_seed(T)
    o = torch.randn(T, H, hd, generator=g).to(torch.bfloat16).cuda()
    pos = torch.randint(0, 1 << 20, (T,), generator=g).cuda()
    freqs = rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0).cuda()
    lin = Linear(H * hd // G, G * R)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(G * R, H * hd // G, generator=g) * 0.03)
    lin = lin.to("cuda", torch.bfloat16)
    w = lin.weight.view(G, R, -1)
    old = dsv4.get_backend()
    try:
        dsv4.set_backend("cuda")
        with torch.no_grad():
            z = go.output_projection(o, pos, freqs, lin, G)
    finally:
        dsv4.set_backend(old)
    cublas = mode == "cublas" or (mode is None and T >= go.OPROJ_CUBLAS_MIN_TOKENS)
    assert bool(calls) == cublas, (mode, T, calls)
    truth = go.grouped_oproj_reference(o.float(), pos, freqs, w.float(), None).double()
    ref16 = go.grouped_oproj_reference(o, pos, freqs, w, None)
    err = (z.double() - truth).abs().max().item()
    err16 = (ref16.double() - truth).abs().max().item()
    assert z.shape == (T, G, R) and z.dtype == torch.bfloat16 and torch.isfinite(z).all()
    assert err <= 2 * err16 + 1e-6, (err, err16)
