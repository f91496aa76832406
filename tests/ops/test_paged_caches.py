"""Paged caches (contracts.md §A.1-§A.2): ``compress_kv`` with ``slots`` / ``block_table`` and
``indexer_topk`` with ``block_table`` give the same results as the dense layouts.

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

EPS = 1e-6
needs_kernel = pytest.mark.skipif(not ext.HAS_C, reason="dsv4._C not built")


def _freqs() -> torch.Tensor:
    return rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------
def scattered_tables(n_entries: list[int], block_size: int, max_blocks: int, seed: int,
                     spare: int = 3) -> tuple[torch.Tensor, int]:
    """A block table [rows, max_blocks] int32 giving every row the blocks its ``n_entries``
    need, ids drawn from one shared pool in a random (out of order) permutation; unused
    entries are -1. Returns (table, num_blocks); the pool has ``spare`` never-used blocks."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in n_entries]
    assert max(need, default=0) <= max_blocks
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(n_entries), max_blocks), -1, dtype=torch.int32)
    k = 0
    for r, nb in enumerate(need):
        table[r, :nb] = torch.tensor(perm[k:k + nb], dtype=torch.int32)
        k += nb
    return table, num_blocks


def gather_rows(pool: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, n, d]: logical entries 0..n-1 of each row of a pool [num_blocks, bs, d]."""
    bs = pool.shape[1]
    s = torch.arange(n)
    blk = table.long().cpu()[:, s // bs]
    return pool[blk.to(pool.device), (s % bs).to(pool.device)]


def scatter_rows(dense: torch.Tensor, table: torch.Tensor, pool: torch.Tensor) -> None:
    """Write dense [rows, C, d] into a pool through the table (every entry with a block)."""
    bs = pool.shape[1]
    for r in range(dense.shape[0]):
        for k in range(dense.shape[1]):
            blk = int(table[r, k // bs]) if k // bs < table.shape[1] else -1
            if blk >= 0:
                pool[blk, k % bs] = dense[r, k]


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
