"""The flattened ("varlen") token layout the kernel path of a layer works in.

The model's activations are right-padded ``[batch, seq, ...]`` tensors; row b holds ``lens[b]``
valid tokens at positions ``starts[b]`` … ``starts[b] + lens[b] − 1``. The kernels take the
``T = Σ lens`` valid tokens back to back, grouped by row (flash-attn's varlen convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenLayout"]


@dataclass
class TokenLayout:
    """Index tensors of one forward step (built on the host from python lists, copied once).

    Attributes (device tensors unless noted):
        batch, seq: the padded shape; num_tokens: T (python ints).
        starts, lens: python lists, per row.
        flat: int64 [T], position of each valid token in the padded ``batch*seq`` order.
        rows: int32 [T], the batch row of each token.
        pos: int64 [T], the absolute position of each token.
        cu_seqlens: int32 [batch+1], token offsets of the rows in the flattened order.
        starts_t: int32 [batch], ``starts`` on the device.
        max_seqlen: max(lens) (python int).
    """

    batch: int
    seq: int
    num_tokens: int
    starts: list[int]
    lens: list[int]
    flat: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    cu_seqlens: torch.Tensor
    starts_t: torch.Tensor
    max_seqlen: int

    @classmethod
    def build(cls, batch: int, seq: int, starts: list[int], lens: list[int],
              device: torch.device) -> "TokenLayout":
        lens_c = torch.tensor(lens, dtype=torch.int64)
        starts_c = torch.tensor(starts, dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(batch), lens_c)
        cu = torch.zeros(batch + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lens_c, 0)
        within = torch.arange(int(cu[-1])) - cu[:-1][rows]
        flat = rows * seq + within
        pos = starts_c[rows] + within
        to = dict(device=device, non_blocking=True)
        return cls(batch=batch, seq=seq, num_tokens=int(cu[-1]), starts=list(starts),
                   lens=list(lens), flat=flat.to(**to), rows=rows.to(torch.int32).to(**to),
                   pos=pos.to(**to), cu_seqlens=cu.to(torch.int32).to(**to),
                   starts_t=starts_c.to(torch.int32).to(**to), max_seqlen=max(lens, default=0))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, *rest] → [T, *rest] (the valid tokens, contiguous)."""
        return x.reshape(self.batch * self.seq, *x.shape[2:])[self.flat]

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """[T, *rest] → [batch, seq, *rest], zeros at padded positions."""
        out = y.new_zeros(self.batch * self.seq, *y.shape[1:])
        out[self.flat] = y
        return out.view(self.batch, self.seq, *y.shape[1:])
