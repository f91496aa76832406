"""RMSNorm with a learned fp32 weight (architecture.md §10.1)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import rms_norm_reference

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (:func:`dsv4.ops.norm.rms_norm_reference`); the weight is kept
    in fp32 whatever the model dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.weight._dsv4_keep_fp32 = True

    def forward(self, x: torch.Tensor, kernel: bool = False) -> torch.Tensor:
        """x: [..., dim] -> same shape and dtype. ``kernel``: through ``torch.ops.dsv4.rms_norm``
        (one launch; the caller decides, e.g. a layer on its kernel path) instead of the
        reference; the same formula (architecture.md §10.1)."""
        if kernel:
            return torch.ops.dsv4.rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)
