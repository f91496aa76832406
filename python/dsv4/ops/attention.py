"""Sparse attention with a per-head sink: the reference (architecture.md §3.6).

The reference is the semantics every kernel is checked against: fp32 math, index −1 = invalid,
a query with no valid key returns 0 and lse +inf, the sink joins the softmax denominator with a
zero value, and lse excludes the sink (FlashMLA's convention).
"""

from __future__ import annotations

import math

import torch

__all__ = ["sparse_attn_reference"]

# Bytes of gathered keys materialised at once (the reference chunks over queries).
_CHUNK_BYTES = 64 << 20


def sparse_attn_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                          attn_sink: torch.Tensor, softmax_scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its listed rows of a shared K = V array, with a sink.

    Args:
        q: [tokens, heads, head_dim], float32 or bfloat16.
        kv: [n_kv, head_dim], same dtype; each row is both key and value (MQA, one KV head).
        indices: [tokens, k] integer rows into ``kv``; −1 marks an unused slot. Other values
            must lie in [0, n_kv).
        attn_sink: [heads] float32 sink logit per head.
        softmax_scale: multiplies q·k (``head_dim ** -0.5`` in V4).

    Returns:
        out: [tokens, heads, head_dim] in ``q.dtype``:
            ``o_h = Σ_j e^{s_hj} k_j / (Σ_j e^{s_hj} + e^{sink_h})`` with ``s_hj = scale·q_h·k_j``;
            0 for a query without a valid index.
        lse: [tokens, heads] float32, ``log Σ_j e^{s_hj}`` over the valid keys only (no sink);
            +inf for a query without a valid index.

    Raises:
        ValueError: on mismatched shapes or an index outside [−1, n_kv).
    """
    if q.dim() != 3 or kv.dim() != 2 or indices.dim() != 2:
        raise ValueError("sparse_attn: expected q [tokens, heads, dim], kv [n_kv, dim], "
                         f"indices [tokens, k]; got {tuple(q.shape)}, {tuple(kv.shape)}, "
                         f"{tuple(indices.shape)}")
    T, H, D = q.shape
    if kv.shape[1] != D or indices.shape[0] != T or attn_sink.shape != (H,):
        raise ValueError("sparse_attn: shape mismatch between q, kv, indices and attn_sink")
    n_kv = kv.shape[0]
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= n_kv):
        raise ValueError(f"sparse_attn: indices must lie in [-1, {n_kv}); got "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    K = indices.shape[1]
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    lse = torch.full((T, H), math.inf, dtype=torch.float32, device=q.device)
    if T == 0 or K == 0:
        return out.to(q.dtype), lse
    kvf = kv.float()
    sink = attn_sink.float()
    step = max(1, _CHUNK_BYTES // max(1, K * D * 4))
    for t0 in range(0, T, step):
        idx = indices[t0:t0 + step].long()
        valid = idx >= 0
        keys = kvf[idx.clamp_min(0)]                                   # [t, k, D]
        s = torch.einsum("thd,tkd->thk", q[t0:t0 + step].float(), keys) * softmax_scale
        s = s.masked_fill(~valid[:, None, :], -math.inf)
        m = s.amax(-1, keepdim=True)                                    # -inf: no valid key
        m = torch.where(torch.isfinite(m), m, 0.0)
        p = torch.exp(s - m)
        denom = p.sum(-1)
        # sink = +inf gives out = 0; sink = -inf is a plain softmax.
        o = torch.einsum("thk,tkd->thd", p, keys) / (denom + torch.exp(sink - m[..., 0]))[..., None]
        any_valid = valid.any(-1)[:, None]
        out[t0:t0 + step] = torch.where(any_valid[..., None], o, 0.0)
        lse[t0:t0 + step] = torch.where(any_valid, m[..., 0] + torch.log(denom), math.inf)
    return out.to(q.dtype), lse
