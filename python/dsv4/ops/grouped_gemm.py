"""Grouped expert GEMMs of the routed MoE: ``torch.ops.dsv4.moe_up`` and ``moe_down``
(architecture.md §9, training.md §3.6; the contract of docs/contracts.md §B).

Routed experts are stored stacked, in one of three formats chosen by the weight dtype:

==========  =====================================  ==========================================
format      ``w_up`` / ``w_down``                  scale (``float8_e8m0fnu`` or float32)
==========  =====================================  ==========================================
float       bf16 (fp32 on the reference)           None
FP8         float8_e4m3fn [E, 2, N, K] / [E, D, N]  128x128 blocks: [E, 2, ⌈N/128⌉, ⌈K/128⌉]
                                                   / [E, ⌈D/128⌉, ⌈N/128⌉]
FP4         int8 [E, 2, N, K/2] / [E, D, N/2]       1x32 blocks: [E, 2, N, K/32] / [E, D, N/32]
==========  =====================================  ==========================================

(K = dim, N = moe_inter_dim, D = K_out = dim; ``w_up[e, 0]`` is the official ``w1`` (gate),
``w_up[e, 1]`` is ``w3`` (up), ``w_down[e]`` is ``w2``; FP4: two e2m1 codes per byte along the
input dim, low nibble first; :mod:`dsv4.quant` holds the formats.)

Dispatch hands over P (token, slot) pairs in expert-major order: ``row_ids`` [P] int32 (the
token of each pair), ``expert_offsets`` [E + 1] int32 (the pairs of expert e are
``[offsets[e], offsets[e + 1])``) and ``route_weight`` [P] float32. Then::

    moe_up:   h[p] = route_weight[p] · silu(min(g, L)) · clamp(u, −L, L)    (L = 0: no clamp)
              g = x[row_ids[p]] · w1[e]ᵀ,  u = x[row_ids[p]] · w3[e]ᵀ         (e = expert of p)
    moe_down: y[p] = h[p] · w2[e]ᵀ

The references compute exactly the official per-expert math in fp32 from the exactly
dequantised weights; g and u are rounded to x's dtype first (bf16 models: as ``F.linear`` in bf16
does), h and y are returned in the activation dtype. ``act_quant=True`` applies the official FP8
activation quantisation to the GEMM input first (e4m3 round trip in 1x128 blocks along K with
ue8m0 scales, :func:`dsv4.ops.quant.fp8_e4m3_sim`); the MoE uses it when ``quant_sim`` is on
and the experts were stored FP8/FP4. Rows ``p >= offsets[E]`` are zero in the functional ops'
results and left untouched by the ``_out`` variants.

On CUDA with ``act_quant`` and FP8 / FP4 (e8m0-scaled) experts, ``DSV4_MOE_FP8_MMA=1`` selects
the FP8 x FP8 path (opt-in until measured on the H200): the input rows are quantised once by
:func:`fp8_act_quant` (codes + 1x128 scales, before the gather) and multiplied on FP8 tensor
cores with the weight scales applied to the fp32 partial sums of each 128-deep k block
(grouped_gemm_qmma.cuh; FP4 weights converted exactly to e4m3 with their four 1x32 scales of a
k block folded into one power of two). Same result as the reference up to fp32 summation order.
Without it, the activation quantisation is simulated in bf16 and the products run on bf16 tensor
cores (FP8 / FP4 weights dequantised in shared memory).

On CUDA (bf16 activations) the kernels in csrc/kernels/grouped_gemm*.cu run; the CUDA kernels
check shapes and dtypes but not the values of ``row_ids`` / ``expert_offsets`` (that would need
a host sync): an out-of-range row id reads as a zero row and offsets are clamped to [0, P],
so bad routing gives a wrong result, never an illegal memory access. The references raise.

``torch.ops.dsv4.moe_swiglu(gu, weight, limit)``: the clamped SwiGLU alone, over the bf16
``[g | u]`` rows of grouped GEMMs that round g and u to bf16 as ``F.linear`` does (the MoE's
``torch._grouped_mm`` path at prefill size): ``h[p] = bf16(silu(min(g, L)) · clamp(u, −L, L) ·
weight[p])``, the reference :func:`dsv4.layers.moe.swiglu_clamped`; the CUDA kernel gives its
bits in one pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant import FP4_BLOCK, FP8_BLOCK, fp4_unpack, fp8_block_dequantize
from ._ext import check_clamp_limit_f32, check_writable, raise_value_error, register_op
from .quant import fp8_e4m3_quantize, fp8_e4m3_sim

__all__ = [
    "moe_up", "moe_down", "moe_up_reference", "moe_down_reference",
    "expert_weight_format", "dequantize_expert", "dequantize_experts",
    "MOE_UP_SCHEMA", "MOE_UP_OUT_SCHEMA", "MOE_DOWN_SCHEMA", "MOE_DOWN_OUT_SCHEMA",
    "fp8_act_quant", "fp8_act_quant_reference", "FP8_ACT_QUANT_SCHEMA",
    "moe_swiglu", "moe_swiglu_reference", "MOE_SWIGLU_SCHEMA",
]

_UP_ARGS = ("(Tensor x, Tensor row_ids, Tensor expert_offsets, Tensor w_up, Tensor? w_up_scale, "
            "Tensor route_weight, float swiglu_limit, bool act_quant")
MOE_UP_SCHEMA = _UP_ARGS + ") -> Tensor"
MOE_UP_OUT_SCHEMA = _UP_ARGS + ", *, Tensor(a!) h) -> ()"
_DOWN_ARGS = "(Tensor h, Tensor expert_offsets, Tensor w_down, Tensor? w_down_scale, bool act_quant"
MOE_DOWN_SCHEMA = _DOWN_ARGS + ") -> Tensor"
MOE_DOWN_OUT_SCHEMA = _DOWN_ARGS + ", *, Tensor(a!) y) -> ()"

# Experts of one grouped GEMM (w_up / w_down .shape[0]): the CUDA glue's range
# (csrc/torch/grouped_gemm.cpp check_routing), checked on every device.
MAX_EXPERTS = 1024

_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float32)
_FP4_DTYPES = (torch.int8, torch.uint8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Weight formats
# ---------------------------------------------------------------------------------------------
def expert_weight_format(w: torch.Tensor, scale: Optional[torch.Tensor], in_features: int,
                         name: str, check=None) -> str:
    """The storage format of a stacked expert weight, checked against its scale.

    ``w``: [..., out, in] (float, float8_e4m3fn) or [..., out, in/2] (FP4 int8); the leading
    dims are the expert (and gate/up) dims. ``in_features`` is the logical input width (K for
    ``w_up``, N for ``w_down``). ``check(cond, msg_fn)`` reports a failure (default: raise
    ValueError; the fakes pass ``torch._check``).

    Returns ``"float"``, ``"fp8"`` or ``"fp4"``. Raises ValueError naming the accepted formats
    when the dtype, the packed width or the scale's dtype/shape do not fit.
    """
    if check is None:
        check = raise_value_error
    lead, out = tuple(w.shape[:-2]), w.shape[-2]
    if w.dtype == torch.float8_e4m3fn:
        fmt = "fp8"
        want_w = lead + (out, in_features)
        want_s = lead + (_cdiv(out, FP8_BLOCK), _cdiv(in_features, FP8_BLOCK))
    elif w.dtype in _FP4_DTYPES:
        fmt = "fp4"
        check(in_features % FP4_BLOCK == 0,
              lambda: f"{name}: FP4 weights need an input width divisible by {FP4_BLOCK}, got "
                      f"{in_features}")
        want_w = lead + (out, in_features // 2)
        want_s = lead + (out, in_features // FP4_BLOCK)
    elif w.is_floating_point() and w.dtype.itemsize >= 2:
        fmt = "float"
        want_w, want_s = lead + (out, in_features), None
    else:
        check(False, lambda: f"{name} must be bfloat16 (fp32 on the reference), float8_e4m3fn "
                             f"(with 128x128 block scales) or int8 packed FP4 (with 1x32 "
                             f"scales), got {w.dtype}")
        return "float"
    check(tuple(w.shape) == want_w,
          lambda: f"{name}: {fmt} weight must be {list(want_w)}, got {list(w.shape)}")
    if fmt == "float":
        check(scale is None, lambda: f"{name}_scale must be None for {w.dtype} weights")
    else:
        check(scale is not None, lambda: f"{name}_scale is required for {fmt} weights "
                                         f"(shape {list(want_s)})")
        if scale is not None:
            check(scale.dtype in _SCALE_DTYPES,
                  lambda: f"{name}_scale must be float8_e8m0fnu or float32, got {scale.dtype}")
            check(tuple(scale.shape) == want_s,
                  lambda: f"{name}_scale must be {list(want_s)} for {fmt} weights, got "
                          f"{list(scale.shape)}")
    return fmt


def dequantize_expert(w: torch.Tensor, scale: Optional[torch.Tensor], fmt: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One expert matrix [out, in] (or [out, in/2] FP4 bytes) in ``dtype``, exactly
    dequantised (:func:`dsv4.quant.fp8_block_dequantize` / :func:`dsv4.quant.fp4_unpack`)."""
    if fmt == "fp8":
        return fp8_block_dequantize(w, scale, dtype)
    if fmt == "fp4":
        return fp4_unpack(w, scale, dtype)
    return w.to(dtype)


