"""Host model of mhc.cu's one-pass prefill kernel (mhc_wide_kernel): a 16-CTA cluster per
32-token tile, CTA `rank` owning dims [rank·W, rank·W + W) of the 4 streams. CPU only.

Transcribed from the kernel: the tile loads (thread -> token, stream, 16-byte chunk), each
warp's columns and its fn B fragments, the ldmatrix / mma fragment maps, the partial rows
[warp][token][32] and their sums, the finalise map (two tokens per CTA, lane -> column, lane
-> destination rank), the collapse items and the post/comb tail's token enumeration; the
shared-memory layout. The PTX fragment layouts (ldmatrix x4, mma m16n8k16 A / B / C) are
stated here independently, from the PTX ISA, and the projection computed through them is
compared with x̂ · fnᵀ. If the kernel's logic changes, change its model here.
"""

from __future__ import annotations

import numpy as np
import pytest

HC, CLUSTER, TM, THREADS, WARPS, PART_COLS, SUMSQ_COL = 4, 16, 32, 512, 16, 32, 31
MAX_KS, PARTS, SMEM_LIMIT = 4, 3, 232448
WIDE_DIMS = (1024, 2048, 4096)


def wide_dim_ok(dim):
    return dim in (CLUSTER * 64, CLUSTER * 128, CLUSTER * 256)


def pitch(W):
    return HC * W + 8


def smem_layout(W):
    """Byte offsets of the dynamic shared memory (mhc_wide_kernel's carve-up)."""
    off, out = 2 * TM * pitch(W) * 2, {"x": 0}
    for name, floats in (("red", WARPS * TM * PART_COLS), ("ctot", TM * PART_COLS),
                         ("spre", TM * HC), ("tot", 2 * PART_COLS), ("pre_loc", 2 * HC),
                         ("scratch", 32 * HC), ("zero_row", PART_COLS)):
        out[name] = off
        off += 4 * floats
    out["end"] = off
    return out


