"""Grouped output projection of the attention block: ``torch.ops.dsv4.grouped_oproj``
(architecture.md §3.7, §7; kernels.md §4.5).

The attention output o [T, n_heads, head_dim] gets the inverse RoPE on the last ``rope_dim``
dims of every head (rotation by -position, :func:`dsv4.layers.rope.apply_rope` with
``inverse=True``), is viewed as G groups of consecutive heads (Dg = n_heads·head_dim / G
features each), and each group gets its own map ``wo_a[g]`` [R, Dg] (R = o_lora_rank)::

    z[t, g, :] = wo_a[g] · rope⁻¹(o)[t, g·Dg : (g+1)·Dg]          (einsum "tgd,grd->tgr")

``wo_a`` is bf16 [G, R, Dg] (the official code's dequantised weight) or the release's FP8 form:
float8_e4m3fn [G, R, Dg] with 128x128 block scales [G, ⌈R/128⌉, ⌈Dg/128⌉] (the stored
[G·R, Dg] weight and [G·R/128, Dg/128] scale viewed per group; R % 128 == 0). The reference
rounds the rotated o to o's dtype (as the layer does) and computes the einsum in fp32 from the
exactly dequantised weight, rounded once. ``wo_b`` stays an ordinary (FP8) linear on z.

On CUDA (bf16 o, rope_dim 64, head_dim a multiple of 64) the grouped GEMM kernel applies the
inverse RoPE while loading o (no rotated copy of o in memory) and streams wo_a's bytes. At
prefill size with a bf16 ``wo_a``, :func:`output_projection` (the layer's entry) instead writes
the rotated o once (``q_norm_rope`` without the norm, rotating by -angle) and runs the einsum
on cuBLAS (:func:`oproj_cublas`; from ``OPROJ_CUBLAS_MIN_TOKENS`` tokens, where cuBLAS's
batched GEMM outruns the dsv4 tile; ``DSV4_OPROJ=kernel`` / ``cublas``, read per call, forces
one): the same formula, the rotated o rounded to bf16 as the reference rounds it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._ext import check_writable, raise_value_error, register_op
from .backend import env_choice, use_kernels
from .grouped_gemm import dequantize_experts, expert_weight_format

__all__ = ["grouped_oproj", "grouped_oproj_reference", "output_projection", "oproj_cublas",
           "OPROJ_CUBLAS_MIN_TOKENS", "GROUPED_OPROJ_SCHEMA", "GROUPED_OPROJ_OUT_SCHEMA"]

#: Tokens from which :func:`output_projection` takes :func:`oproj_cublas` for a bf16 wo_a:
#: H100, 2026-12-06 (bench_gemm oproj --cublas): 1.5% slower than the kernel at 1024 tokens,
#: equal at 2048, 5-7% faster from 4096 to 16384.
OPROJ_CUBLAS_MIN_TOKENS = 4096

_ARGS = "(Tensor o, Tensor positions, Tensor freqs, Tensor wo_a, Tensor? wo_a_scale"
GROUPED_OPROJ_SCHEMA = _ARGS + ") -> Tensor"
GROUPED_OPROJ_OUT_SCHEMA = _ARGS + ", *, Tensor(a!) out) -> ()"


def _check(o, positions, freqs, wo_a, wo_a_scale, check) -> str:
    op = "grouped_oproj"
    check(o.dim() == 3 and o.is_floating_point() and o.dtype.itemsize >= 2,
          lambda: f"{op}: o must be a float [tokens, n_heads, head_dim] tensor, got {o.dtype} "
                  f"{list(o.shape)}")
    check(wo_a.dim() == 3, lambda: f"{op}: wo_a must be [groups, o_lora_rank, features per "
                                    f"group], got {list(wo_a.shape)}")
    T, H, hd = o.shape
    check(hd >= 1, lambda: f"{op}: o's head_dim must be >= 1, got {list(o.shape)}")
    G, Dg = wo_a.shape[0], H * hd // max(wo_a.shape[0], 1)
    check(1 <= G <= 1024 and G * Dg == H * hd and Dg % hd == 0,
          lambda: f"{op}: {H} heads x {hd} must split into {G} groups of whole heads "
                  "(G <= 1024)")
    fmt = expert_weight_format(wo_a, wo_a_scale, Dg, "wo_a", check)
    check(fmt != "fp4", lambda: f"{op}: wo_a must be bf16/fp32 or float8_e4m3fn, not FP4")
    check(positions.dim() == 1 and positions.shape[0] == T
          and positions.dtype in (torch.int32, torch.int64),
          lambda: f"{op}: positions must be int32 or int64 [{T}], got {positions.dtype} "
                  f"{list(positions.shape)}")
    check(freqs.dim() == 1 and 0 < 2 * freqs.shape[0] <= hd and freqs.dtype == torch.float32,
          lambda: f"{op}: freqs must be float32 [rope_dim / 2] with rope_dim <= head_dim "
                  f"{hd}, got {freqs.dtype} {list(freqs.shape)}")
    return fmt


def grouped_oproj_reference(o: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                            wo_a: torch.Tensor, wo_a_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse RoPE + per-group projection (module docstring).

    Args:
        o: [T, n_heads, head_dim] float (bf16 in the model): the attention output.
        positions: [T] int32 / int64, the absolute position of each token.
        freqs: [rope_dim / 2] float32, the layer's RoPE frequencies (rope_frequencies).
        wo_a: [G, R, Dg] bf16/fp32, or float8_e4m3fn with ``wo_a_scale``
            [G, ⌈R/128⌉, ⌈Dg/128⌉] (float8_e8m0fnu or float32).
        wo_a_scale: None for float weights.

    Returns:
        z [T, G, R] in o's dtype. Formula: the official ``Attention.forward`` output path
        (architecture.md §3.7, §7), inverse RoPE from :func:`dsv4.layers.rope.apply_rope`.

    Raises:
        ValueError: shapes / dtypes outside the above.
    """
    from ..layers.rope import apply_rope  # lazy: layers import ops

    fmt = _check(o, positions, freqs, wo_a, wo_a_scale, raise_value_error)
    T, H, hd = o.shape
    G, R = wo_a.shape[0], wo_a.shape[1]
    Dg = H * hd // G
    o_rot = apply_rope(o, positions.to(o.device)[:, None], freqs.to(o.device), inverse=True)
    w = dequantize_experts(wo_a, wo_a_scale, Dg) if fmt != "float" else wo_a.float()
    z = torch.einsum("tgd,grd->tgr", o_rot.reshape(T, G, Dg).float(), w)
    return z.to(o.dtype).contiguous()


