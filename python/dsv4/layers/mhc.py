"""mHC: manifold-constrained hyper-connections (architecture.md §8, training.md §1.4).

The residual is ``hc_mult`` parallel streams X [batch, seq, hc, dim]. Each sub-layer site
collapses them with ``pre`` weights, runs the sub-layer, and writes back
``X'_k = post_k · F(u) + Σ_j comb[j, k] · X_j`` (comb applied transposed). All mixing maths is
fp32; the residual keeps the model dtype between sub-layers.

The ``*_reference`` functions below are the one definition of the maths: the references of
``torch.ops.dsv4.mhc_pre`` / ``mhc_post`` / ``mhc_head`` (python/dsv4/ops/mhc.py) call them.
:func:`hc_pre`, :func:`hc_post` and :func:`hc_head` run those fused CUDA ops when the backend is
``"cuda"`` and the inputs suit the kernels (CUDA bfloat16 streams, hc_mult 4, dim % 8 == 0, no
gradient needed), and the references otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.backend import use_kernels

__all__ = ["sinkhorn", "hc_split", "hc_pre", "hc_post", "hc_head", "hc_pre_reference",
           "hc_post_reference", "hc_head_reference"]

_dsv4 = torch.ops.dsv4
_KERNEL_STREAMS = 4  # hc_mult the CUDA kernels take


def _kernel_unsupported(x: torch.Tensor, *params: torch.Tensor) -> str | None:
    """Why the fused mHC kernels cannot serve streams ``x`` [..., hc, dim], or None."""
    if x.dim() < 2 or x.shape[-2] != _KERNEL_STREAMS:
        return f"the mHC kernels take hc_mult {_KERNEL_STREAMS}, not {x.shape[-2] if x.dim() > 1 else '?'}"
    if x.shape[-1] % 8:
        return f"the mHC kernels take dim % 8 == 0, not {x.shape[-1]}"
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return ("the mHC kernels have no backward; with gradients enabled mHC runs the "
                "reference (wrap inference in torch.no_grad())")
    return None


def _use_kernels(x: torch.Tensor, op: str, *params: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    return use_kernels(x, (op,), _kernel_unsupported(x, *params))


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The official Sinkhorn projection of [..., hc, hc] logits onto (nearly) doubly-stochastic.

    ``comb = softmax(logits, -1) + eps``; ``comb /= colsum + eps``; then ``iters - 1`` times
    row-normalise and column-normalise (each ``÷ (sum + eps)``): ``iters`` column normalisations
    in total (official ``hc_split_sinkhorn``; training.md §7.1 has test vectors). fp32.
    """
    comb = torch.softmax(logits.float(), dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def _mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened fp32 streams [..., hc*d] and ``mixes = (fn · x̂) · rsqrt(mean(x̂²) + eps)``."""
    xf = x.flatten(-2).float()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    return xf, F.linear(xf, fn.float()) * r


def hc_split(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int,
             iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split mixes [..., (2+hc)*hc] into pre [..., hc], post [..., hc], comb [..., hc, hc].

    pre = sigmoid(scale0·m + base) + eps; post = 2·sigmoid(scale1·m + base);
    comb = sinkhorn(scale2·m + base) with comb[j, k] row-major at ``2hc + j*hc + k`` (§8).
    """
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    logits = (mixes[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))
    return pre, post, sinkhorn(logits, iters, eps)


def hc_pre_reference(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                     norm_eps: float, iters: int, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse streams x [b, s, hc, d] → (u [b, s, d] in x.dtype, post [b, s, hc], comb [b, s, hc, hc]).

    u = Σ_i pre_i X_i with pre / post / comb from :func:`hc_split` of
    ``mixes = (fn · x̂) · rsqrt(mean(x̂²) + norm_eps)``, x̂ the token's hc·d values in fp32
    (architecture.md §8 steps 1-6; official ``Block.hc_pre``). Any leading dims.
    """
    hc = x.shape[-2]
    xf, mixes = _mixes(x, fn, norm_eps)
    pre, post, comb = hc_split(mixes, scale, base, hc, iters, eps)
    u = torch.sum(pre.unsqueeze(-1) * xf.view(x.shape), dim=-2)
    return u.to(x.dtype), post, comb


def hc_post_reference(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
                      comb: torch.Tensor) -> torch.Tensor:
    """``out[k] = post[k]·f + Σ_j comb[j, k]·residual[j]`` in fp32, cast to f.dtype.

    f [b, s, d]; residual [b, s, hc, d]; post [b, s, hc]; comb [b, s, hc, hc] (combᵀ applied).
    """
    y = post.unsqueeze(-1) * f.float().unsqueeze(-2) + torch.sum(
        comb.unsqueeze(-1) * residual.float().unsqueeze(-2), dim=-3)
    return y.to(f.dtype)


def hc_head_reference(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor,
                      base: torch.Tensor, norm_eps: float, eps: float) -> torch.Tensor:
    """Final collapse y = Σ_i pre_i X_i with pre = sigmoid(scale·mixes + base) + eps (§8).

    x [b, s, hc, d] → [b, s, d] in x.dtype; fn [hc, hc·d], scale [1], base [hc] fp32.
    """
    xf, mixes = _mixes(x, fn, norm_eps)
    pre = torch.sigmoid(mixes * scale + base) + eps
    return torch.sum(pre.unsqueeze(-1) * xf.view(x.shape), dim=-2).to(x.dtype)



# ---------------------------------------------------------------------------------------------
# entry points of the model: fused CUDA ops or the references above
# ---------------------------------------------------------------------------------------------
def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           norm_eps: float, iters: int, eps: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hc_pre_reference`, through ``torch.ops.dsv4.mhc_pre`` (one fused kernel at decode)
    when the kernels apply (see the module doc). x [..., hc, d]; fn [(2+hc)·hc, hc·d],
    scale [3], base [(2+hc)·hc] fp32. Returns (u [..., d] x.dtype, post [..., hc] fp32,
    comb [..., hc, hc] fp32)."""
    if _use_kernels(x, "mhc_pre", fn, scale, base):
        return _dsv4.mhc_pre(x, fn, scale, base, norm_eps, iters, eps)
    return hc_pre_reference(x, fn, scale, base, norm_eps, iters, eps)


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
            ) -> torch.Tensor:
    """:func:`hc_post_reference`, through ``torch.ops.dsv4.mhc_post`` when the kernels apply.
    f [..., d]; residual [..., hc, d]; post [..., hc]; comb [..., hc, hc] → [..., hc, d] f.dtype."""
    if (f.dtype == residual.dtype and post.dtype == comb.dtype == torch.float32
            and _use_kernels(residual, "mhc_post", f, post, comb)):
        return _dsv4.mhc_post(f, residual, post, comb)
    return hc_post_reference(f, residual, post, comb)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            norm_eps: float, eps: float) -> torch.Tensor:
    """:func:`hc_head_reference`, through ``torch.ops.dsv4.mhc_head`` when the kernels apply.
    x [..., hc, d]; fn [hc, hc·d], scale [1], base [hc] fp32 → [..., d] in x.dtype."""
    if _use_kernels(x, "mhc_head", fn, scale, base):
        return _dsv4.mhc_head(x, fn, scale, base, norm_eps, eps)
    return hc_head_reference(x, fn, scale, base, norm_eps, eps)
