"""Lightning Indexer: top-k selection of compressed entries for CSA layers (architecture.md §5)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..cache import CompressorState
from ..ops.indexer import indexer_topk_reference
from ..ops.qkv_rope import QUANT_FP4_HADAMARD, QUANT_NONE
from ..ops.quant import fp4_e2m1_sim, hadamard
from .compressor import (Compressor, complete_entries, gather_blocks, paged_op_available,
                         paged_op_missing)
from .linear import Linear
from .rope import apply_rope
from .varlen import StepBatch

__all__ = ["Indexer", "indexer_topk_reference"]

# The torch.ops.dsv4 namespace (CUDA kernels, references on CPU); one name to patch in tests.
_dsv4 = torch.ops.dsv4


class Indexer(nn.Module):
    """Scores the compressed entries of a CSA layer and picks ``index_topk`` per query.

    Shares the main attention's q latent ``qr``; has its own overlapping compressor (ratio 4,
    head dim ``index_head_dim``, ``rotate=True``). Parameters (official names): ``wq_b``
    [index_n_heads·index_head_dim, q_lora_rank], ``weights_proj`` [index_n_heads, dim],
    ``compressor.*``.
    """

    def __init__(self, config, compress_ratio: int):
        super().__init__()
        self.config = config
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.index_topk = config.index_topk
        self.compress_ratio = compress_ratio
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = Linear(config.dim, self.n_heads)
        self.compressor = Compressor(config, compress_ratio, self.head_dim, rotate=True)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, state: CompressorState, row: int,
                start: int, freqs: torch.Tensor, block_table: Optional[list[int]] = None,
                weights: Optional[torch.Tensor] = None,
                compressor_proj: Optional[tuple] = None) -> torch.Tensor:
        """Select entries for tokens x [n, dim] / qr [n, q_lora] of the sequence in slot
        ``row`` (per-sequence reference path; ``block_table``: its block ids when the key
        store is paged).

        Updates the indexer key store with the blocks these tokens complete, then returns
        int64 [n, index_topk] entry indices (−1 = none), causal per query (§3.5, §5).
        ``weights`` (``weights_proj(x)`` [n, index_n_heads]) and ``compressor_proj`` (its
        compressor's projections, :meth:`Compressor.forward`): the projections of x when the
        caller computed them (the attention layer, fused with its own: one GEMM per input),
        else None (computed here).
        """
        n = x.shape[0]
        pos = torch.arange(start, start + n, device=x.device)
        q, w = self.queries(qr, self.weights_proj(x) if weights is None else weights, pos,
                            freqs)
        n_entries = self.compressor(x, state, row, start, freqs, block_table, compressor_proj)
        keys = state.row_entries(row, block_table, n_entries)
        return indexer_topk_reference(q, w, keys, pos, self.compress_ratio, self.index_topk)

    def queries(self, qr: torch.Tensor, weights: torch.Tensor, pos: torch.Tensor,
                freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer queries [n, index_n_heads, index_head_dim] (RoPE'd; Hadamard + FP4 with
        quant_sim) and head weights [n, index_n_heads] fp32 (:meth:`head_weights`) for
        tokens with q latent qr [n, q_lora_rank], ``weights`` = ``weights_proj(x)``
        [n, index_n_heads], at positions ``pos`` [n] (§5)."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(q, pos[:, None], freqs)
        if self.config.quant_sim:
            q = fp4_e2m1_sim(hadamard(q), 32)
        return q, self.head_weights(weights)

    def head_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-head weights [n, index_n_heads] fp32 from ``weights`` = ``weights_proj(x)``:
        ``weights_proj(x) · d**-0.5 · H**-0.5`` (§5)."""
        return weights.float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)

    def forward_batch(self, x: torch.Tensor, qr: torch.Tensor, state: CompressorState,
                      batch: StepBatch, freqs: torch.Tensor,
                      xf: torch.Tensor | None = None, weights: Optional[torch.Tensor] = None,
                      compressor_proj: Optional[tuple] = None) -> torch.Tensor:
        """Batched path of :meth:`forward` (``x`` [T, dim], ``qr`` [T, q_lora_rank], the
        tokens of ``batch`` back to back; the query path of :meth:`queries` in one
        ``q_norm_rope`` pass). Returns int32 [T, index_topk] LOGICAL entry indices
        of each token's own sequence (−1 = none) from ``torch.ops.dsv4.indexer_topk``; a paged
        store is read through ``batch.block_table``. No host synchronisation. ``xf``: ``x.float()``
        when the caller has it (the attention layer's main compressor takes it too);
        ``weights``, ``compressor_proj``: the projections of x when the caller computed them
        (see :meth:`forward`)."""
        q = _dsv4.q_norm_rope(self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim)),
                              batch.pos, freqs, 0.0, False,
                              QUANT_FP4_HADAMARD if self.config.quant_sim else QUANT_NONE)
        w = self.head_weights(self.weights_proj(x) if weights is None else weights)
        self.compressor.forward_batch(x if xf is None else xf, state, batch, freqs,
                                      compressor_proj)
        args = (q.contiguous(), w.contiguous())
        tail = (batch.rows, complete_entries(batch, self.compress_ratio), self.index_topk)
        if not state.paged:
            return _dsv4.indexer_topk(*args, state.entries, *tail)
        if paged_op_available("indexer_topk"):
            try:
                return _dsv4.indexer_topk(*args, state.entries, *tail, batch.block_table)
            except RuntimeError as e:
                paged_op_missing("indexer_topk", e)
        keys, _ = gather_blocks(state.entries, batch.block_table)   # dense fallback
        return _dsv4.indexer_topk(*args, keys, *tail)