def _out_ref(o, positions, freqs, wo_a, wo_a_scale, out):
    _check(o, positions, freqs, wo_a, wo_a_scale, raise_value_error)
    want = (o.shape[0], wo_a.shape[0], wo_a.shape[1])
    if tuple(out.shape) != want or out.dtype != o.dtype:
        raise ValueError(f"grouped_oproj_out: out must be {o.dtype} {list(want)}, got "
                         f"{out.dtype} {list(out.shape)}")
    check_writable("grouped_oproj_out", out=out)
    out.copy_(grouped_oproj_reference(o, positions, freqs, wo_a, wo_a_scale))


def _fake(o, positions, freqs, wo_a, wo_a_scale):
    _check(o, positions, freqs, wo_a, wo_a_scale, torch._check)
    return o.new_empty((o.shape[0], wo_a.shape[0], wo_a.shape[1]))


def _out_fake(o, positions, freqs, wo_a, wo_a_scale, out):
    _check(o, positions, freqs, wo_a, wo_a_scale, torch._check)
    torch._check(tuple(out.shape) == (o.shape[0], wo_a.shape[0], wo_a.shape[1])
                 and out.dtype == o.dtype,
                 lambda: "grouped_oproj_out: out must be [tokens, groups, o_lora_rank]")


register_op("grouped_oproj", GROUPED_OPROJ_SCHEMA, grouped_oproj_reference, _fake)
register_op("grouped_oproj_out", GROUPED_OPROJ_OUT_SCHEMA, _out_ref, _out_fake)


