"""dsv4.ops.kv_cache: the FP8 cache formats (MODEL1 584 B, FP8 indexer keys 132 B).

The dequantised cache equals the official quantisation simulation bit for bit
(``fp8_e4m3_sim``), the bytes sit where FlashMLA's MODEL1 / DeepGEMM's paged indexer layout put
them (checked against offsets computed by hand here), FP4-simulated indexer keys survive FP8
exactly, and compress_kv writes FP8 caches equal to its bf16 entries packed (CPU reference;
the CUDA kernel in the cuda-marked tests).
"""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401
import dsv4.ops._ext as ext
from dsv4.layers.rope import rope_frequencies
from dsv4.ops import kv_cache as kc
from dsv4.ops.compressor import QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE, compress_kv_reference
from dsv4.ops.quant import fp4_e2m1_sim, fp8_e4m3_sim, hadamard

from _paged import scattered_tables  # noqa: E402  (tests/_paged.py)

needs_kernel = pytest.mark.skipif(not ext.HAS_C, reason="dsv4._C not built")


def _entries(n, d, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * scale
    x[0, :64] *= 1e-6              # a block below the 1e-4 amax floor
    x[1, 64:128] = 0.0             # an all-zero block
    x[2, 5] = 1e4                  # a large value
    return x.to(torch.bfloat16)


def test_sizes_and_shapes():
    assert kc.entry_bytes(kc.MODEL1, 512) == 584
    assert kc.entry_bytes(kc.INDEXER, 128) == 132 and kc.entry_bytes(kc.INDEXER, 64) == 68
    assert kc.block_bytes(kc.MODEL1, 64, 512) == 65 * 576      # FlashMLA pads to 576
    assert kc.block_bytes(kc.MODEL1, 2, 512) == 3 * 576
    assert kc.block_bytes(kc.INDEXER, 3, 128) == 400           # 396 -> 16-byte multiple
    assert kc.bytes_per_entry(torch.bfloat16, 512) == 1024
    p = kc.allocate(kc.MODEL1, 4, 7, 512)
    assert p.shape == (4, 7, 584) and p.stride() == (kc.block_bytes(kc.MODEL1, 7, 512), 584, 1)
    assert p.dtype == torch.uint8 and not bool(p.any())
    with pytest.raises(ValueError, match="head_dim 512"):
        kc.entry_bytes(kc.MODEL1, 128)
    with pytest.raises(ValueError, match="MODEL1"):
        kc.cache_format(torch.zeros(2, 3, 100, dtype=torch.uint8), 512)
    assert kc.cache_format(torch.zeros(2, 3, 512, dtype=torch.bfloat16), 512) is None


def test_model1_dequant_equals_fp8_sim_exactly():
    x = _entries(37, 512, seed=1)
    got = kc.unpack(kc.MODEL1, kc.pack(kc.MODEL1, x))
    ref = torch.cat([fp8_e4m3_sim(x[:, :448], 64), x[:, 448:]], -1)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    # and in fp32 (the e4m3 value times a power of two is exact)
    got32 = kc.unpack(kc.MODEL1, kc.pack(kc.MODEL1, x), torch.float32)
    assert torch.equal(got32, ref.float())


def test_model1_pool_layout_offsets():
    """Bytes where FlashMLA MODEL1 puts them: per block [bs x 576][bs x 8], pad byte 0."""
    bs, nb = 5, 3
    pool = kc.allocate(kc.MODEL1, nb, bs, 512)
    x = _entries(4, 512, seed=2)
    blocks = torch.tensor([2, 0, 2, 1])
    rows = torch.tensor([4, 0, 1, 3])
    kc.write_entries(pool, blocks, rows, x)
    flat = pool.as_strided((nb, kc.block_bytes(kc.MODEL1, bs, 512)), (pool.stride(0), 1))
    for i in range(4):
        b, r = int(blocks[i]), int(rows[i])
        tok = flat[b, r * 576:(r + 1) * 576]
        sc = flat[b, bs * 576 + r * 8:bs * 576 + r * 8 + 8]
        q = tok[:448].view(torch.float8_e4m3fn).float()
        s = torch.pow(2.0, sc[:7].float() - 127)
        nope = (q.view(7, 64) * s[:, None]).flatten()
        assert torch.equal(nope, fp8_e4m3_sim(x[i:i + 1, :448], 64)[0].float())
        assert torch.equal(tok[448:].view(torch.bfloat16), x[i, 448:])
        assert int(sc[7]) == 0
    got = kc.read_entries(pool, blocks, rows, 512)
    assert torch.equal(got[:, 448:], x[:, 448:])
    # untouched entries stay zero
    assert not bool(kc.read_pool(pool, 512)[1, 0].any())


def test_indexer_layout_and_fp4_keys_survive_exactly():
    bs, nb, d = 3, 4, 128
    pool = kc.allocate(kc.INDEXER, nb, bs, d)
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(6, d, generator=g).to(torch.bfloat16)
    keys = fp4_e2m1_sim(hadamard(raw), 32)          # what quant_sim stores (§5)
    blocks, rows = torch.tensor([0, 3, 3, 1, 2, 0]), torch.tensor([2, 0, 1, 1, 2, 0])
    kc.write_entries(pool, blocks, rows, keys)
    assert torch.equal(kc.read_entries(pool, blocks, rows, d), keys)
    flat = pool.as_strided((nb, kc.block_bytes(kc.INDEXER, bs, d)), (pool.stride(0), 1))
    for i in range(6):
        b, r = int(blocks[i]), int(rows[i])
        q = flat[b, r * d:(r + 1) * d].view(torch.float8_e4m3fn).float()
        s = flat[b, bs * d + 4 * r:bs * d + 4 * r + 4].view(torch.float32)
        assert torch.equal(q * s, keys[i].float())
        assert float(s) == 2.0 ** round(float(torch.log2(s)))   # a power of two
    # plain bf16 keys: exactly the FP8 simulation with one block of d
    other = torch.randn(2, d, generator=g).to(torch.bfloat16)
    assert torch.equal(kc.unpack(kc.INDEXER, kc.pack(kc.INDEXER, other)), fp8_e4m3_sim(other, d))


def _compress_problem(d, m, lens, seed):
    g = torch.Generator().manual_seed(seed)
    coff = 2 if m == 4 else 1
    w, B, T = coff * d, len(lens), sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return dict(kv=torch.randn(T, w, generator=g), score=torch.randn(T, w, generator=g) * 1.5,
                ape=torch.randn(m, w, generator=g) * 0.5,
                norm_weight=torch.rand(d, generator=g) + 0.5,
                freqs=rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0),
                cu=cu, starts=torch.zeros(B, dtype=torch.int32),
                skv=torch.zeros(B, coff * m, w),
                ssc=torch.full((B, coff * m, w), float("-inf")))


