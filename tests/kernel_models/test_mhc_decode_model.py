"""Host model of mhc.cu's decode kernel (mhc_decode_kernel, T <= 64) index logic: the plan
(make_decode_plan / decode_group: token groups, splits, passes), the GEMV's column coverage
(every 4·dim column of every token counted once), the partial rows written (the mixes and
Σx̂² of every (split, token), inside the workspace before the counters), the finisher's split
sums with 256 threads (the model of sum_split_partials in test_mhc_finish_model), the pre
threads, the Sinkhorn warps' token map and the collapse items of the other warps. CPU only.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_mhc_finish_model import model_finish_sums

DEC_THREADS, DEC_WARPS, DEC_COLS, PART_COLS, SUMSQ_COL, HC, MAX_FINISH = 256, 8, 128, 32, 31, 4, 8


def decode_group(tokens: int, forced: int | None = None) -> int:
    if forced is not None:
        return forced
    if tokens <= 32:
        return min(tokens, 4)
    return -(-tokens // MAX_FINISH)


def make_decode_plan(tokens: int, dim: int, num_sms: int, forced: int | None = None):
    group = decode_group(tokens, forced)
    groups = -(-tokens // group)
    cols = -(-(HC * dim) // DEC_COLS)
    s = -(-(2 * num_sms) // groups)
    s = max(1, min(s, cols))
    passes = -(-cols // s)
    splits = -(-cols // passes)
    return group, groups, splits, passes


CASES = [(T, dim) for T in (1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 32, 33, 40, 57, 63, 64)
         for dim in (8, 40, 136, 4096, 7168)]


@pytest.mark.parametrize("forced", [None, 1, 3, 8])
@pytest.mark.parametrize("num_sms", [132, 114, 1])
def test_plan_groups_and_splits(forced, num_sms):
    for T, dim in CASES:
        group, groups, splits, passes = make_decode_plan(T, dim, num_sms, forced)
        assert 1 <= group <= MAX_FINISH
        assert (groups - 1) * group < T <= groups * group        # the last group is not empty
        cols = -(-(4 * dim) // DEC_COLS)
        assert splits * passes >= cols and (splits - 1) * passes < cols   # no empty split
        assert groups * splits < 2 ** 31 and splits <= cols
        if forced is None and num_sms == 132 and dim == 4096:
            assert groups * splits <= 2 * 132 + groups                # ~2 CTAs per SM


@pytest.mark.parametrize("T,dim", [(1, 4096), (8, 4096), (64, 4096), (13, 136), (3, 8),
                                   (33, 40), (2, 7168)])
@pytest.mark.parametrize("nt", [3, 1])
def test_gemv_columns_and_partial_rows(T, dim, nt):
    """Every (token, column) enters exactly one (split, lane, pass) FMA chain per fn row; every
    real fn row has a warp; lane 0 of warp w writes rows w·NT .. w·NT + NT - 1 (< 24 or 4) and
    warp 7 Σx̂², all inside [0, counter offset)."""
    K = 4 * dim
    n_real = 24 if nt == 3 else 4
    group, groups, splits, passes = make_decode_plan(T, dim, 132)
    cols = -(-K // DEC_COLS)
    counter_offset = cols * T * PART_COLS * 4
    hits = np.zeros((T, K), np.int64)
    rows_written = {}
    for g in range(groups):
        t0 = g * group
        n = min(group, T - t0)
        for split in range(splits):
            for lane in range(32):
                for p in range(passes):
                    k = split * passes * DEC_COLS + lane * 4 + p * DEC_COLS
                    if k < K:
                        assert k + 3 < K and k % 4 == 0
                        hits[t0:t0 + n, k:k + 4] += 1
            for i in range(n):
                for warp in range(DEC_WARPS):
                    cols_w = [warp * nt + j for j in range(nt) if warp * nt + j < n_real]
                    if warp == DEC_WARPS - 1:
                        cols_w.append(SUMSQ_COL)
                    for c in cols_w:
                        off = ((split * T + t0 + i) * PART_COLS + c) * 4
                        assert 0 <= off < counter_offset
                        rows_written.setdefault((split, t0 + i), []).append(c)
    assert (hits == 1).all()
    want = list(range(n_real)) + [SUMSQ_COL]
    assert len(rows_written) == splits * T
    assert all(sorted(v) == want for v in rows_written.values())
    assert {w * nt + j for w in range(DEC_WARPS) for j in range(nt)} >= set(range(n_real))


@pytest.mark.parametrize("n", range(1, MAX_FINISH + 1))
@pytest.mark.parametrize("splits", [1, 5, 32, 33, 128, 224])
def test_finisher_split_sums_with_256_threads(n, splits):
    rng = np.random.default_rng(7 * n + splits)
    tokens = n + 5
    part = rng.standard_normal((splits, tokens, PART_COLS)).astype(np.float32)
    for t0 in (0, 5):
        tot, reads, written, red_read = model_finish_sums(part, t0, n, threads=DEC_THREADS)
        want = sorted(sp * tokens * 8 + (t0 + i) * 8 + c4 for sp in range(splits)
                      for i in range(n) for c4 in range(8))
        assert sorted(reads) == want and set(red_read) <= written
        np.testing.assert_allclose(tot, part[:, t0:t0 + n].astype(np.float64).sum(0),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nt", [3, 1])
@pytest.mark.parametrize("n", range(1, MAX_FINISH + 1))
@pytest.mark.parametrize("dim", [8, 40, 136, 4096, 7168])
def test_finisher_work_split(nt, n, dim):
    """pre: threads tid < 4n, one (token, stream) each; post / comb: token 2w + h on half h of
    the first ceil(n / 2) warps (hc_pre only); the collapse items over the other threads, each
    (token, 8-column chunk) once."""
    pre = sorted(divmod(tid, HC) for tid in range(DEC_THREADS) if tid < n * HC)
    assert pre == [(i, l) for i in range(n) for l in range(HC)]
    sink = (n + 1) // 2 if nt == 3 else 0
    assert sink <= DEC_WARPS // 2
    tokens = sorted(2 * w + (lane >> 4) for w in range(sink) for lane in range(0, 32, 16)
                    if 2 * w + (lane >> 4) < n)
    assert tokens == (list(range(n)) if nt == 3 else [])
    n_chunks = dim // 8
    nthreads = DEC_THREADS - 32 * sink
    hits = np.zeros((n, n_chunks), np.int64)
    for tid in range(32 * sink, DEC_THREADS):
        for e in range(tid - 32 * sink, n * n_chunks, nthreads):
            i, c = divmod(e, n_chunks)
            hits[i, c] += 1
    assert (hits == 1).all()


def test_decode_smem():
    smem = DEC_THREADS * 16 + MAX_FINISH * PART_COLS * 4 + MAX_FINISH * HC * 4
    assert smem == 5248          # ptxas: 5264 B with arrive_last's flag (and its alignment)
