"""RoPE tables and rotation (architecture.md §3.4)."""

from __future__ import annotations

import math

import torch

from dsv4.layers.rope import apply_rope, rope_frequencies


def test_plain_table():
    f = rope_frequencies(64, 10000.0)
    torch.testing.assert_close(f, 10000.0 ** (-torch.arange(0, 64, 2) / 64), rtol=1e-6, atol=0)


def test_yarn_ramp_low15_high25():
    base = rope_frequencies(64, 160000.0)
    f = rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0)
    assert torch.equal(f[:16], base[:16])             # pairs i <= 15 keep their frequency
    torch.testing.assert_close(f[25:], base[25:] / 16)  # pairs i >= 25 divided by 16
    rho = (20 - 15) / (25 - 15)
    assert math.isclose(f[20].item(), (base[20] / 16 * rho + base[20] * (1 - rho)).item(), rel_tol=1e-6)


def test_interleaved_pairs_on_last_dims_and_inverse():
    f = rope_frequencies(8, 10000.0)
    x = torch.randn(5, 3, 12)
    pos = torch.arange(5)[:, None]
    y = apply_rope(x, pos, f)
    assert torch.equal(y[..., :4], x[..., :4])                 # nope dims untouched
    t, i = 3, 1                                                # pair (2i, 2i+1) of the rope slice
    a = t * f[i].item()
    a0, a1 = x[t, :, 4 + 2 * i], x[t, :, 5 + 2 * i]
    torch.testing.assert_close(y[t, :, 4 + 2 * i], a0 * math.cos(a) - a1 * math.sin(a))
    torch.testing.assert_close(y[t, :, 5 + 2 * i], a0 * math.sin(a) + a1 * math.cos(a))
    torch.testing.assert_close(apply_rope(y, pos, f, inverse=True), x, atol=1e-6, rtol=1e-6)
