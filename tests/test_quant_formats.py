"""Storage formats of the release checkpoints (dsv4.quant; architecture.md §12.3)."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.ops.quant import fp4_e2m1_round, fp4_e2m1_sim, fp8_e4m3_sim
from dsv4.quant import (E2M1_VALUES, block_scale_shape, e2m1_decode, e2m1_encode,
                        e8m0_to_float, float_to_e8m0, fp4_pack, fp4_to_fp8, fp4_unpack, fp8_block_dequantize,
                        fp8_block_quantize)

E8M0 = torch.float8_e8m0fnu


def _rand_blocks(N, K, block_r, block_c, gen):
    """Random weights whose magnitude varies by 2**[-12, 6] from block to block."""
    w = torch.randn(N, K, generator=gen)
    ex = torch.randint(-12, 7, (-(-N // block_r), -(-K // block_c)), generator=gen).float()
    f = torch.pow(2.0, ex).repeat_interleave(block_r, 0)[:N].repeat_interleave(block_c, 1)[:, :K]
    return w * f


def _pow2_ceil(v: float) -> float:
    """2**ceil(log2(v)) computed in float64 with frexp (independent of dsv4's fp32 helper)."""
    m, e = math.frexp(v)
    return math.ldexp(1.0, e - 1 if m == 0.5 else e)


# ------------------------------------------------------------------------------------ e8m0
def test_e8m0_every_code():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = e8m0_to_float(codes.view(E8M0))
    for c in range(255):
        assert vals[c].item() == math.ldexp(1.0, c - 127), c
    assert math.isnan(vals[255].item())
    assert torch.equal(float_to_e8m0(vals[:255]).view(torch.uint8), codes[:255])
    # torch's own e8m0 -> float32 conversion agrees on every finite code
    assert torch.equal(codes[:255].view(E8M0).float(), vals[:255])
    # float (-Base) scales pass through
    s = torch.tensor([0.25, 3.0])
    assert torch.equal(e8m0_to_float(s), s)


@pytest.mark.parametrize("bad", [3.0, 0.0, -2.0, float("inf"), float("nan"), 2.0 ** 128, 2.0 ** -128])
def test_float_to_e8m0_rejects_non_powers_of_two(bad):
    with pytest.raises(ValueError, match="powers of two"):
        float_to_e8m0(torch.tensor([1.0, bad], dtype=torch.float64))


# ------------------------------------------------------------------------------------ e2m1
def _e2m1_ref(x: float) -> int:
    """Nearest e2m1 code, ties to the even code, saturating; sign in bit 3 (pure Python)."""
    a = min(abs(x), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1_VALUES[c] - a), c % 2))
    return best | (8 if math.copysign(1.0, x) < 0 else 0)


def test_e2m1_every_code_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_decode(codes)
    assert vals[:8].tolist() == list(E2M1_VALUES)
    assert vals[8:].tolist() == [-v for v in E2M1_VALUES]
    assert torch.signbit(vals[8])                         # code 8 is -0
    assert torch.equal(e2m1_encode(vals), codes)


def test_e2m1_midpoints_ties_to_even_code():
    pts, want = [], []
    for i in range(7):
        lo, hi = E2M1_VALUES[i], E2M1_VALUES[i + 1]
        mid = (lo + hi) / 2
        even = i if i % 2 == 0 else i + 1
        m32 = torch.tensor(mid, dtype=torch.float32)
        below = torch.nextafter(m32, torch.tensor(0.0)).item()     # fp32 neighbours
        above = torch.nextafter(m32, torch.tensor(9.0)).item()
        for sign in (1.0, -1.0):
            s = 8 if sign < 0 else 0
            pts += [sign * mid, sign * below, sign * above]
            want += [even | s, i | s, (i + 1) | s]
    got = e2m1_encode(torch.tensor(pts, dtype=torch.float32))
    assert got.tolist() == want
    # the explicit tie table of the OCP format
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_decode(e2m1_encode(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_e2m1_dense_grid_matches_references():
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.linspace(-7, 7, 4001), (torch.rand(3000, generator=g) - 0.5) * 14,
                   torch.tensor([6.0, -6.0, 100.0, -1e9, 0.0, -0.0, 1e-30, -1e-30])])
    codes = e2m1_encode(x)
    assert codes.tolist() == [_e2m1_ref(v) for v in x.tolist()]
    # the simulation's rounding (ops.quant) agrees wherever it is defined (|x| <= 6)
    inside = x.abs() <= 6
    assert torch.equal(e2m1_decode(codes)[inside], fp4_e2m1_round(x[inside]))


