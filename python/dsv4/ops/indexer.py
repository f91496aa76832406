"""Lightning Indexer scoring + causal top-k: the reference of ``torch.ops.dsv4.indexer_topk``.

The score of compressed entry ``s`` for query ``t`` is (architecture.md §5, step 6)::

    I(t, s) = Σ_h weights[t, h] · ReLU(q[t, h, :] · keys[rows[t], s, :])

computed in fp32, and the op returns the indices of the ``topk`` highest scores among the
entries the query sees (§5, step 7). The ordering contract, shared by the reference and the
CUDA kernel (csrc/kernels/indexer_topk.cu):

* descending score; equal scores (e.g. the ReLU zero plateau) by the LOWEST index first, so the
  result is deterministic (kernels.md §5 #1, #2); ``-0.0`` equals ``+0.0``;
* NaN scores rank below ``-inf`` and are never returned; ``-inf`` is an ordinary score;
* with ``m = min(topk, number of non-NaN visible entries)``, slots ``[0, m)`` hold indices and
  slots ``[m, topk)`` hold ``-1``.
"""

from __future__ import annotations

import torch

from . import kv_cache
from ._ext import check_writable, raise_value_error, register_op

__all__ = [
    "indexer_topk",
    "indexer_topk_out",
    "indexer_topk_varlen_reference",
    "indexer_topk_reference",
    "INDEXER_HEAD_DIMS",
    "INDEXER_MAX_TOPK",
]

# What the CUDA kernel supports (and the op checks on every device).
INDEXER_HEAD_DIMS = (64, 128)
INDEXER_MAX_TOPK = 2048

# Elements of the fp32 [queries, heads, entries] product materialised at once, and of the
# [queries, entries] score / sort-key block (the reference chunks over both).
_PRODUCT_ELEMS = 1 << 25
_SCORE_ELEMS = 1 << 24
_INT64_MIN = -(2**63)
_LOW_MASK = 0xFFFFFFFF
_IDX_BIAS = 2**31 - 1

_SCHEMA = ("(Tensor q, Tensor weights, Tensor keys, Tensor rows, Tensor n_valid, int topk, "
           "Tensor? block_table=None) -> Tensor")
_SCHEMA_OUT = ("(Tensor q, Tensor weights, Tensor keys, Tensor rows, Tensor n_valid, int topk, "
               "Tensor(a!) indices, Tensor? block_table=None) -> ()")


