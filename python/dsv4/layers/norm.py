"""RMSNorm with a learned fp32 weight (architecture.md §10.1)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.backend import use_kernels
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

    def kernel_serves(self, x: torch.Tensor) -> bool:
        """Whether ``torch.ops.dsv4.rms_norm`` may normalise ``x`` here: the backend's rules
        (:func:`dsv4.ops.backend.use_kernels`: CUDA bfloat16 activations, a compiled and
        verified kernel), the fp32 weight the kernel takes, and no gradient needed (the op
        has no backward). The block's norms and the head's final norm ask this."""
        reason = None
        if self.weight.dtype != torch.float32:
            reason = f"the rms_norm kernel takes a float32 weight, not {self.weight.dtype}"
        elif torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            reason = ("the rms_norm kernel has no backward; with gradients enabled the norms "
                      "run the reference (wrap inference in torch.no_grad())")
        return use_kernels(x, ("rms_norm",), reason)

    def forward(self, x: torch.Tensor, kernel: bool = False) -> torch.Tensor:
        """x: [..., dim] -> same shape and dtype. ``kernel``: through ``torch.ops.dsv4.rms_norm``
        (one launch; the caller decides, e.g. a layer on its kernel path) instead of the
        reference; the same formula (architecture.md §10.1)."""
        if kernel:
            return torch.ops.dsv4.rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)
