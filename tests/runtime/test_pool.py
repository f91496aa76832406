"""The runtime's block pool and slots (dsv4.runtime.pool): allocation, freeing, exhaustion,
fragmentation, sizes."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.runtime.pool import BlockAllocator, PagedCache, PoolExhausted, blocks_needed


def test_allocate_free_and_exhaustion():
    a = BlockAllocator(5)
    assert a.allocate(2) == [0, 1] and a.num_free == 3
    b = a.allocate(3)
    assert b == [2, 3, 4] and a.num_free == 0
    with pytest.raises(PoolExhausted, match="0 free blocks of 5; 1 requested"):
        a.allocate(1)
    a.free([3, 0])
    assert a.num_free == 2 and a.allocate(2) == [0, 3]     # lowest free ids first
    with pytest.raises(ValueError, match="not allocated"):
        a.free([0, 0])
    assert a.num_free == 0                                  # the bad free changed nothing
    with pytest.raises(ValueError, match="not allocated"):
        a.free([7])
    with pytest.raises(PoolExhausted):
        a.allocate(1)


@pytest.mark.parametrize("ids", [[True], [1.0], 5, "ab", [None]])
def test_free_takes_integer_ids_only(ids):
    """free([True]) / free([1.0]) freed block 1, and allocate() then handed out True / 1.0 as
    block ids; free(5) was a TypeError from list()."""
    a = BlockAllocator(4)
    a.allocate(2)
    with pytest.raises(ValueError, match=r"free: ids must be a sequence of block ids"):
        a.free(ids)
    assert a.num_free == 2 and a.allocate(2) == [2, 3]
    a.free(torch.tensor([0, 1]))                            # a tensor of ids is a sequence
    assert a.allocate(2) == [0, 1]


def test_fragmented_pool_serves_any_request():
    """Blocks freed out of order (holes between live ones) serve a request as well as a fresh
    pool: there is no external fragmentation with fixed-size blocks."""
    a = BlockAllocator(8)
    tables = [a.allocate(2) for _ in range(4)]              # [0,1] [2,3] [4,5] [6,7]
    a.free(tables[0])
    a.free(tables[2])
    assert sorted(a.allocate(4)) == [0, 1, 4, 5]


def test_paged_cache_shapes_and_slots():
    cfg = dsv4.ModelConfig.tiny()                           # ratios 0, 4, 16, 4 (+ MTP)
    c = PagedCache(cfg, max_seqs=3, num_blocks=6, block_tokens=32, dtype=torch.float32,
                   device="cpu")
    csa, hca, swa = c.layers[1], c.layers[2], c.layers[0]
    assert swa.window.shape == (4, cfg.window_size, cfg.head_dim) and swa.compressor is None
    # 6 blocks + the scratch block; 32 tokens = 8 CSA entries, 2 HCA entries (ratio 16)
    assert csa.compressor.entries.shape == (7, 8, cfg.head_dim)
    assert csa.indexer.entries.shape == (7, 8, cfg.index_head_dim)
    assert hca.compressor.entries.shape == (7, 2, cfg.head_dim)
    assert csa.compressor.kv.shape == (4, 8, 2 * cfg.head_dim)           # slots + scratch
    assert c.scratch_slot == 3 and len(c.layers) == cfg.n_layers
    assert c.bytes == PagedCache.estimate_bytes(cfg, 3, 6, 32, torch.float32)
    assert [c.take_slot() for _ in range(3)] == [0, 1, 2] and c.num_free_slots == 0
    with pytest.raises(RuntimeError, match="no free sequence slot"):
        c.take_slot()
    c.release_slot(1)
    with pytest.raises(ValueError, match="not in use"):
        c.release_slot(1)
    with pytest.raises(ValueError, match="multiple of every compress ratio"):
        PagedCache(cfg, 1, 1, 24, torch.float32, "cpu")
    for slot in (False, "a", 1.0):
        with pytest.raises(ValueError, match="release_slot: slot must be an integer"):
            c.release_slot(slot)
    assert c.num_free_slots == 1
    for dtype in (torch.float16, torch.int32):
        with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
            PagedCache(cfg, 1, 1, 32, dtype, "cpu")
    with pytest.raises(RuntimeError, match=r"the runtime cache \(2 slots, 1000000000000000 "
                                           r"blocks .* does not fit on cpu"):
        PagedCache(cfg, 2, 10 ** 15, 32, torch.float32, "cpu")


def test_taking_a_slot_clears_its_state():
    cfg = dsv4.ModelConfig.tiny()
    c = PagedCache(cfg, 2, 2, 16, torch.float32, "cpu")
    s = c.take_slot()
    c.layers[1].window[s] = 1.0
    c.layers[1].compressor.score[s] = 2.0
    c.release_slot(s)
    assert c.take_slot() == s
    assert not c.layers[1].window[s].any()
    assert torch.isneginf(c.layers[1].compressor.score[s]).all()


def test_grow_and_blocks_needed():
    cfg = dsv4.ModelConfig.tiny()
    c = PagedCache(cfg, 2, 3, 16, torch.float32, "cpu")
    assert [blocks_needed(cfg, n, 16) for n in (0, 1, 16, 17, 48)] == [0, 1, 1, 2, 3]
    t: list[int] = []
    assert c.grow(t, 17) == [0, 1] and t == [0, 1]
    assert c.grow(t, 30) == [] and t == [0, 1]
    assert c.grow(t, 49) is None and t == [0, 1]              # 4 blocks > pool: unchanged
    swa_only = dsv4.ModelConfig.tiny(compress_ratios=(0, 0, 0, 0, 0))
    assert blocks_needed(swa_only, 10 ** 6, 16) == 0


def test_fp8_indexer_keys_pool():
    from dsv4.ops import kv_cache
    cfg = dsv4.ModelConfig.tiny()
    c = PagedCache(cfg, 2, 5, 32, torch.bfloat16, "cpu", indexer_cache="fp8")
    idx = c.layers[1].indexer.entries
    assert idx.dtype == torch.uint8 and idx.shape == (6, 8, cfg.index_head_dim + 4)
    assert c.layers[1].compressor.entries.dtype == torch.bfloat16
    assert c.bytes == PagedCache.estimate_bytes(cfg, 2, 5, 32, torch.bfloat16, "fp8")
    per_block = PagedCache.block_bytes(cfg, 32, torch.bfloat16, "fp8")
    # two CSA layers (8 bf16 entries + 8 FP8 keys each), one HCA layer (2 bf16 entries)
    assert per_block == (2 * (8 * cfg.head_dim * 2
                              + kv_cache.block_bytes(kv_cache.INDEXER, 8, cfg.index_head_dim))
                         + 2 * cfg.head_dim * 2)
    with pytest.raises(ValueError, match="indexer_cache must be"):
        PagedCache(cfg, 2, 5, 32, torch.bfloat16, "cpu", indexer_cache="fp4")


def _cfg512(**kw):
    """The tiny config at the release's attention head (head_dim 512 = 448 nope + 64 RoPE),
    the only one the FP8 MODEL1 KV layout takes."""
    return dsv4.ModelConfig.tiny(head_dim=512, **kw)


def test_fp8_kv_cache_pool():
    """kv_cache="fp8": every window ring and CSA / HCA entry store is a MODEL1 pool (584 bytes
    per entry, blocks padded to a multiple of 576 bytes as FlashMLA allocates them); the bytes
    the pool reports are its allocation; the indexer keys keep their own format."""
    from dsv4.ops import kv_cache
    cfg = _cfg512()
    c = PagedCache(cfg, 2, 5, 32, torch.bfloat16, "cpu", kv_cache="fp8")
    assert c.kv_cache == "fp8"
    for lc in c.layers:
        assert lc.kv_fp8 and lc.window.dtype == torch.uint8
        assert lc.window.shape == (3, cfg.window_size, 584)
        assert lc.window.stride(0) == 17 * 576        # a ring of 16 x 584 = 9344 B, padded
    csa, hca = c.layers[1], c.layers[2]
    assert csa.compressor.entries.shape == (6, 8, 584)
    assert hca.compressor.entries.shape == (6, 2, 584)
    assert csa.indexer.entries.dtype == torch.bfloat16
    # by hand: 8 entries x 584 = 4672 B -> 9 x 576 = 5184; 2 x 584 = 1168 -> 3 x 576 = 1728;
    # a ring of 16 x 584 = 9344 B -> 17 x 576 = 9792
    assert kv_cache.block_bytes(kv_cache.MODEL1, 8, 512) == 5184
    per_block = PagedCache.block_bytes(cfg, 32, torch.bfloat16, "bf16", "fp8")
    assert per_block == 2 * (5184 + 8 * cfg.index_head_dim * 2) + 1728
    state = 2 * (8 * 2 * 512 + 8 * 2 * 64) * 4 * 2 + 2 * 16 * 512 * 4  # CSA x2 (+keys), HCA
    assert PagedCache.slot_bytes(cfg, torch.bfloat16, "fp8") == 4 * 9792 + state
    assert c.bytes == PagedCache.estimate_bytes(cfg, 2, 5, 32, torch.bfloat16, "bf16", "fp8")
    assert per_block < PagedCache.block_bytes(cfg, 32, torch.bfloat16)   # 14,144 vs 20,480
    both = PagedCache(cfg, 2, 5, 32, torch.bfloat16, "cpu", indexer_cache="fp8", kv_cache="fp8")
    assert both.layers[1].indexer.entries.shape[-1] == cfg.index_head_dim + 4
    assert both.bytes == PagedCache.estimate_bytes(cfg, 2, 5, 32, torch.bfloat16, "fp8", "fp8")


def test_fp8_ring_round_trip_and_reset():
    """write_ring quantises (kv_cache.pack), ring_keys dequantises: exactly fp8_e4m3_sim of the
    nope dims in blocks of 64 and the bf16 RoPE dims; stored_keys is the same round trip; a
    new slot's ring reads back as zeros."""
    from dsv4.ops.quant import fp8_e4m3_sim
    cfg = _cfg512()
    c = PagedCache(cfg, 2, 5, 32, torch.bfloat16, "cpu", kv_cache="fp8")
    lc = c.layers[0]
    g = torch.Generator().manual_seed(0)
    keys = (torch.randn(5, 512, generator=g) * 3).to(torch.bfloat16)
    s = c.take_slot()
    lc.write_ring(s, torch.tensor([3, 0, 15, 7, 8]), keys)
    want = torch.cat([fp8_e4m3_sim(keys[:, :448], 64), keys[:, 448:]], -1)
    got = lc.ring_keys(s)
    assert got.dtype == torch.bfloat16 and got.shape == (16, 512)
    assert torch.equal(got[[3, 0, 15, 7, 8]], want)
    assert not got[[1, 2, 4]].any() and not (want == keys).all()
    assert torch.equal(lc.stored_keys(keys), want)
    assert torch.equal(lc.stored_keys(want), want)          # idempotent on simulated keys
    assert not lc.ring_keys(1 - s).any()                     # the other slot is untouched
    c.release_slot(s)
    assert c.take_slot() == s and not lc.ring_keys(s).any()


