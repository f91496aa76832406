"""Sparse attention with a per-head sink: ``torch.ops.dsv4.sparse_attn`` (architecture.md §3.6).

The reference is the semantics every kernel is checked against: fp32 math, index −1 (or any
index outside the key array) = invalid, a query with no valid key returns 0 and lse +inf, the
sink joins the softmax denominator with a zero value, and lse excludes the sink (FlashMLA's
convention, kernels.md §4.1). Keys come from one or two scopes (the SWA window and the
compressed store) joined into one softmax; ``topk_length`` / ``extra_topk_length`` limit how
many lanes of each index row are used (lanes past the length are never read).

``torch.ops.dsv4.sparse_attn`` runs the CUDA kernel (csrc/kernels/sparse_attn.cu, bf16) on CUDA
tensors and this reference on CPU (and on CUDA when the extension is not built).
"""

from __future__ import annotations

import math

import torch

from . import kv_cache
from ._ext import check_finite_f32, check_writable, register_op

__all__ = ["sparse_attn", "sparse_attn_reference"]

# Bytes of gathered keys materialised at once (the reference chunks over queries).
_CHUNK_BYTES = 64 << 20

_SCHEMA_ARGS = ("(Tensor q, Tensor kv, Tensor indices, Tensor attn_sink, float softmax_scale, "
                "Tensor? topk_length=None, Tensor? extra_kv=None, Tensor? extra_indices=None, "
                "Tensor? extra_topk_length=None")
SPARSE_ATTN_SCHEMA = _SCHEMA_ARGS + ") -> (Tensor, Tensor)"
SPARSE_ATTN_OUT_SCHEMA = _SCHEMA_ARGS + ", *, Tensor(a!) out, Tensor(b!) lse) -> ()"


def _is_fp8_pool(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == torch.uint8


def _check_pool(name: str, t: torch.Tensor, D: int, op: str = "sparse_attn") -> None:
    """An FP8 (MODEL1) key pool [num_blocks, block_size, 584] for head_dim 512."""
    try:
        fmt = kv_cache.cache_format(t, D)
    except ValueError:  # no FP8 format at all: this op's own words below
        fmt = None
    if t.dim() != 3 or fmt != kv_cache.MODEL1:
        raise ValueError(f"{op}: a uint8 {name} must be a MODEL1 FP8 pool "
                         f"[num_blocks, block_size, 584] (head_dim 512, dsv4.ops.kv_cache), got "
                         f"{tuple(t.shape)} for head_dim {D}")


def _check_scopes(q, kv, extra_kv, op: str = "sparse_attn") -> None:
    """The key scopes' formats (sparse_attn and hca_attn; the CUDA glue's rules): a uint8 scope
    is a MODEL1 FP8 pool, any other scope floating-point, and kv and extra_kv (when given) both
    FP8 pools or both floating-point; q has at least one head."""
    D = q.shape[2]
    if q.shape[1] < 1:
        raise ValueError(f"{op}: q must have at least one head, got {tuple(q.shape)}")
    for name, t in (("q", q), ("kv", kv), ("extra_kv", extra_kv)):
        if t is None:
            continue
        if _is_fp8_pool(t) and name != "q":
            _check_pool(name, t, D, op)
        elif not t.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be a floating-point tensor (bfloat16 on "
                             f"CUDA; float32 or bfloat16 for the reference), got {t.dtype}")
    if extra_kv is not None and _is_fp8_pool(kv) != _is_fp8_pool(extra_kv):
        raise ValueError(f"{op}: kv and extra_kv must both be FP8 pools or both floating-point "
                         f"(bfloat16 on CUDA), got {kv.dtype} and {extra_kv.dtype}")


def _flat_keys(t: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, D] keys of a scope: a plain [N, D] array as is, an FP8 pool dequantised and
    flattened (row r = entry r % block_size of block r // block_size; exact)."""
    if not _is_fp8_pool(t):
        return t
    return kv_cache.read_pool(t, D, dtype).reshape(-1, D)


def _check_shapes(q, kv, indices, attn_sink, topk_length, extra_kv, extra_indices,
                  extra_topk_length, op: str = "sparse_attn") -> None:
    """Every argument of sparse_attn (``op``: the message prefix; hca_attn checks its window
    scope here with extra_kv etc. None)."""
    if q.dim() != 3 or indices.dim() != 2 or (kv.dim() != 2 and not _is_fp8_pool(kv)):
        raise ValueError(f"{op}: expected q [tokens, heads, dim], kv [n_kv, dim] (or a "
                         "uint8 FP8 pool), indices [tokens, k]; got "
                         f"{tuple(q.shape)}, {tuple(kv.shape)}, {tuple(indices.shape)}")
    T, H, D = q.shape
    _check_scopes(q, kv, extra_kv, op)
    if (not _is_fp8_pool(kv) and kv.shape[1] != D) or indices.shape[0] != T or \
            tuple(attn_sink.shape) != (H,):
        raise ValueError(f"{op}: shape mismatch between q, kv, indices and attn_sink: "
                         f"q {tuple(q.shape)}, kv {tuple(kv.shape)}, indices "
                         f"{tuple(indices.shape)}, attn_sink {tuple(attn_sink.shape)}")
    if (extra_kv is None) != (extra_indices is None):
        raise ValueError("sparse_attn: extra_kv and extra_indices must be given together")
    if extra_topk_length is not None and extra_indices is None:
        raise ValueError("sparse_attn: extra_topk_length needs extra_kv and extra_indices")
    if extra_kv is not None:
        if not _is_fp8_pool(extra_kv) and (extra_kv.dim() != 2 or extra_kv.shape[1] != D):
            raise ValueError(f"sparse_attn: extra_kv must be [n, {D}], got "
                             f"{tuple(extra_kv.shape)}")
        if extra_indices.dim() != 2 or extra_indices.shape[0] != T:
            raise ValueError(f"sparse_attn: extra_indices must be [{T}, k], got "
                             f"{tuple(extra_indices.shape)}")
    for name, length in (("topk_length", topk_length), ("extra_topk_length", extra_topk_length)):
        if length is not None and tuple(length.shape) != (T,):
            raise ValueError(f"{op}: {name} must have shape [{T}], got "
                             f"{tuple(length.shape)}")
    for name, t in (("indices", indices), ("extra_indices", extra_indices),
                    ("topk_length", topk_length), ("extra_topk_length", extra_topk_length)):
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex
                              or t.dtype == torch.bool):
            raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype} "
                             "(int32 on CUDA)")