def grouped_oproj(o: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                  wo_a: torch.Tensor, wo_a_scale: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.dsv4.grouped_oproj`` (``grouped_oproj_out`` into ``out`` when given, which is
    then returned). Arguments, result and errors: :func:`grouped_oproj_reference`. The CUDA
    kernel takes bf16 o with head_dim % 64 == 0 and rope_dim == 64."""
    if out is None:
        return torch.ops.dsv4.grouped_oproj(o, positions, freqs, wo_a, wo_a_scale)
    torch.ops.dsv4.grouped_oproj_out(o, positions, freqs, wo_a, wo_a_scale, out=out)
    return out


def output_projection(o: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                      wo_a, o_groups: int) -> torch.Tensor:
    """The attention layer's ``wo_a`` step in one call: inverse RoPE + grouped projection.

    Args:
        o: [..., n_heads, head_dim] attention output (bf16 on the kernel path).
        positions: [...] integer positions (o's leading shape).
        freqs: [rope_dim / 2] float32, the layer's RoPE frequencies.
        wo_a: the layer's :class:`dsv4.layers.linear.Linear` ``wo_a`` ([o_groups·o_lora_rank,
            n_heads·head_dim / o_groups]), a float parameter or native FP8 storage.
        o_groups: number of groups G.

    Returns:
        z [..., G, o_lora_rank] in o's dtype, what ``layers/attention.py`` computes today as
        ``einsum("bsgd,grd->bsgr", apply_rope(o, pos, freqs, inverse=True).view(..., G, -1),
        wo_a.weight.view(G, R, -1))``; then ``wo_b(z.flatten(-2))``.
    """
    lead = o.shape[:-2]
    H, hd = o.shape[-2], o.shape[-1]
    G = o_groups
    R, Dg = wo_a.out_features // G, wo_a.in_features
    scale = None
    if getattr(wo_a, "weight_format", None) == "fp8" and R % 128 == 0:
        w = wo_a.qweight.view(G, R, Dg)
        scale = wo_a.scale.view(G, R // 128, wo_a.scale.shape[-1])
    else:  # float parameter, or FP8 blocks straddling groups: the dequantised weight
        w = wo_a.weight.view(G, R, Dg)
        if w.dtype != o.dtype:
            w = w.to(o.dtype)
    o2, pos = o.reshape(-1, H, hd), positions.reshape(-1)
    if scale is None and _prefer_cublas(o2, pos, w):
        return oproj_cublas(o2, pos, freqs, w).view(*lead, G, R)
    z = grouped_oproj(o2, pos, freqs, w, scale)
    return z.view(*lead, G, R)


def _prefer_cublas(o: torch.Tensor, positions: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`output_projection` runs :func:`oproj_cublas`: bf16 o and wo_a on CUDA,
    int32 / int64 positions, ``q_norm_rope``'s kernel callable, at least
    ``OPROJ_CUBLAS_MIN_TOKENS`` tokens (``DSV4_OPROJ`` = ``kernel``: never, ``cublas``: at any
    size)."""
    from .qkv_rope import HEAD_DIMS  # lazy: qkv_rope imports the layers, which import this

    mode = env_choice("DSV4_OPROJ", ("", "kernel", "cublas"))
    if mode == "kernel" or not (o.is_cuda and o.dtype == torch.bfloat16 == w.dtype):
        return False
    if mode != "cublas" and o.shape[0] < OPROJ_CUBLAS_MIN_TOKENS:
        return False
    return (o.shape[-1] in HEAD_DIMS and positions.dtype in (torch.int32, torch.int64) and
            use_kernels(o, ("q_norm_rope",)))


def oproj_cublas(o: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                 wo_a: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_oproj_reference`'s formula for bf16 o [T, H, hd] on CUDA and a bf16 wo_a
    [G, R, Dg]: the inverse RoPE written once (``q_norm_rope`` without the norm, by -angle:
    ``apply_rope(..., inverse=True)``'s rotation, rounded to bf16 as the reference rounds it),
    then the grouped einsum on cuBLAS (fp32 accumulation, rounded once). Returns z [T, G, R]
    bf16. Raises ValueError (from q_norm_rope) for a head_dim outside 64 / 128 / 256 / 512,
    positions that are not int32 / int64 [T] or freqs not float32 [rope_dim / 2]; torch's
    RuntimeError when H·hd is not G·Dg."""
    from .qkv_rope import QUANT_NONE, q_norm_rope  # lazy: see _prefer_cublas

    T, H, hd = o.shape
    G, R, Dg = wo_a.shape
    o_rot = q_norm_rope(o, positions, -freqs, 0.0, norm=False, quant=QUANT_NONE)
    return torch.einsum("tgd,grd->tgr", o_rot.view(T, G, Dg), wo_a)