def dequantize_experts(w: torch.Tensor, scale: Optional[torch.Tensor], in_features: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A whole stacked expert weight (``w_up`` [E, 2, N, ·] or ``w_down`` [E, D, ·]) as float
    [..., out, in_features] in ``dtype``, exactly dequantised. Raises ValueError like
    :func:`expert_weight_format`."""
    fmt = expert_weight_format(w, scale, in_features, "w")
    lead = w.shape[:-2]
    flat_w = w.reshape(-1, *w.shape[-2:])
    flat_s = None if scale is None else scale.reshape(-1, *scale.shape[-2:])
    mats = [dequantize_expert(flat_w[i], None if flat_s is None else flat_s[i], fmt, dtype)
            for i in range(flat_w.shape[0])]
    out = torch.stack(mats) if mats else torch.empty(0, w.shape[-2], in_features, dtype=dtype,
                                                     device=w.device)
    return out.view(*lead, w.shape[-2], in_features)


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by the references and the fakes)
# ---------------------------------------------------------------------------------------------

def _check_routing(op: str, P: int, expert_offsets: torch.Tensor, E: int, check) -> None:
    check(expert_offsets.dim() == 1 and expert_offsets.shape[0] == E + 1,
          lambda: f"{op}: expert_offsets must be [E + 1] = [{E + 1}], got "
                  f"{list(expert_offsets.shape)}")
    check(expert_offsets.dtype == torch.int32,
          lambda: f"{op}: expert_offsets must be int32, got {expert_offsets.dtype}")
    check(1 <= E <= MAX_EXPERTS,
          lambda: f"{op}: E must be in [1, {MAX_EXPERTS}] experts (the CUDA kernel's range), "
                  f"got {E}")


def _check_up(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit,
              act_quant, check) -> str:
    op = "moe_up"
    check(x.dim() == 2, lambda: f"{op}: x must be [tokens, dim], got {list(x.shape)}")
    check(x.is_floating_point() and x.dtype.itemsize >= 2,
          lambda: f"{op}: x must be bfloat16 (any float >= 16 bits on the reference), got "
                  f"{x.dtype}")
    check(w_up.dim() == 4 and w_up.shape[1] == 2,
          lambda: f"{op}: w_up must be [E, 2, N, K] (gate w1 and up w3 stacked; FP4: [E, 2, "
                  f"N, K/2]), got {list(w_up.shape)}")
    K = x.shape[1]
    fmt = expert_weight_format(w_up, w_up_scale, K, "w_up", check)
    E = w_up.shape[0]
    check(row_ids.dim() == 1 and row_ids.dtype == torch.int32,
          lambda: f"{op}: row_ids must be int32 [P], got {row_ids.dtype} {list(row_ids.shape)}")
    P = row_ids.shape[0]
    check(route_weight.dim() == 1 and route_weight.shape[0] == P
          and route_weight.dtype == torch.float32,
          lambda: f"{op}: route_weight must be float32 [P] = [{P}], got {route_weight.dtype} "
                  f"{list(route_weight.shape)}")
    _check_routing(op, P, expert_offsets, E, check)
    check_clamp_limit_f32(op, "swiglu_limit", swiglu_limit, check)   # moe_swiglu's rule
    check(not act_quant or K % FP8_BLOCK == 0,
          lambda: f"{op}: act_quant needs dim divisible by {FP8_BLOCK}, got {K}")
    check(x.shape[0] > 0 or P == 0,
          lambda: f"{op}: pairs need tokens: x has 0 rows but P = {P}")
    return fmt


def _check_down(h, expert_offsets, w_down, w_down_scale, act_quant, check) -> str:
    op = "moe_down"
    check(h.dim() == 2, lambda: f"{op}: h must be [P, moe_inter_dim], got {list(h.shape)}")
    check(h.is_floating_point() and h.dtype.itemsize >= 2,
          lambda: f"{op}: h must be bfloat16 (any float >= 16 bits on the reference), got "
                  f"{h.dtype}")
    check(w_down.dim() == 3, lambda: f"{op}: w_down must be [E, dim, N] (FP4: [E, dim, N/2]), "
                                     f"got {list(w_down.shape)}")
    N = h.shape[1]
    fmt = expert_weight_format(w_down, w_down_scale, N, "w_down", check)
    _check_routing(op, h.shape[0], expert_offsets, w_down.shape[0], check)
    check(not act_quant or N % FP8_BLOCK == 0,
          lambda: f"{op}: act_quant needs moe_inter_dim divisible by {FP8_BLOCK}, got {N}")
    return fmt


def _offsets(expert_offsets: torch.Tensor, P: int, op: str) -> list[int]:
    offs = expert_offsets.tolist()
    if offs and (offs[0] < 0 or offs[-1] > P or any(b < a for a, b in zip(offs, offs[1:]))):
        raise ValueError(f"{op}: expert_offsets must be non-decreasing within [0, P = {P}], "
                         f"got {offs[:8]}{' ...' if len(offs) > 8 else ''}")
    return offs


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------
def moe_up_reference(x: torch.Tensor, row_ids: torch.Tensor, expert_offsets: torch.Tensor,
                     w_up: torch.Tensor, w_up_scale: Optional[torch.Tensor],
                     route_weight: torch.Tensor, swiglu_limit: float,
                     act_quant: bool) -> torch.Tensor:
    """Gathered gate/up GEMMs + clamped SwiGLU + routing weight, per expert (module docstring).

    Args:
        x: [T, K] float (bf16 in the model), the ffn-normed tokens.
        row_ids: [P] int32, token of each pair, in [0, T).
        expert_offsets: [E + 1] int32, non-decreasing, ``offsets[E] <= P``.
        w_up: [E, 2, N, K] bf16/fp32, float8_e4m3fn, or int8 [E, 2, N, K/2] (FP4).
        w_up_scale: None, or the FP8 / FP4 scales (module table).
        route_weight: [P] float32.
        swiglu_limit: L >= 0 (0: no clamp).
        act_quant: FP8 1x128 activation quantisation of x first (needs K % 128 == 0).

    Returns:
        h [P, N] in x's dtype: ``(route_weight[p] · silu(min(g, L)) · clamp(u, -L, L))`` with
        g, u computed in fp32 and rounded to x's dtype; rows ``p >= offsets[E]`` are 0.
        Formula: official ``Expert.forward`` / ``MoE.forward`` (architecture.md §9), SwiGLU
        from :func:`dsv4.layers.moe.swiglu_clamped`.

    Raises:
        ValueError: shapes, dtypes, formats, offsets or row ids outside the contract.
    """
    from ..layers.moe import swiglu_clamped  # lazy: layers.moe will import this module

    fmt = _check_up(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit,
                    act_quant, raise_value_error)
    T, K = x.shape
    E, N = w_up.shape[0], w_up.shape[2]
    P = row_ids.shape[0]
    offs = _offsets(expert_offsets, P, "moe_up")
    h = torch.zeros(P, N, dtype=x.dtype, device=x.device)
    if P == 0:
        return h
    used = row_ids[: offs[-1]]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= T):
        raise ValueError(f"moe_up: row_ids must lie in [0, T = {T}), got values in "
                         f"[{int(used.min())}, {int(used.max())}]")
    xin = fp8_e4m3_sim(x, FP8_BLOCK) if act_quant else x
    for e in range(E):
        a, b = offs[e], offs[e + 1]
        if a == b:
            continue
        xe = xin[row_ids[a:b].long()].float()
        s = (None, None) if w_up_scale is None else (w_up_scale[e, 0], w_up_scale[e, 1])
        g = (xe @ dequantize_expert(w_up[e, 0], s[0], fmt).T).to(x.dtype)
        u = (xe @ dequantize_expert(w_up[e, 1], s[1], fmt).T).to(x.dtype)
        h[a:b] = (route_weight[a:b, None] * swiglu_clamped(g, u, swiglu_limit)).to(x.dtype)
    return h


def moe_down_reference(h: torch.Tensor, expert_offsets: torch.Tensor, w_down: torch.Tensor,
                       w_down_scale: Optional[torch.Tensor], act_quant: bool) -> torch.Tensor:
    """Per-expert down projection ``y[p] = h[p] · w2[e]ᵀ`` (module docstring).

    Args:
        h: [P, N] float (bf16 in the model), :func:`moe_up_reference`'s output.
        expert_offsets: [E + 1] int32, non-decreasing, ``offsets[E] <= P``.
        w_down: [E, D, N] bf16/fp32, float8_e4m3fn, or int8 [E, D, N/2] (FP4).
        w_down_scale: None, or [E, ⌈D/128⌉, ⌈N/128⌉] (FP8) / [E, D, N/32] (FP4).
        act_quant: FP8 1x128 activation quantisation of h first (needs N % 128 == 0).

    Returns:
        y [P, D] in h's dtype (fp32 product rounded once, as the official bf16 expert output
        before the fp32 combine); rows ``p >= offsets[E]`` are 0.

    Raises:
        ValueError: shapes, dtypes, formats or offsets outside the contract.
    """
    fmt = _check_down(h, expert_offsets, w_down, w_down_scale, act_quant, raise_value_error)
    P, N = h.shape
    E, D = w_down.shape[0], w_down.shape[1]
    offs = _offsets(expert_offsets, P, "moe_down")
    y = torch.zeros(P, D, dtype=h.dtype, device=h.device)
    if P == 0:
        return y
    hin = fp8_e4m3_sim(h, FP8_BLOCK) if act_quant else h
    for e in range(E):
        a, b = offs[e], offs[e + 1]
        if a == b:
            continue
        s = None if w_down_scale is None else w_down_scale[e]
        y[a:b] = (hin[a:b].float() @ dequantize_expert(w_down[e], s, fmt).T).to(h.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# torch.ops.dsv4.moe_up / moe_up_out / moe_down / moe_down_out: CPU references and fakes
# ---------------------------------------------------------------------------------------------
def _check_out(op: str, out: torch.Tensor, shape: tuple, dtype: torch.dtype, check) -> None:
    check(tuple(out.shape) == tuple(shape) and out.dtype == dtype,
          lambda: f"{op}: the output must be {dtype} {list(shape)}, got {out.dtype} "
                  f"{list(out.shape)}")


def _moe_up_out_ref(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit,
                    act_quant, h):
    _check_up(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit,
              act_quant, raise_value_error)
    P, N = row_ids.shape[0], w_up.shape[2]
    _check_out("moe_up_out", h, (P, N), x.dtype, raise_value_error)
    check_writable("moe_up_out", h=h)  # also when no row is routed (nothing written then)
    res = moe_up_reference(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight,
                           swiglu_limit, act_quant)
    n = int(expert_offsets[-1]) if P else 0
    h[:n] = res[:n]


def _moe_down_out_ref(h, expert_offsets, w_down, w_down_scale, act_quant, y):
    _check_down(h, expert_offsets, w_down, w_down_scale, act_quant, raise_value_error)
    P, D = h.shape[0], w_down.shape[1]
    _check_out("moe_down_out", y, (P, D), h.dtype, raise_value_error)
    check_writable("moe_down_out", y=y)
    res = moe_down_reference(h, expert_offsets, w_down, w_down_scale, act_quant)
    n = int(expert_offsets[-1]) if P else 0
    y[:n] = res[:n]


def _moe_up_fake(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit,
                 act_quant):
    _check_up(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit,
              act_quant, torch._check)
    return x.new_empty((row_ids.shape[0], w_up.shape[2]))


def _moe_up_out_fake(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit,
                     act_quant, h):
    _check_up(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit,
              act_quant, torch._check)
    _check_out("moe_up_out", h, (row_ids.shape[0], w_up.shape[2]), x.dtype, torch._check)


def _moe_down_fake(h, expert_offsets, w_down, w_down_scale, act_quant):
    _check_down(h, expert_offsets, w_down, w_down_scale, act_quant, torch._check)
    return h.new_empty((h.shape[0], w_down.shape[1]))


def _moe_down_out_fake(h, expert_offsets, w_down, w_down_scale, act_quant, y):
    _check_down(h, expert_offsets, w_down, w_down_scale, act_quant, torch._check)
    _check_out("moe_down_out", y, (h.shape[0], w_down.shape[1]), h.dtype, torch._check)


FP8_ACT_QUANT_SCHEMA = "(Tensor x) -> (Tensor, Tensor)"


def fp8_act_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantiser of the FP8 x FP8 expert path: exactly
    :func:`dsv4.ops.quant.fp8_e4m3_quantize` with block 128 (architecture.md §12.3).

    Args:
        x: [rows, cols] float (bf16 on CUDA), ``cols % 128 == 0``.

    Returns:
        (codes float8_e4m3fn [rows, cols], scales float32 [rows, cols / 128]); ``x ≈ codes *
        scale`` per 1x128 block, and ``codes * scale`` is :func:`fp8_e4m3_sim` (x, 128).

    Raises:
        ValueError: x not floating point (an integer or bool x has no activations to
            quantise), not 2-D or cols not a multiple of 128.
    """
    _check_act_quant(x, raise_value_error)
    return fp8_e4m3_quantize(x, FP8_BLOCK)