def _order_keys(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """int64 sort keys of fp32 ``scores`` [m, n]: higher key = higher score, then lower index.

    ``(ordered float bits) << 32 | (2**31 - 1 - index)``; NaN and invisible entries get
    INT64_MIN (below every real key: even -inf maps above it). -0.0 is folded into +0.0.
    """
    s = (scores + 0.0).contiguous()  # -0.0 + 0.0 = +0.0
    bits = s.view(torch.int32).long()
    key32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    idx = torch.arange(s.shape[1], device=s.device, dtype=torch.long)
    key = key32 * (2**32) + (_IDX_BIAS - idx)
    return key.masked_fill(~visible | torch.isnan(s), _INT64_MIN)


def _topk_from_scores(scores: torch.Tensor, n_valid: torch.Tensor, topk: int,
                      present: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [m, topk] of the contract above for fp32 ``scores`` [m, n], ``n_valid`` [m];
    ``present`` [n] bool (optional) hides the entries whose paged block does not exist."""
    m, n = scores.shape
    out = torch.full((m, topk), -1, dtype=torch.int32, device=scores.device)
    kk = min(topk, n)
    if m == 0 or kk == 0:
        return out
    visible = torch.arange(n, device=scores.device)[None, :] < n_valid[:, None]
    if present is not None:
        visible = visible & present[None, :]
    vals = _order_keys(scores, visible).topk(kk, dim=1).values  # sorted, descending
    idx = _IDX_BIAS - (vals & _LOW_MASK)
    out[:, :kk] = torch.where(vals == _INT64_MIN, -1, idx).to(torch.int32)
    return out


def _scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """fp32 [t, n] = Σ_h w[t, h] · ReLU(q[t, h] · keys[s]) for q [t, H, D], keys [n, D],
    chunked over the entries so the [t, H, chunk] product stays bounded."""
    t, H, _ = q.shape
    n = keys.shape[0]
    out = torch.empty(t, n, dtype=torch.float32, device=q.device)
    qf = q.float()
    wf = weights.float()[:, :, None]
    step = max(1, _PRODUCT_ELEMS // max(1, t * H))
    for c0 in range(0, n, step):
        x = torch.einsum("thd,nd->thn", qf, keys[c0:c0 + step].float()).relu_()  # keeps NaN
        out[:, c0:c0 + step] = (x * wf).sum(dim=1)
    return out


def _check_shapes(q, weights, keys, rows, n_valid, topk, check, block_table=None):
    check(q.dim() == 3, lambda: f"indexer_topk: q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    if block_table is None:
        check(keys.dim() == 3, lambda: "indexer_topk: keys must be [batch, capacity, head_dim], "
                                       f"got {tuple(keys.shape)}")
    else:
        check(keys.dim() == 3, lambda: "indexer_topk: with block_table, keys must be a paged pool "
                                       f"[num_blocks, block_size, head_dim], got {tuple(keys.shape)}")
        check(block_table.dim() == 2 and block_table.dtype == torch.int32,
              lambda: "indexer_topk: block_table must be int32 [rows, max_blocks], got "
                      f"{block_table.dtype} {tuple(block_table.shape)}")
    T, H, D = q.shape
    check(weights.dim() == 2 and weights.shape[0] == T and weights.shape[1] == H,
          lambda: f"indexer_topk: weights must be [{T}, {H}] ([tokens, heads]), got {tuple(weights.shape)}")
    if keys.dtype == torch.uint8:  # FP8 keys (dsv4.ops.kv_cache): [..., head_dim + 4] bytes
        check(keys.shape[2] == kv_cache.indexer_entry_bytes(D),
              lambda: f"indexer_topk: FP8 keys last dim {keys.shape[2]} != head_dim + 4 = {D + 4}")
    else:
        check(keys.shape[2] == D,
              lambda: f"indexer_topk: keys head_dim {keys.shape[2]} != q head_dim {D}")
    check(rows.dim() == 1 and rows.shape[0] == T,
          lambda: f"indexer_topk: rows must be [{T}] ([tokens]), got {tuple(rows.shape)}")
    check(n_valid.dim() == 1 and n_valid.shape[0] == T,
          lambda: f"indexer_topk: n_valid must be [{T}] ([tokens]), got {tuple(n_valid.shape)}")
    check(topk >= 0, lambda: f"indexer_topk: topk must be >= 0, got {topk}")
    check(all(t.dtype.is_floating_point for t in (q, weights))
          and (keys.dtype.is_floating_point or keys.dtype == torch.uint8),
          lambda: "indexer_topk: q, weights and keys must be floating-point tensors (keys may be "
                  f"uint8 FP8 keys), got {q.dtype}, {weights.dtype} and {keys.dtype}")


def _check_op_contract(q, keys, rows, n_valid, topk, check):
    """What the op (every device) accepts beyond the reference's own needs."""
    check(q.shape[2] in INDEXER_HEAD_DIMS,
          lambda: f"indexer_topk: head_dim must be one of {INDEXER_HEAD_DIMS}, got {q.shape[2]}")
    check(1 <= topk <= INDEXER_MAX_TOPK,
          lambda: f"indexer_topk: topk must be in [1, {INDEXER_MAX_TOPK}], got {topk}")
    check(q.shape[1] >= 1, lambda: "indexer_topk: heads must be >= 1")
    check(rows.dtype == torch.int32 and n_valid.dtype == torch.int32,
          lambda: f"indexer_topk: rows and n_valid must be int32, got {rows.dtype} and {n_valid.dtype}")


def indexer_topk_varlen_reference(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                                  rows: torch.Tensor, n_valid: torch.Tensor, topk: int,
                                  block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k compressed entries per query over a batch of key stores (semantics of the op).

    ``I(t, s) = Σ_h weights[t, h] · ReLU(q[t, h, :] · key(t, s))`` in fp32 for
    ``s < n_valid[t]`` (architecture.md §5, steps 6-7), then the ordering contract of this
    module (descending score, lowest index first among equal scores, NaN never selected, -1
    padding). Chunked over queries and entries, so it also runs at 1M context (as a baseline,
    not fast).

    Args:
        q: [tokens, heads, head_dim] indexer queries, any floating dtype (upcast to fp32; the
            CUDA kernel takes bfloat16).
        weights: [tokens, heads] head weights, already scaled (fp32 in the model).
        keys: the compressed indexer keys, either dense per-sequence stores
            [batch, capacity, head_dim] with ``key(t, s) = keys[rows[t], s]``, or (with
            ``block_table``) a paged pool [num_blocks, block_size, head_dim] with
            ``key(t, s) = keys[block_table[rows[t], s // block_size], s % block_size]``
            (docs/contracts.md §A.2; block_size need not be a power of two). A uint8 ``keys``
            [..., head_dim + 4] is an FP8 key cache (:mod:`dsv4.ops.kv_cache`), scored
            through its dequantised values.
        rows: [tokens] integer, the key row of each query: in [0, batch), or in
            [0, block_table.shape[0]) with a block table.
        n_valid: [tokens] integer, query t sees entries 0 .. n_valid[t]-1 of its row; clamped
            to [0, capacity] (paged: [0, max_blocks · block_size]).
        topk: number of indices per query (>= 0).
        block_table: optional [R, max_blocks] int32. An entry whose block id is < 0 or
            >= num_blocks is not visible (never selected; no memory is read for it).

    Returns:
        int32 [tokens, topk] on q.device: LOGICAL entry indices s (also with a block table;
        the physical row is ``block_table[row, s // bs] * bs + s % bs``).

    Raises:
        ValueError: mismatched shapes, negative topk, or a row index outside its range
            (the CUDA kernel cannot raise; it returns a row of -1 for such a query).
    """
    _check_shapes(q, weights, keys, rows, n_valid, topk, raise_value_error, block_table)
    if keys.dtype == torch.uint8:  # FP8 keys: score the dequantised values (exact in fp32)
        keys = kv_cache.read_pool(keys, q.shape[2], torch.float32)
    T = q.shape[0]
    if block_table is None:
        B, C, _ = keys.shape
    else:
        B, bs = block_table.shape[0], keys.shape[1]
        C = block_table.shape[1] * bs
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    if T == 0 or topk == 0:
        return out
    rows = rows.to(device=q.device, dtype=torch.long)
    nv = n_valid.to(device=q.device, dtype=torch.long).clamp(0, C)
    if bool((rows < 0).any()) or bool((rows >= B).any()):
        what = "block_table.shape[0]" if block_table is not None else "keys.shape[0]"
        raise ValueError(f"indexer_topk: rows must lie in [0, {B}) ({what}); got "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    for b in torch.unique(rows).tolist():
        sel = (rows == b).nonzero().flatten()
        n_b = int(nv[sel].max())
        if n_b == 0:
            continue  # every query of this row sees nothing: -1s
        present = None
        if block_table is None:
            row_keys = keys[b, :n_b]
        else:
            row_keys, present = _gather_paged(keys, block_table[b].to(q.device), n_b)
        step = max(1, min(_SCORE_ELEMS // n_b, T))
        for i0 in range(0, sel.numel(), step):
            ts = sel[i0:i0 + step]
            s = _scores(q[ts], weights[ts], row_keys)
            out[ts] = _topk_from_scores(s, nv[ts], topk, present)
    return out


def _gather_paged(keys: torch.Tensor, table: torch.Tensor, n: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical entries 0 .. n-1 of one row of a paged pool [num_blocks, bs, D] through its
    block table [max_blocks]: (keys [n, D], present [n] bool). Missing blocks give zeros
    (and present False)."""
    num_blocks, bs = keys.shape[0], keys.shape[1]
    s = torch.arange(n, device=keys.device)
    flat = kv_cache.paged_rows(table[None], s.new_zeros(1, 1), s[None], bs, num_blocks)[0]
    present = flat >= 0
    if num_blocks == 0:
        return keys.new_zeros(n, keys.shape[2]), present
    f = flat.clamp(min=0)
    row_keys = keys[f // bs, f % bs]
    return torch.where(present[:, None], row_keys, torch.zeros_like(row_keys)), present


def indexer_topk_reference(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                           positions: torch.Tensor, compress_ratio: int, topk: int
                           ) -> torch.Tensor:
    """Causal top-k of one sequence's queries, as the model's ``Indexer`` uses it (int64).

    Entry ``s`` is complete for the query at absolute position ``t`` iff
    ``s < (t + 1) // compress_ratio`` (architecture.md §3.5, §5). Same scores and ordering
    contract as :func:`indexer_topk_varlen_reference` (lowest index first among equal scores,
    NaN never selected, -1 padding).

    Args:
        q: [tokens, heads, d] indexer queries (after RoPE and, with quant_sim, Hadamard + FP4).
        weights: [tokens, heads] head weights (already scaled by d**-0.5 · heads**-0.5).
        keys: [n_entries, d] the sequence's compressed indexer keys.
        positions: [tokens] absolute position t of each query.
        compress_ratio: tokens per compressed entry (4 for CSA layers).
        topk: number of indices returned per query.

    Returns:
        int64 [tokens, topk] entry indices, -1 where fewer than ``topk`` entries are complete.
    """
    n_valid = torch.div(positions + 1, compress_ratio, rounding_mode="floor")
    rows = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return indexer_topk_varlen_reference(q, weights, keys[None], rows, n_valid, topk).long()


# ---------------------------------------------------------------------------------------------
# torch.ops.dsv4.indexer_topk / indexer_topk_out
# ---------------------------------------------------------------------------------------------
def _indexer_topk_kernel(q, weights, keys, rows, n_valid, topk, block_table=None):
    _check_shapes(q, weights, keys, rows, n_valid, topk, raise_value_error, block_table)
    _check_op_contract(q, keys, rows, n_valid, topk, raise_value_error)
    return indexer_topk_varlen_reference(q, weights, keys, rows, n_valid, topk, block_table)


def _indexer_topk_out_kernel(q, weights, keys, rows, n_valid, topk, indices, block_table=None):
    _check_shapes(q, weights, keys, rows, n_valid, topk, raise_value_error, block_table)
    _check_op_contract(q, keys, rows, n_valid, topk, raise_value_error)
    T = q.shape[0]
    if tuple(indices.shape) != (T, topk) or indices.dtype != torch.int32:
        raise ValueError(f"indexer_topk_out: indices must be int32 [{T}, {topk}], got "
                         f"{indices.dtype} {tuple(indices.shape)}")
    check_writable("indexer_topk_out", indices=indices)
    indices.copy_(indexer_topk_varlen_reference(q, weights, keys, rows, n_valid, topk,
                                                block_table))


def _indexer_topk_fake(q, weights, keys, rows, n_valid, topk, block_table=None):
    _check_shapes(q, weights, keys, rows, n_valid, topk, torch._check, block_table)
    _check_op_contract(q, keys, rows, n_valid, topk, torch._check)
    return q.new_empty((q.shape[0], topk), dtype=torch.int32)


def _indexer_topk_out_fake(q, weights, keys, rows, n_valid, topk, indices, block_table=None):
    _check_shapes(q, weights, keys, rows, n_valid, topk, torch._check, block_table)
    _check_op_contract(q, keys, rows, n_valid, topk, torch._check)
    torch._check(indices.dim() == 2 and indices.shape[0] == q.shape[0] and indices.shape[1] == topk,
                 lambda: f"indexer_topk_out: indices must be [tokens, {topk}]")
    torch._check(indices.dtype == torch.int32, lambda: "indexer_topk_out: indices must be int32")


register_op("indexer_topk", _SCHEMA, _indexer_topk_kernel, _indexer_topk_fake)
register_op("indexer_topk_out", _SCHEMA_OUT, _indexer_topk_out_kernel, _indexer_topk_out_fake)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor,
                 n_valid: torch.Tensor, topk: int, block_table: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``torch.ops.dsv4.indexer_topk``: top-k entries per query (architecture.md §5).

    Args:
        q: [tokens, heads, head_dim] bfloat16 (the reference on CPU takes any float dtype);
            head_dim 64 or 128, heads >= 1.
        weights: [tokens, heads] float32, already scaled.
        keys: [batch, capacity, head_dim] bfloat16 compressed key store (unit last stride), or
            with ``block_table`` a paged pool [num_blocks, block_size, head_dim].
        rows: [tokens] int32, key row of each query (a row of ``block_table`` when paged).
        n_valid: [tokens] int32, visible entries per query (clamped to [0, capacity]).
        topk: 1 .. 2048.
        block_table: optional [R, max_blocks] int32 (docs/contracts.md §A.2): key s of query t is
            ``keys[block_table[rows[t], s // block_size], s % block_size]``; the result stays
            the logical index s. Entries in missing blocks (id < 0 or >= num_blocks) are
            never selected.

    Returns:
        int32 [tokens, topk]: indices in descending score order, lowest index first among
        equal scores, NaN never selected, -1 padding (module docstring).

    Raises:
        RuntimeError / ValueError naming the accepted shapes / dtypes / head_dim / topk.
    """
    return torch.ops.dsv4.indexer_topk(q, weights, keys, rows, n_valid, topk, block_table)


def indexer_topk_out(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                     rows: torch.Tensor, n_valid: torch.Tensor, topk: int,
                     indices: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
    """``torch.ops.dsv4.indexer_topk_out``: as :func:`indexer_topk`, written into ``indices``
    (int32 [tokens, topk]); no allocation visible to the caller, CUDA-graph capturable."""
    torch.ops.dsv4.indexer_topk_out(q, weights, keys, rows, n_valid, topk, indices,
                                    block_table)
