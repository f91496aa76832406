"""mHC against the test vectors of training.md §7.1-7.2 and against the paper-form Sinkhorn."""

from __future__ import annotations

import torch

from dsv4.layers.mhc import hc_head, hc_post, hc_pre, sinkhorn

L = torch.tensor([[-3.3775196, -3.4570806, -0.7517357, -1.3016365],
                  [2.5461311, 2.0760274, -0.9480383, -6.3456583],
                  [0.9668248, -3.7900043, 1.0499495, 0.9244018],
                  [0.3595245, 3.7129736, 3.3503315, -0.7418345]])


def test_sinkhorn_vector():
    expected = torch.tensor([[0.0405936, 0.0330831, 0.4034770, 0.5228455],
                             [0.6354968, 0.3504710, 0.0138882, 0.0001429],
                             [0.2995740, 0.0022724, 0.2342138, 0.4639388],
                             [0.0243346, 0.6141724, 0.3484201, 0.0130718]])
    out = sinkhorn(L, 20, 1e-6)
    torch.testing.assert_close(out, expected, atol=2e-7, rtol=0)
    torch.testing.assert_close(out.sum(-1), torch.tensor([0.9999992, 0.9999989, 0.9999992, 0.9999989]),
                               atol=2e-7, rtol=0)
    assert (out.sum(-2) - 1).abs().max() < 2e-6


def test_sinkhorn_special_inputs():
    eye = sinkhorn(4 * torch.eye(4), 20, 1e-6)
    torch.testing.assert_close(eye.diagonal(), torch.full((4,), 0.9479113), atol=2e-7, rtol=0)
    assert abs(eye[0, 1].item() - 0.0173626) < 2e-7
    rank1 = sinkhorn((torch.arange(16.).view(4, 4) - 7.5) / 4, 20, 1e-6)
    assert ((rank1 - 0.25).abs() < 5e-7).all()


def test_sinkhorn_equals_paper_form_transposed():
    """code(L, eps=0) == paper(Lᵀ)ᵀ where paper = exp then 20 × [column, row] normalisation."""
    x = torch.randn(5, 4, 4, dtype=torch.float64) * 3
    B = torch.exp(x.transpose(-1, -2))
    for _ in range(20):
        B = B / B.sum(-2, keepdim=True)
        B = B / B.sum(-1, keepdim=True)
    torch.testing.assert_close(sinkhorn(x, 20, 0.0).double(), B.transpose(-1, -2),
                               atol=1e-6, rtol=0)


def _vectors():
    X = torch.arange(12.).view(1, 1, 4, 3) / 10 - 0.5
    fn = ((torch.arange(24 * 12).view(24, 12) % 7) - 3) / 10
    return X, fn, torch.tensor([0.5, 0.25, 1.0]), torch.linspace(-1, 1, 24)


def test_hc_pre_post_vectors():
    X, fn, scale, base = _vectors()
    u, post, comb = hc_pre(X, fn, scale, base, 1e-6, 20, 1e-6)
    torch.testing.assert_close(u.flatten(), torch.tensor([-0.026476, 0.094946, 0.216368]),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(post.flatten(), torch.tensor([0.656249, 0.656668, 0.844563, 0.869600]),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(comb[0, 0], torch.tensor([[0.158760, 0.151850, 0.374765, 0.314623],
                                                         [0.146592, 0.312899, 0.346040, 0.194468],
                                                         [0.265593, 0.310489, 0.188063, 0.235855],
                                                         [0.429054, 0.224761, 0.091131, 0.255053]]),
                               atol=2e-6, rtol=0)
    f = torch.tensor([1.0, -2.0, 0.5]).view(1, 1, 3)
    out = hc_post(f, X, post, comb)
    expected = torch.tensor([[0.745732, -1.123016, 0.617607], [0.639116, -1.230888, 0.510782],
                             [0.643232, -1.790458, 0.420950], [0.799001, -1.709798, 0.564201]])
    torch.testing.assert_close(out[0, 0], expected, atol=2e-6, rtol=0)
    # combᵀ: stream k receives Σ_j comb[j, k] X_j (comb is not symmetric)
    manual = post[0, 0, :, None] * f[0, 0] + comb[0, 0].T @ X[0, 0]
    torch.testing.assert_close(out[0, 0], manual, atol=1e-6, rtol=0)


def test_hc_head_vector():
    X, fn, _, _ = _vectors()
    out = hc_head(X, fn[:4], torch.tensor([0.5]), torch.tensor([0.1, -0.1, 0.2, -0.2]), 1e-6, 1e-6)
    torch.testing.assert_close(out.flatten(), torch.tensor([-0.116592, 0.085966, 0.288524]),
                               atol=2e-6, rtol=0)
