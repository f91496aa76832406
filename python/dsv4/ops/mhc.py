"""mHC op family: ``torch.ops.dsv4.mhc_pre``, ``mhc_post`` and ``mhc_head`` (architecture.md §8,
training.md §1.4).

The maths is defined once, in :mod:`dsv4.layers.mhc` (``hc_pre_reference``,
``hc_post_reference``, ``hc_head_reference``); this module registers those functions as the CPU
implementations of the ops (same schema as the C++ ``m.def`` in csrc/torch/mhc.cpp), with fake
implementations for torch.compile and out variants for CUDA graphs. The CUDA kernels
(csrc/kernels/mhc.cu) take bfloat16 streams with hc_mult 4 and dim % 8 == 0.
"""

from __future__ import annotations

import torch

from ..layers.mhc import hc_head_reference, hc_post_reference, hc_pre_reference
from ._ext import (check_finite_f32, check_positive_f32, check_writable, raise_value_error,
                   register_op)

__all__ = ["mhc_pre", "mhc_post", "mhc_head"]

_PRE = ("(Tensor x, Tensor fn, Tensor scale, Tensor base, float norm_eps, int iters, float eps) "
        "-> (Tensor, Tensor, Tensor)")
_PRE_OUT = ("(Tensor x, Tensor fn, Tensor scale, Tensor base, float norm_eps, int iters, "
            "float eps, *, Tensor(a!) u, Tensor(b!) post, Tensor(c!) comb) -> ()")
_POST = "(Tensor f, Tensor residual, Tensor post, Tensor comb) -> Tensor"
_POST_OUT = "(Tensor f, Tensor residual, Tensor post, Tensor comb, *, Tensor(a!) out) -> ()"
_HEAD = "(Tensor x, Tensor fn, Tensor scale, Tensor base, float norm_eps, float eps) -> Tensor"
_HEAD_OUT = ("(Tensor x, Tensor fn, Tensor scale, Tensor base, float norm_eps, float eps, *, "
             "Tensor(a!) y) -> ()")


def _check_mix(name, x, fn, scale, base, rows_of_hc, n_scale, check):
    check(x.dim() >= 2, lambda: f"{name}: x must be [..., hc, dim], got {tuple(x.shape)}")
    check(x.dtype.is_floating_point, lambda: f"{name}: x must be floating-point, got {x.dtype}")
    hc, d = x.shape[-2], x.shape[-1]
    rows = rows_of_hc(hc)
    check(tuple(fn.shape) == (rows, hc * d) and fn.dtype == torch.float32,
          lambda: f"{name}: fn must be float32 [{rows}, {hc * d}], got {fn.dtype} "
                  f"{tuple(fn.shape)}")
    check(tuple(scale.shape) == (n_scale,) and scale.dtype == torch.float32,
          lambda: f"{name}: scale must be float32 [{n_scale}], got {scale.dtype} "
                  f"{tuple(scale.shape)}")
    check(tuple(base.shape) == (rows,) and base.dtype == torch.float32,
          lambda: f"{name}: base must be float32 [{rows}], got {base.dtype} {tuple(base.shape)}")


def _check_pre(x, fn, scale, base, norm_eps, iters, eps, check):
    # the kernel's float32 epsilons, as the CUDA glue checks them: norm_eps is added to the mean
    # square before the square root, eps to pre and to every Sinkhorn entry and sum before it
    # divides (eps = 0 divides by a column sum that can underflow to 0)
    check_positive_f32("mhc_pre", "norm_eps", norm_eps, check)
    check_positive_f32("mhc_pre", "eps", eps, check)
    _check_mix("mhc_pre", x, fn, scale, base, lambda hc: (2 + hc) * hc, 3, check)
    check(iters >= 1, lambda: f"mhc_pre: iters must be >= 1, got {iters}")


def _check_head(x, fn, scale, base, norm_eps, eps, check):
    # norm_eps as mhc_pre's; eps is only added to the collapse weights (no division): any finite
    check_positive_f32("mhc_head", "norm_eps", norm_eps, check)
    check_finite_f32("mhc_head", "eps", eps, check)
    _check_mix("mhc_head", x, fn, scale, base, lambda hc: hc, 1, check)


def _check_post(f, residual, post, comb, check):
    check(residual.dim() >= 2 and residual.dtype.is_floating_point,
          lambda: f"mhc_post: residual must be a float [..., hc, dim], got {residual.dtype} "
                  f"{tuple(residual.shape)}")
    lead, (hc, d) = tuple(residual.shape[:-2]), tuple(residual.shape[-2:])
    check(tuple(f.shape) == lead + (d,) and f.dtype.is_floating_point,
          lambda: f"mhc_post: f must be a float {list(lead + (d,))}, got {f.dtype} {tuple(f.shape)}")
    check(tuple(post.shape) == lead + (hc,) and post.dtype == torch.float32,
          lambda: f"mhc_post: post must be float32 {list(lead + (hc,))}, got {post.dtype} "
                  f"{tuple(post.shape)}")
    check(tuple(comb.shape) == lead + (hc, hc) and comb.dtype == torch.float32,
          lambda: f"mhc_post: comb must be float32 {list(lead + (hc, hc))}, got {comb.dtype} "
                  f"{tuple(comb.shape)}")


def _check_out(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape) or dst.dtype != src.dtype:
        raise ValueError(f"{name} must be {src.dtype} {list(src.shape)}, got {dst.dtype} "
                         f"{list(dst.shape)}")


def _copy_out(dst: torch.Tensor, src: torch.Tensor, op: str, name: str) -> None:
    _check_out(dst, src, f"{op}: {name}")
    check_writable(op, **{name: dst})
    dst.copy_(src)


