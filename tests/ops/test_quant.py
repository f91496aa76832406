"""Quantisation simulation (training.md §7.5, architecture.md §3.3, §5)."""

from __future__ import annotations

import pytest
import torch

from dsv4.ops.quant import fp4_e2m1_round, fp4_e2m1_sim, fp8_e4m3_sim, hadamard, ue8m0_scale

E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6])


def test_ue8m0_scale_exact_powers():
    amax = torch.tensor([5.1, 448.0, 448.0 * 2 ** -3, 449.0, 1e-4])
    s = ue8m0_scale(amax, 448.0)
    assert s.tolist() == [2.0 ** -6, 1.0, 2.0 ** -3, 2.0, 2.0 ** -22]


def test_fp8_sim_block_scale_and_rounding():
    x = torch.linspace(-3.3, 5.1, 128)
    y = fp8_e4m3_sim(x, 128)
    s = 2.0 ** -6
    assert torch.equal(y, (x / s).to(torch.float8_e4m3fn).float() * s)
    # blocks of 64 are scaled independently
    x2 = torch.cat([torch.randn(64) * 1000, torch.randn(64) * 1e-3])
    y2 = fp8_e4m3_sim(x2, 64)
    assert ((y2[64:] - x2[64:]).abs() <= x2[64:].abs() * 2 ** -4 + 1e-12).all()


def test_fp4_round_every_code_and_midpoint():
    for sign in (1.0, -1.0):
        for v in E2M1:
            assert fp4_e2m1_round(sign * v).item() == sign * v
        mids = (E2M1[:-1] + E2M1[1:]) / 2
        # ties go to the even code (codes 0, 2, 4, 6 = values 0, 1, 2, 4)
        expected = torch.tensor([0, 1, 1, 2, 2, 4, 4.0])
        got = fp4_e2m1_round(sign * mids)
        assert torch.equal(got, sign * expected), (sign, got)


def test_fp4_sim_vector():
    w = torch.linspace(-0.7, 0.9, 32)
    y = fp4_e2m1_sim(w, 32)
    assert torch.equal((y[:6] / 0.25), torch.tensor([-3., -3, -2, -2, -2, -2]))
    assert set((y / 0.25).abs().tolist()) <= set(E2M1.tolist())


def test_hadamard_matches_sylvester_matrix_and_is_orthonormal():
    H = torch.ones(1, 1)
    while H.shape[0] < 64:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(hadamard(x), x @ H.T / 8, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hadamard(hadamard(x)), x, atol=1e-5, rtol=1e-5)


def test_hadamard_refuses_integer_input():
    """An integer tensor came back cast to its dtype: [1, 0, 0, 0] gave zeros, not 0.5 each."""
    with pytest.raises(ValueError, match="hadamard: x must be a float tensor"):
        hadamard(torch.tensor([[1, 0, 0, 0]]))
    assert torch.equal(hadamard(torch.tensor([[1.0, 0, 0, 0]])), torch.full((1, 4), 0.5))


def test_fp8_quantize_is_the_half_of_the_sim_the_caches_store():
    """fp8_e4m3_quantize's codes x scales are fp8_e4m3_sim's values; the scales are powers of
    two from amax / 448 (a block of zeros takes the 1e-4 floor, 2^-22)."""
    from dsv4.ops.quant import fp8_e4m3_quantize
    x = torch.randn(3, 5, 256, dtype=torch.float64)
    x = x * torch.logspace(-3, 3, 256, dtype=torch.float64)
    x[0, 0, :64] = 0
    q, s = fp8_e4m3_quantize(x, 64)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (3, 5, 4)
    assert torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5))     # powers of two
    assert s[0, 0, 0].item() == 2.0 ** -22
    blocks = x.float().unflatten(-1, (4, 64)).abs().amax(-1)
    assert ((blocks / s <= 448) & (blocks / s > 224)).flatten()[1:].all()   # the smallest such
    y = (q.double().unflatten(-1, (4, 64)) * s.double()[..., None]).flatten(-2)
    assert torch.equal(y.to(x.dtype), fp8_e4m3_sim(x, 64))


def test_e8m0_one_decoding_for_checkpoints_and_kv_caches():
    """Scale bytes 0, 127, 254, 255 decode to 2**-127, 1, 2**127, NaN (OCP float8_e8m0fnu, as
    torch's cast) through the one definition, in the checkpoint formats (dsv4.quant) and in the
    MODEL1 KV cache reader (dsv4.ops.kv_cache.unpack) alike."""
    import math

    import dsv4.quant
    from dsv4.ops import kv_cache as kc
    from dsv4.ops.quant import e8m0_to_float

    assert dsv4.quant.e8m0_to_float is e8m0_to_float
    codes = torch.tensor([0, 127, 254, 255], dtype=torch.uint8)
    want = [math.ldexp(1.0, -127), 1.0, math.ldexp(1.0, 127)]
    got = e8m0_to_float(codes)
    assert got.dtype == torch.float32 and got[:3].tolist() == want and math.isnan(got[3])
    assert torch.equal(e8m0_to_float(codes.view(torch.float8_e8m0fnu)).view(torch.int32),
                       got.view(torch.int32))
    assert torch.equal(codes[:3].view(torch.float8_e8m0fnu).float(), got[:3])
    # a MODEL1 entry: every e4m3 code 1.0 (0x38), scale bytes 0, 127, 254, 255, 127, 127, 127
    entry = torch.zeros(kc.MODEL1_ENTRY_BYTES, dtype=torch.uint8)
    entry[:kc.MODEL1_NOPE_DIM] = 0x38
    entry[576:583] = torch.tensor([0, 127, 254, 255, 127, 127, 127], dtype=torch.uint8)
    x = kc.unpack(kc.MODEL1, entry, torch.float32)
    assert x[:64].tolist() == [want[0]] * 64 and x[64:128].tolist() == [1.0] * 64
    assert x[128:192].tolist() == [want[2]] * 64 and bool(x[192:256].isnan().all())
    assert x[256:448].tolist() == [1.0] * 192 and x[448:].tolist() == [0.0] * 64
