"""The runtime's caches, allocated once: window rings and compressor state per sequence slot,
compressed entries in a paged block pool (docs runtime.md "Caches allocated once";
docs/contracts.md §A).

A *block* holds the compressed entries of ``block_tokens`` consecutive tokens of one sequence
in every compressed store of every layer: ``block_tokens // 4`` CSA entries and as many indexer
keys, ``block_tokens // 128`` HCA entries (``block_tokens`` is a multiple of every compress
ratio). A sequence of L tokens owns ``ceil(L / block_tokens)`` blocks, listed in its block
table; block ids come from one free list, so a 1M-token sequence and many short ones share the
pool and a freed block serves any sequence next.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..argtypes import int_sequence
from ..cache import LayerCache, as_int, check_count

__all__ = ["BlockAllocator", "PagedCache", "PoolExhausted", "blocks_needed", "check_cache_formats",
           "check_kv_cache"]

KV_CACHE_FORMATS = ("bf16", "fp8")


def check_cache_formats(config, indexer_cache: str, kv_cache: str,
                        device: torch.device | str) -> None:
    """Check both storage options of the pool (``indexer_cache``: 'bf16' or 'fp8'; ``kv_cache``:
    :func:`check_kv_cache`). Raises ValueError naming what is accepted."""
    if indexer_cache not in ("bf16", "fp8"):
        raise ValueError(f"indexer_cache must be 'bf16' (the model dtype) or 'fp8', got "
                         f"{indexer_cache!r}")
    check_kv_cache(config, kv_cache, device)


def check_kv_cache(config, kv_cache: str, device: torch.device | str) -> None:
    """Check that the attention KV can be stored as ``kv_cache`` for ``config`` on ``device``.

    ``"bf16"`` (the model dtype) always can. ``"fp8"`` is the release's MODEL1 layout
    (:mod:`dsv4.ops.kv_cache`, FlashMLA's V4 format): head_dim 512 = 448 nope + 64 RoPE dims
    only; on a CUDA device with the ``"cuda"`` backend the attention kernels read FP8 scopes
    only on sm_90 (H100 / H200), so another GPU must use ``kv_cache="bf16"`` or the
    ``"reference"`` backend (whose layers dequantise the cache, on any device).

    Raises ValueError naming what is accepted (checked before anything is allocated).
    """
    if kv_cache not in KV_CACHE_FORMATS:
        raise ValueError(f"kv_cache must be 'bf16' (the model dtype) or 'fp8' (the release's "
                         f"584-byte MODEL1 layout), got {kv_cache!r}")
    if kv_cache != "fp8":
        return
    from ..ops import kv_cache as fmt
    if config.head_dim != fmt.MODEL1_HEAD_DIM or config.rope_head_dim != fmt.MODEL1_ROPE_DIM:
        raise ValueError(f"kv_cache='fp8' stores the release's MODEL1 layout, which takes "
                         f"head_dim {fmt.MODEL1_HEAD_DIM} with rope_head_dim "
                         f"{fmt.MODEL1_ROPE_DIM}; this model has head_dim {config.head_dim}, "
                         f"rope_head_dim {config.rope_head_dim} (use kv_cache='bf16')")
    device = torch.device(device)
    if device.type == "cuda":
        from ..ops.backend import get_backend
        cap = torch.cuda.get_device_capability(device)
        if get_backend() == "cuda" and tuple(cap) != (9, 0):
            raise ValueError(f"kv_cache='fp8': the attention kernels read FP8 (MODEL1) caches on "
                             f"sm_90 GPUs (H100 / H200) only; {device} is sm_{cap[0]}{cap[1]}. "
                             "Use kv_cache='bf16', or dsv4.set_backend('reference') (the "
                             "layers then dequantise the cache)")


def blocks_needed(config, n_tokens: int, block_tokens: int) -> int:
    """Blocks a sequence of ``n_tokens`` tokens needs (0 for a model without compressed
    layers, which keeps only its window rings)."""
    if not any(config.compress_ratios[:config.n_layers]):
        return 0
    return -(-n_tokens // block_tokens)


class PoolExhausted(RuntimeError):
    """The block pool has fewer free blocks than an allocation asked for (nothing allocated)."""


class BlockAllocator:
    """A free list of ``num_blocks`` block ids (host side; no device work).

    ``allocate(n)`` returns n ids (the lowest free ids first) or raises :class:`PoolExhausted`
    without allocating any; ``free(ids)`` returns them (double frees and foreign ids raise
    ValueError before anything changes).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = check_count(num_blocks, "num_blocks", 0)
        self._free = list(range(self.num_blocks - 1, -1, -1))   # pop() gives the lowest id
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        n = check_count(n, "n", 0)
        if n > len(self._free):
            raise PoolExhausted(f"the block pool has {len(self._free)} free blocks of "
                                f"{self.num_blocks}; {n} requested")
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        ids = int_sequence(ids, "free: ids must be a sequence of block ids (integers)")
        bad = [i for i in ids if i not in self._used]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"free: blocks {bad or ids} are not allocated (double free?)")
        for i in ids:
            self._used.remove(i)
        self._free.extend(sorted(ids, reverse=True))
        self._free.sort(reverse=True)