def test_kv_cache_argument_is_checked_before_allocation(monkeypatch):
    from dsv4.ops import backend
    from dsv4.runtime.pool import check_kv_cache
    with pytest.raises(ValueError, match="kv_cache must be 'bf16'"):
        PagedCache(_cfg512(), 2, 5, 32, torch.bfloat16, "cpu", kv_cache="fp4")
    with pytest.raises(ValueError, match="head_dim 512 with rope_head_dim 64.*head_dim 128"):
        PagedCache(dsv4.ModelConfig.tiny(), 2, 5, 32, torch.bfloat16, "cpu", kv_cache="fp8")
    with pytest.raises(ValueError, match="rope_head_dim 32"):
        check_kv_cache(_cfg512(rope_head_dim=32, quant_sim=False), "fp8", "cpu")
    # CUDA device of another generation: refused with the cuda backend, fine with reference
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(backend, "_backend", "cuda")
    with pytest.raises(ValueError, match="sm_90 GPUs.*sm_80"):
        check_kv_cache(_cfg512(), "fp8", "cuda")
    check_kv_cache(_cfg512(), "bf16", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_kv_cache(_cfg512(), "fp8", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (10, 0))
    monkeypatch.setattr(backend, "_backend", "reference")
    check_kv_cache(_cfg512(), "fp8", "cuda")
