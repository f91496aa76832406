"""Inference state of sequences (architecture.md §4.5, §11.1).

Per layer (main layers then MTP layers) a :class:`LayerCache` holds, for each cache *slot*
(one sequence):

* ``window``: the sliding-window ring buffer [slots, window_size, head_dim]; token position p
  lives at ring slot ``p % window_size``.
* ``compressor`` (CSA/HCA layers) and ``indexer`` (CSA layers): a :class:`CompressorState` with
  the fp32 partial-block state (``kv``/``score`` [slots, coff·ratio, coff·head_dim], score
  initialised to −inf) and the store of emitted compressed entries. Entry j of a sequence is
  valid iff ``j < length // ratio``.

The entry store is either *dense*, [slots, capacity, head_dim] with entry j of slot s at
``entries[s, j]`` (grown by :meth:`CompressorState.reserve`; what :class:`Cache` and
``dsv4.Model`` use), or *paged*, a pool [num_blocks, block_size, head_dim] shared by all slots,
entry j of a sequence at ``entries[table[j // block_size], j % block_size]`` through the
sequence's block table (what ``dsv4.runtime`` uses; docs/contracts.md §A). A dense store is the
paged layout with one block per slot (``table = [slot]``, ``block_size = capacity``), so the
layers address both the same way.

:class:`Cache` is the public cache of ``dsv4.Model``: ``lengths[b]`` is the number of tokens of
row b already processed. Rows are independent: resetting one row (a new request in that batch
slot) clears exactly that row's state, including the "previous block" rows of the overlapping
compressor that the reference never clears (§15). Every public method validates all of its
arguments before it changes anything.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

__all__ = ["Cache", "LayerCache", "CompressorState", "CacheRowError", "as_int", "check_count"]


class CacheRowError(RuntimeError):
    """A cache row is unusable: a call that was advancing it failed midway (reset it)."""


def as_int(value, name: str, expected: str) -> int:
    """``value`` as a python int; ``ValueError("{name} must be {expected}, got {value!r}")``
    otherwise.

    Accepts ints and integer-like objects (``operator.index``: numpy / 0-d torch integers);
    rejects bools, floats (also 2.0), strings and everything else.
    """
    if not isinstance(value, (bool, str, bytes, float)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_count(value, name: str, minimum: int = 1) -> int:
    """``value`` as a python int >= ``minimum`` (:func:`as_int`); ValueError naming ``name``
    otherwise."""
    v = as_int(value, name, f"an integer >= {minimum}")
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v}")
    return v


class CompressorState:
    """Compressor state and compressed-entry store for one layer and a set of slots.

    ``CompressorState(slots, ratio, head_dim, dtype, device)`` makes a dense store (capacity 0,
    grown by :meth:`reserve`); with ``num_blocks`` and ``block_size`` a paged pool of that many
    blocks, allocated once.
    """

    def __init__(self, batch: int, ratio: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, num_blocks: Optional[int] = None,
                 block_size: Optional[int] = None, fp8_format: Optional[str] = None):
        self.ratio = ratio
        self.overlap = ratio == 4
        self.head_dim = head_dim
        self.dtype = dtype
        coff = 2 if self.overlap else 1
        self.kv = torch.zeros(batch, coff * ratio, coff * head_dim, dtype=torch.float32,
                              device=device)
        self.score = torch.full_like(self.kv, float("-inf"))
        self.paged = num_blocks is not None
        if fp8_format is not None and not self.paged:
            raise ValueError("FP8 entry stores are paged pools (pass num_blocks)")
        if fp8_format is not None:
            # dsv4.ops.kv_cache: MODEL1 (584-byte attention entries, head_dim 512) or FP8
            # indexer keys (DeepGEMM's 132-byte layout at head_dim 128)
            from .ops import kv_cache
            self.entries = kv_cache.allocate(fp8_format, num_blocks, block_size, head_dim,
                                             device)
        elif self.paged:
            self.entries = torch.zeros(num_blocks, block_size, head_dim, dtype=dtype,
                                       device=device)
        else:
            self.entries = torch.zeros(batch, 0, head_dim, dtype=dtype, device=device)

    @property
    def block_size(self) -> int:
        """Entries per block (a dense store: its capacity per slot)."""
        return self.entries.shape[1]

    def reserve(self, n_entries: int) -> None:
        """Grow a dense store (doubling) so that it holds at least ``n_entries`` per slot."""
        if self.paged:
            raise RuntimeError("a paged entry store is allocated once; its blocks are "
                               "assigned through block tables")
        cap = self.entries.shape[1]
        if n_entries <= cap:
            return
        new = torch.zeros(self.entries.shape[0], max(n_entries, 2 * cap), self.entries.shape[2],
                          dtype=self.entries.dtype, device=self.entries.device)
        new[:, :cap] = self.entries
        self.entries = new

    def row_entries(self, slot: int, block_table: Optional[list[int]], n: int) -> torch.Tensor:
        """Entries 0 … n−1 of the sequence in ``slot`` [n, head_dim] (a copy when paged)."""
        if not self.paged:
            return self.entries[slot, :n]
        bs = self.block_size
        need = -(-n // bs)
        if block_table is None or len(block_table) < need or min(block_table[:need],
                                                                   default=0) < 0:
            raise RuntimeError(f"slot {slot}: {n} entries need {need} blocks of {bs}, the "
                               f"block table holds {block_table}")
        dev = self.entries.device
        if self.entries.dtype == torch.uint8:      # an FP8 pool: dequantise the n entries
            from .ops import kv_cache
            s = torch.arange(n, device=dev)
            blocks = torch.tensor(block_table[:need], dtype=torch.long, device=dev)[s // bs]
            return kv_cache.read_entries(self.entries, blocks, s % bs, self.head_dim,
                                         self.dtype)
        blocks = torch.tensor(block_table[:need], dtype=torch.long, device=dev)
        return self.entries[blocks].flatten(0, 1)[:n]

    def reset_rows(self, rows: list[int] | slice) -> None:
        """Clear the partial-block state of ``rows`` (and their dense entries)."""
        self.kv[rows] = 0.0
        self.score[rows] = float("-inf")
        if not self.paged:
            self.entries[rows] = 0


class LayerCache:
    """Window ring buffer plus the optional compressor / indexer states of one layer.

    ``block_tokens`` (with ``num_blocks``) makes the entry stores paged: a block holds the
    entries of ``block_tokens`` consecutive tokens, i.e. ``block_tokens // ratio`` entries.
    ``indexer_fp8`` stores the indexer keys of a paged CSA layer in FP8 (132 bytes per key at
    head dim 128, :mod:`dsv4.ops.kv_cache`; exact for quant_sim's FP4-simulated keys).
    ``kv_fp8`` stores the attention KV, the window ring AND the compressed entries (paged
    only), in the release's FP8 MODEL1 layout (584 bytes per entry: 448 e4m3 nope dims with a
    UE8M0 scale per 64, 64 bf16 RoPE dims; head_dim 512, rope_dim 64 only). The ring is then a
    MODEL1 pool ``uint8 [slots, window_size, 584]`` (one block per slot, flat row
    ``slot·window_size + p % window_size`` as for the bf16 ring); it stores exactly
    ``fp8_e4m3_sim`` of the nope dims in blocks of 64, i.e. what ``quant_sim`` computes (§3.3),
    and the RoPE dims rounded to bf16. Read it with :meth:`ring_keys`, write it with
    :meth:`write_ring`.
    """

    def __init__(self, batch: int, window_size: int, head_dim: int, ratio: int,
                 index_head_dim: int, dtype: torch.dtype, device: torch.device,
                 num_blocks: Optional[int] = None, block_tokens: Optional[int] = None,
                 indexer_fp8: bool = False, kv_fp8: bool = False):
        from .ops import kv_cache
        self.dtype = dtype
        self.kv_fp8 = bool(kv_fp8)
        if self.kv_fp8:
            if ratio and num_blocks is None:
                raise ValueError("an FP8 attention KV cache keeps its compressed entries in a "
                                 "paged pool (pass num_blocks and block_tokens)")
            self.window = kv_cache.allocate(kv_cache.MODEL1, batch, window_size, head_dim,
                                            device)
        else:
            self.window = torch.zeros(batch, window_size, head_dim, dtype=dtype, device=device)
        self.compressor: Optional[CompressorState] = None
        self.indexer: Optional[CompressorState] = None
        paged = {}
        if num_blocks is not None and ratio:
            if block_tokens % ratio:
                raise ValueError(f"block_tokens {block_tokens} must be a multiple of every "
                                 f"compress ratio (got ratio {ratio})")
            paged = dict(num_blocks=num_blocks, block_size=block_tokens // ratio)
        if ratio:
            self.compressor = CompressorState(
                batch, ratio, head_dim, dtype, device, **paged,
                fp8_format=kv_cache.MODEL1 if self.kv_fp8 else None)
        if ratio == 4:
            self.indexer = CompressorState(
                batch, ratio, index_head_dim, dtype, device, **paged,
                fp8_format=kv_cache.INDEXER if indexer_fp8 else None)

    # ------------------------------------------------------------------ the window ring
    def ring_keys(self, slot: int) -> torch.Tensor:
        """The window ring of ``slot`` as keys [window_size, head_dim] (ring slot i holds the
        latest position p with p % window_size == i): the bf16 ring itself (a view), or the
        FP8 ring dequantised (a copy, exact; :func:`dsv4.ops.kv_cache.read_pool`)."""
        if not self.kv_fp8:
            return self.window[slot]
        from .ops import kv_cache
        return kv_cache.read_pool(self.window[slot:slot + 1], self.window_head_dim,
                                  self.dtype)[0]

    def write_ring(self, slot: int, ring_slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Store ``keys`` [n, head_dim] at ring slots ``ring_slots`` [n] (distinct) of
        ``slot``; an FP8 ring quantises them (:func:`dsv4.ops.kv_cache.write_entries`)."""
        if not self.kv_fp8:
            self.window[slot, ring_slots] = keys
            return
        from .ops import kv_cache
        kv_cache.write_entries(self.window, torch.full_like(ring_slots, slot), ring_slots, keys)

    def stored_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys`` [..., head_dim] as this cache stores them: unchanged for a bf16 cache, the
        MODEL1 round trip for an FP8 one (:func:`dsv4.ops.kv_cache.pack` then ``unpack``; the
        identity on keys that ``quant_sim`` has already FP8-simulated)."""
        if not self.kv_fp8:
            return keys
        from .ops import kv_cache
        return kv_cache.unpack(kv_cache.MODEL1, kv_cache.pack(kv_cache.MODEL1, keys),
                               keys.dtype)

    @property
    def window_head_dim(self) -> int:
        """head_dim of the ring's keys (512 for an FP8 ring)."""
        if self.kv_fp8:
            from .ops import kv_cache
            return kv_cache.MODEL1_HEAD_DIM
        return self.window.shape[-1]

    def reset_rows(self, rows: list[int] | slice) -> None:
        self.window[rows] = 0       # (zero bytes of an FP8 ring decode to zero keys)
        for st in (self.compressor, self.indexer):
            if st is not None:
                st.reset_rows(rows)


