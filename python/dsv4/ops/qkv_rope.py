"""Fused query and key-value paths of the attention block: ``torch.ops.dsv4.q_norm_rope`` and
``torch.ops.dsv4.kv_norm_rope`` (architecture.md §3.2, §3.3, §5).

* q path: ``wq_b`` output [T, H, D] → per-head weight-free RMSNorm → RoPE on the last rope_dim
  dims (→ FP8 simulation of the nope dims, or Hadamard + FP4 for the indexer query) in one
  pass.
* kv path: ``wkv`` output [T, D] → ``kv_norm`` (learned fp32 weight) → RoPE → FP8 simulation
  of the nope dims (quant_sim) → the bf16 result AND its store into up to two caches (the
  window ring slot and / or a store row; bf16 or FP8 MODEL1 pools of :mod:`dsv4.ops.kv_cache`)
  in one pass.

The references call the model's own formulas (:func:`dsv4.ops.norm.rms_norm_reference`,
:func:`dsv4.layers.rope.apply_rope`, :mod:`dsv4.ops.quant`, :func:`dsv4.ops.kv_cache.pack`):
same operations, same casts. The CUDA kernel (csrc/kernels/qkv_rope.cu) reduces the sum of
squares in another order, so an element may differ by one bf16 step (and then one FP8 / FP4
step) where an fp32 result lands next to a rounding tie.
"""

from __future__ import annotations

import torch

from ..layers.rope import apply_rope
from . import kv_cache
from ._ext import check_positive_f32, check_writable, raise_value_error, register_op
from .norm import rms_norm_reference
from .compressor import QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE
from .quant import fp4_e2m1_sim, fp8_e4m3_sim, hadamard

__all__ = ["q_norm_rope", "kv_norm_rope", "q_norm_rope_reference", "kv_norm_rope_reference",
           "QUANT_NONE", "QUANT_FP8", "QUANT_FP4_HADAMARD"]

# The ``quant`` codes are compress_kv's (one definition): 0 none, 1 FP8 e4m3 round trip of the
# nope dims in blocks of 64 (§3.3), 2 Hadamard rotation + FP4 e2m1 in blocks of 32 (§5; q only).

HEAD_DIMS = (64, 128, 256, 512)

Q_SCHEMA = "(Tensor x, Tensor positions, Tensor freqs, float eps, bool norm, int quant) -> Tensor"
Q_OUT_SCHEMA = ("(Tensor x, Tensor positions, Tensor freqs, float eps, bool norm, int quant, *, "
                "Tensor(a!) out) -> ()")
_KV_ARGS = ("(Tensor x, Tensor weight, Tensor positions, Tensor freqs, float eps, int quant, "
            "Tensor(a!)? cache=None, Tensor? cache_rows=None, Tensor(b!)? cache2=None, "
            "Tensor? cache2_rows=None")
KV_SCHEMA = _KV_ARGS + ") -> Tensor"
KV_OUT_SCHEMA = _KV_ARGS + ", *, Tensor(c!) out) -> ()"


def _fail(msg: str):
    raise ValueError(msg)


def _check_q_eps(eps, norm, check=raise_value_error) -> None:
    """The op's eps (the kernel's float32): a positive finite float32 where the norm reads it
    (norm = False ignores it: the model passes 0 there), as the CUDA glue checks. The
    references themselves take any eps (the model's maths)."""
    if norm:
        check_positive_f32("q_norm_rope", "eps", eps, check)


def _check_kv_eps(eps, check=raise_value_error) -> None:
    check_positive_f32("kv_norm_rope", "eps", eps, check)


def _check_common(name, x, positions, freqs, quant, check):
    D = x.shape[-1] if x.dim() else 0
    rd = 2 * freqs.numel()
    check(x.dtype.is_floating_point, lambda: f"{name}: x must be a floating-point tensor, got {x.dtype}")
    check(D in HEAD_DIMS, lambda: f"{name}: head_dim must be one of {HEAD_DIMS}, got {D}")
    check(freqs.dim() == 1 and freqs.dtype == torch.float32 and 2 <= rd <= D,
          lambda: f"{name}: freqs must be float32 [rope_dim / 2] with 2 <= rope_dim <= {D}, got "
                  f"{freqs.dtype} {tuple(freqs.shape)}")
    check(positions.dim() == 1 and positions.shape[0] == x.shape[0] and
          positions.dtype in (torch.int32, torch.int64),
          lambda: f"{name}: positions must be int32 / int64 [{x.shape[0]}] (one per token), got "
                  f"{positions.dtype} {tuple(positions.shape)}")
    check(quant in (QUANT_NONE, QUANT_FP8, QUANT_FP4_HADAMARD),
          lambda: f"{name}: quant must be 0 (none), 1 (FP8) or 2 (Hadamard + FP4), got {quant}")
    check(quant != QUANT_FP8 or (D - rd) % 64 == 0,
          lambda: f"{name}: quant=1 (FP8 blocks of 64) needs head_dim - rope_dim to be a multiple "
                  f"of 64, got {D} - {rd}")


