"""KV compressor op family: ``torch.ops.dsv4.compress_kv``, its pure-PyTorch reference and
registration (architecture.md §4).

The op does everything the DeepSeek-V4 compressor does after its two projections
``kv = wkv(x)`` and ``score = wgate(x)`` (which stay GEMMs in PyTorch), for a whole batch of
sequences that each receive a span of new tokens (flash-attn's "varlen" layout): gate logits
``score + ape``, per-feature softmax over the slots of every block these tokens complete, the
weighted sum of ``kv``, the cast to the entry dtype, RMSNorm, RoPE at the block's first
position, the quantisation simulation, the store of the entry, and the rewrite of the
partial-block state. Its reference is ``Compressor.forward`` (python/dsv4/layers/compressor.py)
applied to every row: same operations, same rounding, same state layout.
"""

from __future__ import annotations

import torch

from ..layers.rope import apply_rope
from ._ext import check_positive_f32, check_writable, raise_value_error, register_op
from .norm import rms_norm_reference
from . import kv_cache
from .quant import fp4_e2m1_sim, fp8_e4m3_sim, hadamard

__all__ = ["compress_kv", "compress_kv_reference", "QUANT_NONE", "QUANT_FP8",
           "QUANT_FP4_HADAMARD"]

# ``quant`` argument of compress_kv (what the model's quant_sim does to each entry, §4.4).
QUANT_NONE = 0           # no quantisation simulation
QUANT_FP8 = 1            # FP8 e4m3 of the non-RoPE dims in blocks of 64 (main CSA / HCA KV)
QUANT_FP4_HADAMARD = 2   # Hadamard rotation, then FP4 e2m1 in blocks of 32 (indexer keys)

COMPRESS_KV_SCHEMA = (
    "(Tensor kv, Tensor score, Tensor ape, Tensor norm_weight, Tensor freqs, "
    "Tensor cu_seqlens, Tensor starts, Tensor(a!) state_kv, Tensor(b!) state_score, "
    "Tensor(c!) entries, int compress_ratio, int max_seqlen, float eps, int quant, "
    "Tensor? slots=None, Tensor? block_table=None) -> ()"
)