class Cache:
    """Decode state of ``batch_size`` independent sequences; made by ``Model.make_cache``.

    ``lengths[b]`` (python ints, host side) counts the tokens of row b processed by the main
    layers; ``mtp_lengths[b]`` those processed by the MTP layers. Stores are dense (one block
    per row, grown as needed).

    If a call fails while it is advancing some rows (an exception or Ctrl-C inside a layer),
    those rows are marked unusable: later calls that feed them raise :class:`CacheRowError`
    until ``reset`` clears them (their state would otherwise silently give wrong logits).
    """

    def __init__(self, config, batch_size: int, dtype: torch.dtype, device: torch.device):
        batch_size = check_count(batch_size, "batch_size")
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.lengths = [0] * batch_size
        self.mtp_lengths = [0] * batch_size
        self.broken: dict[int, str] = {}
        n = config.n_layers + config.n_mtp_layers
        self.layers = [
            LayerCache(batch_size, config.window_size, config.head_dim, config.compress_ratios[i],
                       config.index_head_dim, dtype, device)
            for i in range(n)
        ]

    def _rows_arg(self, rows) -> list[int]:
        """Validate ``reset``'s argument completely; return the rows as python ints."""
        if rows is None:
            return list(range(self.batch_size))
        what = ("rows must be a sequence of row indices (ints in [0, "
                f"{self.batch_size})) or None for all rows")
        if isinstance(rows, (str, bytes, bool, int, float)) or (
                isinstance(rows, torch.Tensor) and rows.dim() != 1):
            raise TypeError(f"{what}; got {rows!r}")
        if isinstance(rows, torch.Tensor):
            if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
                raise TypeError(f"{what}; got a {rows.dtype} tensor")
            rows = rows.tolist()
        try:
            items = list(rows)
        except TypeError:
            raise TypeError(f"{what}; got {rows!r}") from None
        out = []
        for r in items:
            if isinstance(r, (bool, str, bytes, float)) or (
                    isinstance(r, torch.Tensor) and (r.dim() or r.dtype.is_floating_point)):
                raise TypeError(f"{what}; got element {r!r}")
            try:
                v = operator.index(r)
            except TypeError:
                raise TypeError(f"{what}; got element {r!r}") from None
            if not 0 <= v < self.batch_size:
                raise IndexError(f"row {v} out of range for a cache of batch {self.batch_size}")
            out.append(v)
        return out

    def reset(self, rows=None) -> None:
        """Forget the sequences in ``rows`` (all rows by default) so the slots start afresh;
        also clears the unusable mark of a row whose last call failed.

        Args:
            rows: None, or a sequence (list, tuple, range, 1-D integer tensor) of row indices.

        Raises:
            TypeError: ``rows`` is a string, a number, a bool, or holds a non-integer.
            IndexError: a row outside [0, batch_size).
            In both cases nothing is changed.
        """
        rows = self._rows_arg(rows)
        if not rows:
            return
        # The rows stay marked unusable until every layer is cleared: a reset interrupted
        # between layers (Ctrl-C) leaves them refused with a clear error, not half-reset.
        for r in rows:
            self.broken[r] = "cache.reset did not finish"
        for lc in self.layers:
            lc.reset_rows(rows)
        for r in rows:
            self.lengths[r] = 0
            self.mtp_lengths[r] = 0
            self.broken.pop(r, None)

    def check_usable(self, rows: list[int]) -> None:
        """Raise :class:`CacheRowError` if any of ``rows`` was left unusable by a failed call."""
        bad = [r for r in rows if r in self.broken]
        if bad:
            why = self.broken[bad[0]]
            raise CacheRowError(
                f"cache rows {bad} are unusable: an earlier call failed while advancing them "
                f"({why}); call cache.reset({bad}) and feed those sequences again")

    def mark_broken(self, rows: list[int], error: BaseException) -> None:
        """Mark ``rows`` unusable after ``error`` interrupted a call that was advancing them."""
        why = f"{type(error).__name__}: {error}"[:300]
        for r in rows:
            self.broken[r] = why