def _quantize(y: torch.Tensor, quant: int, rd: int) -> torch.Tensor:
    if quant == QUANT_FP8:
        return torch.cat([fp8_e4m3_sim(y[..., :-rd], 64), y[..., -rd:]], dim=-1)
    if quant == QUANT_FP4_HADAMARD:
        return fp4_e2m1_sim(hadamard(y), 32)
    return y


# ---------------------------------------------------------------------------------------------
# q path
# ---------------------------------------------------------------------------------------------
def _check_q(x, positions, freqs, quant, check):
    check(x.dim() == 3, lambda: f"q_norm_rope: x must be [tokens, heads, head_dim], got {tuple(x.shape)}")
    _check_common("q_norm_rope", x, positions, freqs, quant, check)
    check(x.shape[1] >= 1,
          lambda: f"q_norm_rope: x must have at least one head, got {tuple(x.shape)}")


def q_norm_rope_reference(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                          eps: float, norm: bool = True, quant: int = QUANT_NONE) -> torch.Tensor:
    """The query path after ``wq_b`` (architecture.md §3.2; with ``norm=False,
    quant=QUANT_FP4_HADAMARD`` the indexer query path of §5).

    Args:
        x: [tokens, heads, head_dim] (bf16 in the model; any float dtype here).
        positions: [tokens] int32 / int64 absolute positions.
        freqs: [rope_dim / 2] float32, the layer's RoPE table (RoPE on the last rope_dim dims).
        eps: RMSNorm epsilon (``norm_eps``).
        norm: apply the per-head weight-free RMSNorm first.
        quant: 0 none, 1 FP8 round trip of the nope dims (blocks of 64), 2 Hadamard + FP4
            (blocks of 32).

    Returns:
        [tokens, heads, head_dim] in x.dtype.
    """
    _check_q(x, positions, freqs, quant, lambda c, m: c or _fail(m()))
    y = rms_norm_reference(x, None, eps) if norm else x
    y = apply_rope(y, positions[:, None], freqs)
    return _quantize(y, quant, 2 * freqs.numel())


def _q_op(x, positions, freqs, eps, norm, quant):
    _check_q_eps(eps, norm)
    return q_norm_rope_reference(x, positions, freqs, eps, norm, quant).contiguous()


def _q_out_op(x, positions, freqs, eps, norm, quant, *, out):
    _check_q_eps(eps, norm)
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        _fail(f"q_norm_rope_out: out must be {x.dtype} {tuple(x.shape)}, got {out.dtype} "
              f"{tuple(out.shape)}")
    check_writable("q_norm_rope_out", out=out)
    out.copy_(q_norm_rope_reference(x, positions, freqs, eps, norm, quant))


def _q_fake(x, positions, freqs, eps, norm, quant):
    _check_q_eps(eps, norm, torch._check)
    _check_q(x, positions, freqs, quant, torch._check)
    return x.new_empty(x.shape)


def _q_out_fake(x, positions, freqs, eps, norm, quant, *, out):
    _check_q_eps(eps, norm, torch._check)
    _check_q(x, positions, freqs, quant, torch._check)


register_op("q_norm_rope", Q_SCHEMA, _q_op, _q_fake)
register_op("q_norm_rope_out", Q_OUT_SCHEMA, _q_out_op, _q_out_fake)