def test_e2m1_against_torch_float4_cast():
    x = torch.tensor([0.0, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.25, -2.6, -5.0, 6.0])
    try:
        ref = x.to(torch.float4_e2m1fn_x2)      # not implemented on every torch/device
    except (RuntimeError, TypeError, AttributeError, NotImplementedError) as e:
        pytest.skip(f"this torch cannot cast to float4_e2m1fn_x2: {e}")
    u = ref.view(torch.uint8).flatten()
    if u.numel() * 2 == x.numel():               # packed, element 2j in the low nibble
        codes = torch.stack((u & 15, u >> 4), -1).flatten()
    else:
        assert u.numel() == x.numel(), (u.shape, x.shape)
        codes = u & 15
    assert torch.equal(e2m1_encode(x), codes)


def test_e2m1_encode_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        e2m1_encode(torch.tensor([1.0, float("nan")]))


# ------------------------------------------------------------------------------------ FP8
@pytest.mark.parametrize("N,K", [(1, 1), (128, 128), (127, 129), (300, 257), (256, 384), (5, 640)])
def test_fp8_block_quantize_matches_independent_computation(N, K):
    g = torch.Generator().manual_seed(N * 1000 + K)
    w = _rand_blocks(N, K, 128, 128, g)
    q, s = fp8_block_quantize(w)
    nb, kb = -(-N // 128), -(-K // 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (N, K)
    assert s.dtype == E8M0 and s.shape == (nb, kb)
    sf = e8m0_to_float(s)
    for i in range(nb):
        for j in range(kb):
            amax = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max().item()
            assert sf[i, j].item() == _pow2_ceil(max(amax, 1e-4) / 448.0), (i, j)
    s_full = sf.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    # bit-exact against torch's float8_e4m3fn cast (round to nearest even)
    assert torch.equal(q.view(torch.uint8), (w / s_full).to(torch.float8_e4m3fn).view(torch.uint8))
    deq = fp8_block_dequantize(q, s, torch.float32)
    assert torch.equal(deq, q.float() * s_full)
    err = (deq - w).abs()
    assert (err <= torch.maximum(w.abs() / 16, s_full * 2.0 ** -10)).all()
    # scales are rounded up: every block's largest |q| lies in [224, 448]
    qa = q.float().abs()
    for i in range(nb):
        for j in range(kb):
            m = qa[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].max().item()
            assert 224 <= m <= 448 or sf[i, j].item() == _pow2_ceil(1e-4 / 448)
    # bf16 dequantisation is exact (same values)
    assert torch.equal(fp8_block_dequantize(q, s, torch.bfloat16).float(), deq)


def test_fp8_zero_block_and_bf16_input():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=g).to(torch.bfloat16)
    w[128:, 128:256] = 0
    q, s = fp8_block_quantize(w)
    sf = e8m0_to_float(s)
    assert torch.isfinite(sf).all() and (sf > 0).all()
    assert sf[1, 1].item() == 2.0 ** -22                       # amax floor 1e-4 -> 2**-22
    assert (q[128:, 128:256].float() == 0).all()
    deq = fp8_block_dequantize(q, s, torch.float32)
    assert (deq[128:, 128:256] == 0).all() and torch.isfinite(deq).all()
    # float32 scales (the "-Base" checkpoints) give the same weights
    assert torch.equal(fp8_block_dequantize(q, sf, torch.float32), deq)


