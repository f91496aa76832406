"""RMSNorm op family: the pure-PyTorch reference of ``torch.ops.dsv4.rms_norm`` and its registration."""

from __future__ import annotations

import torch

from ._ext import check_positive_f32, raise_value_error, register_op

__all__ = ["rms_norm_reference"]


def _dtype_message(dtype: torch.dtype) -> str:
    return (f"rms_norm: x must be a floating-point tensor (float32, bfloat16, float16 or "
            f"float64), got {dtype}")


def _weight_dtype_message(dtype: torch.dtype) -> str:
    return (f"rms_norm: weight must be a floating-point tensor (float32 on CUDA, where RMSNorm "
            f"weights are kept in fp32), got {dtype}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, the semantics of ``torch.ops.dsv4.rms_norm``.

    ``y = weight * (x * rsqrt(mean(x**2, dim=-1) + eps))``, computed in fp32 (x and weight are
    upcast; the weight multiplies in fp32) and cast once to ``x.dtype``. Source:
    architecture.md §10.1 and the official ``RMSNorm.forward``.

    Args:
        x: ``[..., dim]``, any floating dtype (the CUDA kernel accepts float32 and bfloat16
            with a contiguous last dimension).
        weight: ``[dim]``, the learned scale; fp32 in the model (any floating dtype is upcast).
            ``None`` gives the weight-free variant (per-head query norm, architecture.md §3.2;
            the torch op itself always takes a weight).
        eps: added to the mean square before the rsqrt (1e-6 in DeepSeek-V4).

    Returns:
        ``[..., dim]`` tensor of ``x.dtype`` on ``x.device``.

    Raises:
        ValueError: ``x`` is not floating point (an integer or bool x would come back
            truncated), is 0-d, or ``weight`` is not a floating-point ``[x.size(-1)]``.
    """
    if not x.dtype.is_floating_point:
        raise ValueError(_dtype_message(x.dtype))
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least 1 dimension, got a 0-d tensor")
    if weight is not None and (weight.dim() != 1 or weight.size(0) != x.size(-1)):
        raise ValueError(
            f"rms_norm: weight must have shape [{x.size(-1)}] (x.size(-1)), "
            f"got {list(weight.shape)}"
        )
    if weight is not None and not weight.dtype.is_floating_point:
        raise ValueError(_weight_dtype_message(weight.dtype))
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (y if weight is None else weight.float() * y).to(x.dtype)


def _rms_norm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the op's eps (the kernel's float32): a positive finite float32, as the CUDA glue checks
    # (rms_norm_reference itself takes any eps: the model's maths, eps 0 in hand-worked tests)
    check_positive_f32("rms_norm", "eps", eps, raise_value_error)
    # contiguous(): the CUDA kernel and the fake return a contiguous tensor whatever x's layout.
    return rms_norm_reference(x, weight, eps).contiguous()


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_positive_f32("rms_norm", "eps", eps, torch._check)
    torch._check(x.dtype.is_floating_point, lambda: _dtype_message(x.dtype))
    torch._check(x.dim() >= 1, lambda: "rms_norm: x must have at least 1 dimension")
    torch._check(
        weight.dim() == 1 and weight.size(0) == x.size(-1),
        lambda: f"rms_norm: weight must have shape [{x.size(-1)}], got {list(weight.shape)}",
    )
    torch._check(weight.dtype.is_floating_point, lambda: _weight_dtype_message(weight.dtype))
    return x.new_empty(x.shape)


register_op("rms_norm", "(Tensor x, Tensor weight, float eps) -> Tensor", _rms_norm_kernel,
            _rms_norm_fake)