# ---------------------------------------------------------------------------------------------
# kv path
# ---------------------------------------------------------------------------------------------
def _check_kv(x, weight, positions, freqs, quant, caches, check):
    check(x.dim() == 2, lambda: f"kv_norm_rope: x must be [tokens, head_dim], got {tuple(x.shape)}")
    _check_common("kv_norm_rope", x, positions, freqs, quant, check)
    D = x.shape[-1]
    check(weight.dim() == 1 and weight.shape[0] == D and weight.dtype == torch.float32,
          lambda: f"kv_norm_rope: weight must be float32 [{D}], got {weight.dtype} {tuple(weight.shape)}")
    check(quant != QUANT_FP4_HADAMARD,
          lambda: "kv_norm_rope: quant must be 0 (none) or 1 (FP8); 2 is a query-only mode")
    for name, cache, rows in caches:
        if cache is None:
            check(rows is None, lambda name=name: f"kv_norm_rope: {name}_rows given without {name}")
            continue
        check(rows is not None and rows.dim() == 1 and rows.shape[0] == x.shape[0] and
              rows.dtype == torch.int32,
              lambda name=name: f"kv_norm_rope: {name}_rows must be int32 [{x.shape[0]}] (a flat "
                                f"cache row per token, -1 = not written)")
        if cache.dtype == torch.uint8:
            check(cache.dim() == 3 and D == 512 and cache.shape[-1] == kv_cache.MODEL1_ENTRY_BYTES
                  and 2 * freqs.numel() == kv_cache.MODEL1_ROPE_DIM,
                  lambda name=name: f"kv_norm_rope: a uint8 {name} must be a MODEL1 FP8 pool "
                                    f"[num_blocks, block_size, 584] (head_dim 512, rope_dim 64)")
        else:
            check(cache.dtype == torch.bfloat16 and cache.dim() in (2, 3) and cache.shape[-1] == D,
                  lambda name=name: f"kv_norm_rope: {name} must be bfloat16 [rows, {D}] or a pool "
                                    f"[num_blocks, block_size, {D}] (or an FP8 MODEL1 pool), got "
                                    f"{cache.dtype} {tuple(cache.shape)}")


