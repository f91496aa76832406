"""NaN codes in FP8 (MODEL1) key pools, for the CUDA tests of sparse_attn / hca_attn: a NaN
activation that reached the cache must make the attention output NaN exactly where the fp32
reference's is, through every FP8 kernel (DSV4_SPARSE_FP8 = old / new / new2)."""

from __future__ import annotations

import torch

from dsv4.ops import kv_cache as kc


def write_nan(pool: torch.Tensor, row: int, dim: int, negative: bool) -> None:
    """Re-writes flat row ``row`` (block row // block_size, entry row % block_size) of a MODEL1
    pool (in place, any device) from its dequantised values with +NaN / -NaN at nope dim
    ``dim``: the writer (dsv4.ops.kv_cache, ops.quant.fp8_e4m3_quantize) stores the e4m3 NaN
    code 0x7f / 0xff there (asserted)."""
    assert 0 <= dim < kc.MODEL1_NOPE_DIM
    bs = pool.shape[1]
    cpu = pool.cpu()
    blk, ent = torch.tensor([row // bs]), torch.tensor([row % bs])
    x = kc.read_entries(cpu, blk, ent, 512, torch.float32)
    x[0, dim] = -float("nan") if negative else float("nan")
    assert int(kc.pack(kc.MODEL1, x)[0, dim]) == (0xFF if negative else 0x7F)
    kc.write_entries(cpu, blk, ent, x)
    pool.copy_(cpu)


def tokens_reading(indices: torch.Tensor, lengths: torch.Tensor | None, key: int) -> torch.Tensor:
    """bool [tokens]: the token lists ``key`` in a used lane (lanes < clamp(length, 0, K))."""
    idx = indices.cpu()
    used = torch.ones(idx.shape, dtype=torch.bool)
    if lengths is not None:
        used = torch.arange(idx.shape[1])[None, :] < lengths.cpu().long().clamp_min(0)[:, None]
    return ((idx == key) & used).any(-1)


def poison_allocator(numel: int, dtype: torch.dtype) -> None:
    """Fill, then free, a block the caching allocator will hand to the op's outputs with a
    finite sentinel (1e4): an element the kernel does not write then fails the tolerance
    check, or the NaN-position check, instead of passing as an expected NaN."""
    torch.full((numel,), 1e4, dtype=dtype, device="cuda")


def assert_nan_where_reference(out, lse, ref_o, ref_l, lo_o, lo_l, nan_tokens) -> None:
    """The fp32 reference is NaN in every output and lse of exactly the ``nan_tokens`` (the
    NaN key reached them; a check of the case itself), the kernel NaN exactly where the
    reference is, and elsewhere within the tolerance rule (error <= 2x the bf16 reference's,
    + 1e-5); inf lse positions equal."""
    nan_tokens = nan_tokens.to(ref_o.device)
    assert bool(nan_tokens.any()) and not bool(nan_tokens.all()), "case: NaN in some tokens"
    assert torch.equal(torch.isnan(ref_o), nan_tokens[:, None, None].expand_as(ref_o))
    assert torch.equal(torch.isnan(ref_l), nan_tokens[:, None].expand_as(ref_l))
    assert torch.equal(torch.isnan(out), torch.isnan(ref_o)), "NaN outputs differ"
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_l)), "NaN lse differ"
    fin_o = ~torch.isnan(ref_o)
    err = (out.float() - ref_o)[fin_o].abs().max().item()
    base = (lo_o.float() - ref_o)[fin_o].abs().max().item()
    assert err <= 2 * base + 1e-5, (err, base)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l))
    fin_l = torch.isfinite(ref_l)
    if fin_l.any():
        e_l = (lse - ref_l)[fin_l].abs().max().item()
        b_l = (lo_l - ref_l)[fin_l].abs().max().item()
        assert e_l <= 2 * b_l + 1e-5, (e_l, b_l)


def assert_same_bits_nan_equal(x: torch.Tensor, y: torch.Tensor) -> None:
    """x and y NaN at the same positions (any NaN bits) and bit-equal elsewhere."""
    nx, ny = torch.isnan(x), torch.isnan(y)
    assert torch.equal(nx, ny)
    ints = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[x.dtype]
    assert torch.equal(x[~nx].view(ints), y[~ny].view(ints))