def _pre_kernel(x, fn, scale, base, norm_eps, iters, eps):
    _check_pre(x, fn, scale, base, norm_eps, iters, eps, raise_value_error)
    return tuple(t.contiguous() for t in hc_pre_reference(x, fn, scale, base, norm_eps, iters, eps))


def _pre_out_kernel(x, fn, scale, base, norm_eps, iters, eps, *, u, post, comb):
    outs = _pre_kernel(x, fn, scale, base, norm_eps, iters, eps)
    bufs = tuple(zip((u, post, comb), outs, ("mhc_pre_out: u", "mhc_pre_out: post",
                                             "mhc_pre_out: comb")))
    for dst, src, name in bufs:  # every buffer checked before any is written
        _check_out(dst, src, name)
    check_writable("mhc_pre_out", u=u, post=post, comb=comb)
    for dst, src, _ in bufs:
        dst.copy_(src)


def _pre_fake(x, fn, scale, base, norm_eps, iters, eps):
    _check_pre(x, fn, scale, base, norm_eps, iters, eps, torch._check)
    lead, (hc, d) = tuple(x.shape[:-2]), tuple(x.shape[-2:])
    return (x.new_empty(lead + (d,)), x.new_empty(lead + (hc,), dtype=torch.float32),
            x.new_empty(lead + (hc, hc), dtype=torch.float32))


def _pre_out_fake(x, fn, scale, base, norm_eps, iters, eps, *, u, post, comb):
    _check_pre(x, fn, scale, base, norm_eps, iters, eps, torch._check)


def _post_kernel(f, residual, post, comb):
    _check_post(f, residual, post, comb, raise_value_error)
    return hc_post_reference(f, residual, post, comb).contiguous()


def _check_post_out_alias(f, residual, out, check) -> None:
    # the CUDA kernel reads residual and f while it writes out: the glue refuses the same tensor
    # (at::Tensor::is_same), and so does the reference (an in-place residual update would
    # work here and fail on CUDA)
    check(out is not residual and out is not f,
          lambda: "mhc_post_out: out must not alias residual or f")


def _post_out_kernel(f, residual, post, comb, *, out):
    _check_post_out_alias(f, residual, out, raise_value_error)
    _copy_out(out, _post_kernel(f, residual, post, comb), "mhc_post_out", "out")


def _post_fake(f, residual, post, comb):
    _check_post(f, residual, post, comb, torch._check)
    return residual.new_empty(residual.shape, dtype=f.dtype)


def _post_out_fake(f, residual, post, comb, *, out):
    _check_post(f, residual, post, comb, torch._check)
    _check_post_out_alias(f, residual, out, torch._check)


def _head_kernel(x, fn, scale, base, norm_eps, eps):
    _check_head(x, fn, scale, base, norm_eps, eps, raise_value_error)
    return hc_head_reference(x, fn, scale, base, norm_eps, eps).contiguous()


def _head_out_kernel(x, fn, scale, base, norm_eps, eps, *, y):
    _copy_out(y, _head_kernel(x, fn, scale, base, norm_eps, eps), "mhc_head_out", "y")


def _head_fake(x, fn, scale, base, norm_eps, eps):
    _check_head(x, fn, scale, base, norm_eps, eps, torch._check)
    return x.new_empty(tuple(x.shape[:-2]) + (x.shape[-1],))


def _head_out_fake(x, fn, scale, base, norm_eps, eps, *, y):
    _check_head(x, fn, scale, base, norm_eps, eps, torch._check)


register_op("mhc_pre", _PRE, _pre_kernel, _pre_fake)
register_op("mhc_pre_out", _PRE_OUT, _pre_out_kernel, _pre_out_fake)
register_op("mhc_post", _POST, _post_kernel, _post_fake)
register_op("mhc_post_out", _POST_OUT, _post_out_kernel, _post_out_fake)
register_op("mhc_head", _HEAD, _head_kernel, _head_fake)
register_op("mhc_head_out", _HEAD_OUT, _head_out_kernel, _head_out_fake)


def mhc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            norm_eps: float, iters: int, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.dsv4.mhc_pre``: :func:`dsv4.layers.mhc.hc_pre_reference` as one op.

    x [..., hc, d] (CUDA: bfloat16, hc 4, d % 8 == 0); fn float32 [(2+hc)·hc, hc·d]; scale [3];
    base [(2+hc)·hc]. Returns (u [..., d] in x.dtype, post [..., hc] fp32, comb [..., hc, hc]
    fp32). Raises ValueError (CPU) / RuntimeError (CUDA) naming the expected shapes.
    """
    return torch.ops.dsv4.mhc_pre(x, fn, scale, base, norm_eps, iters, eps)


def mhc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
             comb: torch.Tensor) -> torch.Tensor:
    """``torch.ops.dsv4.mhc_post``: :func:`dsv4.layers.mhc.hc_post_reference` as one op
    (out[k] = post[k]·f + Σ_j comb[j, k]·residual[j]; [..., hc, d] in f.dtype)."""
    return torch.ops.dsv4.mhc_post(f, residual, post, comb)


def mhc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
             norm_eps: float, eps: float) -> torch.Tensor:
    """``torch.ops.dsv4.mhc_head``: :func:`dsv4.layers.mhc.hc_head_reference` as one op
    (fn [hc, hc·d], scale [1], base [hc]; returns [..., d] in x.dtype)."""
    return torch.ops.dsv4.mhc_head(x, fn, scale, base, norm_eps, eps)
