"""Logical compressed entries to flat rows of a paged store: ``torch.ops.dsv4.paged_rows``.

``paged_rows(table, rows, sel, block_size)`` for int32 ``table`` [num_rows, max_blocks] (block
ids, -1 = none), ``rows`` [tokens] (the table row of each token) and ``sel`` [tokens, k]
(logical entry indices, -1 = none) returns int32 [tokens, k]: ``table[rows[t], s // bs] * bs +
s % bs`` (the row of entry ``s`` in the store viewed as [num_blocks * bs, ...]), -1 where
``s < 0``, ``s`` lies past the table, the block id is negative or ``rows[t]`` is not a row of
the table. The formula is :func:`dsv4.ops.kv_cache.paged_rows` (its int64 result in int32,
as the kernels that read the rows take them). Precondition: every selected flat row (block id
times ``block_size`` plus ``s % block_size``) fits in int32, i.e. is at most 2**31 - 1 (the
reference raises ValueError; the CUDA kernel, which cannot raise inside a CUDA graph, gives -1
for such a row, never a wrapped one). The CSA
layers turn the indexer's picks into the rows ``sparse_attn`` reads with it: one kernel on
CUDA where the PyTorch form launches about fifteen.
"""

from __future__ import annotations

import torch

from ._ext import raise_value_error, register_op
from .kv_cache import paged_rows as _paged_rows_int64

__all__ = ["PAGED_ROWS_SCHEMA", "paged_rows", "paged_rows_reference"]

PAGED_ROWS_SCHEMA = "(Tensor table, Tensor rows, Tensor sel, int block_size) -> Tensor"

_INT32_MAX = 2 ** 31 - 1


def _check(table, rows, sel, block_size, check) -> None:
    check(table.dtype == torch.int32 and rows.dtype == torch.int32 and sel.dtype == torch.int32,
          lambda: f"paged_rows: table, rows and sel must be int32, got {table.dtype}, "
                  f"{rows.dtype} and {sel.dtype}")
    check(table.dim() == 2,
          lambda: f"paged_rows: table must be [num_rows, max_blocks], got {tuple(table.shape)}")
    check(sel.dim() == 2, lambda: f"paged_rows: sel must be [tokens, k], got {tuple(sel.shape)}")
    check(rows.dim() == 1 and rows.shape[0] == sel.shape[0],
          lambda: f"paged_rows: rows must be [{sel.shape[0]}] (one table "
                  f"row per token), got {tuple(rows.shape)}")
    check(1 <= block_size <= _INT32_MAX,
          lambda: f"paged_rows: block_size must be in [1, 2147483647], got {block_size}")


def paged_rows_reference(table: torch.Tensor, rows: torch.Tensor, sel: torch.Tensor,
                         block_size: int) -> torch.Tensor:
    """int32 [tokens, k] flat rows (see the module doc). Raises ValueError on other dtypes or
    shapes, and when a selected flat row exceeds 2**31 - 1 (the op's precondition: the rows
    must fit in int32)."""
    _check(table, rows, sel, block_size, raise_value_error)
    R = table.shape[0]
    ok = (rows >= 0) & (rows < R)
    if R == 0:
        return torch.full(sel.shape, -1, dtype=torch.int32, device=sel.device)
    r = torch.where(ok, rows, 0).long()[:, None]
    out = torch.where(ok[:, None], _paged_rows_int64(table, r, sel.long(), block_size), -1)
    if out.numel() and bool((out > _INT32_MAX).any()):
        raise ValueError(f"paged_rows: flat rows (block id * block_size + s % block_size) must "
                         f"fit in int32 (at most {_INT32_MAX}); got {int(out.max())}")
    return out.to(torch.int32)


def _paged_rows_fake(table, rows, sel, block_size):
    _check(table, rows, sel, block_size, torch._check)
    return sel.new_empty(sel.shape)


register_op("paged_rows", PAGED_ROWS_SCHEMA, paged_rows_reference, _paged_rows_fake)


def paged_rows(table: torch.Tensor, rows: torch.Tensor, sel: torch.Tensor,
               block_size: int) -> torch.Tensor:
    """``torch.ops.dsv4.paged_rows``: see :func:`paged_rows_reference` (on CUDA one kernel,
    the reference's values). Every selected flat row must fit in int32 (at most 2**31 - 1):
    the reference raises ValueError otherwise, the kernel gives -1 for that row."""
    return torch.ops.dsv4.paged_rows(table, rows, sel, int(block_size))
