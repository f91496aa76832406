"""HCA dense attention: ``torch.ops.dsv4.hca_attn`` (architecture.md §3.5, §6;
docs/contracts.md §A.4).

An HCA layer's query at position t attends to its sliding window and to EVERY compressed entry
it may see (entry s is visible iff ``s < (t + 1) // 128``), with the per-head sink. Instead of
an index list over the compressed scope ([queries, entries], 32 GB for a 1M-token prompt), the
op takes the compressed store as a (paged) pool, a block table, the block-table row of each
query and the number of entries each query sees. The window scope is given exactly as in
``sparse_attn`` (rows of ``kv`` per query, −1 unused). Same softmax, sink, lse and empty-row
contract as ``sparse_attn``: the reference below builds the equivalent ``extra_indices`` and
calls :func:`dsv4.ops.attention.sparse_attn_reference` (one definition of the attention).

Compressed lane i < ``extra_lengths[t]`` of query t is entry i of block-table row
``r = extra_rows[t]``::

    extra_kv[extra_block_table[r, i // block_size], i % block_size]

(``extra_kv`` [num_blocks, block_size, head_dim]). A block id outside [0, num_blocks) or a
column past ``max_blocks`` makes that lane an unused slot (nothing read); a row outside
[0, rows) sees no compressed entry; lengths are clamped to [0, max_blocks · block_size].
A dense per-sequence store [batch, capacity, head_dim] is the pool with block_size =
capacity and the table :func:`dense_block_table`. ``kv`` and ``extra_kv`` may both be FP8
MODEL1 pools (uint8 [num_blocks, block_size, 584], :mod:`dsv4.ops.kv_cache`; CUDA: sm_90).
"""

from __future__ import annotations

import math

import torch

from . import kv_cache
from ._ext import check_finite_f32, check_writable, raise_value_error, register_op
from .attention import _check_scopes, _check_shapes, _flat_keys, sparse_attn_reference

__all__ = ["hca_attn", "hca_attn_reference", "hca_entry_counts", "dense_block_table"]

_ARGS = ("(Tensor q, Tensor kv, Tensor indices, Tensor attn_sink, float softmax_scale, "
         "Tensor? topk_length, Tensor extra_kv, Tensor extra_block_table, Tensor extra_rows, "
         "Tensor extra_lengths")
HCA_ATTN_SCHEMA = _ARGS + ") -> (Tensor, Tensor)"
HCA_ATTN_OUT_SCHEMA = _ARGS + ", *, Tensor(a!) out, Tensor(b!) lse) -> ()"

# Index-list elements the reference materialises at once (it chunks over queries).
_CHUNK_ELEMS = 1 << 24


def hca_entry_counts(positions: torch.Tensor, compress_ratio: int) -> torch.Tensor:
    """Compressed entries visible to queries at absolute ``positions``: ``(t + 1) // m``
    (architecture.md §3.5), int32 (the ``extra_lengths`` argument)."""
    return torch.div(positions.long() + 1, compress_ratio, rounding_mode="floor").to(torch.int32)


def dense_block_table(batch: int, device=None) -> torch.Tensor:
    """The block table [batch, 1] int32 (row b -> block b) that makes a dense store
    [batch, capacity, head_dim] a pool with block_size = capacity."""
    return torch.arange(batch, dtype=torch.int32, device=device)[:, None].contiguous()


def _check(q, kv, indices, attn_sink, topk_length, extra_kv, extra_block_table, extra_rows,
           extra_lengths, check) -> None:
    T = q.shape[0] if q.dim() == 3 else -1
    check(q.dim() == 3, lambda: f"hca_attn: q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    check(extra_kv.dim() == 3,
          lambda: "hca_attn: extra_kv must be a pool [num_blocks, block_size, head_dim] (or an FP8 "
                  f"MODEL1 pool [..., 584]), got {tuple(extra_kv.shape)}")
    check(extra_block_table.dim() == 2 and extra_block_table.dtype == torch.int32,
          lambda: "hca_attn: extra_block_table must be int32 [rows, max_blocks], got "
                  f"{extra_block_table.dtype} {tuple(extra_block_table.shape)}")
    for name, t in (("extra_rows", extra_rows), ("extra_lengths", extra_lengths)):
        check(t.dim() == 1 and t.shape[0] == T and t.dtype == torch.int32,
              lambda name=name, t=t: f"hca_attn: {name} must be int32 [{T}] (one per query), got "
                                     f"{t.dtype} {tuple(t.shape)}")
    check(extra_kv.dtype == torch.uint8 or q.dim() != 3 or extra_kv.shape[-1] == q.shape[-1],
          lambda: f"hca_attn: extra_kv head_dim {extra_kv.shape[-1]} != q head_dim {q.shape[-1]}")


