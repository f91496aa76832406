"""Bias-free linear layer holding the official ``.weight`` name (architecture.md §12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear"]


class Linear(nn.Module):
    """``y = x @ weight.T`` with ``weight`` [out_features, in_features].

    ``keep_fp32=True`` pins the weight to fp32 whatever the model dtype (compressor ``wkv`` /
    ``wgate`` and the head, §12.3); the input is then promoted to fp32 and so is the output.
    Otherwise the weight follows the model dtype and the input is used as given.
    """

    def __init__(self, in_features: int, out_features: int, keep_fp32: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float32))
        if keep_fp32:
            self.weight._dsv4_keep_fp32 = True
        nn.init.normal_(self.weight, std=in_features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != w.dtype:
            x = x.to(w.dtype)
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}"