@pytest.mark.parametrize("dim", WIDE_DIMS)
def test_smem_layout_fits_and_is_aligned(dim):
    W = dim // CLUSTER
    lay = smem_layout(W)
    assert lay["end"] <= SMEM_LIMIT
    for name in ("red", "ctot", "spre", "pre_loc"):      # float4 / 16-byte accesses
        assert lay[name] % 16 == 0, name
    # ldmatrix: 8 rows of one 8x8 matrix at row pitch 2·pitch bytes hit 8 distinct 16-byte
    # bank groups
    assert len({(r * pitch(W) * 2 // 16) % 8 for r in range(8)}) == 8
    assert (pitch(W) * 2) % 16 == 0


@pytest.mark.parametrize("dim", WIDE_DIMS)
@pytest.mark.parametrize("tokens", [9, 40, 64, 100])
def test_tile_loads_cover_the_slice_once(dim, tokens):
    W = dim // CLUSTER
    per_token = HC * (W // 8)
    ld_tokens = THREADS // per_token
    assert THREADS % per_token == 0
    for rank in (0, 7, 15):
        slice0 = rank * W
        for tile in range((tokens + TM - 1) // TM):
            smem_hits = np.zeros(TM * pitch(W), np.int64)
            global_hits = set()
            for tid in range(THREADS):
                i0 = tid // per_token
                s, ch = (tid % per_token) // (W // 8), tid % (W // 8)
                soff, goff = s * W + ch * 8, s * dim + slice0 + ch * 8
                for i in range(i0, TM, ld_tokens):
                    dst = i * pitch(W) + soff
                    assert dst % 8 == 0 and dst + 8 <= i * pitch(W) + HC * W
                    smem_hits[dst:dst + 8] += 1
                    t = tile * TM + i
                    if t < tokens:               # else zero-filled, source not read
                        assert 0 <= goff and goff + 8 <= HC * dim
                        global_hits.add((t, goff))
            # every element of every token row's 4·W slice columns written once, pads never
            rows = smem_hits.reshape(TM, pitch(W))
            assert (rows[:, :HC * W] == 1).all() and (rows[:, HC * W:] == 0).all()
            n_valid = min(TM, tokens - tile * TM)
            assert len(global_hits) == n_valid * HC * (W // 8)


# ---------------------------------------------------------------------------------------------
# fragments: PTX layouts stated independently, the kernel's choices transcribed
# ---------------------------------------------------------------------------------------------
def ptx_ldmatrix_x4(rows_addr_of_lane, read8):
    """ldmatrix.x4: matrix m takes its 8 row addresses from lanes 8m..8m+7; thread t receives
    row t // 4, elements 2 (t % 4), +1 of each matrix m as register m."""
    regs = np.zeros((32, 4, 2))
    for m in range(4):
        for t in range(32):
            row = read8(rows_addr_of_lane(8 * m + t // 4))
            regs[t, m] = row[2 * (t % 4):2 * (t % 4) + 2]
    return regs


def ptx_mma_16816(a_regs, b_regs):
    """mma.m16n8k16 row.col: A [16, 16] from a0 (g, 2q..), a1 (g + 8, 2q..), a2 (g, 8 + 2q..),
    a3 (g + 8, 8 + 2q..); B [16, 8] from b0 (k 2q.., n g), b1 (k 8 + 2q.., n g); returns
    D = A·B as the C fragments c0, c1 (g, 2q..), c2, c3 (g + 8, 2q..); g = lane / 4,
    q = lane % 4."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, q = lane // 4, lane % 4
        A[g, 2 * q:2 * q + 2] = a_regs[lane, 0]
        A[g + 8, 2 * q:2 * q + 2] = a_regs[lane, 1]
        A[g, 8 + 2 * q:8 + 2 * q + 2] = a_regs[lane, 2]
        A[g + 8, 8 + 2 * q:8 + 2 * q + 2] = a_regs[lane, 3]
        B[2 * q:2 * q + 2, g] = b_regs[lane, 0]
        B[8 + 2 * q:8 + 2 * q + 2, g] = b_regs[lane, 1]
    D = A @ B
    c = np.zeros((32, 4))
    for lane in range(32):
        g, q = lane // 4, lane % 4
        c[lane] = [D[g, 2 * q], D[g, 2 * q + 1], D[g + 8, 2 * q], D[g + 8, 2 * q + 1]]
    return c


def model_partial_rows(x, fn, rank, dim, n_real, nt_count):
    """One tile (x: [TM, 4, dim] float64) on CTA `rank`: the red[warp][token][32] rows the
    kernel's warps write (projection through the fragment maps, Σx² from the A registers)."""
    W, ks = dim // CLUSTER, dim // CLUSTER // 64
    K = HC * dim
    slice0 = rank * W
    # smem tile as the loads lay it out: row i, column s·W + d = x[i, s, slice0 + d]
    sx = np.zeros((TM, pitch(W)))
    for s in range(HC):
        sx[:, s * W:(s + 1) * W] = x[:, s, slice0:slice0 + W]
    red = np.full((WARPS, TM, PART_COLS), np.nan)
    for warp in range(WARPS):
        wcol = (warp >> 2) * W + (warp & 3) * (W // 4)
        kcol = (warp >> 2) * dim + slice0 + (warp & 3) * (W // 4)
        for mt in range(TM // 16):
            acc = np.zeros((nt_count, 32, 4))
            sq = np.zeros((32, 2))
            for j in range(ks):
                def addr(lane):
                    return (mt * 16 + (lane & 15), wcol + j * 16 + (lane >> 4) * 8)

                a = ptx_ldmatrix_x4(addr, lambda rc: sx[rc[0], rc[1]:rc[1] + 8])
                for lane in range(32):             # sumsq_frag: a0, a2 -> row g; a1, a3 -> g + 8
                    sq[lane, 0] += (a[lane, 0] ** 2).sum() + (a[lane, 2] ** 2).sum()
                    sq[lane, 1] += (a[lane, 1] ** 2).sum() + (a[lane, 3] ** 2).sum()
                for nt in range(nt_count):
                    b = np.zeros((32, 2, 2))
                    for lane in range(32):
                        n, c2 = nt * 8 + lane // 4, (lane % 4) * 2
                        if n < n_real:
                            k = kcol + j * 16 + c2
                            b[lane, 0] = fn[n, k:k + 2]
                            b[lane, 1] = fn[n, k + 8:k + 10]
                    acc[nt] += ptx_mma_16816(a, b)   # the 3 bf16 parts sum to fn (exact split)
            for lane in range(32):                   # xor 1, 2 shuffles: the 4 lanes of a row
                quad = lane & ~3
                sq_row = sq[quad:quad + 4].sum(0)
                g, c2 = lane // 4, (lane % 4) * 2
                for h in range(2):
                    row = red[warp, mt * 16 + g + 8 * h]
                    for nt in range(nt_count):
                        n = nt * 8 + c2
                        if n < n_real:
                            row[n] = acc[nt, lane, 2 * h]
                        if n + 1 < n_real:
                            row[n + 1] = acc[nt, lane, 2 * h + 1]
                    if lane & 3 == 0:
                        row[SUMSQ_COL] = sq_row[h]
    return red


@pytest.mark.parametrize("dim", [1024, 2048])
@pytest.mark.parametrize("head", [False, True])
def test_projection_through_fragments_equals_the_matrix_product(dim, head):
    rng = np.random.default_rng(dim + head)
    n_real, nt_count = (4, 1) if head else (24, 3)
    x = rng.standard_normal((TM, HC, dim))
    fn = rng.standard_normal((n_real, HC * dim))
    ctot = np.zeros((TM, PART_COLS))
    for rank in range(CLUSTER):                      # CTA sums (warp order), cluster sums
        red = model_partial_rows(x, fn, rank, dim, n_real, nt_count)
        cols = [c for c in range(PART_COLS) if c < n_real or c == SUMSQ_COL]
        assert not np.isnan(red[:, :, cols]).any()   # every needed entry written
        ctot[:, cols] += red[:, :, cols].sum(0)
    xf = x.reshape(TM, HC * dim)
    np.testing.assert_allclose(ctot[:, :n_real], xf @ fn.T, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ctot[:, SUMSQ_COL], (xf ** 2).sum(1), rtol=1e-12)


def test_warp_columns_cover_the_slice_once():
    for dim in WIDE_DIMS:
        W, ks = dim // CLUSTER, dim // CLUSTER // 64
        assert ks <= MAX_KS and 16 * ks == W // 4
        for rank in range(CLUSTER):
            cols = []
            for warp in range(WARPS):
                kcol = (warp >> 2) * dim + rank * W + (warp & 3) * (W // 4)
                cols += [kcol + 16 * j + k for j in range(ks) for k in range(16)]
            want = [s * dim + rank * W + d for s in range(HC) for d in range(W)]
            assert sorted(cols) == want


def test_finalise_and_broadcast_maps():
    """Warp 0 of rank r: half h finalises token 2r + h; lane l sums columns l and l + 16 when
    needed; lane l of each half writes the token's pre into CTA l."""
    for n_real in (24, 4):
        finalised, spre_writes = {}, np.zeros((CLUSTER, TM), np.int64)
        for rank in range(CLUSTER):
            for lane in range(32):
                h, l = lane >> 4, lane & 15
                i = 2 * rank + h
                cols = [c for c in (l, l + 16) if c < n_real or c == SUMSQ_COL]
                finalised.setdefault(i, set()).update(cols)
                spre_writes[l, i] += 1
        assert sorted(finalised) == list(range(TM))
        for cols in finalised.values():
            assert cols == set(range(n_real)) | {SUMSQ_COL}
        assert (spre_writes == 1).all()              # each CTA's spre row once per token


@pytest.mark.parametrize("dim", WIDE_DIMS)
@pytest.mark.parametrize("tokens", [9, 32, 70])
def test_collapse_items_cover_u_once(dim, tokens):
    W = dim // CLUSTER
    chunks = W // 8
    assert THREADS % chunks == 0
    for tile in range((tokens + TM - 1) // TM):
        t0 = tile * TM
        u_hits = np.zeros((TM, dim), np.int64)
        for rank in range(CLUSTER):
            for tid in range(THREADS):
                ch = tid % chunks
                for i in range(tid // chunks, TM, THREADS // chunks):
                    if t0 + i >= tokens:
                        break
                    col = rank * W + ch * 8
                    assert col + 8 <= dim
                    u_hits[i, col:col + 8] += 1
        n_valid = min(TM, tokens - t0)
        assert (u_hits[:n_valid] == 1).all() and (u_hits[n_valid:] == 0).all()


@pytest.mark.parametrize("tokens,clusters", [(9, 8), (40, 8), (4096, 8), (4100, 7), (1000, 6),
                                             (33, 1)])
def test_tiles_and_tail_tokens_cover_every_token_once(tokens, clusters):
    """Grid = min(clusters, tiles) clusters; cluster c runs tiles c, c + ncl, ...; the tail of
    CTA rank r handles k = 2·(its n-th tile) + half, warp w taking k0 = 2w, 2w + 32, ...:
    every token's post/comb exactly once, by the CTA that finalised (and stored) its row."""
    n_tiles = (tokens + TM - 1) // TM
    ncl = min(clusters, n_tiles)
    finalised_by, tail_by = {}, {}
    for cid in range(ncl):
        tiles = list(range(cid, n_tiles, ncl))
        for tile in tiles:
            for rank in range(CLUSTER):
                for h in range(2):
                    t = tile * TM + 2 * rank + h
                    if t < tokens:
                        assert t not in finalised_by
                        finalised_by[t] = (cid, rank)
        my_tiles = (n_tiles - cid + ncl - 1) // ncl if cid < n_tiles else 0
        assert my_tiles == len(tiles)
        for rank in range(CLUSTER):
            for warp in range(WARPS):
                for k0 in range(2 * warp, 2 * my_tiles, 2 * WARPS):
                    for h in range(2):
                        k = k0 + h
                        t = (cid + (k >> 1) * ncl) * TM + 2 * rank + (k & 1)
                        if k < 2 * my_tiles and t < tokens:
                            assert t not in tail_by
                            tail_by[t] = (cid, rank)
    assert sorted(finalised_by) == list(range(tokens))
    assert tail_by == finalised_by


def test_wide_path_dims():
    assert [d for d in range(8, 8200, 8) if wide_dim_ok(d)] == list(WIDE_DIMS)
