"""RMSNorm with a learned fp32 weight (architecture.md §10.1)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x**2, -1) + eps)`` in fp32, cast back to ``x.dtype``.

    x: [..., d]; weight: [d] (fp32) or None for the weight-free variant (per-head query norm,
    §3.2). Source: official ``RMSNorm.forward`` (multiply by the weight in fp32, cast once).
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; the weight is kept in fp32 whatever the model dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.weight._dsv4_keep_fp32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
