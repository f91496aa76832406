"""The sparse-attention reference against a dense float64 formula and its edge contract."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.ops.attention import sparse_attn_reference


def _dense(q, kv, idx, sink, scale):
    """float64: o = Σ e^s v / (Σ e^s + e^sink) over the listed valid rows, lse without the sink."""
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), math.inf, dtype=torch.float64)
    for t in range(T):
        rows = idx[t][idx[t] >= 0]
        if len(rows) == 0:
            continue
        k = kv[rows].double()
        s = q[t].double() @ k.T * scale                          # [H, n]
        e = torch.exp(s)
        out[t] = (e @ k) / (e.sum(-1) + torch.exp(sink.double()))[:, None]
        lse[t] = torch.logsumexp(s, -1)
    return out, lse


@pytest.mark.parametrize("T,H,D,N,K", [(1, 1, 16, 5, 3), (7, 4, 64, 40, 12), (33, 3, 32, 200, 70)])
def test_matches_dense_formula(T, H, D, N, K):
    g = torch.Generator().manual_seed(T * 100 + K)
    q = torch.randn(T, H, D, generator=g)
    kv = torch.randn(N, D, generator=g)
    idx = torch.randint(0, N, (T, K), generator=g)
    idx[:, 0] = -1                                  # -1 at the front of a row
    idx[-1, 1:] = torch.randperm(N, generator=g)[:K - 1]   # distinct rows
    idx[0] = -1                                     # an all-invalid row
    sink = torch.randn(H, generator=g)
    out, lse = sparse_attn_reference(q, kv, idx, sink, D ** -0.5)
    ref_o, ref_l = _dense(q, kv, idx, sink, D ** -0.5)
    torch.testing.assert_close(out.double(), ref_o, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l))
    fin = torch.isfinite(ref_l)
    torch.testing.assert_close(lse.double()[fin], ref_l[fin], atol=1e-5, rtol=1e-5)
    assert (out[0] == 0).all() and (lse[0] == math.inf).all()


def test_sink_limits():
    q = torch.randn(3, 2, 8)
    kv = torch.randn(6, 8)
    idx = torch.tensor([[0, 1, 2], [3, -1, 5], [-1, -1, 4]])
    plain, lse = sparse_attn_reference(q, kv, idx, torch.full((2,), -math.inf), 0.3)
    for t in range(3):
        rows = idx[t][idx[t] >= 0]
        w = torch.softmax(q[t] @ kv[rows].T * 0.3, -1)
        torch.testing.assert_close(plain[t], w @ kv[rows], atol=1e-6, rtol=1e-5)
    out, lse2 = sparse_attn_reference(q, kv, idx, torch.full((2,), math.inf), 0.3)
    assert (out == 0).all() and torch.equal(lse, lse2)       # lse never includes the sink
    big, _ = sparse_attn_reference(q * 1e4, kv, idx, torch.zeros(2), 1.0)   # huge logits
    assert torch.isfinite(big).all()


def test_rejects_out_of_range_indices():
    q, kv = torch.randn(2, 1, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        sparse_attn_reference(q, kv, torch.tensor([[0], [3]]), torch.zeros(1), 1.0)
