"""Test models whose constant-initialised parameters hold varied values.

A freshly built ``dsv4.Model`` has every RMSNorm weight 1, every ``attn_sink`` 0 and the
``hc_*_scale`` values 1 (the official initialisation). A glue bug that drops one of them, passes
its default, or swaps two of them then gives the same logits, so a test that compares two
paths of such a model cannot see it. :func:`vary_constant_parameters` gives those parameters
random values near their initial one before the comparison.
"""

from __future__ import annotations

import torch


def vary_constant_parameters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace each floating-point parameter whose elements all equal one value ``c`` by
    ``c + u * max(|c|, 1)`` with ``u ~ U(-0.5, 0.5)`` per element (norm weights in [0.5, 1.5],
    sinks in [-0.5, 0.5]); other parameters and buffers are left alone. Returns ``model``.
    Raises AssertionError if the model has no such parameter (the helper would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            flat = p.detach().reshape(-1)
            if not p.is_floating_point() or flat.numel() == 0 or not bool((flat == flat[0]).all()):
                continue
            c = flat[0].item()
            u = torch.rand(p.shape, generator=g, dtype=torch.float32) - 0.5
            p.copy_((c + u * max(abs(c), 1.0)).to(p.device, p.dtype))
            changed += 1
    assert changed, "vary_constant_parameters: no constant-initialised parameter found"
    return model
