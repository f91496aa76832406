"""torch.ops.dsv4.rms_norm: the reference against an fp64 formula (CPU), the CUDA kernel
against the reference (GPU), and torch.library.opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dsv4.ops  # noqa: F401  (registers every op)
import dsv4.ops._ext as ext
from dsv4.ops.norm import rms_norm_reference

EPS = 1e-6


def rms_norm_fp64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return weight.double() * (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps))


def make_inputs(shape, dtype, device, seed=None):
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    cols = shape[-1]
    # Non-unit scale so that a kernel ignoring the mean (or the weight) is visibly wrong.
    x = (torch.randn(shape, generator=g, device=device) * 3 + 0.5).to(dtype)
    weight = torch.rand(cols, generator=g, device=device) * 2 + 0.1
    return x, weight


# ---------------------------------------------------------------------------------------------
# CPU: the reference and the registered CPU kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 3, 64), (129, 512), (4, 4096)])
def test_reference_fp32_matches_fp64_formula(shape):
    x, w = make_inputs(shape, torch.float32, "cpu")
    y = rms_norm_reference(x, w, EPS)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), rms_norm_fp64(x, w, EPS), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5), (129, 512)])
def test_reference_bf16_is_fp64_formula_rounded_once(shape):
    x, w = make_inputs(shape, torch.bfloat16, "cpu")
    y = rms_norm_reference(x, w, EPS)
    assert y.dtype == torch.bfloat16
    expected = rms_norm_fp64(x, w, EPS)
    # one bf16 rounding of an fp32-accurate value: |err| <= 2^-8 relative (+ fp32 slack)
    err = (y.double() - expected).abs()
    assert bool((err <= expected.abs() * (2.0**-8 + 1e-6) + 1e-30).all()), err.max()


def test_reference_eps_matters():
    x = torch.full((2, 8), 1e-4)
    w = torch.ones(8)
    y = rms_norm_reference(x, w, 1e-6)
    expected = 1e-4 / math.sqrt(1e-8 + 1e-6)
    torch.testing.assert_close(y, torch.full_like(x, expected))


def _check_op_cpu(rows, cols, scale, eps, seed):
    x, w = make_inputs((rows, cols), torch.float32, "cpu", seed)
    x = x * scale
    y = torch.ops.dsv4.rms_norm(x, w, eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), rms_norm_fp64(x, w, eps), rtol=3e-6, atol=1e-6)


try:  # hypothesis is in the `test` extra; the offline GPU machine may lack it
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:

    @pytest.mark.parametrize("rows,cols", [(0, 7), (1, 1), (3, 5), (40, 300)])
    @pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
    def test_op_cpu_matches_fp64_formula(rows, cols, scale):
        _check_op_cpu(rows, cols, scale, EPS, torch.seed() % 2**31)

else:

    @settings(max_examples=30, deadline=None)
    @given(
        rows=st.integers(0, 40),
        cols=st.integers(1, 300),
        scale=st.sampled_from([1e-3, 1.0, 1e3]),
        eps=st.sampled_from([1e-6, 1e-5]),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_op_cpu_matches_fp64_formula(rows, cols, scale, eps, seed):
        _check_op_cpu(rows, cols, scale, eps, seed)


def test_op_cpu_non_contiguous_input_gives_contiguous_output():
    base, w = make_inputs((16, 2 * 64), torch.float32, "cpu")
    x = base[:, ::2]  # last-dim stride 2
    y = torch.ops.dsv4.rms_norm(x, w[:64], EPS)
    assert y.is_contiguous()
    torch.testing.assert_close(y, rms_norm_reference(x.contiguous(), w[:64], EPS))


def test_op_rejects_wrong_weight_shape():
    x, w = make_inputs((4, 8), torch.float32, "cpu")
    with pytest.raises((ValueError, RuntimeError), match="weight must have shape"):
        torch.ops.dsv4.rms_norm(x, w[:7], EPS)


def _refused_everywhere(x, w, msg):
    """The reference and the op raise ValueError, the fake RuntimeError, all matching msg."""
    with pytest.raises(ValueError, match=msg):
        rms_norm_reference(x, w, EPS)
    with pytest.raises(ValueError, match=msg):
        torch.ops.dsv4.rms_norm(x, w, EPS)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=msg):
        torch.ops.dsv4.rms_norm(mode.from_tensor(x), mode.from_tensor(w), EPS)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_op_rejects_non_float_x(dtype):
    """An integer or bool x came back as truncated ints; the reference, the op and the fake
    refuse it, naming the accepted dtypes."""
    x = torch.ones(4, 8, dtype=dtype)
    w = torch.ones(8)
    _refused_everywhere(x, w, rf"rms_norm: x must be a floating-point tensor \(float32, .*\), "
                              rf"got {dtype}")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_op_rejects_non_float_weight(dtype):
    """An integer weight is refused by the reference, the op and the fake, as the CUDA glue
    refuses it (it had been upcast and used on the CPU)."""
    x = torch.randn(4, 8)
    w = torch.ones(8, dtype=dtype)
    _refused_everywhere(x, w, rf"rms_norm: weight must be a floating-point tensor "
                              rf"\(float32 on CUDA.*\), got {dtype}")


# ---------------------------------------------------------------------------------------------
# CUDA kernel vs reference
# ---------------------------------------------------------------------------------------------
needs_kernel = pytest.mark.skipif(not ext.HAS_C, reason="dsv4._C not built")


def _poison_allocator(numel: int, dtype: torch.dtype, device) -> None:
    """Fill, then free, a block the caching allocator will hand to the op's output: an element
    the kernel does not write then reads NaN."""
    torch.full((numel,), float("nan"), dtype=dtype, device=device)


def _check_against_reference(x: torch.Tensor, w: torch.Tensor) -> None:
    _poison_allocator(x.numel(), x.dtype, x.device)
    y = torch.ops.dsv4.rms_norm(x, w, EPS)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert bool(torch.isfinite(y).all()), "unwritten (poisoned) or non-finite output elements"
    if x.dtype == torch.float32:
        torch.testing.assert_close(y, rms_norm_reference(x, w, EPS), rtol=1e-5, atol=1e-6)
    else:
        # FlashAttention's rule: kernel error vs the fp32 reference <= 2x the error of the
        # reference itself run in bf16 (here: rounding its fp32 result to bf16).
        xf = x.float()
        ref32 = rms_norm_reference(xf, w, EPS)
        err_kernel = (y.float() - ref32).abs().max().item()
        err_ref_bf16 = (rms_norm_reference(x, w, EPS).float() - ref32).abs().max().item()
        assert err_kernel <= 2 * err_ref_bf16 + 1e-6, (err_kernel, err_ref_bf16)
        cos = torch.nn.functional.cosine_similarity(y.float().flatten(), ref32.flatten(), dim=0)
        assert cos.item() > 0.99999, cos.item()


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cols", [64, 512, 4096])
@pytest.mark.parametrize("rows", [1, 3, 129, 70000])
def test_cuda_matches_reference(rows, cols, dtype):
    x, w = make_inputs((rows, cols), dtype, "cuda")
    _check_against_reference(x, w)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "layout", ["row_stride", "misaligned", "odd_cols", "3d_noncollapsible", "empty"]
)
def test_cuda_layouts(layout, dtype):
    if layout == "row_stride":  # 2-D view with row stride > cols (vectorized path)
        base, w = make_inputs((37, 1024 + 64), dtype, "cuda")
        x, w = base[:, :1024], w[:1024]
    elif layout == "misaligned":  # data pointer not 16-byte aligned (scalar path)
        base, w = make_inputs((37, 1024 + 1), dtype, "cuda")
        x, w = base[:, 1:], w[1:]
    elif layout == "odd_cols":
        x, w = make_inputs((129, 127), dtype, "cuda")
    elif layout == "3d_noncollapsible":
        base, w = make_inputs((8, 6, 256), dtype, "cuda")
        x = base.transpose(0, 1)
    else:
        x, w = make_inputs((0, 256), dtype, "cuda")
    if x.numel() == 0:
        assert torch.ops.dsv4.rms_norm(x, w, EPS).shape == x.shape
        return
    _check_against_reference(x, w)


@pytest.mark.cuda
@needs_kernel
def test_cuda_rejects_unsupported_inputs():
    x, w = make_inputs((4, 64), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.dsv4.rms_norm(x.half(), w, EPS)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        torch.ops.dsv4.rms_norm(x, w.bfloat16(), EPS)
    with pytest.raises(RuntimeError, match="weight must be on x's device"):
        torch.ops.dsv4.rms_norm(x, w.cpu(), EPS)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        torch.ops.dsv4.rms_norm(x.t().contiguous().t(), torch.ones(4, device="cuda"), EPS)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.dsv4.rms_norm(x, w[:63], EPS)


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake/meta, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------------------------
def _opcheck_samples(device):
    samples = []
    for dtype in (torch.float32, torch.bfloat16):
        x, w = make_inputs((5, 64), dtype, device)
        samples.append((x, w, EPS))
        x3, w3 = make_inputs((2, 3, 128), dtype, device)
        samples.append((x3, w3, 1e-5))
        base, w4 = make_inputs((6, 4, 32), dtype, device)
        samples.append((base.transpose(0, 1), w4, EPS))
    return samples


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])])
def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.dsv4.rms_norm.default, args)
