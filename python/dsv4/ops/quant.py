"""Quantisation simulation used by the reference forward (architecture.md §3.3, §5, §12.3).

All functions are pure PyTorch, work on any device and return a tensor of the input's dtype and
shape holding the *dequantised* values (a quant-dequant round trip). Scales are powers of two
(UE8M0) and casts round to nearest, ties to even, as the official kernels do.
"""

from __future__ import annotations

import torch

from ..cache import as_int

__all__ = ["ue8m0_scale", "e8m0_to_float", "fp8_e4m3_quantize", "fp8_e4m3_sim", "fp4_e2m1_sim",
           "fp4_e2m1_round",
           "hadamard",
           "FP8_E4M3_MAX", "FP4_E2M1_MAX"]

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0


def check_block(block, fn: str, even: bool = False) -> int:
    """``block`` as a python int >= 1 (even and >= 2 with ``even``); ValueError naming ``fn``
    otherwise (a block of 0 divided by zero, a float one failed deep in torch)."""
    want = "an even integer >= 2" if even else "an integer >= 1"
    b = as_int(block, f"{fn}: block", want)
    if b < (2 if even else 1) or (even and b % 2):
        raise ValueError(f"{fn}: block must be {want}, got {block!r}")
    return b


def ue8m0_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Power-of-two scale ``2**ceil(log2(amax / qmax))``, exactly (no log2 rounding error).

    ``amax`` fp32 (already clamped away from 0 by the caller). Source: the official
    ``fast_round_scale`` (architecture.md §3.3, training.md §5.2). A non-finite ``amax`` (a
    block holding inf or NaN) gives 1: ``torch.frexp`` of inf / NaN has exponent 0 on the CPU
    and in CUDA's ``frexpf``; the CUDA writers and simulations do the same
    (csrc/kernels/fp8_block_quant.cuh).
    """
    mant, exp = torch.frexp(amax.float() / qmax)  # v = mant * 2**exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(amax, dtype=torch.float32), exp)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode e8m0 (UE8M0) scales to float32: ``2**(code - 127)`` exactly, code 0 -> 2**-127
    (an fp32 subnormal), code 255 -> NaN (OCP MX ``float8_e8m0fnu``, as torch's own cast).
    The one decoding of scale bytes: checkpoint scales (:mod:`dsv4.quant`, which re-exports
    it) and the FP8 KV caches' scale bytes (:mod:`dsv4.ops.kv_cache`) both use it.

    scale: float8_e8m0fnu (or uint8 codes) of any shape. A float32/bf16/fp16 tensor (the
    float scales of the "-Base" checkpoints, architecture.md §12.3) is returned as float32
    unchanged in value. Raises TypeError for other dtypes.
    """
    if scale.dtype == torch.float8_e8m0fnu:
        codes = scale.view(torch.uint8)
    elif scale.dtype == torch.uint8:
        codes = scale
    elif scale.is_floating_point():
        return scale.float()
    else:
        raise TypeError(f"e8m0 scales must be float8_e8m0fnu or uint8 codes (or float scales), "
                        f"got {scale.dtype}")
    c = codes.to(torch.int32)
    # fp32 bit patterns: exponent field = code for codes 1..254; code 0 = 2**-127 (subnormal).
    bits = torch.where(c == 0, torch.full_like(c, 0x00400000), c << 23)
    bits = torch.where(c == 255, torch.full_like(c, 0x7FC00000), bits)
    return bits.view(torch.float32)


def _check_float_blocks(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{fn}: x must be a float tensor [..., n] (at least 1-D), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} "
                         f"{tuple(getattr(x, 'shape', ()))}")