def _write_cache(cache: torch.Tensor, rows: torch.Tensor, y: torch.Tensor,
                 pre: torch.Tensor) -> None:
    """Rows ``rows[t]`` in [0, rows of the cache) get entry t; FP8 pools quantise ``pre``."""
    n = cache.shape[0] * cache.shape[1] if cache.dim() == 3 else cache.shape[0]
    r = rows.to(y.device).long()
    ok = (r >= 0) & (r < n)
    if not bool(ok.any()):
        return
    sel = ok.nonzero().flatten()
    r = r[sel]
    if cache.dtype == torch.uint8:
        bs = cache.shape[1]
        kv_cache.write_entries(cache, r // bs, r % bs, pre[sel])
    elif cache.dim() == 3:
        bs = cache.shape[1]
        cache[r // bs, r % bs] = y[sel].to(cache.dtype)
    else:
        cache[r] = y[sel].to(cache.dtype)


def kv_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor,
                           freqs: torch.Tensor, eps: float, quant: int = QUANT_NONE,
                           cache: torch.Tensor | None = None,
                           cache_rows: torch.Tensor | None = None,
                           cache2: torch.Tensor | None = None,
                           cache2_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The key-value path after ``wkv`` (architecture.md §3.3), and the cache write.

    Args:
        x: [tokens, head_dim] bf16 (any float dtype here), ``wkv(x)``.
        weight: [head_dim] float32, ``kv_norm.weight``.
        positions: [tokens] int32 / int64 absolute positions; freqs: [rope_dim / 2] float32.
        eps: RMSNorm epsilon. quant: 0 none, 1 FP8 round trip of the nope dims (quant_sim).
        cache, cache2: optional caches updated in place: bf16 [rows, head_dim], a bf16 pool
            [num_blocks, block_size, head_dim] (flat row r = entry r % block_size of block
            r // block_size) or an FP8 MODEL1 pool (:mod:`dsv4.ops.kv_cache`; it stores
            exactly the FP8 simulation of the entry, whatever ``quant``).
        cache_rows, cache2_rows: [tokens] int32 flat rows; a row outside [0, rows) (e.g. −1,
            a token that leaves the window within this step) is not written. Two tokens must
            not write the same row.

    Returns:
        [tokens, head_dim] in x.dtype: the keys / values this step attends to.

    Raises:
        ValueError on bad shapes / dtypes / quant.
    """
    caches = (("cache", cache, cache_rows), ("cache2", cache2, cache2_rows))
    _check_kv(x, weight, positions, freqs, quant, caches, lambda c, m: c or _fail(m()))
    check_writable("kv_norm_rope", cache=cache, cache2=cache2)
    for c in (cache, cache2):  # FP8 pool layouts, checked before either cache is written
        if c is not None and c.dtype == torch.uint8:
            kv_cache.block_view(c)
    pre = apply_rope(rms_norm_reference(x, weight, eps), positions, freqs)
    y = _quantize(pre, quant, 2 * freqs.numel())
    for _, c, rows in caches:
        if c is not None:
            _write_cache(c, rows, y, pre)
    return y


def _kv_op(x, weight, positions, freqs, eps, quant, cache=None, cache_rows=None, cache2=None,
           cache2_rows=None):
    _check_kv_eps(eps)
    return kv_norm_rope_reference(x, weight, positions, freqs, eps, quant, cache, cache_rows,
                                  cache2, cache2_rows).contiguous()


def _kv_out_op(x, weight, positions, freqs, eps, quant, cache=None, cache_rows=None, cache2=None,
               cache2_rows=None, *, out):
    _check_kv_eps(eps)  # before _kv_op writes the caches
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        _fail(f"kv_norm_rope_out: out must be {x.dtype} {tuple(x.shape)}, got {out.dtype} "
              f"{tuple(out.shape)}")
    check_writable("kv_norm_rope_out", out=out)  # before _kv_op writes the caches
    out.copy_(_kv_op(x, weight, positions, freqs, eps, quant, cache, cache_rows, cache2,
                     cache2_rows))


def _kv_fake(x, weight, positions, freqs, eps, quant, cache=None, cache_rows=None, cache2=None,
             cache2_rows=None):
    _check_kv_eps(eps, torch._check)
    _check_kv(x, weight, positions, freqs, quant,
              (("cache", cache, cache_rows), ("cache2", cache2, cache2_rows)), torch._check)
    return x.new_empty(x.shape)


def _kv_out_fake(x, weight, positions, freqs, eps, quant, cache=None, cache_rows=None,
                 cache2=None, cache2_rows=None, *, out):
    _check_kv_eps(eps, torch._check)
    _check_kv(x, weight, positions, freqs, quant,
              (("cache", cache, cache_rows), ("cache2", cache2, cache2_rows)), torch._check)


register_op("kv_norm_rope", KV_SCHEMA, _kv_op, _kv_fake)
register_op("kv_norm_rope_out", KV_OUT_SCHEMA, _kv_out_op, _kv_out_fake)


# ---------------------------------------------------------------------------------------------
# Wrappers (what a layer calls)
# ---------------------------------------------------------------------------------------------
def q_norm_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, eps: float,
                norm: bool = True, quant: int = QUANT_NONE, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.dsv4.q_norm_rope`` (``_out`` with ``out``): :func:`q_norm_rope_reference`
    in one CUDA pass (bf16 x with a unit last stride, head_dim 64/128/256/512).

    Attention layer (§3.2)::

        q = q_norm_rope(self.wq_b(qr).unflatten(-1, (H, D)).flatten(0, -3), pos_t, freqs,
                        c.norm_eps)
    Indexer query (§5)::

        q = q_norm_rope(wq_b_out, pos_t, freqs, eps, norm=False,
                        quant=QUANT_FP4_HADAMARD if quant_sim else QUANT_NONE)
    """
    if out is None:
        return torch.ops.dsv4.q_norm_rope(x, positions, freqs, float(eps), bool(norm), int(quant))
    torch.ops.dsv4.q_norm_rope_out(x, positions, freqs, float(eps), bool(norm), int(quant),
                                   out=out)
    return out


def kv_norm_rope(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor,
                 freqs: torch.Tensor, eps: float, quant: int = QUANT_NONE,
                 cache: torch.Tensor | None = None, cache_rows: torch.Tensor | None = None,
                 cache2: torch.Tensor | None = None, cache2_rows: torch.Tensor | None = None, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.dsv4.kv_norm_rope`` (``_out`` with ``out``): :func:`kv_norm_rope_reference`
    in one CUDA pass, the window ring write included.

    Attention layer (§3.3)::

        kv_t = kv_norm_rope(self.wkv(x_t), self.kv_norm.weight, lay.pos, freqs, c.norm_eps,
                            QUANT_FP8 if c.quant_sim else QUANT_NONE, cache_pool, rows)

    The cache is written BEFORE the step's attention runs. That is right for a destination
    that keeps every position of the step (a paged per-position window / store, as FlashMLA
    engines keep it) and for a W-slot ring when each sequence gets one new token (decode).
    With several new tokens per sequence (MTP, chunked prefill) a W-slot ring would lose
    slots the earlier queries of the step still read (token p overwrites position p − W,
    which query p − 1 sees): pass no cache then and update the ring after attention, as
    ``Attention._attend_kernels`` does today.
    """
    if out is None:
        return torch.ops.dsv4.kv_norm_rope(x, weight, positions, freqs, float(eps), int(quant),
                                           cache, cache_rows, cache2, cache2_rows)
    torch.ops.dsv4.kv_norm_rope_out(x, weight, positions, freqs, float(eps), int(quant), cache,
                                    cache_rows, cache2, cache2_rows, out=out)
    return out
