"""torch.ops.dsv4.moe_swiglu: the clamped SwiGLU of the routed experts over bf16 [g | u] rows
(the MoE's torch._grouped_mm path). CPU: the reference is swiglu_clamped's values, bad input
raises ValueError naming what is accepted. CUDA (runs on the H200): the kernel gives the
reference's bits (run on the GPU) on fresh random inputs (beyond the clamp, NaN / ±inf, very
negative gates),
with no clamp, odd widths (the scalar path), strided rows, more than 65,535 pairs; opcheck."""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers the ops)
from dsv4.layers.moe import swiglu_clamped
from dsv4.ops.grouped_gemm import moe_swiglu, moe_swiglu_reference

cuda = pytest.mark.cuda


def _same(a, b) -> bool:
    """Bit for bit, NaN where the other has NaN (any payload)."""
    a, b = a.cpu(), b.cpu()
    return a.shape == b.shape and bool(((a.view(torch.int16) == b.view(torch.int16))
                                        | (a.isnan() & b.isnan())).all())


def _inputs(P, n, seed, device="cpu", scale=8.0, specials=True):
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(P, 2 * n, generator=g) * scale).to(torch.bfloat16)
    w = torch.rand(P, generator=g) + 0.1
    if P and n and specials:
        flat = gu.view(-1)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -200.0, 200.0,
                                 0.0, -0.0], dtype=torch.bfloat16)
        flat[:specials.numel()] = specials[:flat.numel()]
        flat[-specials.numel():] = specials[:flat.numel()]
    return gu.to(device), w.to(device)


@pytest.mark.parametrize("limit", [0.0, 7.0, 10.0])
def test_reference_is_swiglu_clamped(limit):
    """The reference gives swiglu_clamped's bits (the model's one definition) on the [g | u]
    halves, and those are the clamped SwiGLU written out here in float64, rounded once to
    bf16 (NaN where it is NaN)."""
    gu, w = _inputs(13, 24, 1)
    want = swiglu_clamped(gu[:, :24], gu[:, 24:], limit, w[:, None], torch.bfloat16)
    assert _same(moe_swiglu_reference(gu, w, limit), want)
    assert _same(moe_swiglu(gu, w, limit), want)                 # CPU: the reference
    g, u = gu[:, :24].double(), gu[:, 24:].double()
    if limit > 0:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    f64 = g / (1 + torch.exp(-g)) * u * w.double()[:, None]    # (silu(-inf) is NaN, as F.silu)
    got = want.double()
    # one bf16 rounding; below bf16's normal range the fp32 product may flush to 0
    close = (got == f64) | ((got - f64).abs() <= 2 ** -8 * f64.abs() + 2 ** -126)
    assert bool((close | (got.isnan() & f64.isnan())).all())


@pytest.mark.parametrize("args,match", [
    ((torch.ones(3, 8), torch.ones(3), 7.0), "bfloat16"),
    ((torch.ones(3, 7, dtype=torch.bfloat16), torch.ones(3), 7.0), r"\[pairs, 2 \* n\]"),
    ((torch.ones(3, 8, dtype=torch.bfloat16), torch.ones(4), 7.0), "one routing weight"),
    ((torch.ones(3, 8, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float64), 7.0),
     "float32"),
    ((torch.ones(3, 8, dtype=torch.bfloat16), torch.ones(3), -1.0), "must be 0"),
    ((torch.ones(3, 8, dtype=torch.bfloat16), torch.ones(3), float("nan")), "finite"),
    ((torch.ones(3, 8, dtype=torch.bfloat16), torch.ones(3), 1e-50), "1.17549435e-38"),
])
def test_bad_input_is_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        moe_swiglu_reference(*args)


@cuda
@pytest.mark.parametrize("P,n,limit", [(1, 8, 10.0), (7, 2048, 10.0), (300, 64, 0.0),
                                       (5, 13, 10.0), (33, 1, 7.0), (0, 16, 10.0),
                                       (70000, 8, 10.0), (64, 4096, 2.5)])
