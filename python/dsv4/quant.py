"""Storage formats of the official DeepSeek-V4 checkpoints (architecture.md §12.3).

This module converts weights between float tensors and the formats the released safetensors
hold; it is distinct from :mod:`dsv4.ops.quant`, which *simulates* quantisation inside the
forward (quant-dequant round trips of activations and KV entries).

* **FP8 block format** (every FP8 linear): ``weight`` float8_e4m3fn [N, K] plus ``scale``
  float8_e8m0fnu [ceil(N/128), ceil(K/128)], one power-of-two scale per 128x128 block
  (ceil-divided grid: the last row/column of blocks may be partial):
  ``W[o, k] = weight[o, k] * scale[o // 128, k // 128]``.
* **FP4 expert format** (routed experts): ``weight`` int8 [N, K/2], two e2m1 codes per byte
  along K, element ``2j`` in the low nibble and ``2j+1`` in the high nibble; ``scale``
  float8_e8m0fnu [N, K/32], one power-of-two scale per 1x32 block:
  ``W[o, k] = e2m1(code[o, k]) * scale[o, k // 32]``.
* **e8m0** (``float8_e8m0fnu``): an unsigned 8-bit exponent, value ``2**(code - 127)``;
  code 255 is NaN; there is no zero and no sign.
* **e2m1** (FP4): 4-bit codes, bit 3 the sign, magnitudes
  ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` for codes 0..7 (OCP MX; code 8 is -0).

Quantisers use power-of-two scales rounded *up* (UE8M0, ``2**ceil(log2(amax / qmax))``, as
the official kernels and DeepGEMM's casts do) and round to nearest, ties to even; the block
amax is first clamped from below (1e-4 for FP8, ``6 * 2**-126`` for FP4, the official
``act_quant`` / ``fp4_act_quant`` floors), so an all-zero block gets a finite, non-zero scale
(FP8: ``2**-22``; FP4: ``2**-126``) and quantises to zeros.
"""

from __future__ import annotations


import torch

from .cache import as_int, check_count
from .ops.quant import check_block, e8m0_to_float, fp4_e2m1_round, ue8m0_scale  # noqa: F401 (re-exported)

__all__ = [
    "FP8_E4M3_MAX", "FP4_E2M1_MAX", "FP8_BLOCK", "FP4_BLOCK", "E2M1_VALUES",
    "e8m0_to_float", "e8m0_exponent", "float_to_e8m0", "e2m1_encode", "e2m1_decode",
    "fp8_block_quantize", "fp8_block_dequantize", "fp4_pack", "fp4_unpack", "fp4_to_fp8",
    "block_scale_shape",
]

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
FP8_BLOCK = 128
FP4_BLOCK = 32
#: Magnitudes of the e2m1 codes 0..7 (codes 8..15 are the same values negated).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def block_scale_shape(fmt: str, n: int, k: int) -> tuple[int, int]:
    """The scale tensor's shape for a weight of logical shape [n, k] (out, in) stored in ``fmt``:
    "fp8" -> [ceil(n / 128), ceil(k / 128)] (128x128 blocks), "fp4" -> [n, k / 32] (1x32
    blocks; ValueError unless k % 32 == 0). The release's layout (architecture.md §12).
    Raises ValueError for an ``n`` or ``k`` that is not an integer >= 0."""
    n = check_count(n, "block_scale_shape: n", 0)
    k = check_count(k, "block_scale_shape: k", 0)
    if fmt == "fp8":
        return -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    if fmt == "fp4":
        if k % FP4_BLOCK:
            raise ValueError(f"FP4 storage needs in_features % {FP4_BLOCK} == 0, got {k}")
        return n, k // FP4_BLOCK
    raise ValueError(f"block_scale_shape: fmt must be 'fp8' or 'fp4', got {fmt!r}")


_FP8_AMAX_MIN = 1e-4
_FP4_AMAX_MIN = FP4_E2M1_MAX * 2.0 ** -126
_E8M0 = torch.float8_e8m0fnu


