"""FP8 KV cache formats: definitions, pack / unpack references, allocation helpers.

Two byte formats, shared by every kernel that writes or reads a cache (the C++ side is
``csrc/include/dsv4/kv_cache.h``; docs/contracts.md §A.5, architecture.md §11.2, kernels.md §3):

* **MODEL1** (FlashMLA ``MODEL1_FP8Sparse``; main attention KV, head_dim 512 = 448 nope + 64
  rope): 584 bytes per entry. A block of ``block_size`` entries is laid out as
  ``[block_size x 576 B: 448 e4m3 nope | 64 bf16 rope][block_size x 8 B: 7 UE8M0 scales | pad]``
  and padded to a multiple of 576 bytes (as FlashMLA allocates it). Nope dim ``c`` of an entry
  is ``e4m3[c] * 2**(scale_byte[c // 64] - 127)`` (:func:`dsv4.ops.quant.e8m0_to_float`:
  byte 0 is 2**-127, byte 255 NaN; the writers produce bytes 105 .. 247 only).
* **FP8 indexer keys** (DeepGEMM's paged layout; head_dim 64 or 128): ``d + 4`` bytes per entry
  (132 at d = 128), a block being ``[block_size x d e4m3][block_size x fp32 scale]``, padded to
  a multiple of 16 bytes.

Both quantise exactly as :func:`dsv4.ops.quant.fp8_e4m3_sim` (power-of-two scale
``2**ceil(log2(max(amax, 1e-4) / 448))``, round to nearest even), MODEL1 in blocks of 64 of the
nope dims and the indexer keys in one block of ``d``. Consequences: a MODEL1 cache written from
a bf16 entry dequantises to exactly ``cat(fp8_e4m3_sim(entry[:448], 64), entry[448:])`` (what
the model's ``quant_sim`` computes, §3.3); indexer keys that are already FP4-simulated
(``quant_sim``, §5) are stored exactly unless the 32-blocks of one key have scales more than
2**14 apart (their e2m1 values then fall below e4m3's subnormal range).

A pool tensor is ``uint8 [num_blocks, block_size, entry_bytes]`` whose block stride
(``stride(0)``) is the padded block size: the shape carries (num_blocks, block_size, format);
the bytes of a block follow the layouts above, NOT ``entry_bytes`` per row (FlashMLA passes
its cache the same way). A dense per-sequence store ``[batch, capacity, entry_bytes]`` is the
same thing with one block per sequence. Allocate with :func:`allocate`.
"""

from __future__ import annotations

import torch

from .quant import e8m0_to_float, fp8_e4m3_quantize

__all__ = [
    "MODEL1", "INDEXER", "MODEL1_ENTRY_BYTES", "MODEL1_NOPE_DIM", "MODEL1_ROPE_DIM",
    "MODEL1_HEAD_DIM", "indexer_entry_bytes", "entry_bytes", "block_bytes", "pool_shape",
    "allocate", "cache_format", "pack", "unpack", "write_entries", "read_entries",
    "read_pool", "bytes_per_entry", "block_view", "paged_rows", "block_starts",
    "paged_rows_from",
]

MODEL1 = "fp8_model1"
INDEXER = "fp8_indexer"

MODEL1_HEAD_DIM = 512
MODEL1_NOPE_DIM = 448
MODEL1_ROPE_DIM = 64
MODEL1_TOKEN_BYTES = 576        # nope (448 B) + rope (128 B) of one entry
MODEL1_SCALE_BYTES = 8          # 7 UE8M0 scales + 1 pad byte
MODEL1_ENTRY_BYTES = 584
_MODEL1_PAGE_ALIGN = 576        # FlashMLA pads a block to a multiple of this
_INDEXER_ALIGN = 16


def indexer_entry_bytes(head_dim: int) -> int:
    """Bytes per FP8 indexer key: ``head_dim`` e4m3 values + one fp32 scale (132 at 128)."""
    return head_dim + 4