def _check_args(kv, score, ape, norm_weight, freqs, cu_seqlens, starts, state_kv, state_score,
                entries, compress_ratio, max_seqlen, quant, slots=None, block_table=None
                ) -> tuple[int, int, int, int]:
    """Shape / dtype checks shared by the reference and the fake; returns (B, d, coff, rd)."""
    def fail(msg: str) -> None:
        raise ValueError(f"compress_kv: {msg}")

    m = int(compress_ratio)
    if m < 1:
        fail(f"compress_ratio must be >= 1, got {m}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        fail(f"cu_seqlens must be int32 [batch + 1], got {cu_seqlens.dtype} "
             f"{tuple(cu_seqlens.shape)}")
    B = cu_seqlens.shape[0] - 1
    paged = block_table is not None
    if entries.dim() != 3:
        what = "[num_blocks, block_size, head_dim]" if paged else "[batch, capacity, head_dim]"
        fail(f"entries must be {what}, got shape {tuple(entries.shape)}")
    fmt = None
    if entries.dtype == torch.uint8:
        d = norm_weight.shape[0] if norm_weight.dim() == 1 else -1
        try:
            fmt = kv_cache.cache_format(entries, d)
        except ValueError as e:
            fail(str(e))
    else:
        d = entries.shape[2]
    coff = 2 if m == 4 else 1
    w = coff * d
    # float64 data is accepted on CPU (the reference under float64 gradient checks, e.g. the
    # training tests); the CUDA kernel takes float32.
    fl = (torch.float32, torch.float64) if kv.device.type == "cpu" else (torch.float32,)
    f64 = " (float64 on CPU)" if len(fl) == 2 else ""
    if entries.dtype not in (torch.bfloat16, torch.uint8) + fl:
        fail(f"entries must be bfloat16 or float32{f64} (or a uint8 FP8 cache of "
             f"dsv4.ops.kv_cache), got {entries.dtype}")
    if d % 4 or not 4 <= d <= 1024:
        fail(f"head_dim (entries.size(-1)) must be a multiple of 4 in [4, 1024], got {d}")
    for name, t in (("kv", kv), ("score", score)):
        if t.dtype not in fl or t.dim() != 2 or t.shape[1] != w:
            fail(f"{name} must be float32 [tokens, {w}]{f64} (coff * head_dim, coff = "
                 f"{coff} for compress_ratio {m}), got {t.dtype} {tuple(t.shape)}")
    if score.shape[0] != kv.shape[0]:
        fail(f"kv and score must have the same number of tokens, got {kv.shape[0]} and "
             f"{score.shape[0]}")
    if ape.dtype not in fl or tuple(ape.shape) != (m, w):
        fail(f"ape must be float32 [{m}, {w}]{f64}, got {ape.dtype} {tuple(ape.shape)}")
    if norm_weight.dtype not in fl or tuple(norm_weight.shape) != (d,):
        fail(f"norm_weight must be float32 [{d}]{f64}, got {norm_weight.dtype} "
             f"{tuple(norm_weight.shape)}")
    rd = 2 * freqs.numel()
    if freqs.dtype != torch.float32 or freqs.dim() != 1 or not 2 <= rd <= d:
        fail(f"freqs must be float32 [rope_dim / 2] with 2 <= rope_dim <= {d}, got "
             f"{freqs.dtype} {tuple(freqs.shape)}")
    if starts.dtype != torch.int32 or tuple(starts.shape) != (B,):
        fail(f"starts must be int32 [{B}], got {starts.dtype} {tuple(starts.shape)}")
    if slots is not None and (slots.dtype != torch.int32 or tuple(slots.shape) != (B,)):
        fail(f"slots must be int32 [{B}] (one state row per step row), got {slots.dtype} "
             f"{tuple(slots.shape)}")
    if paged and (block_table.dtype != torch.int32 or block_table.dim() != 2
                  or block_table.shape[0] != B):
        fail(f"block_table must be int32 [{B}, max_blocks] (indexed by step row), got "
             f"{block_table.dtype} {tuple(block_table.shape)}")
    if slots is None and not paged and entries.shape[0] != B:
        fail(f"entries must be [{B}, capacity, {d}] (one row per step row; pass slots or "
             f"block_table otherwise), got {tuple(entries.shape)}")
    for name, t in (("state_kv", state_kv), ("state_score", state_score)):
        if t.dtype not in fl or t.dim() != 3 or tuple(t.shape[1:]) != (coff * m, w) or (
                slots is None and t.shape[0] != B):
            rows = "n_slots" if slots is not None else str(B)
            fail(f"{name} must be float32 [{rows}, {coff * m}, {w}]{f64}, got {t.dtype} "
                 f"{tuple(t.shape)}")
    if state_score.shape[0] != state_kv.shape[0]:
        fail(f"state_kv and state_score must have the same rows, got {state_kv.shape[0]} and "
             f"{state_score.shape[0]}")
    if int(max_seqlen) < 0:
        fail(f"max_seqlen must be >= 0, got {max_seqlen}")
    if quant not in (QUANT_NONE, QUANT_FP8, QUANT_FP4_HADAMARD):
        fail(f"quant must be 0 (none), 1 (FP8) or 2 (Hadamard + FP4), got {quant}")
    if quant == QUANT_FP8 and (d - rd) % 64:
        fail(f"quant=1 (FP8 blocks of 64) needs head_dim - rope_dim to be a multiple of 64, "
             f"got {d} - {rd}")
    if quant == QUANT_FP4_HADAMARD and (d < 32 or d & (d - 1)):
        fail(f"quant=2 (Hadamard + FP4 blocks of 32) needs head_dim a power of two >= 32, "
             f"got {d}")
    if fmt == kv_cache.MODEL1 and (rd != kv_cache.MODEL1_ROPE_DIM or quant == QUANT_FP4_HADAMARD):
        fail(f"a MODEL1 FP8 cache takes rope_dim 64 and quant 0 or 1, got rope_dim {rd}, "
             f"quant {quant}")
    if fmt == kv_cache.INDEXER and quant == QUANT_FP8:
        fail("an FP8 indexer-key cache takes quant 0 or 2, got 1")
    return B, d, coff, rd