def sparse_attn_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                          attn_sink: torch.Tensor, softmax_scale: float,
                          topk_length: torch.Tensor | None = None,
                          extra_kv: torch.Tensor | None = None,
                          extra_indices: torch.Tensor | None = None,
                          extra_topk_length: torch.Tensor | None = None, *,
                          skip_out_of_range: bool = False,
                          compute_dtype: torch.dtype = torch.float32,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its listed rows of shared K = V arrays, with a sink.

    For token t and head h, over the keys J_t listed by ``indices[t, :topk_length[t]]`` (rows
    of ``kv``) and ``extra_indices[t, :extra_topk_length[t]]`` (rows of ``extra_kv``), joined
    into one softmax (architecture.md §3.6)::

        s_hj = softmax_scale · q[t, h] · k_j
        out[t, h] = Σ_j e^{s_hj} k_j / (Σ_j e^{s_hj} + e^{attn_sink[h]})
        lse[t, h] = log Σ_j e^{s_hj}            (valid keys only, without the sink)

    Duplicated indices count once per listing. sink = +inf gives out 0 (lse unchanged);
    sink = −inf a plain softmax.

    Args:
        q: [tokens, heads, head_dim], float32 or bfloat16.
        kv: [n_kv, head_dim], same dtype; each row is both key and value (MQA, one KV head).
            Or an FP8 MODEL1 pool uint8 [num_blocks, block_size, 584] (head_dim 512,
            :mod:`dsv4.ops.kv_cache`): row r is entry r % block_size of block
            r // block_size, dequantised exactly (extra_kv likewise). On CUDA the
            environment variable ``DSV4_SPARSE_FP8`` (read at each call) picks the kernel for
            FP8 pools: ``old`` (dequantisation between the GEMMs), ``new`` (warp-specialised:
            producer warps dequantise the next key block while the MMA warps run the current
            one), ``new2`` (the same with whole-sector loads) or ``auto`` (the default when
            unset: ``new`` when the grid has more (token, 64-head tile) CTAs than the GPU has
            SMs, else ``old``); all give bit-identical results; any other value raises
            RuntimeError.
        indices: [tokens, k] integer rows into ``kv``; −1 marks an unused slot.
        attn_sink: [heads] float32 sink logit per head.
        softmax_scale: multiplies q·k (``head_dim ** -0.5`` in V4).
        topk_length: optional [tokens] integer; only lanes ``i < topk_length[t]`` of row t are
            used (clamped to [0, k]); the rest may hold anything.
        extra_kv: optional [n_extra, head_dim] second key array (the compressed store).
        extra_indices: optional [tokens, k2] rows into ``extra_kv`` (given with extra_kv).
        extra_topk_length: optional [tokens] lane count of ``extra_indices``.
        skip_out_of_range: False (default): an index outside [−1, n) of a used lane raises
            ValueError (a host sync). True: any index outside [0, n) is an invalid slot, as
            in the CUDA kernel and FlashMLA (``torch.ops.dsv4.sparse_attn`` uses this).
        compute_dtype: float32 (the semantics). bfloat16 runs the same formula in bf16 math
            (the low-precision baseline of the kernel tolerance rule in the tests).

    Returns:
        out: [tokens, heads, head_dim] in ``q.dtype``; 0 for a query without a valid key.
        lse: [tokens, heads] float32; +inf for a query without a valid key.

    Raises:
        ValueError: on mismatched shapes, a q without heads, extra_kv without extra_indices
            (or the reverse), an FP8 pool with a floating-point scope (kv and extra_kv are both
            FP8 pools or both floating-point, as on CUDA), non-integer indices or lengths,
            non-floating q / kv / extra_kv, or (unless
            skip_out_of_range) an out-of-range used index.
    """
    _check_shapes(q, kv, indices, attn_sink, topk_length, extra_kv, extra_indices,
                  extra_topk_length)
    T, H, D = q.shape
    kv = _flat_keys(kv, D, q.dtype)
    if extra_kv is not None:
        extra_kv = _flat_keys(extra_kv, D, q.dtype)
    scopes = [(kv, indices, topk_length, "indices")]
    if extra_kv is not None:
        scopes.append((extra_kv, extra_indices, extra_topk_length, "extra_indices"))

    def used_lanes(idx: torch.Tensor, length: torch.Tensor | None) -> torch.Tensor:
        lanes = torch.arange(idx.shape[1], device=idx.device)
        if length is None:
            return torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        return lanes[None, :] < length.to(idx.device).long()[:, None]

    if not skip_out_of_range:
        for src, idx, length, name in scopes:
            used = used_lanes(idx, length)
            bad = used & ((idx < -1) | (idx >= src.shape[0]))
            if idx.numel() and bool(bad.any()):
                vals = idx[bad]
                raise ValueError(f"sparse_attn: {name} must lie in [-1, {src.shape[0]}); got "
                                 f"[{int(vals.min())}, {int(vals.max())}]")

    K = sum(idx.shape[1] for _, idx, _, _ in scopes)
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    lse = torch.full((T, H), math.inf, dtype=torch.float32, device=q.device)
    if T == 0 or K == 0:
        return out.to(q.dtype), lse
    cd = compute_dtype
    sink = attn_sink.to(cd)
    step = max(1, _CHUNK_BYTES // max(1, K * D * 4))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        keys_parts, valid_parts = [], []
        for src, idx, length, _ in scopes:
            ix = idx[t0:t1].long()
            valid = (ix >= 0) & (ix < src.shape[0])
            valid &= used_lanes(idx[t0:t1], None if length is None else length[t0:t1])
            if src.shape[0] == 0:
                keys = torch.zeros(*ix.shape, D, dtype=cd, device=q.device)
            else:
                # invalid lanes read row 0 and are zeroed: their weight is 0, and 0 x NaN
                # would otherwise carry a NaN of row 0 into tokens that never read it
                keys = src[torch.where(valid, ix, 0)].to(cd)              # [t, k, D]
                keys = keys.masked_fill(~valid[..., None], 0)
            keys_parts.append(keys)
            valid_parts.append(valid)
        keys = torch.cat(keys_parts, 1)
        valid = torch.cat(valid_parts, 1)
        s = torch.einsum("thd,tkd->thk", q[t0:t1].to(cd), keys) * softmax_scale
        s = s.masked_fill(~valid[:, None, :], -math.inf)
        m = s.amax(-1, keepdim=True)                                    # -inf: no valid key
        m = torch.where(torch.isfinite(m), m, 0.0)
        p = torch.exp(s - m)
        denom = p.sum(-1)
        # sink = +inf gives out = 0; sink = -inf is a plain softmax.
        o = torch.einsum("thk,tkd->thd", p, keys) / (denom + torch.exp(sink - m[..., 0]))[..., None]
        any_valid = valid.any(-1)[:, None]
        out[t0:t1] = torch.where(any_valid[..., None], o.float(), 0.0)
        lse[t0:t1] = torch.where(any_valid, (m[..., 0] + torch.log(denom)).float(), math.inf)
    return out.to(q.dtype), lse


# ---------------------------------------------------------------------------------------------
# torch.ops.dsv4.sparse_attn / sparse_attn_out: reference (CPU) and fake registrations
# ---------------------------------------------------------------------------------------------
def _sparse_attn_op(q, kv, indices, attn_sink, softmax_scale, topk_length=None, extra_kv=None,
                    extra_indices=None, extra_topk_length=None):
    # the kernel's float32 scale: any finite one (the CUDA glue's check)
    check_finite_f32("sparse_attn", "softmax_scale", softmax_scale)
    out, lse = sparse_attn_reference(q, kv, indices, attn_sink, softmax_scale, topk_length,
                                     extra_kv, extra_indices, extra_topk_length,
                                     skip_out_of_range=True)
    return out.contiguous(), lse


def _sparse_attn_out_op(q, kv, indices, attn_sink, softmax_scale, topk_length=None,
                        extra_kv=None, extra_indices=None, extra_topk_length=None, *, out, lse):
    check_finite_f32("sparse_attn", "softmax_scale", softmax_scale)
    T, H, D = q.shape if q.dim() == 3 else (None, None, None)
    if tuple(out.shape) != (T, H, D) or tuple(lse.shape) != (T, H):
        raise ValueError(f"sparse_attn_out: out must be [{T}, {H}, {D}] and lse [{T}, {H}]; "
                         f"got {tuple(out.shape)} and {tuple(lse.shape)}")
    if out.dtype != q.dtype or lse.dtype != torch.float32:
        raise ValueError(f"sparse_attn_out: out must have q's dtype ({q.dtype}) and lse must be "
                         f"float32; got {out.dtype} and {lse.dtype}")
    check_writable("sparse_attn_out", out=out, lse=lse)
    o, l = _sparse_attn_op(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv,
                           extra_indices, extra_topk_length)
    out.copy_(o)
    lse.copy_(l)


def _fake_checks(q, kv, indices, attn_sink):
    torch._check(q.dim() == 3, lambda: "sparse_attn: q must be [tokens, heads, head_dim]")
    torch._check((kv.dim() == 2 and kv.size(1) == q.size(2)) or
                 (kv.dtype == torch.uint8 and kv.dim() == 3),
                 lambda: "sparse_attn: kv must be [n_kv, head_dim] or an FP8 pool")
    torch._check(indices.dim() == 2 and indices.size(0) == q.size(0),
                 lambda: "sparse_attn: indices must be [tokens, k]")
    torch._check(attn_sink.dim() == 1 and attn_sink.size(0) == q.size(1),
                 lambda: "sparse_attn: attn_sink must be [heads]")


def _sparse_attn_fake(q, kv, indices, attn_sink, softmax_scale, topk_length=None, extra_kv=None,
                      extra_indices=None, extra_topk_length=None):
    check_finite_f32("sparse_attn", "softmax_scale", softmax_scale, torch._check)
    _fake_checks(q, kv, indices, attn_sink)
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


def _sparse_attn_out_fake(q, kv, indices, attn_sink, softmax_scale, topk_length=None,
                          extra_kv=None, extra_indices=None, extra_topk_length=None, *, out, lse):
    check_finite_f32("sparse_attn", "softmax_scale", softmax_scale, torch._check)
    _fake_checks(q, kv, indices, attn_sink)
    return None


register_op("sparse_attn", SPARSE_ATTN_SCHEMA, _sparse_attn_op, _sparse_attn_fake)
register_op("sparse_attn_out", SPARSE_ATTN_OUT_SCHEMA, _sparse_attn_out_op, _sparse_attn_out_fake)


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                attn_sink: torch.Tensor, softmax_scale: float,
                topk_length: torch.Tensor | None = None, extra_kv: torch.Tensor | None = None,
                extra_indices: torch.Tensor | None = None,
                extra_topk_length: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.dsv4.sparse_attn`` (or ``sparse_attn_out`` when ``out``/``lse`` are given).

    Same arguments and contract as :func:`sparse_attn_reference` with ``skip_out_of_range``
    (any index outside [0, n) is an unused slot; no host sync). On CUDA the kernel needs
    bfloat16 q / kv / extra_kv, int32 indices and lengths, float32 attn_sink, head_dim in
    {64, 128, 256, 512} and any number of heads; other inputs raise RuntimeError (call the
    reference for float32). On CPU the reference runs.

    Args:
        q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv, extra_indices,
            extra_topk_length: see :func:`sparse_attn_reference`.
        out: optional [tokens, heads, head_dim] bf16 buffer (unit last stride) to write into;
            must be given together with ``lse`` [tokens, heads] float32.

    Returns:
        (out [tokens, heads, head_dim] in q.dtype, lse [tokens, heads] float32).
    """
    if (out is None) != (lse is None):
        raise ValueError("sparse_attn: give both out and lse, or neither")
    if out is None:
        return torch.ops.dsv4.sparse_attn(q, kv, indices, attn_sink, softmax_scale, topk_length,
                                          extra_kv, extra_indices, extra_topk_length)
    torch.ops.dsv4.sparse_attn_out(q, kv, indices, attn_sink, softmax_scale, topk_length,
                                   extra_kv, extra_indices, extra_topk_length, out=out, lse=lse)
    return out, lse
