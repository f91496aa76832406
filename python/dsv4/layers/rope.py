"""Rotary position embedding: interleaved pairs on the last ``rope_head_dim`` dims (§3.4)."""

from __future__ import annotations

import math

import torch

__all__ = ["rope_frequencies", "apply_rope"]


def rope_frequencies(rope_dim: int, theta: float, original_seq_len: int = 0,
                     factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0
                     ) -> torch.Tensor:
    """Per-pair angular frequencies [rope_dim // 2] fp32, with YaRN when ``original_seq_len > 0``.

    ``f_i = theta ** (-2i / rope_dim)``; YaRN blends ``f_i / factor`` in over pairs between the
    correction dims of ``beta_fast`` and ``beta_slow`` rotations (official
    ``precompute_freqs_cis``; architecture.md §3.4). No attention temperature (mscale).
    SWA layers: theta = rope_theta, original_seq_len = 0. CSA/HCA layers: compress_rope_theta
    with YaRN.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device="cpu") / rope_dim))
    if original_seq_len > 0:
        def corr_dim(rot: float) -> float:
            return rope_dim * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``2 * len(freqs)`` dims of ``x`` by ``positions * freqs`` (interleaved pairs).

    x: [..., dim] (the rope slice is the last ``rope_dim`` dims, pairs (2i, 2i+1));
    positions: integer tensor broadcastable to ``x.shape[:-1]`` after dropping trailing head
    dims — pass it shaped like x's leading dims (e.g. [tokens, 1] for x [tokens, heads, dim]).
    Angles are fp32 ``t * f_i`` and the complex product is fp32, as in the official
    ``apply_rotary_emb``; ``inverse`` rotates by −angle (output path, §3.7).
    Returns a new tensor of x's dtype.
    """
    rd = freqs.shape[0] * 2
    ang = positions.to(torch.float32)[..., None] * freqs.to(positions.device)
    rot = torch.polar(torch.ones_like(ang), ang)
    if inverse:
        # conj_physical, not the lazy conj bit: op kernels run under torch.compile / AOT
        # tracing with the Conjugate dispatch key excluded, where a lazy conj is ignored
        rot = torch.conj_physical(rot)
    xr = torch.view_as_complex(x[..., -rd:].float().unflatten(-1, (-1, 2)).contiguous())
    y = torch.view_as_real(xr * rot).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-rd], y], dim=-1)
