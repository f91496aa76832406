"""Router and SwiGLU clamp against training.md §7.4; hash routing errors."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.layers.moe import Gate, MoE, swiglu_clamped


def _gate(hash_layer: bool) -> Gate:
    cfg = dsv4.ModelConfig.tiny(n_routed_experts=8, n_activated_experts=2, route_scale=1.5,
                                vocab_size=1000, dim=8)
    return Gate(cfg, 0 if hash_layer else cfg.n_hash_layers)


def test_router_vector():
    g = _gate(False)
    logits = torch.tensor([[1.0, -0.5, 2.0, 0.3, -1.2, 0.8, 1.9, -2.0],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
    # x = logits with an identity gate weight (dim 8) reproduces the given gate logits.
    with torch.no_grad():
        g.weight.copy_(torch.eye(8))
        g.bias.copy_(torch.tensor([0, 0, -0.2, 0, 0, 0.15, 0, 0]))
    w, idx = g(logits, torch.zeros(2, dtype=torch.long))
    assert idx.tolist() == [[6, 2], [5, 7]]
    torch.testing.assert_close(w, torch.tensor([[0.742120, 0.757880], [0.727293, 0.772707]]),
                               atol=2e-6, rtol=0)


def test_hash_routing_uses_tid2eid_and_rejects_unknown_ids():
    g = _gate(True)
    ids = torch.tensor([3, 999])
    x = torch.randn(2, 8)
    w, idx = g(x, ids)
    assert idx.dtype == torch.int32 and torch.equal(idx.long(), g.tid2eid[ids])
    assert torch.allclose(w.sum(-1), torch.full((2,), 1.5))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1000\)"):
        g(x, torch.tensor([3, 1000]))


def test_model_rejects_out_of_vocab_ids():
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(vocab_size=512))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.tensor([[1, 512]]))


def test_swiglu_clamp_vector():
    gate = torch.tensor([-12.0, -3.0, 0.0, 5.0, 12.0])
    up = torch.tensor([15.0, -15.0, 2.0, -11.0, 0.5])
    out = swiglu_clamped(gate, up, 10.0)
    torch.testing.assert_close(out, torch.tensor([-0.000737, 1.422776, 0.0, -49.665356, 4.999773]),
                               atol=2e-6, rtol=1e-6)


def test_moe_matches_explicit_sum_with_clamped_shared_expert():
    torch.manual_seed(1)
    cfg = dsv4.ModelConfig.tiny(vocab_size=100)
    moe = MoE(cfg, cfg.n_hash_layers)   # learned routing
    x = torch.randn(1, 5, cfg.dim) * 30          # large inputs so the clamp is active
    ids = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        y = moe(x, ids)
        w, idx = moe.gate(x[0], ids[0])

        def expert(e, v, weight=None):
            h = torch.nn.functional.silu((v @ e.w1.weight.T).clamp(max=10)) * (v @ e.w3.weight.T).clamp(-10, 10)
            return (h if weight is None else weight * h) @ e.w2.weight.T
        ref = expert(moe.shared_experts, x[0])
        for t in range(5):
            for k in range(cfg.n_activated_experts):
                ref[t] += expert(moe.experts[int(idx[t, k])], x[0, t], w[t, k])
    torch.testing.assert_close(y[0], ref, atol=1e-4, rtol=1e-5)
