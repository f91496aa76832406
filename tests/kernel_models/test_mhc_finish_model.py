"""Host model of mhc.cu's finish_tokens index logic (the phase 2 of mhc_pre / mhc_head for up to
8 tokens in one CTA): phase 1 (split sums as float4 per (token, 4-column) pair, groups of
`pairs` threads, group sums added in group order), phase 2 (token 2w + h on half h of warp w,
shuffles xor 1..8 within a half) and phase 3 (the collapse items): bounds, coverage and the
summation order, for every token count and split count. CPU only.
"""

from __future__ import annotations

import numpy as np
import pytest

THREADS, PART_COLS, HC, MAX_FINISH = 128, 32, 4, 8


def model_finish_sums(part: np.ndarray, t0: int, n: int, threads: int = THREADS):
    """finish_tokens phase 1 (sum_split_partials<threads>: 128 in finish_tokens, 256 in the
    decode kernel) on part [splits, tokens, 32] fp32 -> tot [n, 32], plus the float4 indices
    read (to check bounds) and the red[] entries read / written."""
    splits, tokens, _ = part.shape
    flat4 = part.reshape(-1, 4)                     # the float4 view of the workspace
    pairs = n * (PART_COLS // 4)
    groups = threads // pairs
    assert groups >= 1
    per = (splits + groups - 1) // groups
    stride = tokens * (PART_COLS // 4)
    red = np.full((threads, 4), np.nan, np.float32)  # poisoned: an unwritten read shows
    written, reads = set(), []
    for tid in range(threads):
        if tid >= groups * pairs:
            continue
        g, pr = tid // pairs, tid % pairs
        s_lo, s_hi = g * per, min(splits, g * per + per)
        base = t0 * (PART_COLS // 4) + pr
        s = np.zeros(4, np.float32)
        for sp in range(s_lo, s_hi):   # the 8-wide batches and the tail add in the same order
            idx = base + sp * stride
            reads.append(idx)
            s = (s + flat4[idx]).astype(np.float32)
        red[tid] = s
        written.add(tid)
    redf = red.reshape(-1)
    tot = np.zeros((n, PART_COLS), np.float32)
    red_read = []
    for e in range(n * PART_COLS):                  # strided over threads: order irrelevant
        i, c = divmod(e, PART_COLS)
        k = i * PART_COLS + c
        red_read.append(k // 4)
        v = redf[k]
        for g in range(1, groups):
            k = (g * pairs) * 4 + i * PART_COLS + c
            red_read.append(k // 4)
            v = np.float32(v + redf[k])
        tot[i, c] = v
    return tot, reads, written, red_read


@pytest.mark.parametrize("n", range(1, MAX_FINISH + 1))
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 112, 130])
def test_split_sums_cover_every_partial_once_in_bounds(n, splits):
    rng = np.random.default_rng(n * 1000 + splits)
    for tokens, t0s in ((n, [0]),                       # the fused tail: t0 = 0, n = tokens
                        (n + 3, [0, 3] if n == 1 else [0])):
        part = rng.standard_normal((splits, tokens, PART_COLS)).astype(np.float32)
        for t0 in t0s:
            tot, reads, written, red_read = model_finish_sums(part, t0, n)
            assert all(0 <= r < splits * tokens * 8 for r in reads)   # workspace bounds
            # each float4 of the n tokens' rows, in every split, read exactly once
            want = sorted(sp * tokens * 8 + (t0 + i) * 8 + c4 for sp in range(splits)
                          for i in range(n) for c4 in range(8))
            assert sorted(reads) == want
            assert set(red_read) <= written                           # no unwritten red[]
            np.testing.assert_allclose(tot, part[:, t0:t0 + n].astype(np.float64).sum(0),
                                       rtol=1e-5, atol=1e-5)


def test_non_fused_finish_is_the_one_token_case_of_the_fused_one():
    """A token summed by mhc_finish_kernel (n = 1, 16 groups) and by the fused tail with n
    tokens use different group counts (16, 8, 5, 4, 3, 2, 2, 2 for n = 1..8): the same token
    can round differently with the batch it is decoded in (deterministic run to run)."""
    rng = np.random.default_rng(0)
    splits, tokens = 64, 8
    part = (rng.standard_normal((splits, tokens, PART_COLS)) * 1e3).astype(np.float32)
    one = model_finish_sums(part[:, :1], 0, 1)[0][0]
    eight = model_finish_sums(part, 0, 8)[0][0]
    groups = [THREADS // (n * 8) for n in range(1, 9)]
    assert groups == [16, 8, 5, 4, 3, 2, 2, 2]
    # the sums of token 0 are not bit-identical between n = 1 and n = 8 (they agree to fp32
    # rounding of a 64-term sum of magnitude ~1e3 * 8)
    assert (one != eight).any()
    np.testing.assert_allclose(one, eight, rtol=0, atol=1e3 * 8 * 64 * 2**-23 * 4)


@pytest.mark.parametrize("n", range(1, MAX_FINISH + 1))
def test_half_warp_token_map_and_shuffle_partners(n):
    seen = {}
    for tid in range(THREADS):
        grp, lane = tid >> 5, tid & 31
        i = 2 * grp + (lane >> 4)
        have = i < n
        ii = i if have else 0
        for m in (1, 2, 4, 8):                      # xor partners stay in the half
            p = lane ^ m
            assert (p >> 4) == (lane >> 4)
        if have:
            seen.setdefault(ii, set()).add(lane & 15)
    assert sorted(seen) == list(range(n))
    assert all(v == set(range(16)) for v in seen.values())   # 16 lanes = the 16 comb entries


@pytest.mark.parametrize("n", range(1, MAX_FINISH + 1))
@pytest.mark.parametrize("dim", [8, 40, 64, 104, 136, 4096, 7168])
def test_collapse_items_cover_every_chunk_once(n, dim):
    n_chunks = dim // 8
    hits = np.zeros((n, n_chunks), np.int64)
    for tid in range(THREADS):
        for e in range(tid, n * n_chunks, THREADS):
            i, c = divmod(e, n_chunks)
            assert 0 <= i < n
            hits[i, c] += 1
    assert (hits == 1).all()


def test_finish_smem_fits_over_sx():
    finish_smem = THREADS * 16 + MAX_FINISH * PART_COLS * 4 + MAX_FINISH * HC * 4
    sx = 2 * 64 * (64 + 8) * 2
    assert finish_smem == 3200 and finish_smem <= sx