def hca_attn_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                       attn_sink: torch.Tensor, softmax_scale: float,
                       topk_length: torch.Tensor | None, extra_kv: torch.Tensor,
                       extra_block_table: torch.Tensor, extra_rows: torch.Tensor,
                       extra_lengths: torch.Tensor, *,
                       compute_dtype: torch.dtype = torch.float32
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its window and its first ``extra_lengths[t]`` compressed
    entries (module docstring), in fp32.

    Args:
        q: [tokens, heads, head_dim] (float32 or bfloat16).
        kv, indices, topk_length: the window scope, as in
            :func:`dsv4.ops.attention.sparse_attn_reference` (indices: rows of ``kv``, −1
            unused; ``kv`` [n_kv, head_dim] or an FP8 pool).
        attn_sink: [heads] float32; softmax_scale: multiplies q·k.
        extra_kv: [num_blocks, block_size, head_dim] compressed-entry pool (or FP8 pool).
        extra_block_table: [rows, max_blocks] int32.
        extra_rows: [tokens] int32, the block-table row of each query.
        extra_lengths: [tokens] int32, compressed entries the query sees
            (:func:`hca_entry_counts` of its position for an HCA layer).
        compute_dtype: float32 (the semantics) or bfloat16 (the low-precision baseline of the
            tests' tolerance rule).

    Returns:
        (out [tokens, heads, head_dim] in q.dtype, lse [tokens, heads] float32): 0 / +inf for a
        query without any valid key.

    Raises:
        ValueError: bad shapes / dtypes of either scope, checked as sparse_attn checks them
            (also with no query), or kv and extra_kv of mixed formats (an out-of-range row or
            block id is an unused slot, as in the kernel, not an error).
    """
    _check(q, kv, indices, attn_sink, topk_length, extra_kv, extra_block_table, extra_rows,
           extra_lengths, raise_value_error)
    # The window scope and both scopes' formats, checked here for every call (the chunks below
    # pass slices to sparse_attn_reference, and none at all when there is no query).
    _check_shapes(q, kv, indices, attn_sink, topk_length, None, None, None, op="hca_attn")
    _check_scopes(q, kv, extra_kv, op="hca_attn")
    T = q.shape[0]
    nb, bs = extra_kv.shape[0], extra_kv.shape[1]
    R, max_blocks = extra_block_table.shape
    cap = max_blocks * bs
    dev = q.device
    rows = extra_rows.to(dev).long()
    lengths = extra_lengths.to(dev).long().clamp(0, cap)
    row_ok = (rows >= 0) & (rows < R)
    lengths = torch.where(row_ok, lengths, 0)
    table = extra_block_table.to(dev).long()
    # FP8 pools are dequantised once here, not again for every chunk of queries below.
    kv = _flat_keys(kv, q.shape[-1], q.dtype)
    flat_extra = _flat_keys(extra_kv, q.shape[-1], q.dtype) if extra_kv.dtype == torch.uint8 \
        else extra_kv.reshape(nb * bs, *extra_kv.shape[2:])
    outs, lses = [], []
    L_all = int(lengths.max()) if T else 0
    step = max(1, _CHUNK_ELEMS // max(1, L_all))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        L = int(lengths[t0:t1].max()) if t1 > t0 else 0
        i = torch.arange(L, device=dev)[None, :]
        if L == 0:  # (also every R == 0 / max_blocks == 0 case: lengths are 0 there)
            extra_idx = torch.empty(t1 - t0, 0, dtype=torch.int32, device=dev)
        else:
            flat = kv_cache.paged_rows(table, rows[t0:t1, None].clamp(0, R - 1),
                                       i.expand(t1 - t0, L), bs, nb)
            extra_idx = torch.where(i < lengths[t0:t1, None], flat, -1).to(torch.int32)
        o, l = sparse_attn_reference(
            q[t0:t1], kv, indices[t0:t1], attn_sink, softmax_scale,
            None if topk_length is None else topk_length[t0:t1], flat_extra, extra_idx, None,
            skip_out_of_range=True, compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(l)
    if not outs:
        return (torch.zeros_like(q), torch.full(q.shape[:2], math.inf, dtype=torch.float32,
                                                device=dev))
    return torch.cat(outs, 0), torch.cat(lses, 0)


def _hca_attn_op(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv,
                 extra_block_table, extra_rows, extra_lengths):
    # the kernel's float32 scale: any finite one (the CUDA glue's check)
    check_finite_f32("hca_attn", "softmax_scale", softmax_scale)
    out, lse = hca_attn_reference(q, kv, indices, attn_sink, softmax_scale, topk_length,
                                  extra_kv, extra_block_table, extra_rows, extra_lengths)
    return out.contiguous(), lse


def _hca_attn_out_op(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv,
                     extra_block_table, extra_rows, extra_lengths, *, out, lse):
    check_finite_f32("hca_attn", "softmax_scale", softmax_scale)
    T, H, D = q.shape if q.dim() == 3 else (None, None, None)
    if tuple(out.shape) != (T, H, D) or tuple(lse.shape) != (T, H) or out.dtype != q.dtype \
            or lse.dtype != torch.float32:
        raise ValueError(f"hca_attn_out: out must be {q.dtype} [{T}, {H}, {D}] and lse float32 "
                         f"[{T}, {H}]; got {out.dtype} {tuple(out.shape)} and {lse.dtype} "
                         f"{tuple(lse.shape)}")
    check_writable("hca_attn_out", out=out, lse=lse)
    o, l = _hca_attn_op(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv,
                        extra_block_table, extra_rows, extra_lengths)
    out.copy_(o)
    lse.copy_(l)


def _fake(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv, extra_block_table,
          extra_rows, extra_lengths):
    check_finite_f32("hca_attn", "softmax_scale", softmax_scale, torch._check)
    _check(q, kv, indices, attn_sink, topk_length, extra_kv, extra_block_table, extra_rows,
           extra_lengths, torch._check)
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


def _fake_out(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv,
              extra_block_table, extra_rows, extra_lengths, *, out, lse):
    check_finite_f32("hca_attn", "softmax_scale", softmax_scale, torch._check)
    _check(q, kv, indices, attn_sink, topk_length, extra_kv, extra_block_table, extra_rows,
           extra_lengths, torch._check)


register_op("hca_attn", HCA_ATTN_SCHEMA, _hca_attn_op, _fake)
register_op("hca_attn_out", HCA_ATTN_OUT_SCHEMA, _hca_attn_out_op, _fake_out)


def hca_attn(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
             softmax_scale: float, topk_length: torch.Tensor | None, extra_kv: torch.Tensor,
             extra_block_table: torch.Tensor, extra_rows: torch.Tensor,
             extra_lengths: torch.Tensor, *, out: torch.Tensor | None = None,
             lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.dsv4.hca_attn`` (``hca_attn_out`` when ``out`` / ``lse`` are given).

    Arguments and semantics: :func:`hca_attn_reference`. On CUDA: bfloat16 q / kv / extra_kv
    (or FP8 MODEL1 pools for both on sm_90), int32 indices / table / rows / lengths, float32
    attn_sink, head_dim 64/128/256/512; the sparse-attention kernel with the compressed lanes
    computed from the block table (no index list, no host sync, CUDA-graph capturable).

    How an HCA layer calls it (prefill or decode, one launch for the whole batch; window scope
    as for ``sparse_attn``)::

        out, lse = hca_attn(q_t, main_kv, win_idx, attn_sink, scale, None,
                            entries, dense_block_table(B, dev), lay.rows,
                            hca_entry_counts(lay.pos, 128))
    """
    if (out is None) != (lse is None):
        raise ValueError("hca_attn: give both out and lse, or neither")
    if out is None:
        return torch.ops.dsv4.hca_attn(q, kv, indices, attn_sink, softmax_scale, topk_length,
                                       extra_kv, extra_block_table, extra_rows, extra_lengths)
    torch.ops.dsv4.hca_attn_out(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv,
                                extra_block_table, extra_rows, extra_lengths, out=out, lse=lse)
    return out, lse
