"""torch.ops.dsv4.grouped_oproj: the reference equals the attention layer's formula (inverse
RoPE + grouped einsum), the layer wrapper, opcheck (CPU); the CUDA kernel against the fp32
reference with the 2x bf16 rule (GPU)."""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
from dsv4.config import ModelConfig
from dsv4.layers.linear import Linear
from dsv4.layers.rope import apply_rope, rope_frequencies
from dsv4.ops.grouped_oproj import grouped_oproj, grouped_oproj_reference, output_projection
from dsv4.quant import e8m0_to_float, fp8_block_quantize


def make(T, H, hd, G, R, fmt, seed, device="cpu", max_pos=5000):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(T, H, hd, generator=g).bfloat16()
    pos = torch.randint(0, max_pos, (T,), generator=g)
    freqs = rope_frequencies(64, 10000.0)
    Dg = H * hd // G
    w = torch.randn(G * R, Dg, generator=g) * Dg ** -0.5
    if fmt == "bf16":
        wo_a, scale = w.bfloat16().view(G, R, Dg), None
    else:
        q, s = fp8_block_quantize(w)
        wo_a, scale = q.view(G, R, Dg), s.view(G, R // 128, s.shape[-1])
    return [t if t is None else t.to(device) for t in (o, pos, freqs, wo_a, scale)]


def layer_formula(o, pos, freqs, w_bf16):
    """Today's code in layers/attention.py (bf16 einsum after the inverse RoPE)."""
    T, H, hd = o.shape
    G = w_bf16.shape[0]
    o = apply_rope(o, pos[:, None], freqs, inverse=True).view(T, G, -1)
    return torch.einsum("tgd,grd->tgr", o, w_bf16.to(o.dtype))


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_reference_equals_the_layer_formula(fmt):
    o, pos, freqs, wo_a, scale = make(T=7, H=4, hd=128, G=2, R=128, fmt=fmt, seed=1)
    z = grouped_oproj_reference(o, pos, freqs, wo_a, scale)
    assert z.shape == (7, 2, 128) and z.dtype == torch.bfloat16
    from dsv4.ops.grouped_gemm import dequantize_experts
    w = dequantize_experts(wo_a, scale, 256) if fmt == "fp8" else wo_a.float()
    want = layer_formula(o.float(), pos, freqs, w).double()
    err = (z.double() - want).abs()
    # the reference rounds the rotated o to bf16 first: that plus one output rounding
    assert bool((err <= 0.02 * want.abs().max()).all()), err.max()
    # and the exact bf16 formula of the layer agrees to bf16 precision
    zl = layer_formula(o, pos, freqs, w.bfloat16())
    torch.testing.assert_close(z.float(), zl.float(), rtol=2 ** -6, atol=2e-2)


def test_inverse_rope_matters():
    o, pos, freqs, wo_a, scale = make(T=5, H=4, hd=128, G=2, R=128, fmt="bf16", seed=2)
    a = grouped_oproj_reference(o, pos, freqs, wo_a, None)
    b = grouped_oproj_reference(o, torch.zeros_like(pos), freqs, wo_a, None)
    assert not torch.equal(a, b)
    # position 0 = no rotation = plain grouped einsum
    want = torch.einsum("tgd,grd->tgr", o.float().view(5, 2, 256), wo_a.float()).bfloat16()
    assert torch.equal(b, want)


def test_output_projection_wrapper_on_the_layer_weights():
    cfg = ModelConfig.tiny()
    G, R = cfg.o_groups, cfg.o_lora_rank
    H, hd = cfg.n_heads, cfg.head_dim
    Dg = H * hd // G
    lin = Linear(Dg, G * R)
    g = torch.Generator().manual_seed(3)
    o = torch.randn(2, 3, H, hd, generator=g).bfloat16()
    pos = torch.arange(6).view(2, 3) + 100
    freqs = rope_frequencies(cfg.rope_head_dim, 10000.0)
    lin = lin.bfloat16()
    z = output_projection(o, pos, freqs, lin, G)
    assert z.shape == (2, 3, G, R)
    want = layer_formula(o.view(6, H, hd), pos.view(-1), freqs, lin.weight.view(G, R, Dg))
    torch.testing.assert_close(z.view(6, G, R).float(), want.float(), rtol=2 ** -6, atol=2e-2)
    # native FP8 storage: the wrapper passes the stored bytes and their scales
    q, s = fp8_block_quantize(lin.weight.float())
    lin8 = Linear(Dg, G * R)
    lin8.set_quantized(q, s, "fp8", torch.bfloat16)
    z8 = output_projection(o, pos, freqs, lin8, G)
    want8 = grouped_oproj_reference(o.view(6, H, hd), pos.view(-1), freqs,
                                    q.view(G, R, Dg), s.view(G, R // 128, -1))
    assert torch.equal(z8.view(6, G, R), want8)


def test_errors_and_opcheck():
    o, pos, freqs, wo_a, scale = make(T=4, H=4, hd=128, G=2, R=128, fmt="fp8", seed=4)
    with pytest.raises(ValueError, match="must split into 3 groups"):
        grouped_oproj_reference(o, pos, freqs, wo_a[:1].expand(3, -1, -1), scale)
    # positions int32 / int64 as on CUDA (a bool tensor used to be read as positions 0 / 1)
    for bad in (pos.float(), pos.bool()):
        with pytest.raises(ValueError, match="positions must be int32 or int64"):
            grouped_oproj_reference(o, bad, freqs, wo_a, scale)
    # head_dim 0: a ValueError (used to be a ZeroDivisionError from the group check)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        torch.ops.dsv4.grouped_oproj(o[..., :0], pos, freqs, wo_a, scale)
    with pytest.raises(ValueError, match="wo_a_scale is required"):
        grouped_oproj_reference(o, pos, freqs, wo_a, None)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    sf = e8m0_to_float(scale)
    torch.library.opcheck(torch.ops.dsv4.grouped_oproj.default, (o, pos, freqs, wo_a, sf),
                          test_utils=utils)
    out = torch.empty(4, 2, 128, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dsv4.grouped_oproj_out.default, (o, pos, freqs, wo_a, sf),
                          {"out": out}, test_utils=utils)
    o, pos, freqs, wo_a, _ = make(T=4, H=4, hd=128, G=2, R=128, fmt="bf16", seed=5)
    torch.library.opcheck(torch.ops.dsv4.grouped_oproj.default, (o, pos, freqs, wo_a, None))


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
def _assert_2x_bf16_rule(kernel, ref_bf16, truth, what):
    k, r, t = kernel.double().cpu(), ref_bf16.double().cpu(), truth.double().cpu()
    assert torch.equal(torch.isnan(k), torch.isnan(t)), f"{what}: NaN positions differ"
    k_err = (k - t).abs().max().item()
    r_err = (r - t).abs().max().item()
    assert k_err <= 2 * r_err + 1e-6 * t.abs().max().item(), \
        f"{what}: kernel err {k_err:.3g} > 2 x bf16 ref err {r_err:.3g}"


def _truth(o, pos, freqs, wo_a, scale):
    # fp32 throughout: the rotated o is not rounded to bf16
    return grouped_oproj_reference(o.float(), pos, freqs,
                                   wo_a if scale is None else wo_a, scale)


@pytest.mark.cuda
@pytest.mark.parametrize("pipe", ["serial", "overlap"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("tile", ["auto", "decode", "decode_deep", "medium", "large", "huge",
                                  "skinny"])
@pytest.mark.parametrize("T,H,hd,G,R", [(1, 4, 128, 2, 128), (37, 4, 128, 2, 128),
                                         (5, 8, 512, 2, 256), (300, 16, 64, 4, 128)])
def test_cuda_matches_reference(monkeypatch, pipe, fmt, tile, T, H, hd, G, R):
    if tile == "auto":
        monkeypatch.delenv("DSV4_GEMM_TILE", raising=False)
    else:
        monkeypatch.setenv("DSV4_GEMM_TILE", tile)
    monkeypatch.setenv("DSV4_GEMM_PIPE", pipe)
    o, pos, freqs, wo_a, scale = make(T, H, hd, G, R, fmt, seed=T + H + G, device="cuda",
                                      max_pos=1 << 20)
    out = torch.full((T, G, R), float("nan"), dtype=torch.bfloat16, device="cuda")
    grouped_oproj(o, pos, freqs, wo_a, scale, out=out)
    ref = grouped_oproj_reference(o, pos, freqs, wo_a, scale)
    _assert_2x_bf16_rule(out, ref, _truth(o, pos, freqs, wo_a, scale), "grouped_oproj")
    assert torch.equal(grouped_oproj(o, pos.int(), freqs, wo_a, scale), out)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 64, 2048])
def test_cuda_v4_flash_shapes(fmt, T):
    # 64 heads x 512, 8 groups, o_lora_rank 1024; positions up to 1M (large RoPE angles)
    o, pos, freqs, wo_a, scale = make(T, 64, 512, 8, 1024, fmt, seed=T, device="cuda",
                                      max_pos=1 << 20)
    z = grouped_oproj(o, pos, freqs, wo_a, scale)
    ref = grouped_oproj_reference(o, pos, freqs, wo_a, scale)
    _assert_2x_bf16_rule(z, ref, _truth(o, pos, freqs, wo_a, scale), "grouped_oproj V4")


@pytest.mark.cuda
def test_cuda_strided_o_and_opcheck():
    o, pos, freqs, wo_a, scale = make(9, 4, 128, 2, 128, "fp8", seed=6, device="cuda")
    big = torch.randn(9, 6, 128, device="cuda").bfloat16()
    big[:, 1:5] = o
    z = grouped_oproj(big[:, 1:5], pos, freqs, wo_a, scale)
    assert torch.equal(z, grouped_oproj(o, pos, freqs, wo_a, scale))
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.dsv4.grouped_oproj.default,
                          (o, pos, freqs, wo_a, e8m0_to_float(scale)), test_utils=utils)


@pytest.mark.cuda
def test_cuda_misaligned_o_and_one_token_views():
    """A misaligned contiguous o is copied, and one-token o / out views whose token stride is
    not a multiple of 8 work (before: 'launch failed: invalid argument')."""
    o, pos, freqs, wo_a, scale = make(3, 4, 128, 2, 128, "fp8", seed=8, device="cuda")
    z = grouped_oproj(o, pos, freqs, wo_a, scale)
    buf = torch.empty(o.numel() + 1, dtype=o.dtype, device="cuda")
    om = buf[1:].view(o.shape)
    om.copy_(o)
    assert torch.equal(grouped_oproj(om, pos, freqs, wo_a, scale), z)
    o1 = torch.empty(3 + 512, dtype=o.dtype, device="cuda").as_strided((1, 4, 128), (3, 128, 1))
    o1.copy_(o[:1])
    assert torch.equal(grouped_oproj(o1, pos[:1], freqs, wo_a, scale), z[:1])
    out1 = torch.full((3 + 256,), float("nan"), dtype=o.dtype,
                      device="cuda").as_strided((1, 2, 128), (3, 128, 1))
    grouped_oproj(o[:1], pos[:1], freqs, wo_a, scale, out=out1)
    assert torch.equal(out1, z[:1])


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("tile", ["skinny", "decode", "gemv"])
@pytest.mark.parametrize("T", [1, 2, 7, 8, 9, 16, 33])
def test_cuda_decode_tokens(monkeypatch, fmt, tile, T):
    """Decode token counts through the skinny tile, the 16-row tensor-core tile and the GEMV
    tile (T <= 2; forced at T > 2 it runs the skinny tile): inverse RoPE at positions up to 1M
    on 512-wide heads (the V4 head size), 2 groups of 256 rows."""
    monkeypatch.setenv("DSV4_GEMM_TILE", tile)
    o, pos, freqs, wo_a, scale = make(T, 4, 512, 2, 256, fmt, seed=900 + T, device="cuda",
                                      max_pos=1 << 20)
    out = torch.full((T, 2, 256), float("nan"), dtype=torch.bfloat16, device="cuda")
    grouped_oproj(o, pos, freqs, wo_a, scale, out=out)
    ref = grouped_oproj_reference(o, pos, freqs, wo_a, scale)
    _assert_2x_bf16_rule(out, ref, _truth(o, pos, freqs, wo_a, scale), f"grouped_oproj[{tile}]")