# ---------------------------------------------------------------------------------- e8m0
def e8m0_exponent(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e, ok)`` for float values ``x`` (any shape; computed in fp32, fp64 kept): int32 ``e``
    with ``x == 2**e`` where ``ok``, and ``ok`` true exactly for the values an e8m0 scale holds,
    the powers of two in [2**-127, 2**127] (not 0, negatives, other values, inf or NaN;
    codes 0..254 of OCP MX ``float8_e8m0fnu``, architecture.md §12.3). The one test of that
    rule (:func:`float_to_e8m0`, :func:`fp4_to_fp8`, ``dsv4 convert``)."""
    xf = x if x.dtype == torch.float64 else x.float()   # (a float64 1 + 2**-30 is no power of 2)
    mant, exp = torch.frexp(xf)            # x = mant * 2**exp, mant in [0.5, 1)
    e = exp.to(torch.int32) - 1
    # 2**-127 is subnormal in fp32: frexp still gives mant 0.5, exp -126 -> e = -127.
    return e, (mant == 0.5) & (e >= -127) & (e <= 127)


def float_to_e8m0(x: torch.Tensor) -> torch.Tensor:
    """Encode exact powers of two in [2**-127, 2**127] as float8_e8m0fnu (same shape).

    Raises ValueError if any value is not a positive power of two in that range (an e8m0 scale
    holds nothing else; round first, e.g. with :func:`dsv4.ops.quant.ue8m0_scale`).
    """
    e, ok = e8m0_exponent(x)
    code = e + 127
    if not bool(ok.all()):
        bad = x[~ok].flatten()[:4].double().tolist()
        raise ValueError(f"float_to_e8m0: values must be powers of two in [2**-127, 2**127], "
                         f"got e.g. {bad}")
    return code.to(torch.uint8).view(_E8M0)


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Power-of-two scale (fp32) ``2**ceil(log2(amax / qmax))``; raises on non-finite amax."""
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantise non-finite values (inf/NaN in the input)")
    return ue8m0_scale(amax, qmax)


# ---------------------------------------------------------------------------------- e2m1
def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float values (already divided by their scale) to e2m1 codes, uint8 in [0, 15].

    Round to nearest, ties to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
    3.5->4, 5->4; magnitudes above 6 saturate to 6 (code 7). The sign goes to bit 3 for every
    negative input, including those that round to zero (code 8, -0), as IEEE-style casts do.
    Source: OCP MX e2m1 (architecture.md §12.3). Raises ValueError for NaN inputs.
    """
    if not x.is_floating_point():
        raise TypeError(f"e2m1_encode expects a float tensor, got {x.dtype}")
    xf = x.float()
    if bool(torch.isnan(xf).any()):
        raise ValueError("e2m1_encode: NaN has no e2m1 code")
    # The rounding is the simulation's (one definition); the code is the grid index + sign bit.
    v = fp4_e2m1_round(xf)
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=xf.device)
    code = torch.searchsorted(grid, v.abs().contiguous()).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (any integer dtype; only the low 4 bits are used) -> float32 values."""
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"e2m1_decode expects integer codes, got {codes.dtype}")
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32,
                         device=codes.device)
    return table[(codes.to(torch.int32) & 15).long()]


# ---------------------------------------------------------------------------------- FP8
def _check_2d_float(w: torch.Tensor, fn: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{fn}: expected a 2-D float tensor [N, K], got "
                         f"{getattr(w, 'dtype', type(w))} {tuple(getattr(w, 'shape', ()))}")