def compress_kv_reference(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor,
                          norm_weight: torch.Tensor, freqs: torch.Tensor,
                          cu_seqlens: torch.Tensor, starts: torch.Tensor,
                          state_kv: torch.Tensor, state_score: torch.Tensor,
                          entries: torch.Tensor, compress_ratio: int, max_seqlen: int,
                          eps: float, quant: int, slots: torch.Tensor | None = None,
                          block_table: torch.Tensor | None = None) -> None:
    """The semantics of ``torch.ops.dsv4.compress_kv``: ``Compressor.forward`` for every row.

    Notation: B step rows (``len(cu_seqlens) - 1``), T new tokens, m = ``compress_ratio``,
    d = head_dim, coff = 2 if m == 4 (overlapping windows, architecture.md §4.3) else 1 (§4.2),
    w = coff·d.

    Args:
        kv, score: [T, w] float32, ``wkv(x)`` and ``wgate(x)`` (before ``ape``) of the new
            tokens, grouped by row: row b owns ``kv[cu_seqlens[b]:cu_seqlens[b+1]]`` at
            positions ``starts[b], starts[b]+1, ...``.
        ape: [m, w] float32, added to the score of the token at position p: ``ape[p % m]``.
        norm_weight: [d] float32, the RMSNorm weight (eps ``eps``).
        freqs: [rope_dim / 2] float32, RoPE frequencies; the entry of block k is rotated at
            position k·m on its last rope_dim dims (interleaved pairs, §3.4).
        cu_seqlens: [B + 1] int32 token offsets; starts: [B] int32.
        state_kv, state_score: [S, coff·m, w] float32, updated in place (the layout of
            :class:`dsv4.cache.CompressorState`: for m == 4 rows 0..3 hold the previous
            complete block and rows 4..7 the partial current one; else rows 0..m-1 the partial
            block; scores include ``ape``; initialise scores to -inf and kv to 0). Step row b
            uses state row ``slots[b]`` (S >= max(slots) + 1), or row b when ``slots`` is None
            (then S == B). Two step rows must not share a state row.
        entries: updated in place; entry k of a row is written by the call that completes
            block k (tokens k·m ... k·m+m-1), bfloat16 or float32:

            * ``block_table`` None: [R, C, d]; entry k of step row b goes to
              ``entries[slots[b], k]`` (or ``entries[b, k]`` without slots, then R == B).
              Entries k >= C are not written (the caller reserves capacity).
            * ``block_table`` [B, max_blocks] int32 (rows indexed by STEP row b, already
              gathered for the step): ``entries`` is a paged pool [num_blocks, block_size, d]
              and entry k of step row b goes to
              ``entries[block_table[b, k // block_size], k % block_size]``. Entries whose block
              id is < 0 or >= num_blocks, or with k // block_size >= max_blocks, are not
              written. block_size is any positive size (not necessarily a power of two).

            A uint8 ``entries`` is an FP8 cache (:mod:`dsv4.ops.kv_cache`): MODEL1
            ``[..., 584]`` (head_dim 512, rope_dim 64, quant 0 or 1) or FP8 indexer keys
            ``[..., head_dim + 4]`` (quant 0 or 2). The entry is computed as a bfloat16 entry
            and packed; a dense FP8 store holds one block of C entries per row. A MODEL1
            cache dequantises to exactly the FP8 simulation (quant 1) of the bf16 entry.
        compress_ratio: m >= 1.
        max_seqlen: the largest n_b (sizes the CUDA grid; not needed here).
        eps: RMSNorm epsilon.
        quant: 0 none, 1 FP8 e4m3 of the first d - rope_dim dims in blocks of 64, 2 Hadamard
            rotation + FP4 e2m1 in blocks of 32 (:mod:`dsv4.ops.quant`, §4.4).
        slots: optional [B] int32, the state row (and, without ``block_table``, the entries
            row) of each step row (docs/contracts.md §A.1).
        block_table: optional [B, max_blocks] int32 (see ``entries``).

    Per entry (§4.2-§4.4): softmax over the slots (per feature, fp32) of score + ape, weighted
    sum of kv, ``.to(entries.dtype)``, RMSNorm, RoPE, quantisation; a row with no new token is
    untouched. The result equals feeding the tokens one at a time (§4.5).

    Raises:
        ValueError: on a bad shape / dtype / quant, inconsistent cu_seqlens / starts, a slot
            outside the state (or dense entries) rows, or two step rows with new tokens
            sharing a slot (the CUDA kernel cannot raise on device data and skips such rows
            instead; shared slots are the caller's error).
    """
    B, d, coff, rd = _check_args(kv, score, ape, norm_weight, freqs, cu_seqlens, starts,
                                 state_kv, state_score, entries, compress_ratio, max_seqlen,
                                 quant, slots, block_table)
    check_writable("compress_kv", state_kv=state_kv, state_score=state_score, entries=entries)
    if entries.dtype == torch.uint8:
        kv_cache.block_view(entries)  # the pool layout, checked before the first row is written
    m = int(compress_ratio)
    overlap = m == 4
    off = m if overlap else 0
    T = kv.shape[0]
    cu = cu_seqlens.tolist()
    st = starts.tolist()
    sl = slots.tolist() if slots is not None else list(range(B))
    n_state = state_kv.shape[0]
    for row in range(B):
        if not (0 <= cu[row] <= cu[row + 1] <= T) or st[row] < 0:
            raise ValueError(f"compress_kv: row {row}: need 0 <= cu_seqlens[{row}] <= "
                             f"cu_seqlens[{row + 1}] <= {T} and starts >= 0, got "
                             f"cu_seqlens {cu[row]}, {cu[row + 1]} and start {st[row]}")
        if cu[row + 1] > cu[row]:
            limit = n_state if block_table is not None else min(n_state, entries.shape[0])
            if not 0 <= sl[row] < limit:
                raise ValueError(f"compress_kv: slots[{row}] = {sl[row]} is outside [0, "
                                 f"{limit}) (state rows {n_state}, entries rows "
                                 f"{entries.shape[0]})")
    busy = [sl[r] for r in range(B) if cu[r + 1] > cu[r]]
    if len(set(busy)) != len(busy):
        raise ValueError(f"compress_kv: two step rows with new tokens share a slot: {sl}")
    bt = block_table.tolist() if block_table is not None else None
    dev = kv.device
    # An FP8 cache: the entry is computed in bf16, then packed (dsv4.ops.kv_cache).
    dtype = torch.bfloat16 if entries.dtype == torch.uint8 else entries.dtype
    for row in range(B):
        start, n = st[row], cu[row + 1] - cu[row]
        if n == 0:
            continue
        s = sl[row]
        # From here on: Compressor.forward with kv / score given (same ops, same order).
        r0 = start % m
        pos = torch.arange(start, start + n, device=dev)
        kv_r = kv[cu[row]:cu[row + 1]]
        sc_r = score[cu[row]:cu[row + 1]] + ape[pos % m]
        kv_r = torch.cat([state_kv[s, off:off + r0], kv_r], dim=0)
        sc_r = torch.cat([state_score[s, off:off + r0], sc_r], dim=0)
        nb = (r0 + n) // m
        first_block = (start - r0) // m
        if nb:
            bkv = kv_r[:nb * m].unflatten(0, (nb, m))
            bsc = sc_r[:nb * m].unflatten(0, (nb, m))
            if overlap:
                prev_kv = torch.cat([state_kv[s, None, :m], bkv[:-1]], dim=0)
                prev_sc = torch.cat([state_score[s, None, :m], bsc[:-1]], dim=0)
                bkv = torch.cat([prev_kv[..., :d], bkv[..., d:]], dim=1)   # [nb, 2m, d]
                bsc = torch.cat([prev_sc[..., :d], bsc[..., d:]], dim=1)
                state_kv[s, :m] = kv_r[(nb - 1) * m:nb * m]
                state_score[s, :m] = sc_r[(nb - 1) * m:nb * m]
            pooled = (bkv * bsc.softmax(dim=1)).sum(dim=1)                 # [nb, d] fp32
            out = rms_norm_reference(pooled.to(dtype), norm_weight, eps)
            block_pos = torch.arange(first_block, first_block + nb, device=dev) * m
            out = apply_rope(out, block_pos, freqs)
            if quant == QUANT_FP4_HADAMARD:
                out = fp4_e2m1_sim(hadamard(out), 32)
            elif quant == QUANT_FP8 and entries.dtype != torch.uint8:
                # (a MODEL1 FP8 cache quantises in the pack: the same values, §11.2)
                out = torch.cat([fp8_e4m3_sim(out[:, :d - rd], 64), out[:, d - rd:]], -1)
            _store_entries(entries, out, s, first_block, bt[row] if bt is not None else None)
        rem = r0 + n - nb * m
        if rem:
            state_kv[s, off:off + rem] = kv_r[nb * m:]
            state_score[s, off:off + rem] = sc_r[nb * m:]


