"""FP8 block-scaled linear: ``torch.ops.dsv4.fp8_linear`` (architecture.md §12.3, training.md §5).

The release stores most dense linears (attention projections, shared expert, MTP projections)
as float8_e4m3fn ``weight`` [N, K] with one power-of-two scale per 128x128 block
(``scale`` [⌈N/128⌉, ⌈K/128⌉], float8_e8m0fnu, or float32 in the "-Base" checkpoints)::

    y = x · Wᵀ,   W[o, k] = weight[o, k] · scale[o // 128, k // 128]

computed in fp32 from the exactly dequantised weight and rounded once to x's dtype.
``act_quant=True`` first applies the official FP8 activation quantisation to x (e4m3 round trip
in 1x128 blocks along K, ue8m0 scales: :func:`dsv4.ops.quant.fp8_e4m3_sim`), what the model
does when ``quant_sim`` is on.

On CUDA (bf16 x) the grouped GEMM kernel (csrc/kernels/grouped_gemm*.cu) streams the FP8 bytes
and dequantises them in shared memory, so the weight is never materialised in bf16 (weight-bound
at decode, tensor-core bound at prefill). The reference below serves CPU tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant import FP8_BLOCK, fp8_block_dequantize
from ._ext import check_writable, raise_value_error, register_op
from .quant import fp8_e4m3_sim

__all__ = ["fp8_linear", "fp8_linear_reference", "FP8_LINEAR_SCHEMA", "FP8_LINEAR_OUT_SCHEMA"]

_ARGS = "(Tensor x, Tensor weight, Tensor scale, bool act_quant"
FP8_LINEAR_SCHEMA = _ARGS + ") -> Tensor"
FP8_LINEAR_OUT_SCHEMA = _ARGS + ", *, Tensor(a!) out) -> ()"


def _check(x, weight, scale, act_quant, check) -> None:
    op = "fp8_linear"
    check(x.dim() >= 1 and x.is_floating_point() and x.dtype.itemsize >= 2,
          lambda: f"{op}: x must be a float tensor [..., in_features] (bf16 on CUDA), got "
                  f"{x.dtype} {list(x.shape)}")
    check(weight.dim() == 2 and weight.dtype == torch.float8_e4m3fn,
          lambda: f"{op}: weight must be float8_e4m3fn [out_features, in_features], got "
                  f"{weight.dtype} {list(weight.shape)}")
    N, K = weight.shape
    check(x.shape[-1] == K,
          lambda: f"{op}: x's last dim {x.shape[-1]} != in_features {K}")
    want = [-(-N // FP8_BLOCK), -(-K // FP8_BLOCK)]
    check(list(scale.shape) == want and scale.dtype in (torch.float8_e8m0fnu, torch.float32),
          lambda: f"{op}: scale must be float8_e8m0fnu or float32 {want}, got {scale.dtype} "
                  f"{list(scale.shape)}")
    check(not act_quant or K % FP8_BLOCK == 0,
          lambda: f"{op}: act_quant needs in_features divisible by {FP8_BLOCK}, got {K}")


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         act_quant: bool) -> torch.Tensor:
    """``y = x · Wᵀ`` with W the exact dequantisation of the FP8 block format.

    Args:
        x: [..., K] float (bf16 in the model).
        weight: float8_e4m3fn [N, K].
        scale: [⌈N/128⌉, ⌈K/128⌉] float8_e8m0fnu or float32 (powers of two).
        act_quant: FP8 1x128 activation quantisation of x first (needs K % 128 == 0).

    Returns:
        [..., N] in x's dtype: the fp32 product rounded once (architecture.md §12.3).

    Raises:
        ValueError: dtypes or shapes outside the format.
    """
    _check(x, weight, scale, act_quant, raise_value_error)
    xin = fp8_e4m3_sim(x, FP8_BLOCK) if act_quant else x
    w = fp8_block_dequantize(weight, scale, torch.float32)
    return (xin.float() @ w.T).to(x.dtype)


def _out_ref(x, weight, scale, act_quant, out):
    _check(x, weight, scale, act_quant, raise_value_error)
    want = (*x.shape[:-1], weight.shape[0])
    if tuple(out.shape) != want or out.dtype != x.dtype:
        raise ValueError(f"fp8_linear_out: out must be {x.dtype} {list(want)}, got {out.dtype} "
                         f"{list(out.shape)}")
    check_writable("fp8_linear_out", out=out)
    out.copy_(fp8_linear_reference(x, weight, scale, act_quant))


def _fake(x, weight, scale, act_quant):
    _check(x, weight, scale, act_quant, torch._check)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _out_fake(x, weight, scale, act_quant, out):
    _check(x, weight, scale, act_quant, torch._check)
    torch._check(tuple(out.shape) == (*x.shape[:-1], weight.shape[0]) and out.dtype == x.dtype,
                 lambda: "fp8_linear_out: out must be [..., out_features] in x's dtype")


register_op("fp8_linear", FP8_LINEAR_SCHEMA, fp8_linear_reference, _fake)
register_op("fp8_linear_out", FP8_LINEAR_OUT_SCHEMA, _out_ref, _out_fake)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               act_quant: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.dsv4.fp8_linear`` (``fp8_linear_out`` into ``out`` when given, which is then
    returned). Arguments, result and errors: :func:`fp8_linear_reference`. The CUDA kernel
    takes bf16 x with in_features % 16 == 0 and out_features % 8 == 0."""
    if out is None:
        return torch.ops.dsv4.fp8_linear(x, weight, scale, bool(act_quant))
    torch.ops.dsv4.fp8_linear_out(x, weight, scale, bool(act_quant), out=out)
    return out
