"""The Sinkhorn iteration count of mHC pinned by a vector that separates 19 from 20 (and 21)
iterations (issue 13 item 7; architecture.md §8 step 5: softmax + eps, a column
normalisation, then hc_sinkhorn_iters - 1 = 19 row/column rounds: 20 column normalisations).

The test vectors of tests/layers/test_mhc.py converge within float32 long before 19 rounds,
so they cannot tell the count. This matrix converges slowly: three rows want column 0, which
only one row's worth of mass can fill, so each round still moves entries by ~1e-3."""

from __future__ import annotations

import torch

import dsv4
from dsv4.layers.mhc import hc_split, sinkhorn

L = torch.tensor([[8.0, 0, 0, 0], [8, 0, 0, 0], [8, 0, 0, 0], [0, 0, 0, 8]])
EPS = 1e-6


def _independent(logits: torch.Tensor, column_normalisations: int, eps: float) -> torch.Tensor:
    """§8 step 5 in float64, counted in column normalisations."""
    x = logits.double()
    c = torch.exp(x - x.max(-1, keepdim=True).values)
    c = c / c.sum(-1, keepdim=True) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(column_normalisations - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def test_the_vector_separates_19_20_and_21_iterations():
    w19, w20, w21 = (_independent(L, k, EPS) for k in (19, 20, 21))
    assert (w19 - w20).abs().max() > 5e-4 and (w21 - w20).abs().max() > 5e-4


def test_sinkhorn_runs_exactly_the_given_count():
    for k in (19, 20, 21):
        got = sinkhorn(L, k, EPS).double()
        torch.testing.assert_close(got, _independent(L, k, EPS), atol=2e-6, rtol=0)


def test_the_model_configs_and_hc_split_run_20():
    for cfg in (dsv4.ModelConfig.flash(), dsv4.ModelConfig.pro(), dsv4.ModelConfig.tiny()):
        assert cfg.hc_sinkhorn_iters == 20 and cfg.hc_eps == EPS
    hc = 4
    mixes = torch.cat([torch.zeros(2 * hc), L.flatten()])       # comb logits = L
    _, _, comb = hc_split(mixes, torch.ones(3), torch.zeros((2 + hc) * hc), hc,
                          dsv4.ModelConfig.flash().hc_sinkhorn_iters, EPS)
    want = _independent(L, 20, EPS)
    torch.testing.assert_close(comb.double(), want, atol=2e-6, rtol=0)
    assert (comb.double() - _independent(L, 19, EPS)).abs().max() > 5e-4
