"""torch.ops.dsv4.argmax_finite: each row's argmax and all-finite flag (the runtime's greedy
draw). CPU: the reference is torch.argmax / torch.isfinite(...).all, bad input raises
ValueError naming what is accepted. CUDA (runs on the H200): the kernel gives the reference's
values on fresh random rows with ties, NaN, +-inf, all-equal and all -inf rows, at the V4
vocabulary and odd widths, rows shorter than the CTAs of a row's cluster, strided and
misaligned rows (the scalar path), more rows than one launch's grid takes (65,535); the
sampler takes it and draws what it drew before; opcheck."""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers the ops)
from dsv4.ops.sampling import argmax_finite, argmax_finite_reference

cuda = pytest.mark.cuda
V = 129280


def _rows(L, n, seed, device="cpu"):
    """L rows of n values: random with repeated values (ties), plus rows with NaN (two of
    them), +inf, -inf, all equal, all -inf, the maximum at the last index."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-50, 50, (L, n), generator=g).float() / 4    # many ties
    specials = [
        lambda r: r.__setitem__(slice(0, 1), float("nan")),          # NaN at index 0
        lambda r: (r.fill_(-1.0), r.__setitem__(slice(n // 2, n), 0.0),
                   r.__setitem__(slice(n // 2, n // 2 + 1), -0.0)),  # -0.0 ties +0.0
        lambda r: r.__setitem__(slice(n // 3, n // 3 + 1), float("nan")),
        lambda r: (r.__setitem__(slice(n - 1, n), float("nan")),
                   r.__setitem__(slice(n // 2, n // 2 + 1), float("nan"))),
        lambda r: r.__setitem__(slice(n // 2, n // 2 + 1), float("inf")),
        lambda r: r.__setitem__(slice(0, 1), -float("inf")),
        lambda r: r.fill_(1.5),
        lambda r: r.fill_(-float("inf")),
        lambda r: r.__setitem__(slice(n - 1, n), 1e30),
    ]
    for i, f in enumerate(specials[:L]):
        f(x[min(L - 1, 2 * i)])
    return x.to(device)


def _check(got, x):
    want = argmax_finite_reference(x.cpu())
    assert got.dtype == torch.long and got.shape == (2, x.shape[0])
    assert torch.equal(got.cpu(), want), (got.cpu(), want)


@pytest.mark.parametrize("L,n", [(1, 1), (3, 10), (15, 1000), (8, V)])
def test_reference_equals_the_samplers_two_stage_path(L, n):
    """The reference against an independent implementation of the same values: the
    sampler's two-stage argmax_rows / rows_finite (chunked reductions)."""
    from dsv4.runtime.sampler import argmax_rows, rows_finite
    x = _rows(L, n, 1)
    want = torch.stack([argmax_rows(x), rows_finite(x).long()])
    assert torch.equal(argmax_finite_reference(x), want)
    assert torch.equal(argmax_finite(x), want)                  # CPU: the reference


@pytest.mark.parametrize("x,match", [
    (torch.ones(3, 8, dtype=torch.float64), "float32"),
    (torch.ones(3, 8, dtype=torch.bfloat16), "float32"),
    (torch.ones(8), r"\[rows, n\]"),
    (torch.ones(3, 0), "n >= 1"),
])
def test_bad_input_is_rejected(x, match):
    with pytest.raises(ValueError, match=match):
        argmax_finite_reference(x)


@cuda
@pytest.mark.parametrize("L,n", [(1, V), (8, V), (64, V), (13, 1), (7, 3), (9, 1001),
                                 (300, 4096), (0, V), (70000, 5), (66000, 70)])
def test_cuda_kernel_gives_the_reference_values(L, n):
    x = _rows(L, n, L * 31 + n, "cuda")
    got = argmax_finite(x)
    _check(got, x)
    assert torch.equal(argmax_finite(x), got)                   # run to run


@cuda
def test_cuda_kernel_strided_and_misaligned_rows():
    """Rows as a column slice of a wider buffer (stride 1011: some rows' starts 16-byte
    aligned, the others not), rows starting 4 bytes off alignment, a transposed view
    (copied): the vector and the scalar path."""
    x = _rows(6, 1003, 5)
    big = torch.full((6, 1011), 9e9)
    big[:, :1003] = x
    _check(argmax_finite(big.cuda()[:, :1003]), x)
    big2 = torch.full((6, 1004), 9e9)
    big2[:, 1:] = x
    _check(argmax_finite(big2.cuda()[:, 1:]), x)
    _check(argmax_finite(x.t().contiguous().cuda().t()), x)


@cuda
def test_cuda_bad_input_is_rejected():
    with pytest.raises((RuntimeError, ValueError), match="float32"):
        argmax_finite(torch.ones(3, 8, dtype=torch.float64, device="cuda"))
    with pytest.raises((RuntimeError, ValueError), match="n >= 1"):
        argmax_finite(torch.ones(3, 0, device="cuda"))


@cuda
def test_sampler_takes_the_kernel_and_draws_the_same(monkeypatch):
    """sample_greedy on CUDA calls argmax_finite, and its ids and flags equal those of the
    two-stage PyTorch path it took before (argmax_rows + rows_finite)."""
    from dsv4.runtime import sampler
    x = _rows(8, V, 2, "cuda")
    calls = []
    real = sampler.argmax_finite
    monkeypatch.setattr(sampler, "argmax_finite", lambda t: calls.append(t) or real(t))
    out = torch.full((2, 10), -7, dtype=torch.long, device="cuda")
    sampler.sample_greedy(x, out)
    assert calls
    assert torch.equal(out[0, :8], sampler.argmax_rows(x))
    assert torch.equal(out[1, :8], sampler.rows_finite(x).long())
    assert (out[:, 8:] == -7).all()                             # columns past L untouched


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_opcheck(device):
    x = torch.randn(5, 300).to(device)
    torch.library.opcheck(torch.ops.dsv4.argmax_finite.default, (x,))