def fp8_block_quantize(w: torch.Tensor, block: int = FP8_BLOCK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight to the FP8 block format of the release (architecture.md §12.3).

    w: [N, K] float (any float dtype; computed in fp32), any N, K >= 1 (partial edge blocks
    are fine). Per ``block`` x ``block`` tile: ``amax = max(|w|, 1e-4)``,
    ``s = 2**ceil(log2(amax / 448))``, ``q = e4m3(w / s)`` (round to nearest even; |w/s| <= 448
    by construction, clamped against fp32 rounding of ``amax / 448``).
    Returns ``(q float8_e4m3fn [N, K], scale float8_e8m0fnu [ceil(N/block), ceil(K/block)])``.
    Raises ValueError for a non-2-D or non-float input, a block < 1, or inf/NaN values.
    """
    _check_2d_float(w, "fp8_block_quantize")
    block = check_block(block, "fp8_block_quantize")
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    wf = torch.nn.functional.pad(w.float(), (0, kb * block - K, 0, nb * block - N))
    tiles = wf.view(nb, block, kb, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(_FP8_AMAX_MIN)          # [nb, kb]
    s = _pow2_scale(amax, FP8_E4M3_MAX)
    q = (tiles / s[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = q.view(nb * block, kb * block)[:N, :K].to(torch.float8_e4m3fn)
    return q.contiguous(), float_to_e8m0(s)


def fp8_block_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         block: int = FP8_BLOCK) -> torch.Tensor:
    """``W = q * scale`` blockwise: q float8_e4m3fn [N, K], scale [ceil(N/block), ceil(K/block)]
    float8_e8m0fnu (or float32, the "-Base" checkpoints' scales) -> [N, K] in ``dtype``.

    Computed in fp32 (exact: an e4m3 value times a power of two) and cast once.
    Source: official ``weight_dequant`` / convert.py's ``wo_a`` step (architecture.md §12.3/4).
    Raises ValueError for a wrong dtype or a scale whose shape does not match the grid.
    """
    block = check_block(block, "fp8_block_dequantize")
    if q.dim() != 2 or q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_block_dequantize: q must be float8_e4m3fn [N, K], got {q.dtype} "
                         f"{tuple(q.shape)}")
    N, K = q.shape
    nb, kb = -(-N // block), -(-K // block)
    if tuple(scale.shape) != (nb, kb):
        raise ValueError(f"fp8_block_dequantize: scale must be [{nb}, {kb}] for a [{N}, {K}] "
                         f"weight in {block}x{block} blocks, got {tuple(scale.shape)}")
    s = e8m0_to_float(scale).to(q.device)
    if N % block == 0 and K % block == 0:
        w = q.float().view(nb, block, kb, block).mul_(s[:, None, :, None]).view(N, K)
    else:
        s_full = s.repeat_interleave(block, 0)[:N].repeat_interleave(block, 1)[:, :K]
        w = q.float().mul_(s_full)
    return w.to(dtype)


# ---------------------------------------------------------------------------------- FP4
def fp4_pack(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight to the packed FP4 expert format (architecture.md §12.3).

    w: [N, K] float with ``K % block == 0`` (block even). Per 1 x ``block`` group along K:
    ``amax = max(|w|, 6 * 2**-126)``, ``s = 2**ceil(log2(amax / 6))``, codes =
    :func:`e2m1_encode` ``(w / s)`` (ties to the even code). Two codes per byte, element 2j in
    the low nibble. Returns ``(packed int8 [N, K/2], scale float8_e8m0fnu [N, K/block])``.
    Raises ValueError for a non-2-D/non-float input, K not a multiple of ``block``, an odd
    ``block``, or inf/NaN values.
    """
    _check_2d_float(w, "fp4_pack")
    block = check_block(block, "fp4_pack", even=True)
    N, K = w.shape
    if K % block:
        raise ValueError(f"fp4_pack: K = {K} is not a multiple of the block size {block}")
    wf = w.float().view(N, K // block, block)
    amax = wf.abs().amax(-1).clamp_min(_FP4_AMAX_MIN)                     # [N, K/block]
    s = _pow2_scale(amax, FP4_E2M1_MAX)
    codes = e2m1_encode((wf / s[..., None]).clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX)).view(N, K)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8).contiguous(), float_to_e8m0(s)


def _fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 bytes [N, K/2] (int8, uint8 or float4_e2m1fn_x2) -> codes uint8 [N, K]."""
    if packed.dim() != 2 or packed.dtype not in (torch.int8, torch.uint8,
                                                  getattr(torch, "float4_e2m1fn_x2", None)):
        raise ValueError(f"packed FP4 weights must be int8/uint8/float4_e2m1fn_x2 [N, K/2], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    u = packed.view(torch.uint8)
    return torch.stack((u & 15, u >> 4), dim=-1).flatten(-2)


def fp4_unpack(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
               block: int = FP4_BLOCK) -> torch.Tensor:
    """Dequantise the packed FP4 format: packed int8 [N, K/2] (uint8 or a
    ``float4_e2m1fn_x2`` view also accepted), scale float8_e8m0fnu [N, K/block] (or float)
    -> ``W`` [N, K] in ``dtype`` (computed in fp32, exact, cast once).

    Source: official convert.py FP4 table / ``fp4_gemm`` (architecture.md §12.3).
    Raises ValueError for wrong dtypes, a scale shape other than [N, K/block], or a ``block``
    that is not even and >= 2.
    """
    block = check_block(block, "fp4_unpack", even=True)
    codes = _fp4_codes(packed)
    N, K = codes.shape
    if K % block or tuple(scale.shape) != (N, K // block):
        raise ValueError(f"fp4_unpack: scale must be [{N}, {K // block}] for a packed [{N}, "
                         f"{K // 2}] weight (logical [{N}, {K}], blocks of {block}), got "
                         f"{tuple(scale.shape)}")
    s = e8m0_to_float(scale).to(codes.device)
    w = e2m1_decode(codes).view(N, K // block, block).mul_(s[..., None])
    return w.view(N, K).to(dtype)


def fp4_to_fp8(packed: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK,
               fp4_block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode a packed FP4 expert weight in the FP8 128x128 block format.

    The recipe of the official convert.py ``--expert-dtype fp8`` (architecture.md §12.4): per
    ``block`` x ``block`` tile, the FP8 scale is ``S = max(tile's 1x32 scales) / 2**6`` and each
    FP4 value ``v`` of a 1x32 group with scale ``s`` becomes ``e4m3(v * s / S)``; since
    ``|v| <= 6`` and ``s / S <= 2**6``, ``|v * s / S| <= 384 < 448``.

    Lossless (``fp8_block_dequantize(*fp4_to_fp8(p, s)) == fp4_unpack(p, s)`` exactly) when,
    inside every tile, each 1x32 group holding a non-zero value has a scale at least
    ``2**-14`` times the tile's largest 1x32 scale (then ``v * s / S`` is a multiple of
    ``2**-9``, the e4m3 subnormal step, whatever the value). Groups scaled further down lose
    their small values to e4m3 rounding (round to nearest even, possibly to 0). If
    ``max scale / 2**6`` falls below 2**-127 (the smallest e8m0), S is clamped to 2**-127.
    N and K need not be multiples of ``block`` (the grid is ceil-divided; the official script
    requires multiples). Returns ``(q float8_e4m3fn [N, K], scale float8_e8m0fnu
    [ceil(N/block), ceil(K/block)])``. Raises ValueError for malformed inputs, a ``fp4_block``
    that is not an even integer >= 2, a ``block`` that is not a positive multiple of it, or
    float scales (the "-Base" checkpoints' form) that are not powers of two in
    [2**-127, 2**127]: an e8m0 block scale can carry no other factor, so such a weight has no
    exact FP8 block form (convert keeps it as FP4 without ``--expert-fp8``).
    """
    fp4_block = as_int(fp4_block, "fp4_to_fp8: fp4_block", "even and >= 2")
    if fp4_block < 2 or fp4_block % 2:
        raise ValueError(f"fp4_to_fp8: fp4_block must be even and >= 2, got {fp4_block}")
    block = as_int(block, "fp4_to_fp8: block", f"a positive multiple of fp4_block {fp4_block}")
    if block < 1 or block % fp4_block:
        raise ValueError(f"fp4_to_fp8: block must be a positive multiple of fp4_block "
                         f"{fp4_block}, got {block}")
    codes = _fp4_codes(packed)
    N, K = codes.shape
    if K % fp4_block or tuple(scale.shape) != (N, K // fp4_block):
        raise ValueError(f"fp4_to_fp8: scale must be [{N}, {K // fp4_block}], got "
                         f"{tuple(scale.shape)}")
    s = e8m0_to_float(scale).to(codes.device)                             # [N, K/32]
    if not bool(torch.isfinite(s).all()):
        raise ValueError("fp4_to_fp8: scale holds NaN (e8m0 code 255)"
                         if scale.dtype in (_E8M0, torch.uint8)
                         else "fp4_to_fp8: scale holds inf or NaN")
    exp, pow2 = e8m0_exponent(s)                                         # s = 2**exp
    if not bool(pow2.all()):
        bad = s[~pow2].flatten()[:4].tolist()
        raise ValueError(f"fp4_to_fp8: the FP8 block format holds only scales that are powers of "
                         f"two in [2**-127, 2**127] (e8m0); this weight's 1x{fp4_block} scales "
                         f"hold others, e.g. {bad}, so it has no exact FP8 form")
    nb, kb = -(-N // block), -(-K // block)
    g = block // fp4_block                                               # groups per tile row
    # Pad the group exponents with a very small value so partial tiles ignore the padding.
    e = torch.nn.functional.pad(exp, (0, kb * g - K // fp4_block, 0, nb * block - N),
                                value=-1000)
    e_max = e.view(nb, block, kb, g).amax(dim=(1, 3))                     # [nb, kb]
    e_S = (e_max - 6).clamp_min(-127)
    shift = e - e_S.repeat_interleave(block, 0).repeat_interleave(g, 1)   # per group, <= 6
    shift = shift[:N, :K // fp4_block]
    v = e2m1_decode(codes).view(N, K // fp4_block, fp4_block)
    q = torch.ldexp(v, shift[..., None].to(torch.float32)).view(N, K).to(torch.float8_e4m3fn)
    S = torch.ldexp(torch.ones_like(e_S, dtype=torch.float32), e_S.to(torch.float32))
    return q, float_to_e8m0(S)
