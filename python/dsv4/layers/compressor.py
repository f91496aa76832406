"""KV compressor shared by CSA, HCA and the Lightning Indexer (architecture.md §4)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..cache import CompressorState
from ..ops.compressor import QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE, compress_kv_reference
from .linear import Linear
from .norm import RMSNorm
from .varlen import StepBatch

__all__ = ["Compressor"]

# The torch.ops.dsv4 namespace (CUDA kernels, references on CPU); one name to patch in tests.
_dsv4 = torch.ops.dsv4


class Compressor(nn.Module):
    """Gated pooling of every ``compress_ratio`` tokens into one ``head_dim`` entry.

    ratio 4 overlaps (each entry pools 8 slots: the A halves of the previous block and the B
    halves of its own block, §4.3); any other ratio pools its own block (§4.2). Gates are a
    per-channel softmax over slots of ``wgate(x) + ape``; the pooled fp32 vector is cast to the
    model dtype, RMS-normalised, RoPE'd at the block's first position, then (``quant_sim``)
    FP8-simulated on the non-RoPE dims, or, for the indexer (``rotate=True``), Hadamard-rotated
    and FP4-simulated (§4.4).
    Parameters (official names): ``wkv``, ``wgate`` [coff·head_dim, dim] fp32, ``ape``
    [ratio, coff·head_dim] fp32, ``norm.weight`` [head_dim].
    """

    def __init__(self, config, compress_ratio: int, head_dim: int, rotate: bool = False):
        super().__init__()
        self.config = config
        self.compress_ratio = compress_ratio
        self.head_dim = head_dim
        self.rotate = rotate
        self.overlap = compress_ratio == 4
        coff = 2 if self.overlap else 1
        self.wkv = Linear(config.dim, coff * head_dim, keep_fp32=True)
        self.wgate = Linear(config.dim, coff * head_dim, keep_fp32=True)
        self.ape = nn.Parameter(torch.randn(compress_ratio, coff * head_dim) * 0.1)
        self.ape._dsv4_keep_fp32 = True
        self.norm = RMSNorm(head_dim, config.norm_eps)

    @property
    def quant(self) -> int:
        """The ``quant`` code of ``compress_kv`` for this compressor (§4.4)."""
        if not self.config.quant_sim:
            return QUANT_NONE
        return QUANT_FP4_HADAMARD if self.rotate else QUANT_FP8

    def forward(self, x: torch.Tensor, state: CompressorState, row: int, start: int,
                freqs: torch.Tensor, block_table: Optional[list[int]] = None) -> int:
        """Feed tokens ``x`` [n, dim] of the sequence in slot ``row`` at positions
        start … start+n−1 (the per-sequence reference path).

        Emits every block that these tokens complete into the slot's entries (dense store:
        ``state.entries[row]``, grown as needed; paged store: through ``block_table``, the
        sequence's block ids) and updates the partial-block state. Returns the number of
        entries of the sequence afterwards (``(start + n) // ratio``). The result equals
        feeding the tokens one at a time (architecture.md §4.5; chunked prefill is defined
        that way). After the two projections the maths is
        :func:`dsv4.ops.compressor.compress_kv_reference` (one definition of the compressor).
        """
        m = self.compress_ratio
        n = x.shape[0]
        n_after = (start + n) // m
        if n == 0:
            return n_after
        dev = x.device
        table = None
        if state.paged:
            if block_table is None:
                raise ValueError("a paged entry store needs the sequence's block_table")
            table = torch.tensor([list(block_table) or [-1]], dtype=torch.int32, device=dev)
        else:
            state.reserve(n_after)
        xf = x.float()
        compress_kv_reference(
            self.wkv(xf), self.wgate(xf), self.ape, self.norm.weight, freqs,
            torch.tensor([0, n], dtype=torch.int32, device=dev),
            torch.tensor([start], dtype=torch.int32, device=dev), state.kv, state.score,
            state.entries, m, n, self.norm.eps, self.quant,
            slots=torch.tensor([row], dtype=torch.int32, device=dev), block_table=table)
        return n_after

    def forward_batch(self, x: torch.Tensor, state: CompressorState, batch: StepBatch,
                      freqs: torch.Tensor) -> None:
        """Batched path of :meth:`forward`: ``x`` [T, dim] holds the new tokens of every row of
        ``batch`` back to back. The projections run here; gating, pooling, RMSNorm, RoPE and
        the quantisation simulation run in ``torch.ops.dsv4.compress_kv``, which writes the
        completed entries (paged: through ``batch.block_table``; dense: row b = slot b) and
        updates the partial-block state of each row's slot in place. No host synchronisation
        (a dense store is grown from the host-side bound ``batch.max_end``).
        """
        m = self.compress_ratio
        paged = {}
        if state.paged:
            paged = dict(slots=batch.slots, block_table=batch.block_table)
        else:
            state.reserve(batch.max_end // m)
        xf = x.float()
        _dsv4.compress_kv(
            self.wkv(xf), self.wgate(xf), self.ape, self.norm.weight, freqs, batch.cu_seqlens,
            batch.starts, state.kv, state.score, state.entries, m, batch.max_seqlen,
            self.norm.eps, self.quant, **paged)