def _compress(fn, p, m, quant, entries, block_table=None):
    fn(p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], p["cu"], p["starts"],
       p["skv"], p["ssc"], entries, m, int((p["cu"][1:] - p["cu"][:-1]).max()), 1e-6, quant,
       None, block_table)


@pytest.mark.parametrize("quant", [QUANT_FP8, QUANT_NONE])
def test_compress_kv_reference_model1_cache_equals_fp8_sim_of_bf16_entries(quant):
    d, m, lens = 512, 4, [13, 9]
    p = _compress_problem(d, m, lens, seed=4)
    q = {k: v.clone() for k, v in p.items()}
    dense = torch.zeros(2, 4, d, dtype=torch.bfloat16)
    _compress(compress_kv_reference, p, m, QUANT_FP8, dense)     # the quant_sim values
    pool = kc.allocate(kc.MODEL1, 2, 4, d)
    _compress(compress_kv_reference, q, m, quant, pool)
    assert torch.equal(kc.read_pool(pool, d), dense)
    assert torch.equal(q["skv"], p["skv"]) and torch.equal(q["ssc"], p["ssc"])


def test_compress_kv_reference_indexer_cache_paged():
    d, m, lens = 128, 4, [30, 7]
    p = _compress_problem(d, m, lens, seed=5)
    q = {k: v.clone() for k, v in p.items()}
    dense = torch.zeros(2, 8, d, dtype=torch.bfloat16)
    _compress(compress_kv_reference, p, m, QUANT_FP4_HADAMARD, dense)
    pool = kc.allocate(kc.INDEXER, 5, 3, d)
    table = torch.tensor([[4, 0, 2], [1, 3, -1]], dtype=torch.int32)
    _compress(compress_kv_reference, q, m, QUANT_FP4_HADAMARD, pool, table)
    deq = kc.read_pool(pool, d)
    for b, n in enumerate(lens):
        for k in range(n // m):
            assert torch.equal(deq[table[b, k // 3], k % 3], dense[b, k]), (b, k)


def test_compress_kv_rejects_bad_fp8_caches():
    p = _compress_problem(512, 4, [5], seed=6)
    with pytest.raises((ValueError, RuntimeError), match="MODEL1"):
        _compress(torch.ops.dsv4.compress_kv, p, 4, QUANT_FP8,
                  torch.zeros(1, 4, 600, dtype=torch.uint8))
    with pytest.raises((ValueError, RuntimeError), match="quant 0 or 1"):
        _compress(torch.ops.dsv4.compress_kv, p, 4, QUANT_FP4_HADAMARD,
                  kc.allocate(kc.MODEL1, 1, 4, 512))


# ---------------------------------------------------------------------------------------------
# CUDA: the kernel writes the same bytes as the reference
# ---------------------------------------------------------------------------------------------
def _to(p, device):
    return {k: v.to(device) for k, v in p.items()}


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("d,m,quant,fmt,bs", [
    (512, 4, QUANT_FP8, kc.MODEL1, 3), (512, 128, QUANT_FP8, kc.MODEL1, 2),
    (512, 4, QUANT_NONE, kc.MODEL1, 64), (128, 4, QUANT_FP4_HADAMARD, kc.INDEXER, 5),
    (64, 4, QUANT_FP4_HADAMARD, kc.INDEXER, 64), (128, 4, QUANT_NONE, kc.INDEXER, 7)])
@pytest.mark.parametrize("max_seqlen_kind", ["prefill", "decode"])
def test_cuda_compress_kv_fp8_cache_matches_reference(d, m, quant, fmt, bs, max_seqlen_kind):
    lens = [300, 1, 131] if max_seqlen_kind == "prefill" else [1, 1, 1]
    p = _compress_problem(d, m, lens, seed=d + m + bs)
    if max_seqlen_kind == "decode":   # positions that complete a block
        p["starts"] = torch.tensor([m - 1, 2 * m - 1, 7 * m - 1], dtype=torch.int32)
        p["skv"].normal_()
        p["ssc"].normal_()
    n_entries = [(int(s) + n) // m for s, n in zip(p["starts"], lens)]
    max_blocks = max(n_entries) // bs + 1
    table, nb = scattered_tables([max_blocks * bs] * 3, bs, max_blocks, seed=bs)
    ref_pool = kc.allocate(fmt, nb, bs, d)
    ker_pool = kc.allocate(fmt, nb, bs, d, device="cuda")
    ker_pool.fill_(0xAB)              # poison
    ref_pool.fill_(0xAB)
    ref = {k: v.clone() for k, v in p.items()}
    _compress(compress_kv_reference, ref, m, quant, ref_pool, table)
    ker = _to(p, "cuda")
    _compress(torch.ops.dsv4.compress_kv, ker, m, quant, ker_pool, table.cuda())
    torch.cuda.synchronize()
    assert torch.equal(ker["skv"].cpu(), ref["skv"]) and torch.equal(ker["ssc"].cpu(), ref["ssc"])
    got = kc.read_pool(ker_pool.cpu(), d).float()
    want = kc.read_pool(ref_pool, d).float()
    # Entries written by both: equal within the compress_kv rounding rule (one bf16 / FP8 step
    # at an fp32 last-bit flip); unwritten bytes untouched (0xAB) in both.
    assert torch.equal(ker_pool.cpu() == 0xAB, ref_pool == 0xAB)
    err = (got - want).abs()
    step = want.abs() * 2.0 ** -3 + 2.0 ** -20
    assert bool((err <= step).all()), err.max()
    assert (err == 0).float().mean().item() > 0.99


def test_dsv4_info_bytes_describe_this_cache():
    """`dsv4 info` (model_info) counts the entry sizes this module stores."""
    from dsv4.config import ModelConfig
    from dsv4.model_info import indexer_key_bytes, kv_entry_bytes
    for cfg in (ModelConfig.flash(), ModelConfig.pro()):
        assert kv_entry_bytes(cfg, "fp8") == kc.entry_bytes(kc.MODEL1, cfg.head_dim)
        assert indexer_key_bytes(cfg, "fp8") == kc.entry_bytes(kc.INDEXER, cfg.index_head_dim)
        assert kv_entry_bytes(cfg, "bf16") == kc.bytes_per_entry(torch.bfloat16, cfg.head_dim)


def test_paged_rows_against_a_loop():
    """kv_cache.paged_rows (the block-table addressing of every paged store) against a plain
    loop: missing blocks (-1), ids past num_blocks, entries past the table and s = -1 give -1."""
    g = torch.Generator().manual_seed(3)
    R, M, bs, nb = 4, 5, 3, 9
    table = torch.randint(-1, nb + 2, (R, M), generator=g, dtype=torch.int32)
    rows = torch.randint(0, R, (6, 1), generator=g)
    s = torch.randint(-1, M * bs + 4, (6, 7), generator=g)
    got = kc.paged_rows(table, rows, s, bs, nb)
    for t in range(6):
        for k in range(7):
            e, r = int(s[t, k]), int(rows[t, 0])
            b = int(table[r, e // bs]) if 0 <= e < M * bs else -1
            want = b * bs + e % bs if 0 <= b < nb else -1
            assert int(got[t, k]) == want, (t, k)
    assert got.dtype == torch.int64
    # without num_blocks only negative ids are missing; an empty table has no entries
    assert (kc.paged_rows(table, rows, s, bs) >= got).all()
    assert (kc.paged_rows(table[:, :0], rows, s, bs) == -1).all()


def test_paged_rows_in_two_halves_and_in_int32():
    """block_starts (once per table) + paged_rows_from (per lookup) is paged_rows; with int32
    starts and int32 entry indices (a CSA layer's picks, the kernels' index dtype) the rows
    are the same values in int32, also for other negative s and entries far past the table."""
    g = torch.Generator().manual_seed(4)
    R, M, bs, nb = 3, 4, 5, 7
    table = torch.randint(-1, nb + 2, (R, M), generator=g, dtype=torch.int32)
    rows = torch.randint(0, R, (8, 1), generator=g)
    s = torch.randint(-3, M * bs + 2 * bs, (8, 6), generator=g, dtype=torch.int32)
    want = kc.paged_rows(table, rows, s, bs, nb)
    starts = kc.block_starts(table, bs, nb, dtype=torch.int32)
    assert starts.shape == (R, M + 1) and (starts[:, -1] == -1).all()
    got = kc.paged_rows_from(starts, rows.int(), s, bs)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    assert torch.equal(kc.paged_rows_from(kc.block_starts(table, bs, nb), rows, s.long(), bs),
                       want)
    assert ((s < 0) <= (want == -1)).all() and (want[s >= M * bs] == -1).all()
