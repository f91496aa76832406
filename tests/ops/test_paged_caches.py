"""Paged caches (docs/contracts.md §A.1-§A.2): ``compress_kv`` with ``slots`` / ``block_table``
and ``indexer_topk`` with ``block_table`` give the same results as the dense layouts.

The paged layouts are built from a dense problem: state rows scattered into a larger pool
(``slots``), entries / keys in a block pool whose block ids are scattered and out of order,
block sizes that are not powers of two, and several rows sharing one pool. CPU: the reference
(bitwise equal to the dense reference, same ops); GPU: the kernel against the same.
"""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
import dsv4.ops._ext as ext
from dsv4.layers.rope import rope_frequencies
from dsv4.ops.compressor import QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE, compress_kv_reference
from dsv4.ops.indexer import indexer_topk_varlen_reference

from _paged import gather_rows, scatter_rows, scattered_tables  # noqa: E402  (tests/_paged.py)

EPS = 1e-6
needs_kernel = pytest.mark.skipif(not ext.HAS_C, reason="dsv4._C not built")


def _freqs() -> torch.Tensor:
    return rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0)


# ---------------------------------------------------------------------------------------------
# compress_kv
# ---------------------------------------------------------------------------------------------
def _problem(d, m, lens, starts, device, seed, capacity):
    g = torch.Generator().manual_seed(seed)
    coff = 2 if m == 4 else 1
    w, B, T = coff * d, len(lens), sum(lens)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return dict(
        kv=rnd(T, w), score=rnd(T, w, scale=1.5), ape=rnd(m, w, scale=0.5),
        norm_weight=(torch.rand(d, generator=g) + 0.5).to(device), freqs=_freqs().to(device),
        cu=cu.to(device), starts=torch.tensor(starts, dtype=torch.int32, device=device),
        state_kv=rnd(B, coff * m, w), state_score=rnd(B, coff * m, w),
        entries=torch.full((B, capacity, d), float("nan"), dtype=torch.bfloat16, device=device))


def _run(fn, p, m, quant, state_kv, state_score, entries, slots=None, block_table=None):
    fn(p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], p["cu"], p["starts"],
       state_kv, state_score, entries, m, max(int(x) for x in (p["cu"][1:] - p["cu"][:-1])),
       EPS, quant, slots, block_table)


def _paged_copy(p, m, slots_n, seed, block_size, max_blocks, n_entries):
    """The dense problem's state scattered into a pool of ``slots_n`` rows and its entries into
    a block pool (poisoned with NaN); returns (slots, state_kv, state_score, table, pool)."""
    B = p["state_kv"].shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(slots_n, generator=g)[:B].to(torch.int32)
    dev = p["kv"].device
    skv = torch.randn(slots_n, *p["state_kv"].shape[1:], generator=g).to(dev)
    ssc = torch.randn(slots_n, *p["state_score"].shape[1:], generator=g).to(dev)
    skv[slots.long().to(dev)] = p["state_kv"]
    ssc[slots.long().to(dev)] = p["state_score"]
    table, num_blocks = scattered_tables(n_entries, block_size, max_blocks, seed)
    pool = torch.full((num_blocks, block_size, p["entries"].shape[2]), float("nan"),
                      dtype=p["entries"].dtype, device=dev)
    return slots.to(dev), skv, ssc, table.to(dev), pool


CASES = [
    # (head_dim, ratio, quant, lens, starts, block_size)
    (128, 4, QUANT_FP8, [9, 0, 130, 5, 1], [3, 7, 0, 126, 255], 3),
    (64, 4, QUANT_FP4_HADAMARD, [17, 4, 1], [0, 1, 3], 5),
    (128, 16, QUANT_FP8, [40, 33, 2], [5, 16, 14], 2),
    (64, 8, QUANT_NONE, [64, 7], [0, 9], 7),
]


