"""Host models of the MoE routing kernels' index logic, checked against the references (CPU).

Each function below transcribes the index arithmetic of a CUDA kernel (file and function named
in its docstring) line for line, without the parallel machinery: a warp's lanes become a loop,
``__match_any_sync`` a comparison, shared-memory counters a dict. The models are run on random
and adversarial inputs and compared with the fp32 references of ``dsv4.ops.moe``. They check
the ranking / tiling / split logic, not the hardware (that is what the ``cuda`` tests do).
If a kernel's index logic changes, change its model here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4.ops.moe import moe_dispatch_reference

# ------------------------------------------------------------------------------ moe_dispatch
K_THREADS, K_ROUNDS = 256, 4
K_WARPS, K_TILE = K_THREADS // 32, K_THREADS * K_ROUNDS


def _bucket(indices: np.ndarray, p: int, experts: int) -> int:
    e = int(indices[p])
    return e if 0 <= e < experts else experts


def _rank_tile(indices, pairs, experts, tile):
    """rank_tile (moe_dispatch.cu): per-lane (bucket, rank) of each round, wcnt as exclusive
    prefix over warps, tile counts."""
    nb = experts + 1
    wcnt = np.zeros((K_WARPS, nb), dtype=np.int64)
    bucket = np.full((K_WARPS, 32, K_ROUNDS), -1, dtype=np.int64)
    rank = np.zeros((K_WARPS, 32, K_ROUNDS), dtype=np.int64)
    for warp in range(K_WARPS):
        mine = wcnt[warp]
        for r in range(K_ROUNDS):
            bs = []
            for lane in range(32):
                p = tile * K_TILE + warp * (32 * K_ROUNDS) + r * 32 + lane
                bs.append(_bucket(indices, p, experts) if p < pairs else -1)
            base = {}
            for lane in range(32):  # every lane reads mine[b] before the lowest lane updates it
                b = bs[lane]
                base[lane] = int(mine[b]) if b >= 0 else 0
            for lane in range(32):
                b = bs[lane]
                group = [l for l in range(32) if bs[l] == b]  # __match_any_sync
                lower = [l for l in group if l < lane]
                if b >= 0 and not lower:
                    mine[b] = base[lane] + len(group)
                bucket[warp, lane, r] = b
                rank[warp, lane, r] = base[lane] + len(lower)
    tile_count = wcnt.sum(axis=0)
    excl = np.cumsum(wcnt, axis=0) - wcnt
    return excl, tile_count, bucket, rank


def _exclusive(v):
    return np.cumsum(v) - v


def model_moe_dispatch(indices2d: np.ndarray, weights2d: np.ndarray, experts: int):
    """moe_dispatch (host + dispatch_single_kernel / count / scan / scatter kernels)."""
    T, topk = indices2d.shape
    pairs = T * topk
    indices, weights = indices2d.reshape(-1), weights2d.reshape(-1)
    nb = experts + 1
    row_ids = np.full(pairs, -7, dtype=np.int64)  # poison: every position must be written
    route_weight = np.full(pairs, np.nan, dtype=np.float32)
    pair_pos = np.full(pairs, -7, dtype=np.int64)
    if pairs == 0:
        return row_ids, np.zeros(nb, dtype=np.int64), route_weight, pair_pos.reshape(T, topk)

    def scatter(p, pos, valid):
        assert 0 <= pos < pairs and row_ids[pos] == -7, "position out of range or written twice"
        row_ids[pos] = p // topk
        route_weight[pos] = weights[p] if valid else 0.0
        pair_pos[p] = pos if valid else -1

    if pairs <= K_TILE:
        wcnt, count, bucket, rank = _rank_tile(indices, pairs, experts, 0)
        start = _exclusive(count)
        offsets = start.copy()
        for warp in range(K_WARPS):
            for lane in range(32):
                for r in range(K_ROUNDS):
                    b = bucket[warp, lane, r]
                    if b < 0:
                        continue
                    p = warp * (32 * K_ROUNDS) + r * 32 + lane
                    scatter(p, start[b] + wcnt[warp, b] + rank[warp, lane, r], b < experts)
        return row_ids, offsets, route_weight, pair_pos.reshape(T, topk)
    n_tiles = (pairs + K_TILE - 1) // K_TILE
    hist = np.zeros((n_tiles, nb), dtype=np.int64)
    for tile in range(n_tiles):  # dispatch_count_kernel
        for r in range(K_ROUNDS):
            for tid in range(K_THREADS):
                p = tile * K_TILE + r * K_THREADS + tid
                if p < pairs:
                    hist[tile, _bucket(indices, p, experts)] += 1
    totals = hist.sum(axis=0)  # dispatch_scan_kernel
    hist = np.cumsum(hist, axis=0) - hist
    start = _exclusive(totals)
    offsets = start.copy()
    for tile in range(n_tiles):  # dispatch_scatter_kernel
        wcnt, _, bucket, rank = _rank_tile(indices, pairs, experts, tile)
        for warp in range(K_WARPS):
            for lane in range(32):
                for r in range(K_ROUNDS):
                    b = bucket[warp, lane, r]
                    if b < 0:
                        continue
                    p = tile * K_TILE + warp * (32 * K_ROUNDS) + r * 32 + lane
                    scatter(p, start[b] + hist[tile, b] + wcnt[warp, b] + rank[warp, lane, r],
                            b < experts)
    return row_ids, offsets, route_weight, pair_pos.reshape(T, topk)


def _dispatch_cases():
    rng = np.random.default_rng(7)
    cases = []
    for T, k, E in [(1, 6, 256), (3, 1, 1), (170, 6, 256), (171, 6, 256), (1024, 1, 4),
                    (1025, 1, 4), (700, 6, 1023), (513, 2, 3)]:
        idx = rng.integers(0, E, size=(T, k))
        cases.append((f"random T{T} k{k} E{E}", idx, E))
    T, k, E = 800, 6, 256
    cases.append(("all on one expert", np.full((T, k), 17), E))
    cases.append(("all on the last expert", np.full((T, k), E - 1), E))
    bad = rng.integers(0, E, size=(T, k))
    bad[rng.random((T, k)) < 0.3] = -1
    bad[rng.random((T, k)) < 0.1] = E + 5
    cases.append(("invalid indices (-1, >= E)", bad, E))
    cases.append(("all invalid", np.full((T, k), -1), E))
    skew = rng.integers(0, 4, size=(3000, 2))  # few busy experts, most idle, 6 tiles
    cases.append(("skewed, multi-tile", skew, 300))
    dup = np.tile(np.array([[5, 5, 5]]), (400, 1))  # equal expert in several slots of a token
    cases.append(("duplicate slots", dup, 8))
    return cases


@pytest.mark.parametrize("name,idx,E", _dispatch_cases(), ids=[c[0] for c in _dispatch_cases()])
def test_dispatch_model_matches_reference(name, idx, E):
    w = np.random.default_rng(1).random(idx.shape, dtype=np.float32)
    row_ids, offsets, rw, pos = model_moe_dispatch(idx, w, E)
    ref = moe_dispatch_reference(torch.from_numpy(idx.astype(np.int32)), torch.from_numpy(w), E)
    np.testing.assert_array_equal(row_ids, ref[0].numpy())
    np.testing.assert_array_equal(offsets, ref[1].numpy())
    np.testing.assert_array_equal(rw, ref[2].numpy())
    np.testing.assert_array_equal(pos, ref[3].numpy())


# ------------------------------------------------------------------------------ moe_gate split
G_BM, G_BN, G_BK, G_MAX_SPLITS = 64, 64, 64, 32


def model_gate_plan(tokens, experts, dim, num_sms):
    """make_plan (moe_gate.cu)."""
    m_tiles, n_tiles, k_tiles = -(-tokens // G_BM), -(-experts // G_BN), -(-dim // G_BK)
    base = m_tiles * n_tiles
    splits = (4 * num_sms + base - 1) // base
    splits = max(1, min(splits, G_MAX_SPLITS, k_tiles))
    tps = -(-k_tiles // splits)
    splits = -(-k_tiles // tps)
    return m_tiles, n_tiles, k_tiles, splits, tps


@pytest.mark.parametrize("tokens,experts,dim,sms", [
    (1, 256, 4096, 132), (8, 256, 7168, 132), (65, 384, 4096, 132), (4096, 256, 4096, 132),
    (1, 8, 8, 132), (1, 512, 64, 132), (3, 72, 200, 16), (1, 256, 4096, 1)])
def test_gate_split_plan_covers_every_logit_once(tokens, experts, dim, sms):
    """Every (token, expert) logit gets every k tile exactly once, summed over the splits; the
    partial writes and the epilogue reads stay inside the workspace; the arrival count is the
    number of CTAs of the token tile."""
    m_tiles, n_tiles, k_tiles, splits, tps = model_gate_plan(tokens, experts, dim, sms)
    assert 1 <= splits <= G_MAX_SPLITS
    ctas = m_tiles * n_tiles * splits
    k_cov = np.zeros((splits, k_tiles), dtype=np.int64)
    writes = np.zeros((splits, tokens, experts), dtype=np.int64)
    arrivals = np.zeros(m_tiles, dtype=np.int64)
    for cta in range(ctas):  # moe_gate_kernel's block decomposition
        split = cta % splits
        rest = cta // splits
        n_tile, m_tile = rest % n_tiles, rest // n_tiles
        kb, ke = split * tps, min(split * tps + tps, k_tiles)
        assert kb < ke, "empty split: its CTA would write zero partials for nothing"
        if n_tile == 0 and m_tile == 0:
            k_cov[split, kb:ke] += 1
        arrivals[m_tile] += 1
        t0, e0 = m_tile * G_BM, n_tile * G_BN
        for warp in range(4):  # the accumulator fragment -> (t, e) of the partial writes
            wm, wn = warp & 1, warp >> 1
            for lane in range(32):
                g, c2 = lane >> 2, (lane & 3) * 2
                for i in range(2):
                    for j in range(4):
                        for h in range(2):
                            t = t0 + wm * 32 + i * 16 + g + h * 8
                            e = e0 + wn * 32 + j * 8 + c2
                            if t < tokens:
                                if e < experts:
                                    writes[split, t, e] += 1
                                if e + 1 < experts:
                                    writes[split, t, e + 1] += 1
    assert (k_cov.sum(axis=0) == 1).all()
    assert (writes == 1).all(), "each split writes each logit exactly once"
    assert (arrivals == n_tiles * splits).all()
    part_elems = splits * tokens * experts  # workspace: part, then one counter per m tile
    last = (splits - 1) * tokens * experts + (tokens - 1) * experts + experts - 1
    assert last < part_elems
