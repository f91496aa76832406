"""Mixture of experts: sqrt-softplus gate, hash routing, clamped SwiGLU experts (§9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear

__all__ = ["Gate", "Expert", "MoE", "swiglu_clamped"]


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(min(gate, limit)) * clamp(up, -limit, limit)`` in fp32 (limit 0 = no clamp).

    Source: official ``Expert.forward``; training.md §3.6 / §7.4 (test vectors).
    """
    gate, up = gate.float(), up.float()
    if limit > 0:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    return F.silu(gate) * up


class Gate(nn.Module):
    """Router: scores ``sqrt(softplus(x·Wᵀ))`` in fp32; selection by top-k of ``score + bias``
    (learned layers) or by ``tid2eid[token_id]`` (hash layers, ``layer_id < n_hash_layers``);
    weights = selected scores / their sum × ``route_scale`` (the bias never enters the weights).
    Parameters: ``weight`` [n_routed_experts, dim]; ``bias`` [n_routed_experts] fp32 (learned) or
    the int64 buffer ``tid2eid`` [vocab_size, n_activated_experts] (hash).

    ``route_hook`` (None by default; set by :mod:`dsv4.train.routing`): a callable
    ``(gate, scores [N, n_routed_experts] fp32, indices [N, topk] int64) -> indices`` run after
    the selection and before the weights are gathered. Training uses it to read the scores
    (balance loss) and the load, and to apply routing indices computed earlier (anticipatory
    routing, training.md §3.7); the weights always come from this call's scores.
    """

    route_hook = None

    def __init__(self, config, layer_id: int):
        super().__init__()
        self.topk = config.n_activated_experts
        self.route_scale = config.route_scale
        self.n_experts = config.n_routed_experts
        self.hash = layer_id < config.n_hash_layers
        self.weight = nn.Parameter(torch.randn(config.n_routed_experts, config.dim) * config.dim ** -0.5)
        if self.hash:
            self.bias = None
            tid2eid = torch.rand(config.vocab_size, config.n_routed_experts).argsort(-1)[:, :self.topk]
            self.register_buffer("tid2eid", tid2eid.long())
        else:
            self.bias = nn.Parameter(torch.randn(config.n_routed_experts) * 0.01)
            self.bias._dsv4_keep_fp32 = True

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim], input_ids [N] → (weights [N, topk] fp32, indices [N, topk] int64).

        Raises ValueError (hash layers) for a token id outside [0, tid2eid.shape[0]).
        """
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()
        if self.hash:
            n_ids = self.tid2eid.shape[0]
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= n_ids):
                raise ValueError(
                    f"hash-routed MoE: token ids must lie in [0, {n_ids}) (the rows of tid2eid); "
                    f"got ids in [{int(input_ids.min())}, {int(input_ids.max())}]")
            indices = self.tid2eid[input_ids]
        else:
            indices = (scores + self.bias).topk(self.topk, dim=-1).indices
        if self.route_hook is not None:
            indices = self.route_hook(self, scores, indices)
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * self.route_scale
        return weights, indices


class Expert(nn.Module):
    """SwiGLU expert ``w2(clamped_swiglu(w1 x, w3 x) · weight)`` (routing weight before ``w2``)."""

    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, dim] → [N, dim] in x.dtype; ``weights`` [N, 1] fp32 routing weights or None."""
        h = swiglu_clamped(self.w1(x), self.w3(x), self.swiglu_limit)
        if weights is not None:
            h = weights * h
        return self.w2(h.to(x.dtype))


class MoE(nn.Module):
    """Routed experts (top-``n_activated_experts``) plus the always-on shared expert, both clamped.

    ``y = Σ_routed expert_e(x, w_e)`` accumulated in fp32 in expert order, ``+ shared(x)``, cast to
    x.dtype (official ``MoE.forward``; the shared expert is clamped too, architecture.md §9).
    """

    def __init__(self, config, layer_id: int):
        super().__init__()
        c = config
        self.dim = c.dim
        self.gate = Gate(c, layer_id)
        self.experts = nn.ModuleList(
            Expert(c.dim, c.moe_inter_dim, c.swiglu_limit) for _ in range(c.n_routed_experts))
        if c.n_shared_experts != 1:
            raise ValueError("dsv4 supports n_shared_experts == 1 (the released V4 models)")
        self.shared_experts = Expert(c.dim, c.n_shared_experts * c.moe_inter_dim, c.swiglu_limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, dim], input_ids [batch, seq] → [batch, seq, dim]."""
        shape = x.shape
        x = x.reshape(-1, self.dim)
        weights, indices = self.gate(x, input_ids.reshape(-1))
        y = torch.zeros_like(x, dtype=torch.float32)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
        for e, cnt in enumerate(counts):
            if cnt == 0:
                continue
            tok, slot = torch.where(indices == e)
            y.index_add_(0, tok, self.experts[e](x[tok], weights[tok, slot, None]).float())
        y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)