def entry_bytes(fmt: str, head_dim: int) -> int:
    """Bytes per entry of format ``fmt`` (:data:`MODEL1` or :data:`INDEXER`)."""
    if fmt == MODEL1:
        if head_dim != MODEL1_HEAD_DIM:
            raise ValueError(f"kv_cache: the MODEL1 format has head_dim 512, got {head_dim}")
        return MODEL1_ENTRY_BYTES
    if fmt == INDEXER:
        if head_dim not in (64, 128):
            raise ValueError(f"kv_cache: the FP8 indexer format takes head_dim 64 or 128, got "
                             f"{head_dim}")
        return indexer_entry_bytes(head_dim)
    raise ValueError(f"kv_cache: unknown format {fmt!r} (expected {MODEL1!r} or {INDEXER!r})")


def bytes_per_entry(fmt: str | torch.dtype, head_dim: int) -> int:
    """Bytes one cache entry occupies: an FP8 format's entry size, or ``head_dim`` elements of
    a plain dtype (``torch.bfloat16`` / ``torch.float32``). Block padding not included."""
    if isinstance(fmt, torch.dtype):
        return head_dim * torch.empty((), dtype=fmt).element_size()
    return entry_bytes(fmt, head_dim)


def block_bytes(fmt: str, block_size: int, head_dim: int) -> int:
    """Bytes of one block of ``block_size`` entries, padded (MODEL1: to a multiple of 576 as
    FlashMLA does; indexer: to a multiple of 16)."""
    if block_size < 1:
        raise ValueError(f"kv_cache: block_size must be >= 1, got {block_size}")
    raw = block_size * entry_bytes(fmt, head_dim)
    align = _MODEL1_PAGE_ALIGN if fmt == MODEL1 else _INDEXER_ALIGN
    return -(-raw // align) * align


def pool_shape(fmt: str, num_blocks: int, block_size: int, head_dim: int) -> tuple[int, int, int]:
    """Shape of the pool tensor: ``(num_blocks, block_size, entry_bytes)``."""
    return (num_blocks, block_size, entry_bytes(fmt, head_dim))


def allocate(fmt: str, num_blocks: int, block_size: int, head_dim: int,
             device: torch.device | str | None = None) -> torch.Tensor:
    """A zeroed pool ``uint8 [num_blocks, block_size, entry_bytes]`` with padded block stride
    :func:`block_bytes` (a view of a ``[num_blocks, block_bytes]`` buffer). Zero bytes decode
    to zero entries. For a dense per-sequence store pass ``num_blocks = batch`` and
    ``block_size = capacity``."""
    bb = block_bytes(fmt, block_size, head_dim)
    eb = entry_bytes(fmt, head_dim)
    buf = torch.zeros(num_blocks, bb, dtype=torch.uint8, device=device)
    return buf.as_strided((num_blocks, block_size, eb), (bb, eb, 1))


def cache_format(pool: torch.Tensor, head_dim: int) -> str | None:
    """The FP8 format of ``pool`` (uint8 ``[..., entry_bytes]``) for ``head_dim``, or None for a
    plain (bf16 / fp32) store. Raises ValueError for a uint8 tensor of no known format."""
    if pool.dtype != torch.uint8:
        return None
    eb = pool.shape[-1] if pool.dim() else -1
    if head_dim == MODEL1_HEAD_DIM and eb == MODEL1_ENTRY_BYTES:
        return MODEL1
    if head_dim in (64, 128) and eb == indexer_entry_bytes(head_dim):
        return INDEXER
    raise ValueError(f"kv_cache: a uint8 cache must be MODEL1 [..., 584] (head_dim 512) or FP8 "
                     f"indexer keys [..., head_dim + 4] (head_dim 64 / 128); got last dim {eb} "
                     f"for head_dim {head_dim}")


# ---------------------------------------------------------------------------------------------
# Pack / unpack of entries (no layout): the quantisation itself
# ---------------------------------------------------------------------------------------------
def _e8m0_byte(s: torch.Tensor) -> torch.Tensor:
    return ((s.float().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def pack(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Entries ``x`` [..., head_dim] (any float dtype; the reference quantises ``x.float()``)
    to their bytes [..., entry_bytes] in the per-entry order (MODEL1: 448 e4m3 | 128 bytes of
    bf16 rope | 7 scale bytes | pad; indexer: d e4m3 | fp32 scale as 4 little-endian bytes).
    The per-block placement of those parts is :func:`write_entries`' job."""
    d = x.shape[-1]
    eb = entry_bytes(fmt, d)
    out = torch.zeros(*x.shape[:-1], eb, dtype=torch.uint8, device=x.device)
    if fmt == MODEL1:
        q, s = fp8_e4m3_quantize(x[..., :MODEL1_NOPE_DIM], 64)
        out[..., :MODEL1_NOPE_DIM] = q.view(torch.uint8)
        rope = x[..., MODEL1_NOPE_DIM:].to(torch.bfloat16).contiguous()
        out[..., MODEL1_NOPE_DIM:MODEL1_TOKEN_BYTES] = rope.view(torch.uint8)
        out[..., MODEL1_TOKEN_BYTES:MODEL1_TOKEN_BYTES + 7] = _e8m0_byte(s)
    else:
        q, s = fp8_e4m3_quantize(x, d)
        out[..., :d] = q.view(torch.uint8)
        out[..., d:] = s.contiguous().view(torch.uint8)
    return out


def unpack(fmt: str, b: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Bytes [..., entry_bytes] (per-entry order of :func:`pack`) to entries [..., head_dim] of
    ``dtype``: e4m3 value times its scale (exact in bf16 and fp32)."""
    eb = b.shape[-1]
    if fmt == MODEL1:
        q = b[..., :MODEL1_NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float()
        s = e8m0_to_float(b[..., MODEL1_TOKEN_BYTES:MODEL1_TOKEN_BYTES + 7])
        nope = (q.unflatten(-1, (7, 64)) * s[..., None]).flatten(-2)
        rope = b[..., MODEL1_NOPE_DIM:MODEL1_TOKEN_BYTES].contiguous().view(torch.bfloat16)
        return torch.cat([nope, rope.float()], -1).to(dtype)
    d = eb - 4
    q = b[..., :d].contiguous().view(torch.float8_e4m3fn).float()
    s = b[..., d:].contiguous().view(torch.float32)
    return (q * s).to(dtype)


# ---------------------------------------------------------------------------------------------
# The block layout
# ---------------------------------------------------------------------------------------------
def block_view(pool: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size * entry_bytes] byte view of each block's used bytes (values and
    scales; whole-block copies through it keep every part of the layout). Raises ValueError
    for a pool without the layout of :func:`allocate`."""
    nb, bs, eb = pool.shape
    if (bs > 1 and pool.stride(1) != eb) or (eb > 1 and pool.stride(2) != 1):
        raise ValueError(f"kv_cache: a pool must have row stride {eb} and unit last stride, got "
                         f"strides {pool.stride()}")
    if nb > 1 and pool.stride(0) < bs * eb:
        raise ValueError(f"kv_cache: block stride {pool.stride(0)} is smaller than a block "
                         f"({bs} x {eb} bytes)")
    return pool.as_strided((nb, bs * eb), (pool.stride(0) if nb > 1 else bs * eb, 1),
                           pool.storage_offset())


def paged_rows(table: torch.Tensor, rows: torch.Tensor, s: torch.Tensor, block_size: int,
               num_blocks: int | None = None) -> torch.Tensor:
    """Flat rows of logical entries through block tables: entry ``s`` of sequence ``row`` is
    at ``table[row, s // block_size] * block_size + s % block_size`` of a store
    [num_blocks, block_size, ...] viewed as [num_blocks * block_size, ...] (every paged store
    of the runtime: compressed KV, indexer keys).

    Args:
        table: int [R, max_blocks] block ids (−1 = no block).
        rows: int [t, 1] or [t, k], rows of ``table`` (in [0, R)).
        s: int [t, k] logical entry indices (−1 = none).
        num_blocks: the store's block count; block ids outside [0, num_blocks) give −1 too.

    Returns int64 [t, k]: the flat row, or −1 where ``s < 0``, ``s`` lies past the table's
    blocks, or the block is missing. No host synchronisation (usable in CUDA graphs).
    The two halves, :func:`block_starts` (per table) and :func:`paged_rows_from` (per lookup),
    let a caller that looks up several ``s`` in one table prepare the table once. (The CSA
    layers of the model use the one-launch ``torch.ops.dsv4.paged_rows``, whose reference
    computes the same rows.)
    """
    return paged_rows_from(block_starts(table, block_size, num_blocks), rows, s, block_size)


def block_starts(table: torch.Tensor, block_size: int, num_blocks: int | None = None,
                 dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The per-table half of :func:`paged_rows`: ``dtype`` [R, max_blocks + 1], the flat row
    of the first entry of each block of ``table`` (``id * block_size``), −1 where the block
    is missing (id −1, or outside [0, num_blocks) when ``num_blocks`` is given), and a last
    column of −1 that stands for every entry past the table. ``dtype`` int32 suits stores
    whose flat rows fit in int32 (those the kernels address)."""
    t = table.to(dtype)
    ok = t >= 0
    if num_blocks is not None:
        ok &= t < num_blocks
    return torch.nn.functional.pad(torch.where(ok, t * block_size, -1), (0, 1), value=-1)


def paged_rows_from(starts: torch.Tensor, rows: torch.Tensor, s: torch.Tensor,
                    block_size: int) -> torch.Tensor:
    """The per-lookup half of :func:`paged_rows`, from ``starts`` = :func:`block_starts` of
    the table: [t, k] flat rows (int32 when ``starts`` and ``s`` are, else int64), −1 where
    there is none (see :func:`paged_rows`). ``rows`` int [t, 1] or [t, k]; ``s`` int [t, k]."""
    M = starts.shape[1] - 1
    # s < 0 → column −1 and s past the table → column M: both the last column, all −1
    col = torch.div(s, block_size, rounding_mode="floor").clamp_(-1, M)
    first = starts[rows, col]
    return torch.where(first >= 0, first + s % block_size, -1)


def _part_views(fmt: str, blocks: torch.Tensor, bs: int, eb: int):
    """(value part [nb, bs, vb], scale part [nb, bs, sb]) of each block."""
    nb = blocks.shape[0]
    vb = MODEL1_TOKEN_BYTES if fmt == MODEL1 else eb - 4
    sb = MODEL1_SCALE_BYTES if fmt == MODEL1 else 4
    return (blocks[:, :bs * vb].unflatten(1, (bs, vb)),
            blocks[:, bs * vb:bs * vb + bs * sb].unflatten(1, (bs, sb)), vb)


def write_entries(pool: torch.Tensor, block_ids: torch.Tensor, rows: torch.Tensor,
                  x: torch.Tensor) -> None:
    """Quantise entries ``x`` [n, head_dim] and store entry i at block ``block_ids[i]``, row
    ``rows[i]`` of ``pool`` (in place). Indices must be valid (this is the reference)."""
    nb, bs, eb = pool.shape
    fmt = cache_format(pool, x.shape[-1])
    if fmt is None:
        raise ValueError("kv_cache.write_entries: pool is not an FP8 (uint8) cache")
    packed = pack(fmt, x)
    blocks = block_view(pool)
    vals, scales, vb = _part_views(fmt, blocks, bs, eb)
    bi, ri = block_ids.long(), rows.long()
    vals[bi, ri] = packed[:, :vb]
    scales[bi, ri] = packed[:, vb:]


def read_entries(pool: torch.Tensor, block_ids: torch.Tensor, rows: torch.Tensor,
                 head_dim: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantised entries [n, head_dim] at (block_ids[i], rows[i]) of an FP8 ``pool``."""
    nb, bs, eb = pool.shape
    fmt = cache_format(pool, head_dim)
    blocks = block_view(pool)
    vals, scales, _ = _part_views(fmt, blocks, bs, eb)
    bi, ri = block_ids.long(), rows.long()
    return unpack(fmt, torch.cat([vals[bi, ri], scales[bi, ri]], -1), dtype)


def read_pool(pool: torch.Tensor, head_dim: int,
              dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Every entry of a pool, dequantised: [num_blocks, block_size, head_dim]. A plain pool is
    returned converted to ``dtype``."""
    if pool.dtype != torch.uint8:
        return pool.to(dtype)
    nb, bs, _ = pool.shape
    fmt = cache_format(pool, head_dim)
    blocks = block_view(pool)
    vals, scales, _ = _part_views(fmt, blocks, bs, pool.shape[2])
    return unpack(fmt, torch.cat([vals, scales], -1), dtype)
