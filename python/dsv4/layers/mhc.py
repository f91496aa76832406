"""mHC: manifold-constrained hyper-connections (architecture.md §8, training.md §1.4).

The residual is ``hc_mult`` parallel streams X [batch, seq, hc, dim]. Each sub-layer site
collapses them with ``pre`` weights, runs the sub-layer, and writes back
``X'_k = post_k · F(u) + Σ_j comb[j, k] · X_j`` (comb applied transposed). All mixing maths is
fp32; the residual keeps the model dtype between sub-layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sinkhorn", "hc_split", "hc_pre", "hc_post", "hc_head"]


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


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           norm_eps: float, iters: int, eps: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse streams x [b, s, hc, d] → (u [b, s, d] in x.dtype, post [b, s, hc], comb [b, s, hc, hc])."""
    hc = x.shape[-2]
    xf, mixes = _mixes(x, fn, norm_eps)
    pre, post, comb = hc_split(mixes, scale, base, hc, iters, eps)
    u = torch.sum(pre.unsqueeze(-1) * xf.view(x.shape), dim=-2)
    return u.to(x.dtype), post, comb


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
            ) -> torch.Tensor:
    """``out[k] = post[k]·f + Σ_j comb[j, k]·residual[j]`` in fp32, cast to f.dtype.

    f [b, s, d]; residual [b, s, hc, d]; post [b, s, hc]; comb [b, s, hc, hc] (combᵀ applied).
    """
    y = post.unsqueeze(-1) * f.float().unsqueeze(-2) + torch.sum(
        comb.unsqueeze(-1) * residual.float().unsqueeze(-2), dim=-3)
    return y.to(f.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            norm_eps: float, eps: float) -> torch.Tensor:
    """Final collapse y = Σ_i pre_i X_i with pre = sigmoid(scale·mixes + base) + eps (§8).

    x [b, s, hc, d] → [b, s, d] in x.dtype; fn [hc, hc·d], scale [1], base [hc] fp32.
    """
    xf, mixes = _mixes(x, fn, norm_eps)
    pre = torch.sigmoid(mixes * scale + base) + eps
    return torch.sum(pre.unsqueeze(-1) * xf.view(x.shape), dim=-2).to(x.dtype)

