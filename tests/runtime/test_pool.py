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
