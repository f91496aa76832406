"""KV compressor shared by CSA, HCA and the Lightning Indexer (architecture.md §4)."""

from __future__ import annotations

import torch
from torch import nn

from ..cache import CompressorState
from ..ops.compressor import QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE
from ..ops.quant import fp4_e2m1_sim, fp8_e4m3_sim, hadamard
from .linear import Linear
from .norm import RMSNorm
from .rope import apply_rope

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

    def forward(self, x: torch.Tensor, state: CompressorState, row: int, start: int,
                freqs: torch.Tensor) -> int:
        """Feed tokens ``x`` [n, dim] of sequence ``row`` at positions start … start+n−1.

        Emits every block that these tokens complete into ``state.entries[row]`` and updates the
        partial-block state. Returns the number of entries of the row afterwards
        (``(start + n) // ratio``). The result equals feeding the tokens one at a time
        (architecture.md §4.5; chunked prefill is defined that way).
        """
        m, d = self.compress_ratio, self.head_dim
        n = x.shape[0]
        r0 = start % m
        off = m if self.overlap else 0
        n_after = (start + n) // m
        if n == 0:
            return n_after
        pos = torch.arange(start, start + n, device=x.device)
        xf = x.float()
        kv = self.wkv(xf)
        score = self.wgate(xf) + self.ape[pos % m]
        # The stream of this block-aligned span: the partial rows already held, then the new ones.
        kv = torch.cat([state.kv[row, off:off + r0], kv], dim=0)
        score = torch.cat([state.score[row, off:off + r0], score], dim=0)
        nb = (r0 + n) // m
        first_block = (start - r0) // m
        if nb:
            bkv = kv[:nb * m].unflatten(0, (nb, m))
            bsc = score[:nb * m].unflatten(0, (nb, m))
            if self.overlap:
                prev_kv = torch.cat([state.kv[row, None, :m], bkv[:-1]], dim=0)
                prev_sc = torch.cat([state.score[row, None, :m], bsc[:-1]], dim=0)
                bkv = torch.cat([prev_kv[..., :d], bkv[..., d:]], dim=1)   # [nb, 2m, d]
                bsc = torch.cat([prev_sc[..., :d], bsc[..., d:]], dim=1)
                state.kv[row, :m] = kv[(nb - 1) * m:nb * m]
                state.score[row, :m] = score[(nb - 1) * m:nb * m]
            pooled = (bkv * bsc.softmax(dim=1)).sum(dim=1)                 # [nb, d] fp32
            entries = self.norm(pooled.to(state.entries.dtype))
            block_pos = torch.arange(first_block, first_block + nb, device=x.device) * m
            entries = apply_rope(entries, block_pos, freqs)
            if self.config.quant_sim:
                rd = self.config.rope_head_dim
                if self.rotate:
                    entries = fp4_e2m1_sim(hadamard(entries), 32)
                else:
                    entries = torch.cat([fp8_e4m3_sim(entries[:, :-rd], 64), entries[:, -rd:]], -1)
            state.reserve(first_block + nb)
            state.entries[row, first_block:first_block + nb] = entries
        rem = r0 + n - nb * m
        if rem:
            state.kv[row, off:off + rem] = kv[nb * m:]
            state.score[row, off:off + rem] = score[nb * m:]
        return n_after

    def forward_varlen(self, x: torch.Tensor, state: CompressorState, layout,
                       freqs: torch.Tensor) -> None:
        """Kernel path of :meth:`forward` for a whole batch: ``x`` [T, dim] holds the new tokens
        of every row back to back (``layout``: a :class:`~dsv4.layers.varlen.TokenLayout`).

        The projections run here; gating, pooling, RMSNorm, RoPE and the quantisation
        simulation run in ``torch.ops.dsv4.compress_kv``, which writes the completed entries
        into ``state.entries`` and updates the partial-block state in place.
        """
        m = self.compress_ratio
        state.reserve(max((s + n) // m for s, n in zip(layout.starts, layout.lens)))
        xf = x.float()
        quant = QUANT_NONE
        if self.config.quant_sim:
            quant = QUANT_FP4_HADAMARD if self.rotate else QUANT_FP8
        _dsv4.compress_kv(
            self.wkv(xf), self.wgate(xf), self.ape, self.norm.weight, freqs, layout.cu_seqlens,
            layout.starts_t, state.kv, state.score, state.entries, m, layout.max_seqlen,
            self.config.norm_eps, quant)