def _check_act_quant(x, check) -> None:
    check(x.dtype.is_floating_point,
          lambda: f"fp8_act_quant: x must be floating point (bfloat16; the CPU reference also "
                  f"takes float32, float16 and float64), got {x.dtype}")
    check(x.dim() == 2 and x.shape[1] % FP8_BLOCK == 0,
          lambda: f"fp8_act_quant: x must be [rows, cols] with cols % {FP8_BLOCK} == 0, "
                  f"got {list(x.shape)}")


def _fp8_act_quant_fake(x):
    _check_act_quant(x, torch._check)
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((x.shape[0], x.shape[1] // FP8_BLOCK), dtype=torch.float32))


register_op("fp8_act_quant", FP8_ACT_QUANT_SCHEMA, fp8_act_quant_reference, _fp8_act_quant_fake)
register_op("moe_up", MOE_UP_SCHEMA, moe_up_reference, _moe_up_fake)
register_op("moe_up_out", MOE_UP_OUT_SCHEMA, _moe_up_out_ref, _moe_up_out_fake)
register_op("moe_down", MOE_DOWN_SCHEMA, moe_down_reference, _moe_down_fake)
register_op("moe_down_out", MOE_DOWN_OUT_SCHEMA, _moe_down_out_ref, _moe_down_out_fake)


# ---------------------------------------------------------------------------------------------
# moe_swiglu
# ---------------------------------------------------------------------------------------------
MOE_SWIGLU_SCHEMA = "(Tensor gu, Tensor weight, float limit) -> Tensor"


def _check_swiglu(gu, weight, limit, check) -> None:
    check(gu.dtype == torch.bfloat16, lambda: f"moe_swiglu: gu must be bfloat16, got {gu.dtype}")
    check(gu.dim() == 2 and gu.shape[1] % 2 == 0,
          lambda: f"moe_swiglu: gu must be [pairs, 2 * n] (the gate half, then the up half), "
                  f"got {tuple(gu.shape)}")
    check(weight.dtype == torch.float32 and weight.dim() == 1 and weight.shape[0] == gu.shape[0],
          lambda: f"moe_swiglu: weight must be float32 [{gu.shape[0] if gu.dim() else '?'}] (one "
                  f"routing weight per pair), got {weight.dtype} {tuple(weight.shape)}")
    check_clamp_limit_f32("moe_swiglu", "limit", limit, check)


def moe_swiglu_reference(gu: torch.Tensor, weight: torch.Tensor, limit: float) -> torch.Tensor:
    """``bf16(silu(min(g, L)) · clamp(u, −L, L) · weight[:, None])`` for ``gu`` = [g | u] bf16
    [P, 2N], ``weight`` fp32 [P], L = ``limit`` >= 0 (0: no clamp): [P, N] bf16, the values of
    :func:`dsv4.layers.moe.swiglu_clamped` (one definition). Raises ValueError on other shapes
    or dtypes."""
    from ..layers.moe import swiglu_clamped  # lazy: layers.moe imports this module

    _check_swiglu(gu, weight, limit, raise_value_error)
    n = gu.shape[1] // 2
    return swiglu_clamped(gu[:, :n], gu[:, n:], float(limit), weight[:, None],
                          torch.bfloat16).contiguous()


def _moe_swiglu_fake(gu, weight, limit):
    _check_swiglu(gu, weight, limit, torch._check)
    return gu.new_empty(gu.shape[0], gu.shape[1] // 2)


register_op("moe_swiglu", MOE_SWIGLU_SCHEMA, moe_swiglu_reference, _moe_swiglu_fake)


def moe_swiglu(gu: torch.Tensor, weight: torch.Tensor, limit: float) -> torch.Tensor:
    """``torch.ops.dsv4.moe_swiglu``: see :func:`moe_swiglu_reference` (on CUDA one kernel, bit
    for bit the reference)."""
    return torch.ops.dsv4.moe_swiglu(gu, weight, float(limit))


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------
def fp8_act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.dsv4.fp8_act_quant``: see :func:`fp8_act_quant_reference` (on CUDA: bf16 x,
    one kernel, bit for bit the reference)."""
    return torch.ops.dsv4.fp8_act_quant(x)


def moe_up(x: torch.Tensor, row_ids: torch.Tensor, expert_offsets: torch.Tensor,
           w_up: torch.Tensor, w_up_scale: Optional[torch.Tensor], route_weight: torch.Tensor,
           swiglu_limit: float, act_quant: bool = False,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.dsv4.moe_up`` (``moe_up_out`` when ``out`` is given; then ``out`` is
    returned). Arguments, result and errors: :func:`moe_up_reference`. On CUDA the kernel takes
    bf16 x and bf16 / FP8 / FP4 weights; ``out`` [P, N] in x's dtype is written only in rows
    ``[0, offsets[E])`` (no allocation: CUDA-graph capturable)."""
    if out is None:
        return torch.ops.dsv4.moe_up(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight,
                                     float(swiglu_limit), bool(act_quant))
    torch.ops.dsv4.moe_up_out(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight,
                              float(swiglu_limit), bool(act_quant), h=out)
    return out


def moe_down(h: torch.Tensor, expert_offsets: torch.Tensor, w_down: torch.Tensor,
             w_down_scale: Optional[torch.Tensor], act_quant: bool = False,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.dsv4.moe_down`` (``moe_down_out`` when ``out`` is given; then ``out`` is
    returned). Arguments, result and errors: :func:`moe_down_reference`; ``out`` [P, D] in h's
    dtype is written only in rows ``[0, offsets[E])``."""
    if out is None:
        return torch.ops.dsv4.moe_down(h, expert_offsets, w_down, w_down_scale, bool(act_quant))
    torch.ops.dsv4.moe_down_out(h, expert_offsets, w_down, w_down_scale, bool(act_quant), y=out)
    return out
