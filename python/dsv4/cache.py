"""Inference state of a batch of sequences (architecture.md §4.5, §11.1).

One :class:`Cache` holds, per layer (main layers then MTP layers):

* ``window``: the sliding-window ring buffer [batch, window_size, head_dim]; token position p
  lives at slot ``p % window_size``.
* ``compressor`` (CSA/HCA layers) and ``indexer`` (CSA layers): a :class:`CompressorState` with
  the fp32 partial-block state (``kv``/``score`` [batch, coff·ratio, coff·head_dim], score
  initialised to −inf) and the store of emitted compressed entries [batch, capacity, head_dim]
  (entry j of a sequence is valid iff ``j < length // ratio``).

``lengths[b]`` is the number of tokens of row b already processed. Rows are independent:
resetting one row (a new request in that batch slot) clears exactly that row's state, including
the "previous block" rows of the overlapping compressor that the reference never clears (§15).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["Cache", "LayerCache", "CompressorState"]


class CompressorState:
    """Compressor state and compressed-entry store for one layer and a batch."""

    def __init__(self, batch: int, ratio: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.ratio = ratio
        self.overlap = ratio == 4
        coff = 2 if self.overlap else 1
        self.kv = torch.zeros(batch, coff * ratio, coff * head_dim, dtype=torch.float32,
                              device=device)
        self.score = torch.full_like(self.kv, float("-inf"))
        self.entries = torch.zeros(batch, 0, head_dim, dtype=dtype, device=device)

    def reserve(self, n_entries: int) -> None:
        """Grow the entry store (doubling) so that it holds at least ``n_entries`` per row."""
        cap = self.entries.shape[1]
        if n_entries <= cap:
            return
        new = torch.zeros(self.entries.shape[0], max(n_entries, 2 * cap), self.entries.shape[2],
                          dtype=self.entries.dtype, device=self.entries.device)
        new[:, :cap] = self.entries
        self.entries = new

    def reset_rows(self, rows: list[int]) -> None:
        self.kv[rows] = 0.0
        self.score[rows] = float("-inf")
        self.entries[rows] = 0


class LayerCache:
    """Window ring buffer plus the optional compressor / indexer states of one layer."""

    def __init__(self, batch: int, window_size: int, head_dim: int, ratio: int,
                 index_head_dim: int, dtype: torch.dtype, device: torch.device):
        self.window = torch.zeros(batch, window_size, head_dim, dtype=dtype, device=device)
        self.compressor: Optional[CompressorState] = None
        self.indexer: Optional[CompressorState] = None
        if ratio:
            self.compressor = CompressorState(batch, ratio, head_dim, dtype, device)
        if ratio == 4:
            self.indexer = CompressorState(batch, ratio, index_head_dim, dtype, device)

    def reset_rows(self, rows: list[int]) -> None:
        self.window[rows] = 0
        for st in (self.compressor, self.indexer):
            if st is not None:
                st.reset_rows(rows)


class Cache:
    """Decode state of ``batch_size`` independent sequences; made by ``Model.make_cache``.

    ``lengths[b]`` (python ints, host side) counts the tokens of row b processed by the main
    layers; ``mtp_lengths[b]`` those processed by the MTP layers.
    """

    def __init__(self, config, batch_size: int, dtype: torch.dtype, device: torch.device):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.lengths = [0] * batch_size
        self.mtp_lengths = [0] * batch_size
        n = config.n_layers + config.n_mtp_layers
        self.layers = [
            LayerCache(batch_size, config.window_size, config.head_dim, config.compress_ratios[i],
                       config.index_head_dim, dtype, device)
            for i in range(n)
        ]

    def reset(self, rows: Optional[Iterable[int]] = None) -> None:
        """Forget the sequences in ``rows`` (all rows by default) so the slots start afresh.

        Raises IndexError for a row outside [0, batch_size).
        """
        rows = list(range(self.batch_size)) if rows is None else [int(r) for r in rows]
        for r in rows:
            if not 0 <= r < self.batch_size:
                raise IndexError(f"row {r} out of range for a cache of batch {self.batch_size}")
            self.lengths[r] = 0
            self.mtp_lengths[r] = 0
        for lc in self.layers:
            lc.reset_rows(rows)
