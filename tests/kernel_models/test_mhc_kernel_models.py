"""Host models of the mHC kernels' index and rounding logic (csrc/kernels/mhc.cu), CPU.

Transcriptions of: the split-K / chunk plan and the partial layout (every k tile once, every
mix column once, workspace bounds), the three-way bf16 split of fn, the Σx² lanes of the A
fragments, and the warp-shuffle Sinkhorn (one comb entry per lane, xor row / column sums),
compared with independent statements and with :func:`dsv4.layers.mhc.sinkhorn`. If the
kernel's logic changes, change its model here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4.layers.mhc import sinkhorn

HC, BM, BK, PART_COLS, SUMSQ_COL, CHUNK, MIN_TPS = 4, 64, 64, 32, 31, 512, 4


def model_plan(tokens, dim, num_sms):
    """make_plan (mhc.cu)."""
    fused = tokens <= 8
    chunk = tokens if fused else min(tokens, CHUNK)
    m_tiles = (chunk + BM - 1) // BM
    k_tiles = (HC * dim + BK - 1) // BK
    s = (2 * num_sms + m_tiles - 1) // m_tiles
    max_s = k_tiles // MIN_TPS if k_tiles // MIN_TPS > 0 else 1
    s = max(1, min(s, max_s))
    tps = (k_tiles + s - 1) // s
    splits = (k_tiles + tps - 1) // tps
    return fused, chunk, m_tiles, k_tiles, splits, tps


@pytest.mark.parametrize("tokens,dim", [(1, 4096), (8, 7168), (9, 4096), (513, 128), (1000, 8),
                                        (4096, 7168), (3, 8), (64, 136)])
def test_mix_plan_partials(tokens, dim):
    fused, chunk, m_tiles, k_tiles, splits, tps = model_plan(tokens, dim, 132)
    ws_floats = splits * chunk * PART_COLS  # mhc_pre_workspace_bytes (+16 for the counter)
    counter_off = splits * chunk * PART_COLS * 4
    assert counter_off % 4 == 0
    for c0 in range(0, tokens, chunk):  # run_mix's chunk loop
        n = min(tokens - c0, chunk)
        ctas = ((n + BM - 1) // BM) * splits
        k_cov = np.zeros(k_tiles, dtype=np.int64)
        written = np.zeros((splits, n, PART_COLS), dtype=np.int64)
        for cta in range(ctas):
            split, m_tile = cta % splits, cta // splits
            kb, ke = split * tps, min(split * tps + tps, k_tiles)
            assert kb < ke
            if m_tile == 0:
                k_cov[kb:ke] += 1
            t0 = m_tile * BM
            for warp in range(4):
                for lane in range(32):
                    g, c2 = lane >> 2, (lane & 3) * 2
                    for h in range(2):
                        t = t0 + warp * 16 + g + h * 8
                        if t >= n:
                            continue
                        row = (split * n + t) * PART_COLS
                        assert row + PART_COLS <= ws_floats
                        for j in range(3):
                            nn = j * 8 + c2
                            if nn < 24:
                                written[split, t, nn] += 1
                            if nn + 1 < 24:
                                written[split, t, nn + 1] += 1
                        if lane & 3 == 0:
                            written[split, t, SUMSQ_COL] += 1
        assert (k_cov == 1).all()
        assert (written[:, :, :24] == 1).all() and (written[:, :, SUMSQ_COL] == 1).all()
        assert (written[:, :, 24:SUMSQ_COL] == 0).all()  # read by finish_tokens, never used


def test_sumsq_lanes_cover_each_column_once():
    """Σx² from the ldmatrix A fragments: a0/a2 = row g, columns 2tg, 2tg+1 and 8 + 2tg,
    9 + 2tg; a1/a3 the same for row g + 8; summed over the 4 lanes of a row (xor 1, 2)."""
    for g in range(8):
        cols = []
        for tg in range(4):
            cols += [2 * tg, 2 * tg + 1, 8 + 2 * tg, 9 + 2 * tg]
        assert sorted(cols) == list(range(16))


def _bf16(v):
    return torch.from_numpy(np.asarray(v, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def test_fn_three_way_split_is_exact():
    """hi = bf16(v), mid = bf16(v - hi), lo = bf16(v - hi - mid): hi + mid + lo == v exactly
    (fp32, each subtraction exact) for values of magnitude 1e-25 .. 1e30 and the 24-bit
    extremes of the mantissa. (Outside that range the split is not exact: below ~1e-30 the lo
    term is a bf16 subnormal and loses bits; above the bf16 maximum 3.39e38 hi rounds to inf and
    the products become NaN. fn values of a trained mHC are ~1e-2.)"""
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.standard_normal(100000).astype(np.float32),
                        (rng.standard_normal(20000) * 1e-25).astype(np.float32),
                        (rng.standard_normal(20000) * 1e30).astype(np.float32),
                        np.array([1 + 2**-23, -(1 + 2**-23), 2 - 2**-23, 1 + 2**-8 + 2**-16,
                                  0.01 * (1 + 2**-23)], np.float32)])
    hi = _bf16(v)
    r1 = (v - hi).astype(np.float32)
    mid = _bf16(r1)
    r2 = (r1 - mid).astype(np.float32)
    lo = _bf16(r2)
    assert (lo == r2).all()  # the third term loses nothing
    np.testing.assert_array_equal(((hi.astype(np.float64) + mid) + lo), v.astype(np.float64))


def model_sinkhorn_warp(L: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """token_coefficients' Sinkhorn (NT = 3), lane e = 4j + k holds comb[j, k]; lanes 16-31 mirror
    0-15 (one token per half-warp in finish_tokens). Row sums: xor 1 then 2; column sums: xor 4 then 8; fp32 with explicit rounding."""
    f = np.float32
    lanes = np.array([L[(l & 15) // 4, (l & 15) % 4] for l in range(32)], dtype=f)

    def xor(v, m):
        return v[np.arange(32) ^ m]

    mx = np.maximum(lanes, xor(lanes, 1))
    mx = np.maximum(mx, xor(mx, 2))
    ex = np.exp((lanes - mx).astype(f)).astype(f)
    rs = (ex + xor(ex, 1)).astype(f)
    rs = (rs + xor(rs, 2)).astype(f)
    c = ((ex / rs).astype(f) + f(eps)).astype(f)
    cs = (c + xor(c, 4)).astype(f)
    cs = (cs + xor(cs, 8)).astype(f)
    c = (c / (cs + f(eps)).astype(f)).astype(f)
    for _ in range(1, iters):
        rs = (c + xor(c, 1)).astype(f)
        rs = (rs + xor(rs, 2)).astype(f)
        c = (c / (rs + f(eps)).astype(f)).astype(f)
        cs = (c + xor(c, 4)).astype(f)
        cs = (cs + xor(cs, 8)).astype(f)
        c = (c / (cs + f(eps)).astype(f)).astype(f)
    assert (c[:16] == c[16:]).all()  # both half-warps agree
    return c[:16].reshape(4, 4)


@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_shuffle_model_matches_reference(iters):
    rng = np.random.default_rng(iters)
    for scale in (0.1, 1.0, 10.0, 80.0):
        for _ in range(50):
            L = (rng.standard_normal((4, 4)) * scale).astype(np.float32)
            got = model_sinkhorn_warp(L, iters, 1e-6)
            ref = sinkhorn(torch.from_numpy(L), iters, 1e-6).numpy()
            np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
