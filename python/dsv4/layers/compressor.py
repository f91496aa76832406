"""KV compressor shared by CSA, HCA and the Lightning Indexer (architecture.md §4)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..cache import CompressorState
from ..ops.compressor import QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE, compress_kv_reference
from .linear import Linear, fp32_input
from .norm import RMSNorm
from .varlen import StepBatch

__all__ = ["Compressor", "complete_entries"]

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
        # fp32 parameters holding bf16 values, as the release stores them (architecture.md
        # §12.3): a random model then takes the same GEMM paths as a loaded one
        # (dsv4.ops.split_gemm: one bf16 GEMM on a bf16 copy).
        with torch.no_grad():
            for lin in (self.wkv, self.wgate):
                if not lin.weight.is_meta:
                    lin.weight.copy_(lin.weight.bfloat16())
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
                freqs: torch.Tensor, block_table: Optional[list[int]] = None,
                proj: Optional[tuple] = None) -> int:
        """Feed tokens ``x`` [n, dim] of the sequence in slot ``row`` at positions
        start … start+n−1 (the per-sequence reference path).

        Emits every block that these tokens complete into the slot's entries (dense store:
        ``state.entries[row]``, grown as needed; paged store: through ``block_table``, the
        sequence's block ids) and updates the partial-block state. Returns the number of
        entries of the sequence afterwards (``(start + n) // ratio``). The result equals
        feeding the tokens one at a time (architecture.md §4.5; chunked prefill is defined
        that way). After the two projections the maths is
        :func:`dsv4.ops.compressor.compress_kv_reference` (one definition of the compressor).
        ``proj``: the projections ``(wkv(x.float()), wgate(x.float()))`` [n, coff·head_dim]
        fp32 when the caller computed them (the attention layer, one GEMM when fused); None:
        computed here.
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
        kv, score = self.projections(x) if proj is None else proj
        compress_kv_reference(
            kv, score, self.ape, self.norm.weight, freqs,
            torch.tensor([0, n], dtype=torch.int32, device=dev),
            torch.tensor([start], dtype=torch.int32, device=dev), state.kv, state.score,
            state.entries, m, n, self.norm.eps, self.quant,
            slots=torch.tensor([row], dtype=torch.int32, device=dev), block_table=table)
        return n_after

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(wkv(x.float()), wgate(x.float()))``: fp32 [n, coff·head_dim] each (§4.1); a bf16
        x at prefill size stays bf16 for the split bf16 GEMMs of
        :func:`dsv4.layers.linear.dense_linear` (the same products)."""
        xf = fp32_input(x, (self.wkv, self.wgate))
        return self.wkv(xf), self.wgate(xf)

    def forward_batch(self, x: torch.Tensor, state: CompressorState, batch: StepBatch,
                      freqs: torch.Tensor, proj: Optional[tuple] = None) -> None:
        """Batched path of :meth:`forward`: ``x`` [T, dim] holds the new tokens of every row of
        ``batch`` back to back. The projections run here; gating, pooling, RMSNorm, RoPE and
        the quantisation simulation run in ``torch.ops.dsv4.compress_kv``, which writes the
        completed entries (paged: through ``batch.block_table``; dense: row b = slot b) and
        updates the partial-block state of each row's slot in place. No host synchronisation
        (a dense store is grown from the host-side bound ``batch.max_end``). ``x`` may be
        given in fp32 already (the projections take ``x.float()``; a CSA layer casts once for
        its indexer's compressor and its own: :func:`dsv4.layers.linear.fp32_input`).
        ``proj``: the projections when the caller computed them (see :meth:`forward`).
        """
        m = self.compress_ratio
        if not state.paged:
            state.reserve(batch.max_end // m)
        kv, score = self.projections(x) if proj is None else proj
        head = (kv, score, self.ape, self.norm.weight, freqs,
                batch.cu_seqlens, batch.starts)
        tail = (m, batch.max_seqlen, self.norm.eps, self.quant)
        if not state.paged:
            _dsv4.compress_kv(*head, state.kv, state.score, state.entries, *tail)
            return
        if paged_op_available("compress_kv"):
            try:
                _dsv4.compress_kv(*head, state.kv, state.score, state.entries, *tail,
                                  batch.slots, batch.block_table)
                return
            except RuntimeError as e:
                paged_op_missing("compress_kv", e)
        # A build whose CUDA kernel does not take block tables yet: the dense form on copies.
        slots = batch.slots.long()
        kv, score = state.kv.index_select(0, slots), state.score.index_select(0, slots)
        entries, ids = gather_blocks(state.entries, batch.block_table)
        _dsv4.compress_kv(*head, kv, score, entries, *tail)
        state.kv.index_copy_(0, slots, kv)
        state.score.index_copy_(0, slots, score)
        state.entries.index_copy_(0, ids, entries.view(-1, *state.entries.shape[1:]))


def complete_entries(batch: StepBatch, ratio: int) -> torch.Tensor:
    """int32 [T]: how many entries of a ratio-``ratio`` compressed store are complete at each
    token of ``batch`` (``(pos + 1) // ratio``, the entries a query may attend or score,
    §3.5 / §4). Computed once per step for each ratio (:meth:`StepBatch.shared`) and shared
    by the layers: the HCA scope lengths and the indexer's valid counts (ratio 4)."""
    return batch.shared(("complete_entries", ratio), lambda: torch.div(
        batch.pos + 1, ratio, rounding_mode="floor").to(torch.int32))


# ---------------------------------------------------------------------------------------------
# Paged stores on a build whose CUDA kernels do not take ``slots`` / ``block_table`` yet
# (docs/contracts.md §A: the CUDA glue rejects them until the kernels land). The layer then runs
# the dense form of the op on copies gathered through the block table and scatters them back:
# correct, slow (it copies the rows' whole stores), and said once.
# ---------------------------------------------------------------------------------------------
_PAGED_MISSING: dict[str, str] = {}


def paged_op_available(op: str) -> bool:
    """False once ``op`` was found to reject paged arguments on this build."""
    return op not in _PAGED_MISSING


def paged_op_missing(op: str, error: RuntimeError) -> None:
    """Record (and warn once) that ``op`` rejects its paged arguments; re-raise other errors."""
    if "not implemented on CUDA" not in str(error):
        raise error
    _PAGED_MISSING[op] = str(error)
    warnings.warn(f"dsv4: this build's CUDA {op} does not take paged caches yet "
                  "(docs/contracts.md §A); the runtime gathers the pages of each step and runs the "
                  "dense kernel instead (correct, slow at long contexts)", RuntimeWarning,
                  stacklevel=3)


def gather_blocks(store: torch.Tensor, block_table: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense copies [B, max_blocks·block_size, d] of the rows of a paged ``store``
    [num_blocks, block_size, d] through ``block_table`` [B, max_blocks] (−1 = no block: the
    pool's last block, a scratch block no sequence owns, stands in), and the block ids used
    (int64 [B·max_blocks], for scattering back)."""
    if store.dtype == torch.uint8:
        raise RuntimeError("FP8 cache pools need CUDA kernels that take block tables "
                           "(docs/contracts.md §A); this build's do not")
    ids = torch.where(block_table >= 0, block_table, store.shape[0] - 1).long().flatten()
    B, mb = block_table.shape
    return store.index_select(0, ids).view(B, mb * store.shape[1], store.shape[2]), ids