@pytest.mark.parametrize("d,m,quant,lens,starts,bs", CASES)
def test_compress_kv_reference_paged_equals_dense(d, m, quant, lens, starts, bs):
    cap = max((s + n) // m for s, n in zip(starts, lens)) + 1
    p = _problem(d, m, lens, starts, "cpu", seed=d + m, capacity=cap)
    dense = {k: p[k].clone() for k in ("state_kv", "state_score", "entries")}
    _run(compress_kv_reference, p, m, quant, dense["state_kv"], dense["state_score"],
         dense["entries"])
    # Slots only (dense entries indexed by slot).
    slots, skv, ssc, table, pool = _paged_copy(p, m, 11, 5, bs, cap // bs + 2, [cap] * len(lens))
    ent = torch.full((11, cap, d), float("nan"), dtype=p["entries"].dtype)
    _run(compress_kv_reference, p, m, quant, skv, ssc, ent, slots=slots)
    sl = slots.long()
    assert torch.equal(skv[sl], dense["state_kv"]) and torch.equal(ssc[sl], dense["state_score"])
    assert torch.equal(ent[sl].nan_to_num(7.0), dense["entries"].nan_to_num(7.0))
    others = torch.ones(11, dtype=torch.bool)
    others[sl] = False
    assert bool(ent[others].isnan().all())
    # Slots + block table (paged entries; rows share the pool).
    _run(compress_kv_reference, p, m, quant, skv2 := _fresh(p, skv, sl, "state_kv"),
         ssc2 := _fresh(p, ssc, sl, "state_score"), pool, slots=slots, block_table=table)
    assert torch.equal(skv2[sl], dense["state_kv"]) and torch.equal(ssc2[sl], dense["state_score"])
    got = gather_rows(pool, table, cap)
    assert torch.equal(got.nan_to_num(7.0), dense["entries"].nan_to_num(7.0))
    # Nothing written outside the rows' blocks.
    used = torch.zeros(pool.shape[:2], dtype=torch.bool)
    for r in range(len(lens)):
        for k in range(cap):
            if not dense["entries"][r, k].isnan().all():
                used[int(table[r, k // bs]), k % bs] = True
    assert bool(pool[~used].isnan().all())


def _fresh(p, pool, sl, key):
    out = pool.clone()
    out[sl] = p[key]
    return out


def test_compress_kv_reference_block_table_without_slots_and_missing_blocks():
    """block_table without slots (state row = step row); entries whose block id is -1, past
    num_blocks, or past max_blocks are dropped, the others written."""
    d, m, bs = 64, 4, 3
    lens, starts = [30, 30], [0, 0]       # 7 entries per row: blocks 0, 1, 2 (entry 6)
    p = _problem(d, m, lens, starts, "cpu", seed=2, capacity=8)
    dense = {k: p[k].clone() for k in ("state_kv", "state_score", "entries")}
    _run(compress_kv_reference, p, m, QUANT_FP8, dense["state_kv"], dense["state_score"],
         dense["entries"])
    table = torch.tensor([[4, -1, 0], [2, 99, 1]], dtype=torch.int32)
    table2 = table[:, :2].contiguous()    # max_blocks 2: row 0 entry 6 dropped
    for tb in (table, table2):
        pool = torch.full((5, bs, d), float("nan"), dtype=torch.bfloat16)
        skv, ssc = p["state_kv"].clone(), p["state_score"].clone()
        _run(compress_kv_reference, p, m, QUANT_FP8, skv, ssc, pool, block_table=tb)
        assert torch.equal(skv, dense["state_kv"]) and torch.equal(ssc, dense["state_score"])
        assert torch.equal(pool[4], dense["entries"][0, 0:3])
        assert torch.equal(pool[2], dense["entries"][1, 0:3])
        if tb.shape[1] == 3:
            assert torch.equal(pool[0, 0], dense["entries"][0, 6])
            assert torch.equal(pool[1, 0], dense["entries"][1, 6])
            assert bool(pool[0, 1:].isnan().all()) and bool(pool[1, 1:].isnan().all())
        else:
            assert bool(pool[0].isnan().all()) and bool(pool[1].isnan().all())
        assert bool(pool[3].isnan().all())


def test_compress_kv_reference_rejects_bad_paged_args():
    d, m = 64, 4
    p = _problem(d, m, [5, 3], [0, 0], "cpu", seed=3, capacity=4)
    skv, ssc = torch.zeros(4, 8, 128), torch.zeros(4, 8, 128)
    ent = torch.zeros(4, 4, d, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="slots must be int32"):
        _run(compress_kv_reference, p, m, 0, skv, ssc, ent, slots=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        _run(compress_kv_reference, p, m, 0, skv, ssc, ent,
             slots=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="share a slot"):
        _run(compress_kv_reference, p, m, 0, skv, ssc, ent,
             slots=torch.tensor([2, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table must be int32"):
        _run(compress_kv_reference, p, m, 0, skv, ssc, ent,
             slots=torch.tensor([0, 1], dtype=torch.int32),
             block_table=torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"state_kv must be float32 \[2,"):
        _run(compress_kv_reference, p, m, 0, skv, ssc, ent[:2])   # no slots: state rows == B


@pytest.mark.parametrize("paged", [False, True])
def test_compress_kv_opcheck_paged(paged):
    d, m = 64, 4
    p = _problem(d, m, [5, 6], [2, 0], "cpu", seed=6, capacity=4)
    slots = torch.tensor([3, 0], dtype=torch.int32)
    skv, ssc = torch.zeros(4, 8, 128), torch.full((4, 8, 128), float("-inf"))
    if paged:
        ent = torch.zeros(6, 3, d, dtype=torch.bfloat16)
        bt = torch.tensor([[5, 1], [0, 2]], dtype=torch.int32)
    else:
        ent, bt = torch.zeros(4, 4, d, dtype=torch.bfloat16), None
    args = (p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], p["cu"], p["starts"],
            skv, ssc, ent, m, 6, EPS, QUANT_FP8, slots, bt)
    torch.library.opcheck(torch.ops.dsv4.compress_kv.default, args)


# ---------------------------------------------------------------------------------------------
# indexer_topk
# ---------------------------------------------------------------------------------------------
def _indexer_problem(T, B, C, H, D, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g).to(torch.bfloat16).to(device)
    keys = torch.randn(B, C, D, generator=g).to(torch.bfloat16).to(device)
    w = ((torch.rand(T, H, generator=g) * 2 - 1) * 0.125).to(device)
    rows = torch.randint(0, B, (T,), generator=g, dtype=torch.int32).to(device)
    nv = torch.randint(0, C + 3, (T,), generator=g, dtype=torch.int32).to(device)
    return q, w, keys, rows, nv


@pytest.mark.parametrize("bs", [1, 3, 64, 61])
def test_indexer_reference_paged_equals_dense(bs):
    T, B, C, H, D, topk = 23, 3, 150, 8, 64, 16
    q, w, keys, rows, nv = _indexer_problem(T, B, C, H, D, seed=bs)
    nv[0], nv[1] = 0, C          # n_valid 0 and full
    dense = indexer_topk_varlen_reference(q, w, keys, rows, nv, topk)
    max_blocks = (C + bs - 1) // bs
    table, num_blocks = scattered_tables([C] * B, bs, max_blocks, seed=bs)
    pool = torch.full((num_blocks, bs, D), float("nan"), dtype=torch.bfloat16)
    scatter_rows(keys, table, pool)
    got = indexer_topk_varlen_reference(q, w, pool, rows, nv, topk, table)
    assert torch.equal(got, dense)
    got_op = torch.ops.dsv4.indexer_topk(q, w, pool, rows, nv, topk, table)
    assert torch.equal(got_op, dense)
    out = torch.full((T, topk), -7, dtype=torch.int32)
    torch.ops.dsv4.indexer_topk_out(q, w, pool, rows, nv, topk, out, table)
    assert torch.equal(out, dense)


def test_indexer_reference_missing_blocks_are_never_selected():
    """A block id of -1 or >= num_blocks hides its entries (nothing read); the rest rank as
    usual. Logical indices are returned."""
    T, C, H, D, bs, topk = 6, 12, 4, 64, 4, 12
    q, w, keys, _, _ = _indexer_problem(T, 1, C, H, D, seed=9)
    rows = torch.zeros(T, dtype=torch.int32)
    nv = torch.full((T,), C, dtype=torch.int32)
    table = torch.tensor([[1, -1, 7]], dtype=torch.int32)   # block 1 missing, block 2 past pool
    pool = torch.full((3, bs, D), float("nan"), dtype=torch.bfloat16)
    pool[1] = keys[0, 0:4]
    got = indexer_topk_varlen_reference(q, w, pool, rows, nv, topk, table)
    dense = indexer_topk_varlen_reference(q, w, keys, rows, torch.full((T,), 4, dtype=torch.int32),
                                          topk)
    assert torch.equal(got, dense)
    assert bool((got[:, 4:] == -1).all())


def test_indexer_paged_rejects_bad_table_and_rows():
    q, w, keys, rows, nv = _indexer_problem(4, 2, 8, 4, 64, seed=1)
    with pytest.raises((ValueError, RuntimeError), match="block_table must be int32"):
        torch.ops.dsv4.indexer_topk(q, w, keys, rows, nv, 4, torch.zeros(2, 3))
    with pytest.raises((ValueError, RuntimeError), match=r"rows must lie in \[0, 1\)"):
        torch.ops.dsv4.indexer_topk(q, w, keys, rows.fill_(1), nv, 4,
                                    torch.zeros(1, 3, dtype=torch.int32))


def test_indexer_opcheck_paged():
    q, w, keys, rows, nv = _indexer_problem(5, 2, 10, 4, 64, seed=2)
    table, nb = scattered_tables([10, 10], 3, 4, seed=2)
    pool = torch.randn(nb, 3, 64).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.dsv4.indexer_topk.default, (q, w, pool, rows, nv, 4, table))
    out = torch.empty(5, 4, dtype=torch.int32)
    torch.library.opcheck(torch.ops.dsv4.indexer_topk_out.default,
                          (q, w, pool, rows, nv, 4, out, table))


# ---------------------------------------------------------------------------------------------
# CUDA kernels: paged == dense, and == the reference
# ---------------------------------------------------------------------------------------------
def _cuda(p):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("d,m,quant,lens,starts,bs", CASES + [
    (512, 4, QUANT_FP8, [1, 1, 1, 1], [3, 7, 126, 255], 3),          # decode (fused kernel)
    (512, 128, QUANT_FP8, [300, 5, 128], [0, 123, 256], 2),          # HCA prefill
    (512, 128, QUANT_FP8, [1, 1], [127, 1023], 5),                   # HCA decode (clusters)
])
def test_cuda_compress_kv_paged_equals_dense(d, m, quant, lens, starts, bs):
    cap = max((s + n) // m for s, n in zip(starts, lens)) + 1
    p = _cuda(_problem(d, m, lens, starts, "cpu", seed=d + m + bs, capacity=cap))
    dense = {k: p[k].clone() for k in ("state_kv", "state_score", "entries")}
    _run(torch.ops.dsv4.compress_kv, p, m, quant, dense["state_kv"], dense["state_score"],
         dense["entries"])
    ref = {k: p[k].clone() for k in ("state_kv", "state_score", "entries")}
    _run(compress_kv_reference, p, m, quant, ref["state_kv"], ref["state_score"], ref["entries"])
    torch.cuda.synchronize()
    assert torch.equal(dense["state_kv"], ref["state_kv"])
    assert torch.equal(dense["entries"].isnan(), ref["entries"].isnan())
    slots, skv, ssc, table, pool = _paged_copy(p, m, 11, 5, bs, cap // bs + 2, [cap] * len(lens))
    _run(torch.ops.dsv4.compress_kv, p, m, quant, skv, ssc, pool, slots=slots,
         block_table=table)
    torch.cuda.synchronize()
    sl = slots.long()
    # The same kernel, another destination: bit for bit.
    assert torch.equal(skv[sl], dense["state_kv"]) and torch.equal(ssc[sl], dense["state_score"])
    got = gather_rows(pool, table, cap)
    assert torch.equal(got.nan_to_num(7.0), dense["entries"].nan_to_num(7.0))
    # Slots without a block table (dense entries indexed by slot), and a slot out of range.
    ent = torch.full((11, cap, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    skv2, ssc2 = _fresh(p, skv, sl, "state_kv"), _fresh(p, ssc, sl, "state_score")
    bad = slots.clone()
    bad[0] = 11                                   # outside the state rows: row 0 skipped
    _run(torch.ops.dsv4.compress_kv, p, m, quant, skv2, ssc2, ent, slots=bad)
    torch.cuda.synchronize()
    for r in range(1, len(lens)):
        assert torch.equal(skv2[sl[r]], dense["state_kv"][r])
        assert torch.equal(ent[sl[r]].nan_to_num(7.0), dense["entries"][r].nan_to_num(7.0))
    assert torch.equal(skv2[sl[0]], p["state_kv"][0]) or lens[0] == 0
    assert bool(ent[sl[0]].isnan().all())


@pytest.mark.cuda
@needs_kernel
def test_cuda_compress_kv_missing_blocks_not_written():
    d, m, bs = 64, 4, 3
    p = _cuda(_problem(d, m, [30, 30], [0, 0], "cpu", seed=2, capacity=8))
    table = torch.tensor([[4, -1, 0], [2, 99, 1]], dtype=torch.int32, device="cuda")
    pool = torch.full((5, bs, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    ref_pool = pool.clone()
    skv, ssc = p["state_kv"].clone(), p["state_score"].clone()
    _run(torch.ops.dsv4.compress_kv, p, m, QUANT_FP8, skv, ssc, pool, block_table=table)
    _run(compress_kv_reference, p, m, QUANT_FP8, p["state_kv"].clone(), p["state_score"].clone(),
         ref_pool, block_table=table)
    torch.cuda.synchronize()
    assert torch.equal(pool.isnan(), ref_pool.isnan())
    assert bool(pool[3].isnan().all())


def _indexer_cuda_problem(T, B, C, H, D, seed, integer):
    g = torch.Generator().manual_seed(seed)
    if integer:   # exact scores (and exact FP8 keys: |k| <= 3 -> scale 2^-7, codes <= 384)
        q = torch.randint(-3, 4, (T, H, D), generator=g).to(torch.bfloat16)
        keys = torch.randint(-3, 4, (B, C, D), generator=g).to(torch.bfloat16)
        w = torch.tensor([0.25, 0.5, 1.0, -0.5])[torch.randint(0, 4, (T, H), generator=g)]
    else:
        q = torch.randn(T, H, D, generator=g).to(torch.bfloat16)
        keys = torch.randn(B, C, D, generator=g).to(torch.bfloat16)
        w = (torch.rand(T, H, generator=g) * 2 - 1) * 0.125
    rows = torch.randint(0, B, (T,), generator=g, dtype=torch.int32)
    nv = torch.randint(0, C + 3, (T,), generator=g, dtype=torch.int32)
    return q, w, keys, rows, nv


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("T,B,C,topk,bs", [
    (T, B, C, topk, bs)
    for T, B, C, topk in [(4, 4, 3000, 512), (96, 2, 700, 64), (1, 1, 20000, 1024)]
    for bs in (64, 61, 1)
    if not (bs == 1 and C > 3000)])     # block_size 1 over 20K keys: the smaller cases cover it
def test_cuda_indexer_paged_equals_dense(T, B, C, topk, bs):
    q, w, keys, rows, nv = _indexer_cuda_problem(T, B, C, 64, 128, seed=bs + T, integer=False)
    nv[0] = C
    dense = torch.ops.dsv4.indexer_topk(q.cuda(), w.cuda(), keys.cuda(), rows.cuda(), nv.cuda(),
                                        topk)
    max_blocks = (C + bs - 1) // bs
    table, nb = scattered_tables([C] * B, bs, max_blocks, seed=bs)
    pool = torch.full((nb, bs, 128), float("nan"), dtype=torch.bfloat16)
    scatter_rows(keys, table, pool)
    paged = torch.ops.dsv4.indexer_topk(q.cuda(), w.cuda(), pool.cuda(), rows.cuda(), nv.cuda(),
                                        topk, table.cuda())
    torch.cuda.synchronize()
    assert torch.equal(paged, dense)


def _to_cuda_pool(pool, block_size, head_dim):
    """A CPU FP8 indexer pool copied into one allocated on the GPU (``pool.cuda()`` would make
    the padded block stride dense, which the kernel refuses)."""
    from dsv4.ops import kv_cache as kc
    out = kc.allocate(kc.INDEXER, pool.shape[0], block_size, head_dim, device="cuda")
    return out.copy_(pool)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("T,B,C,topk,bs", [(3, 3, 2000, 512, 64), (72, 1, 600, 32, 7),
                                           (2, 2, 9000, 1024, 61)])
@pytest.mark.parametrize("D", [128, 64])
def test_cuda_indexer_fp8_keys_equal_reference(T, B, C, topk, bs, D):
    """FP8 keys (paged and dense) against the reference on exact integer scores."""
    from dsv4.ops import kv_cache as kc
    q, w, keys, rows, nv = _indexer_cuda_problem(T, B, C, 16, D, seed=C + D, integer=True)
    want = indexer_topk_varlen_reference(q, w, keys, rows, nv, topk)
    max_blocks = (C + bs - 1) // bs
    table, nb = scattered_tables([C] * B, bs, max_blocks, seed=bs)
    pool = kc.allocate(kc.INDEXER, nb, bs, D)
    for b in range(B):
        s = torch.arange(C)
        kc.write_entries(pool, table[b, s // bs].long(), s % bs, keys[b])
    got = torch.ops.dsv4.indexer_topk(q.cuda(), w.cuda(), _to_cuda_pool(pool, bs, D), rows.cuda(),
                                      nv.cuda(), topk, table.cuda())
    dense_pool = kc.allocate(kc.INDEXER, B, C, D)
    for b in range(B):
        kc.write_entries(dense_pool, torch.full((C,), b), torch.arange(C), keys[b])
    got_dense = torch.ops.dsv4.indexer_topk(q.cuda(), w.cuda(), _to_cuda_pool(dense_pool, C, D),
                                            rows.cuda(), nv.cuda(), topk)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want) and torch.equal(got_dense.cpu(), want)


@pytest.mark.cuda
@needs_kernel
def test_cuda_indexer_missing_blocks_never_selected():
    q, w, keys, _, _ = _indexer_cuda_problem(6, 1, 12, 64, 128, seed=9, integer=False)
    rows = torch.zeros(6, dtype=torch.int32)
    nv = torch.full((6,), 12, dtype=torch.int32)
    table = torch.tensor([[1, -1, 7]], dtype=torch.int32)
    pool = torch.full((3, 4, 128), float("nan"), dtype=torch.bfloat16)
    pool[1] = keys[0, 0:4]
    got = torch.ops.dsv4.indexer_topk(q.cuda(), w.cuda(), pool.cuda(), rows.cuda(), nv.cuda(), 12,
                                      table.cuda())
    want = indexer_topk_varlen_reference(q, w, pool, rows, nv, 12, table)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
@needs_kernel
def test_cuda_indexer_paged_70000_queries():
    """70,000 queries over 4 rows (prefill-like grouping) with causal n_valid: paged == dense."""
    T, B, C = 70000, 4, 300
    q, w, keys, rows, _ = _indexer_cuda_problem(T, B, C, 8, 64, seed=70, integer=False)
    rows = (torch.arange(T) * B // T).to(torch.int32)          # consecutive queries share a row
    nv = ((torch.arange(T) % 1200 + 1) // 4).to(torch.int32)   # 0 .. 300, crossing blocks
    dense = torch.ops.dsv4.indexer_topk(q.cuda(), w.cuda(), keys.cuda(), rows.cuda(), nv.cuda(), 16)
    table, nb = scattered_tables([C] * B, 61, (C + 60) // 61, seed=70)
    pool = torch.zeros(nb, 61, 64, dtype=torch.bfloat16)
    scatter_rows(keys, table, pool)
    paged = torch.ops.dsv4.indexer_topk(q.cuda(), w.cuda(), pool.cuda(), rows.cuda(), nv.cuda(),
                                        16, table.cuda())
    torch.cuda.synchronize()
    assert torch.equal(paged, dense)