class PagedCache:
    """Per-layer caches of ``max_seqs`` sequence slots plus one scratch slot, and a block pool.

    Attributes:
        layers: one :class:`~dsv4.cache.LayerCache` per main layer: ``window``
            [max_seqs + 1, window_size, head_dim]; compressor / indexer state
            [max_seqs + 1, ...]; entry stores [num_blocks, block_tokens // ratio, dim]
            (FP8 stores: uint8 [..., entry_bytes] pools of :mod:`dsv4.ops.kv_cache`).
        kv_cache, indexer_cache: the formats ("bf16" or "fp8") of the attention KV and of the
            indexer keys.
        scratch_slot: the slot index ``max_seqs``, never given to a sequence (padding rows of
            a CUDA-graph batch write there). Likewise the stores hold one block more than the
            allocator hands out: the last block is scratch (see
            :func:`dsv4.layers.compressor.gather_blocks`).
        blocks: the :class:`BlockAllocator` (no blocks when the model has no compressed
            layer).
        bytes: device bytes of all tensors.

    ``indexer_cache="fp8"`` keeps the CSA layers' indexer keys in FP8 (:mod:`dsv4.ops.kv_cache`,
    132 bytes per key at head dim 128 instead of 256): exact when quant_sim has FP4-simulated
    them, an approximation otherwise.

    ``kv_cache="fp8"`` keeps the attention KV, the window rings and the CSA / HCA compressed
    entries, in the release's MODEL1 layout (584 bytes per entry at head_dim 512 instead of
    1024; :class:`~dsv4.cache.LayerCache`): exact for a bf16 model with quant_sim (which has
    FP8-simulated the nope dims in the same 64-blocks), an approximation otherwise (the nope
    dims rounded to e4m3, the RoPE dims to bf16). See :func:`check_kv_cache`.

    Raises ValueError for ``block_tokens`` that is not a multiple of every compress ratio, an
    unknown ``indexer_cache`` or a ``kv_cache`` this model / device cannot use, a ``dtype``
    other than float32 / bfloat16, and a RuntimeError naming the size when the device (GPU or
    CPU memory) cannot hold the pool.
    """

    def __init__(self, config, max_seqs: int, num_blocks: int, block_tokens: int,
                 dtype: torch.dtype, device: torch.device | str, indexer_cache: str = "bf16",
                 kv_cache: str = "bf16"):
        self.config = config
        self.max_seqs = check_count(max_seqs, "max_seqs")
        self.block_tokens = check_count(block_tokens, "block_tokens")
        ratios = sorted({r for r in config.compress_ratios[:config.n_layers] if r})
        self.has_pool = bool(ratios)
        bad = [r for r in ratios if self.block_tokens % r]
        if bad:
            raise ValueError(f"block_tokens must be a multiple of every compress ratio "
                             f"{ratios}; got {self.block_tokens}")
        self.num_blocks = check_count(num_blocks, "num_blocks", 0) if self.has_pool else 0
        check_cache_formats(config, indexer_cache, kv_cache, device)
        self.indexer_cache = indexer_cache
        self.kv_cache = kv_cache
        self.scratch_slot = self.max_seqs
        self.device = torch.device(device)
        if dtype not in (torch.float32, torch.bfloat16):   # the model's dtypes (see Model.to)
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16 (the model's), got "
                             f"{dtype}")
        self.dtype = dtype
        try:
            self.layers = [
                LayerCache(self.max_seqs + 1, config.window_size, config.head_dim,
                           config.compress_ratios[i], config.index_head_dim, dtype, self.device,
                           num_blocks=self.num_blocks + 1, block_tokens=self.block_tokens,
                           indexer_fp8=indexer_cache == "fp8", kv_fp8=kv_cache == "fp8")
                for i in range(config.n_layers)]
        except (MemoryError, RuntimeError) as e:    # (torch.OutOfMemoryError is a RuntimeError)
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) \
                    and "can't allocate memory" not in str(e):     # (the CPU allocator's words)
                raise
            need = PagedCache.estimate_bytes(config, self.max_seqs, self.num_blocks,
                                             self.block_tokens, dtype, indexer_cache, kv_cache)
            raise RuntimeError(
                f"the runtime cache ({self.max_seqs} slots, {self.num_blocks} blocks of "
                f"{self.block_tokens} tokens) does not fit on {self.device}: {need:,} bytes "
                "needed; lower max_batch, max_model_len or num_blocks") from e
        self.blocks = BlockAllocator(self.num_blocks)
        self._free_slots = list(range(self.max_seqs - 1, -1, -1))

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def block_bytes(config, block_tokens: int, dtype: torch.dtype,
                    indexer_cache: str = "bf16", kv_cache: str = "bf16") -> int:
        """Device bytes of one block across all main layers' entry stores (FP8 blocks padded
        as :func:`dsv4.ops.kv_cache.block_bytes` allocates them)."""
        from ..ops import kv_cache as fmt
        es = torch.empty((), dtype=dtype).element_size()
        total = 0
        for r in config.compress_ratios[:config.n_layers]:
            if r and kv_cache == "fp8":
                total += fmt.block_bytes(fmt.MODEL1, block_tokens // r, config.head_dim)
            elif r:
                total += (block_tokens // r) * config.head_dim * es
            if r == 4 and indexer_cache == "fp8":
                total += fmt.block_bytes(fmt.INDEXER, block_tokens // r, config.index_head_dim)
            elif r == 4:
                total += (block_tokens // r) * config.index_head_dim * es
        return total

    @staticmethod
    def slot_bytes(config, dtype: torch.dtype, kv_cache: str = "bf16") -> int:
        """Device bytes of one sequence slot (window rings + fp32 compressor state; an FP8
        ring is one padded MODEL1 block of window_size entries)."""
        from ..ops import kv_cache as fmt
        es = torch.empty((), dtype=dtype).element_size()
        total = 0
        for r in config.compress_ratios[:config.n_layers]:
            if kv_cache == "fp8":
                total += fmt.block_bytes(fmt.MODEL1, config.window_size, config.head_dim)
            else:
                total += config.window_size * config.head_dim * es
            for d in ([config.head_dim] if r else []) + ([config.index_head_dim] if r == 4 else []):
                coff = 2 if r == 4 else 1
                total += 2 * (coff * r) * (coff * d) * 4
        return total

    @staticmethod
    def estimate_bytes(config, max_seqs: int, num_blocks: int, block_tokens: int,
                       dtype: torch.dtype, indexer_cache: str = "bf16",
                       kv_cache: str = "bf16") -> int:
        return ((max_seqs + 1) * PagedCache.slot_bytes(config, dtype, kv_cache)
                + (num_blocks + 1) * PagedCache.block_bytes(config, block_tokens, dtype,
                                                            indexer_cache, kv_cache))

    @property
    def bytes(self) -> int:
        total = 0
        for lc in self.layers:
            w = lc.window       # (an FP8 ring is a strided view of padded blocks)
            total += w.shape[0] * w.stride(0) * w.element_size()
            for st in (lc.compressor, lc.indexer):
                if st is not None:
                    for t in (st.kv, st.score):
                        total += t.numel() * t.element_size()
                    e = st.entries      # (an FP8 pool is a strided view of padded blocks)
                    total += e.shape[0] * e.stride(0) * e.element_size()
        return total

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks a sequence of ``n_tokens`` tokens needs (0 without compressed layers)."""
        return blocks_needed(self.config, n_tokens, self.block_tokens)

    # ------------------------------------------------------------------ slots
    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def take_slot(self) -> int:
        """A free slot, its state cleared (window zeroed, scores −inf) by device work queued
        on the current stream (a slice, not an index list: a list would be copied to the
        device synchronously, waiting for the step in flight)."""
        if not self._free_slots:
            raise RuntimeError("no free sequence slot")
        slot = self._free_slots.pop()
        for lc in self.layers:
            lc.reset_rows(slice(slot, slot + 1))
        return slot

    def release_slot(self, slot: int) -> None:
        slot = as_int(slot, "release_slot: slot", f"an integer in [0, {self.max_seqs})")
        if slot in self._free_slots or not 0 <= slot < self.max_seqs:
            raise ValueError(f"release_slot: slot {slot} is not in use")
        self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)

    def grow(self, table: list[int], n_tokens: int) -> Optional[list[int]]:
        """Append blocks to ``table`` so that it covers ``n_tokens``; returns the new ids, or
        None (nothing changed) when the pool has too few free blocks."""
        need = self.blocks_for(n_tokens) - len(table)
        if need <= 0:
            return []
        if need > self.blocks.num_free:
            return None
        new = self.blocks.allocate(need)
        table.extend(new)
        return new