def fp8_e4m3_quantize(x: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantisation half of :func:`fp8_e4m3_sim`: e4m3 codes ``float8_e4m3fn [..., n]`` and
    their power-of-two block scales ``float32 [..., n / block]`` (``x ≈ codes * scale``; the
    FP8 caches store exactly these, dsv4.ops.kv_cache).
    Non-finite values: a block holding inf or NaN has scale 1 (:func:`ue8m0_scale`); in it a
    NaN gets the NaN code of its sign (0x7f / 0xff), +-inf +-448 (0x7e / 0xfe), every other
    value ``e4m3(clamp(x, +-448))``; other blocks are unaffected.
    Raises ValueError if the last dim is not a multiple of ``block``.
    """
    block = check_block(block, "fp8_e4m3_sim")
    _check_float_blocks(x, "fp8_e4m3_sim")
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"fp8_e4m3_sim: last dim {n} is not a multiple of the block size {block}")
    xf = x.float().unflatten(-1, (n // block, block))
    amax = xf.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = ue8m0_scale(amax, FP8_E4M3_MAX)
    q = (xf / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), s.squeeze(-1)


def fp8_e4m3_sim(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """FP8 e4m3 quant-dequant of ``x`` in blocks of ``block`` along the last dim.

    x: [..., n] with ``n % block == 0``, any float dtype. Per block: ``amax = max(|x|, 1e-4)``,
    ``s = 2**ceil(log2(amax / 448))``, ``y = e4m3(clamp(x / s, ±448)) * s`` (round to nearest
    even). Used on the non-RoPE KV dims (architecture.md §3.3: dsv4 performs the real FP8 round
    trip) and, with block 128, on activations before FP8 GEMMs (§12.3).
    Near the top of ``x``'s dtype the round trip can overflow: a block maximum that rounds up
    to ``256 * s`` comes back as inf when that exceeds the dtype (fp32/bf16 values above
    ~3.3e38, fp16 values from 63,488), as the same fp32 arithmetic in the kernels gives.
    Raises ValueError if the last dim is not a multiple of ``block``.
    """
    q, s = fp8_e4m3_quantize(x, block)
    return (q.float().unflatten(-1, (-1, block)) * s[..., None]).flatten(-2).to(x.dtype)


def fp4_e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-6, 6] to the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even code.

    Ties: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4 (the even code of each pair).
    The sign is kept (−0 for negative values that round to 0). Source: the OCP MX e2m1 format.
    NaN (e2m1 has no NaN code) rounds to 6 with the NaN's sign bit, as the CUDA kernels'
    e2m1 rounding does (compress_kv.cu); a block holding NaN has scale 1 (:func:`ue8m0_scale`).
    """
    a = y.abs()
    v = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0,
        torch.where(a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0,
        torch.where(a <= 5.0, 4.0, 6.0)))))))
    return torch.copysign(v.to(torch.float32), y)


def fp4_e2m1_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 e2m1 quant-dequant of ``x`` in blocks of ``block`` along the last dim.

    Per block: ``amax = max(|x|, 6 * 2**-126)``, ``s = 2**ceil(log2(amax / 6))``,
    ``y = e2m1(x / s) * s``. Source: official ``fp4_act_quant`` (training.md §5.2), applied to
    indexer queries and keys after the Hadamard rotation (architecture.md §5).
    As in :func:`fp8_e4m3_sim`, a block maximum within a rounding step of its dtype's largest
    value (fp32 above ~3e38) can come back as inf.
    Raises ValueError if the last dim is not a multiple of ``block``.
    """
    block = check_block(block, "fp4_e2m1_sim")
    _check_float_blocks(x, "fp4_e2m1_sim")
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"fp4_e2m1_sim: last dim {n} is not a multiple of the block size {block}")
    xf = x.float().unflatten(-1, (n // block, block))
    amax = xf.abs().amax(-1, keepdim=True).clamp_min(FP4_E2M1_MAX * 2.0 ** -126)
    s = ue8m0_scale(amax, FP4_E2M1_MAX)
    q = fp4_e2m1_round((xf / s).clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX))
    return (q * s).flatten(-2).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh–Hadamard transform over the last dim (Sylvester order), scale n**-0.5.

    x: [..., n] with n a power of two; computed in fp32 by butterflies and cast back to
    ``x.dtype``. Equals ``x @ H_n.T / sqrt(n)`` with ``H_{2k} = [[H_k, H_k], [H_k, -H_k]]``, the
    matrix ``fast_hadamard_transform`` applies (architecture.md §5 step 3).
    Raises ValueError if ``x`` is not a floating-point tensor (an integer one came back
    truncated to integers) or n is not a power of two.
    """
    _check_float_blocks(x, "hadamard")
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: last dim must be a power of two, got {n}")
    y = x.float()
    h = 1
    while h < n:
        y = y.unflatten(-1, (n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * n ** -0.5).to(x.dtype)