def test_cuda_kernel_gives_the_reference_bits(P, n, limit):
    """Bit for bit the reference run on the GPU (PyTorch's CUDA silu and products: the same
    fp32 operations); within one bf16 step of the CPU reference (whose vectorised exp may
    differ from CUDA's expf in the last fp32 bit: 1 in ~10^5 values then rounds the other way)."""
    gu, w = _inputs(P, n, P * 7 + n)
    got = moe_swiglu(gu.cuda(), w.cuda(), limit)
    assert got.shape == (P, n) and got.dtype == torch.bfloat16
    want = moe_swiglu_reference(gu.cuda(), w.cuda(), limit)       # the Python reference on CUDA
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert same.all(), f"{(~same).sum().item()} of {same.numel()} differ"
    torch.testing.assert_close(got.cpu(), moe_swiglu_reference(gu, w, limit), rtol=2 ** -7,
                               atol=0, equal_nan=True)
    assert _same(moe_swiglu(gu.cuda(), w.cuda(), limit), got)      # run to run


@cuda
def test_cuda_kernel_strided_rows_and_misaligned_start():
    """gu as a column slice of a wider buffer (row stride 2n + 8), and one with row stride 129
    (not a multiple of 8: the scalar path)."""
    gu, w = _inputs(40, 64, 3)
    big = torch.zeros(40, 136, dtype=torch.bfloat16)
    big[:, :128] = gu
    got = moe_swiglu(big.cuda()[:, :128], w.cuda(), 10.0)
    assert _same(got, moe_swiglu_reference(gu.cuda(), w.cuda(), 10.0))
    big2 = torch.zeros(40, 129, dtype=torch.bfloat16)
    big2[:, 1:] = gu
    got = moe_swiglu(big2.cuda()[:, 1:], w.cuda(), 10.0)
    assert _same(got, moe_swiglu_reference(gu.cuda(), w.cuda(), 10.0))


@cuda
def test_cuda_kernel_layouts():
    """Row strides that are multiples of 8 with a start 2 bytes off 16-byte alignment (the
    alignment alone sends it to the scalar path), a broadcast row (stride 0) and a one-pair
    view with a unit row stride (copied into rows first), a non-contiguous weight."""
    gu, w = _inputs(40, 64, 4)
    big = torch.zeros(40, 136, dtype=torch.bfloat16)
    big[:, 1:129] = gu
    got = moe_swiglu(big.cuda()[:, 1:129], w.cuda(), 10.0)
    assert _same(got, moe_swiglu_reference(gu.cuda(), w.cuda(), 10.0))
    row = gu[:1].cuda().expand(5, -1)
    assert _same(moe_swiglu(row, w[:5].cuda(), 10.0),
                 moe_swiglu_reference(row.contiguous(), w[:5].cuda(), 10.0))
    col = torch.randn(128, 1).to(torch.bfloat16).cuda().t()     # [1, 128], strides (1, 1)
    assert col.stride() == (1, 1)
    assert _same(moe_swiglu(col, w[:1].cuda(), 10.0),
                 moe_swiglu_reference(col.contiguous(), w[:1].cuda(), 10.0))
    w2 = torch.stack([w, w], 1).cuda()[:, 0]                     # stride 2
    assert _same(moe_swiglu(gu.cuda(), w2, 10.0), moe_swiglu_reference(gu.cuda(), w.cuda(), 10.0))


@cuda
def test_cuda_kernel_rejects_bad_input():
    gu, w = _inputs(4, 8, 5, "cuda")
    with pytest.raises((RuntimeError, ValueError), match="float32"):
        moe_swiglu(gu, w.double(), 10.0)
    with pytest.raises((RuntimeError, ValueError), match="one routing weight"):
        moe_swiglu(gu, w[:3], 10.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_opcheck(device):
    gu, w = _inputs(6, 16, 9, device, specials=False)   # (opcheck compares with NaN != NaN)
    torch.library.opcheck(torch.ops.dsv4.moe_swiglu.default, (gu, w, 10.0))