def _store_entries(entries: torch.Tensor, out: torch.Tensor, slot: int, first: int,
                   table: list[int] | None) -> None:
    """Write entries ``first .. first + len(out) - 1`` of one row (dense row ``slot`` or through
    the row's block table); entries without a place (capacity, block id) are dropped. A uint8
    ``entries`` is an FP8 cache (a dense one has one block of ``capacity`` entries per row)."""
    nb = out.shape[0]
    num_blocks, bs = entries.shape[0], entries.shape[1]
    places = []  # (block, row, i)
    for i in range(nb):
        k = first + i
        if table is None:
            if k < bs:
                places.append((slot, k, i))
            continue
        blk = k // bs
        if blk < len(table) and 0 <= table[blk] < num_blocks:
            places.append((table[blk], k % bs, i))
    if not places:
        return
    blk_ids, rows, src = (torch.tensor(v, device=entries.device) for v in zip(*places))
    if entries.dtype == torch.uint8:
        kv_cache.write_entries(entries, blk_ids, rows, out[src.to(out.device)])
    else:
        entries[blk_ids, rows] = out[src.to(out.device)]


def _compress_kv_op(kv, score, ape, norm_weight, freqs, cu_seqlens, starts, state_kv,
                    state_score, entries, compress_ratio, max_seqlen, eps, quant, slots=None,
                    block_table=None) -> None:
    # the op's eps (the kernel's float32): a positive finite float32, as the CUDA glue checks,
    # before anything is written (compress_kv_reference itself takes any eps: the model's maths)
    check_positive_f32("compress_kv", "eps", eps, raise_value_error)
    compress_kv_reference(kv, score, ape, norm_weight, freqs, cu_seqlens, starts, state_kv,
                          state_score, entries, compress_ratio, max_seqlen, eps, quant, slots,
                          block_table)


