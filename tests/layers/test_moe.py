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


def _two_step_swiglu(gate, up, limit, weight=None, dtype=None):
    """The formula as written before the launch diet: both inputs upcast to fp32 first, the
    routing weight multiplied after, the result cast in a separate step."""
    g, u = gate.float(), up.float()
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    h = torch.nn.functional.silu(g) * u
    if weight is not None:
        h = weight * h
    return h if dtype is None else h.to(dtype)


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("limit", [0.0, 10.0, 7.3])
def test_swiglu_with_fewer_launches_gives_the_same_bits(dtype, limit):
    """swiglu_clamped clamps ``up`` in its own dtype when the limit is exact there (10 in
    bf16; 7.3 is not: it upcasts first), lets the fp32 product promote it, and writes the
    last product in the output dtype directly: bit for bit the two-step formula, fp32 and
    rounded, with and without a routing weight, at NaN / ±inf / -0 and around the limit."""
    g = torch.Generator().manual_seed(5)
    gate = (torch.randn(16, 40, generator=g) * 12).to(dtype)
    up = (torch.randn(16, 40, generator=g) * 12).to(dtype)
    gate[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    up[1, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    up[2, :2] = torch.tensor([limit, -limit]).to(dtype)
    weight = torch.rand(16, 1, generator=g)
    for w in (None, weight):
        want = _two_step_swiglu(gate, up, limit, w)
        got = swiglu_clamped(gate, up, limit, w)
        assert got.dtype == torch.float32 and torch.equal(_bits(got), _bits(want))
        want = _two_step_swiglu(gate, up, limit, w, dtype)
        got = swiglu_clamped(gate, up, limit, w, dtype)
        assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))


def test_swiglu_rounded_keeps_gradients():
    """With gradients needed the rounded form is the two-step product (``out=`` has no
    backward): same values and the gradients of the two-step formula."""
    g = torch.Generator().manual_seed(6)
    gate = (torch.randn(5, 8, generator=g) * 12).requires_grad_()
    up = (torch.randn(5, 8, generator=g) * 12).requires_grad_()
    weight = torch.rand(5, 1, generator=g).requires_grad_()
    got = swiglu_clamped(gate, up, 10.0, weight, torch.bfloat16)
    want = _two_step_swiglu(gate, up, 10.0, weight, torch.bfloat16)
    assert torch.equal(got, want)
    grads = torch.autograd.grad(got.float().sum(), (gate, up, weight))
    wants = torch.autograd.grad(want.float().sum(), (gate, up, weight))
    assert all(torch.equal(a, b) for a, b in zip(grads, wants))