def test_fp8_errors():
    with pytest.raises(ValueError, match="2-D"):
        fp8_block_quantize(torch.randn(4))
    with pytest.raises(ValueError, match="2-D"):
        fp8_block_quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-finite"):
        fp8_block_quantize(torch.tensor([[1.0, float("inf")]]))
    q, s = fp8_block_quantize(torch.randn(130, 10))
    with pytest.raises(ValueError, match=r"scale must be \[2, 1\]"):
        fp8_block_dequantize(q, s[:1], torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_block_dequantize(q.float(), s)


# ------------------------------------------------------------------------------------ FP4
@pytest.mark.parametrize("N,K", [(1, 32), (3, 64), (130, 96), (64, 512)])
def test_fp4_pack_layout_and_round_trip(N, K):
    g = torch.Generator().manual_seed(N * 7 + K)
    w = _rand_blocks(N, K, 1, 32, g)
    p, s = fp4_pack(w)
    assert p.dtype == torch.int8 and p.shape == (N, K // 2)
    assert s.dtype == E8M0 and s.shape == (N, K // 32)
    sf = e8m0_to_float(s)
    amax = w.view(N, K // 32, 32).abs().amax(-1)
    want = torch.tensor([_pow2_ceil(max(a, 6 * 2.0 ** -126) / 6) for a in amax.flatten().tolist()])
    assert torch.equal(sf.flatten(), want)
    s_full = sf.repeat_interleave(32, 1)
    codes = torch.tensor([_e2m1_ref(v) for v in (w / s_full).flatten().tolist()],
                         dtype=torch.uint8).view(N, K)
    u = p.view(torch.uint8)
    assert torch.equal(u & 15, codes[:, 0::2])                 # element 2j: low nibble
    assert torch.equal(u >> 4, codes[:, 1::2])                 # element 2j+1: high nibble
    deq = fp4_unpack(p, s, torch.float32)
    assert torch.equal(deq, e2m1_decode(codes) * s_full)
    # half an e2m1 step at most (1/4 of the scale below 2, 1/2 up to 4, 1 above)
    assert ((deq - w).abs() <= s_full).all()
    assert torch.equal(fp4_unpack(*fp4_pack(deq), torch.float32), deq)   # stable values
    assert torch.equal(fp4_unpack(p.view(torch.uint8), s, torch.float32), deq)
    assert torch.equal(fp4_unpack(p, s, torch.bfloat16).float(), deq)   # exact in bf16
    if hasattr(torch, "float4_e2m1fn_x2"):
        assert torch.equal(fp4_unpack(p.view(torch.float4_e2m1fn_x2), s, torch.float32), deq)


def test_fp4_zero_block_and_negative_zero():
    w = torch.randn(2, 64)
    w[0, :32] = 0
    w[1, 32:] = -1e-3
    w[1, 32] = -1.0      # the group's tiny negatives round to -0 (code 8)
    p, s = fp4_pack(w)
    sf = e8m0_to_float(s)
    assert sf[0, 0].item() == 2.0 ** -126 and torch.isfinite(sf).all()
    assert (p[0, :16] == 0).all()
    codes = torch.stack((p.view(torch.uint8) & 15, p.view(torch.uint8) >> 4), -1).flatten(-2)
    assert (codes[1, 33:] == 8).all()
    deq = fp4_unpack(p, s, torch.float32)
    assert (deq[0, :32] == 0).all() and (deq[1, 33:] == 0).all() and deq[1, 32] == -1.0


def test_fp4_errors():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        fp4_pack(torch.randn(2, 48))
    p, s = fp4_pack(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"scale must be \[4, 2\]"):
        fp4_unpack(p, s[:, :1])
    with pytest.raises(ValueError, match="int8"):
        fp4_unpack(p.float(), s)


# ------------------------------------------------------------------------------------ FP4 -> FP8
def _random_fp4(N, K, spread, gen):
    """Random packed FP4 codes with group scales 2**e, e uniform in [-spread, 0] - 3."""
    p = torch.randint(-128, 128, (N, K // 2), generator=gen, dtype=torch.int32).to(torch.int8)
    e = torch.randint(-spread, 1, (N, K // 32), generator=gen) - 3
    s = float_to_e8m0(torch.pow(2.0, e.float()))
    return p, s


@pytest.mark.parametrize("N,K", [(128, 128), (256, 384), (130, 96), (1, 32)])
def test_fp4_to_fp8_lossless_within_2_pow_14(N, K):
    g = torch.Generator().manual_seed(N + K)
    p, s = _random_fp4(N, K, 14, g)
    q, S = fp4_to_fp8(p, s)
    nb, kb = -(-N // 128), -(-K // 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (N, K) and S.shape == (nb, kb)
    assert torch.equal(fp8_block_dequantize(q, S, torch.float32), fp4_unpack(p, s, torch.float32))
    assert q.float().abs().max() <= 384
    sf = e8m0_to_float(s).repeat_interleave(32, 1)             # per element group scale
    for i in range(nb):
        for j in range(kb):
            tile = sf[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert e8m0_to_float(S)[i, j].item() == tile.max().item() / 64


def test_fp4_to_fp8_lossy_beyond_2_pow_14():
    # one tile: group 0 has scale 1, group 1 scale 2**-15: its 0.5s become 2**-10 -> 0 in e4m3
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, :32] = 7           # 6.0
    codes[0, 32:] = 1           # 0.5
    p = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    s = float_to_e8m0(torch.tensor([[1.0, 2.0 ** -15]]))
    q, S = fp4_to_fp8(p, s)
    deq = fp8_block_dequantize(q, S, torch.float32)
    ref = fp4_unpack(p, s, torch.float32)
    assert torch.equal(deq[0, :32], ref[0, :32]) and (deq[0, 32:] == 0).all()
    s14 = float_to_e8m0(torch.tensor([[1.0, 2.0 ** -14]]))     # at the documented limit: exact
    assert torch.equal(fp8_block_dequantize(*fp4_to_fp8(p, s14), torch.float32),
                       fp4_unpack(p, s14, torch.float32))


def test_fp4_to_fp8_errors():
    p, s = fp4_pack(torch.randn(4, 64))
    with pytest.raises(ValueError, match="scale must be"):
        fp4_to_fp8(p, s[:, :1])
    bad = s.view(torch.uint8).clone()
    bad[0, 0] = 255
    with pytest.raises(ValueError, match="NaN"):
        fp4_to_fp8(p, bad.view(E8M0))


@pytest.mark.parametrize("factor", [1.5, -1.0, 0.0, 3.0])
def test_fp4_to_fp8_refuses_float_scales_with_no_e8m0_form(factor):
    """Float 1x32 scales (the "-Base" checkpoints' form, which the loader applies exactly)
    that are not powers of two have no exact FP8 block form: refused, never rounded to their
    exponent (a scale of 1.5 s became s, a negative one lost its sign). Float scales that are
    powers of two convert as their e8m0 codes do."""
    p, s = fp4_pack(torch.randn(128, 256, generator=torch.Generator().manual_seed(5)))
    sf = e8m0_to_float(s)
    q, S = fp4_to_fp8(p, s)
    qf, Sf = fp4_to_fp8(p, sf)
    assert torch.equal(qf.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(Sf.view(torch.uint8), S.view(torch.uint8))
    bad = sf.clone()
    bad[7, 3] *= factor
    with pytest.raises(ValueError, match=r"powers of two in \[2\*\*-127, 2\*\*127\]"):
        fp4_to_fp8(p, bad)
    with pytest.raises(ValueError, match="inf or NaN"):
        fp4_to_fp8(p, torch.where(bad == bad[7, 3], torch.inf, sf))


@pytest.mark.parametrize("n, k", [(-5, 3), (5, -32), (1.0, 32), (True, 32)])
def test_block_scale_shape_refuses_sizes_that_are_no_count(n, k):
    with pytest.raises(ValueError, match="block_scale_shape: [nk] must be an integer >= 0"):
        block_scale_shape("fp8", n, k)
    assert block_scale_shape("fp4", 0, 64) == (0, 2)


@pytest.mark.parametrize("fn, kw, match", [
    ("fp4_unpack", dict(block=0), r"fp4_unpack: block must be an even integer >= 2, got 0"),
    ("fp4_unpack", dict(block=-32), r"fp4_unpack: block must be an even integer >= 2, got -32"),
    ("fp4_unpack", dict(block=32.0), r"fp4_unpack: block must be an even integer >= 2, got 32.0"),
    ("fp4_to_fp8", dict(block=0), r"fp4_to_fp8: block must be a positive multiple of fp4_block"),
    ("fp4_to_fp8", dict(block=-128), r"fp4_to_fp8: block must be a positive multiple of fp4_block"),
    ("fp4_to_fp8", dict(fp4_block=0), r"fp4_to_fp8: fp4_block must be even and >= 2, got 0"),
    ("fp4_to_fp8", dict(block=128.0), r"fp4_to_fp8: block must be a positive multiple of "
                                      r"fp4_block 32, got 128.0"),
    ("fp4_to_fp8", dict(fp4_block=32.0), r"fp4_to_fp8: fp4_block must be even and >= 2, "
                                         r"got 32.0"),
])
def test_fp4_block_sizes_outside_their_range_are_named(fn, kw, match):
    """A block size of 0 or below was a ZeroDivisionError or a negative grid inside the
    function; like fp4_pack / fp8_block_quantize, the argument and its range are named."""
    p, s = fp4_pack(torch.randn(4, 64))
    f = {"fp4_unpack": fp4_unpack, "fp4_to_fp8": fp4_to_fp8}[fn]
    with pytest.raises(ValueError, match=match):
        f(p, s, **kw)


@pytest.mark.parametrize("call, match", [
    (lambda: fp8_block_dequantize(*fp8_block_quantize(torch.randn(4, 8)), block=0),
     r"fp8_block_dequantize: block must be an integer >= 1, got 0"),
    (lambda: fp8_block_dequantize(*fp8_block_quantize(torch.randn(4, 8)), block=-1),
     r"fp8_block_dequantize: block must be an integer >= 1, got -1"),
    (lambda: fp8_block_quantize(torch.randn(4, 8), 128.0),
     r"fp8_block_quantize: block must be an integer >= 1, got 128.0"),
    (lambda: fp8_e4m3_sim(torch.randn(2, 64), 0), r"fp8_e4m3_sim: block must be an integer >= 1"),
    (lambda: fp8_e4m3_sim(torch.randn(2, 64), -2), r"fp8_e4m3_sim: block must be an integer >= 1"),
    (lambda: fp8_e4m3_sim(torch.ones(2, 64, dtype=torch.int32)), r"fp8_e4m3_sim: x must be a float"),
    (lambda: fp4_e2m1_sim(torch.randn(2, 64), -2), r"fp4_e2m1_sim: block must be an integer >= 1"),
    (lambda: fp4_e2m1_sim(torch.tensor(1.0)), r"fp4_e2m1_sim: x must be a float tensor \[\.\.\., n\]"),
    (lambda: float_to_e8m0(torch.tensor([1 + 2 ** -30], dtype=torch.float64)),
     r"values must be powers of two"),
])
def test_block_arguments_and_inputs_are_named(call, match):
    """block=0 was a ZeroDivisionError, -2 an unflatten error, 128.0 a pad() TypeError, an int
    tensor came back as int, a 0-d tensor an IndexError; a float64 value that is no power of two
    was rounded to one by the fp32 cast and encoded."""
    with pytest.raises(ValueError, match=match):
        call()


def test_float64_powers_of_two_encode():
    x = torch.tensor([2.0 ** -127, 1.0, 2.0 ** 127], dtype=torch.float64)
    assert float_to_e8m0(x).view(torch.uint8).tolist() == [0, 127, 254]