def _compress_kv_fake(kv, score, ape, norm_weight, freqs, cu_seqlens, starts, state_kv,
                      state_score, entries, compress_ratio, max_seqlen, eps, quant, slots=None,
                      block_table=None) -> None:
    check_positive_f32("compress_kv", "eps", eps, torch._check)
    _check_args(kv, score, ape, norm_weight, freqs, cu_seqlens, starts, state_kv, state_score,
                entries, compress_ratio, max_seqlen, quant, slots, block_table)
    return None


register_op("compress_kv", COMPRESS_KV_SCHEMA, _compress_kv_op, _compress_kv_fake)


def compress_kv(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor,
                norm_weight: torch.Tensor, freqs: torch.Tensor, cu_seqlens: torch.Tensor,
                starts: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                entries: torch.Tensor, compress_ratio: int, max_seqlen: int, eps: float,
                quant: int = QUANT_NONE, slots: torch.Tensor | None = None,
                block_table: torch.Tensor | None = None) -> None:
    """Run ``torch.ops.dsv4.compress_kv`` (CUDA kernel on CUDA tensors, the reference on CPU).

    Arguments and semantics: :func:`compress_kv_reference`. Mutates ``state_kv``,
    ``state_score`` and ``entries`` in place and returns None. On CUDA the call makes no host
    synchronisation (CUDA-graph capturable); ``max_seqlen`` (max new tokens of a row) only
    sizes the grid, and rows with inconsistent cu_seqlens / starts are skipped (left
    untouched) instead of raising. Additional CUDA requirements: contiguous ``ape``,
    ``norm_weight``, ``freqs``, state tensors; ``kv`` / ``score`` with a contiguous last dim
    and 16-byte aligned rows; ``entries`` with a contiguous last dim. On CUDA a step row whose
    slot is outside the state rows is skipped, and paged entries without a valid block are
    not written (no illegal access).

    Paged / slotted use (docs/contracts.md §A.1): ``slots`` [B] int32 picks the state row of each
    step row; ``block_table`` [B, max_blocks] int32 makes ``entries`` a paged pool
    [num_blocks, block_size, d] (entry k of step row b at
    ``entries[block_table[b, k // block_size], k % block_size]``).
    """
    torch.ops.dsv4.compress_kv(kv, score, ape, norm_weight, freqs, cu_seqlens, starts, state_kv,
                               state_score, entries, int(compress_ratio), int(max_seqlen),
                               float(eps), int(quant), slots, block_table)
