"""NaN and inf in the FP8 KV writers (issue 9 follow-up): a NaN activation must reach the cache
as the e4m3 NaN code, never as a clamped finite value.

The reference (dsv4.ops.quant.fp8_e4m3_quantize, the Python pool writer dsv4.ops.kv_cache):
a 64-block (MODEL1) or key (indexer) holding a NaN or an inf has the scale 1 (torch.frexp of
a non-finite amax has exponent 0, so 2**0; MODEL1 scale byte 127, indexer scale 1.0); in it
NaN -> 0x7f / 0xff (the NaN's sign), +-inf -> +-448 (0x7e / 0xfe), every other value
e4m3(clamp(x, +-448)). CPU: those bytes against values written out here. GPU: the CUDA writers
(kv_norm_rope's FP8 pool, compress_kv's MODEL1 / indexer caches, csrc/kernels/
fp8_block_quant.cuh) write exactly the bytes of the Python writer applied to the kernel's own
bf16 entry (the same call with a bf16 destination), NaN / inf in the entry included, and the
FP8 simulation of the entry (quant 1) is NaN where the reference's is and equal elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401
import dsv4.ops._ext as ext
from dsv4.layers.rope import rope_frequencies
from dsv4.ops import kv_cache as kc
from dsv4.ops.compressor import QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE
from dsv4.ops.quant import fp8_e4m3_quantize, fp8_e4m3_sim, ue8m0_scale
from dsv4.ops.qkv_rope import kv_norm_rope

from _fp8_nan import assert_same_bits_nan_equal  # noqa: E402  (tests/_fp8_nan.py)

NAN, INF = float("nan"), float("inf")
needs_kernel = pytest.mark.skipif(not ext.HAS_C, reason="dsv4._C not built")


def _e4m3_bytes(v: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes of fp32 values already in [-448, 448] (or NaN): torch's cast."""
    return v.to(torch.float8_e4m3fn).view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# CPU: the reference's bytes
# ---------------------------------------------------------------------------------------------
def test_scale_of_a_nonfinite_block_is_one():
    amax = torch.tensor([NAN, INF, -INF, 448.0, 1.75])
    assert ue8m0_scale(amax, 448.0).tolist() == [1.0, 1.0, 1.0, 1.0, 2.0 ** -8]


def test_model1_pack_nan_and_inf_bytes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 512, generator=g) * 3
    x[0, 5], x[0, 70], x[0, 130], x[0, 200] = NAN, -NAN, INF, -INF
    x[0, 131] = 1000.0                 # finite and beyond 448 in an inf block: clamped
    x[1, 450] = NAN                    # rope dim: stored as the bf16 NaN
    x[2] = NAN                         # a whole NaN entry
    b = kc.pack(kc.MODEL1, x)
    assert b[0, 5] == 0x7F and b[0, 70] == 0xFF and b[0, 130] == 0x7E and b[0, 200] == 0xFE
    sc = b[:, kc.MODEL1_TOKEN_BYTES:kc.MODEL1_TOKEN_BYTES + 7]
    assert sc[0].tolist()[:4] == [127, 127, 127, 127]     # blocks 0..3 hold NaN / inf
    # the other values of a non-finite block: e4m3(clamp(x)) at scale 1
    for blk in range(4):
        v = x[0, 64 * blk:64 * blk + 64]
        want = _e4m3_bytes(v.clamp(-448, 448))
        assert torch.equal(b[0, 64 * blk:64 * blk + 64], want), blk
    # finite blocks: unchanged by their neighbours (the scale of the block alone)
    q, s = fp8_e4m3_quantize(x[0:1, 256:448].clone(), 64)
    assert torch.equal(b[0, 256:448], q.view(torch.uint8)[0])
    assert torch.equal(sc[0, 4:], kc._e8m0_byte(s[0]))
    # rope NaN kept as a bf16 NaN; an all-NaN entry is all NaN codes, scales 1
    rope = b[1, kc.MODEL1_NOPE_DIM:kc.MODEL1_TOKEN_BYTES].view(torch.bfloat16)
    assert bool(rope[2].isnan()) and int(rope.isnan().sum()) == 1
    assert bool((b[2, :448] == 0x7F).all()) and sc[2].tolist() == [127] * 7
    # and the reader: NaN exactly there, the sim of the same values otherwise
    y = kc.unpack(kc.MODEL1, b, torch.float32)
    ref = torch.cat([fp8_e4m3_sim(x[:, :448], 64), x[:, 448:].to(torch.bfloat16).float()], -1)
    assert torch.equal(y.isnan(), ref.isnan()) and int(y.isnan().sum()) == 512 + 2 + 1
    assert torch.equal(y[~y.isnan()], ref[~ref.isnan()])


def test_indexer_pack_nan_and_inf_bytes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 128, generator=g)
    x[0, 3] = NAN
    x[1, 9], x[1, 10] = -INF, 600.0
    b = kc.pack(kc.INDEXER, x)
    s = b[:, 128:].contiguous().view(torch.float32).flatten()
    assert s[0] == 1.0 and s[1] == 1.0 and s[2] == ue8m0_scale(x[2].abs().amax(), 448.0)
    assert b[0, 3] == 0x7F and b[1, 9] == 0xFE and b[1, 10] == 0x7E
    assert torch.equal(b[0, :3], _e4m3_bytes(x[0, :3]))
    assert torch.equal(b[1, :9], _e4m3_bytes(x[1, :9]))


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA writers write the Python writer's bytes
# ---------------------------------------------------------------------------------------------
def _freqs() -> torch.Tensor:
    return rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0)


def _nonfinite_weight(d: int, seed: int) -> torch.Tensor:
    """An RMSNorm weight whose product puts NaN / inf / huge values at chosen dims of every
    entry (the kernels normalise before they quantise, so a NaN in the input would make the
    whole entry NaN; a weight places it in one dim): NaN at 5 (block 0) and 130 (block 2),
    +inf at 70 (block 1), 1e38 at 200 (block 3, overflows bf16 or lands near its top), NaN at a
    rope dim when d == 512; the other blocks finite."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(d, generator=g) + 0.5
    w[5] = NAN
    if d > 70:
        w[70] = INF
    if d > 200:
        w[130], w[200] = NAN, 1e38
    if d == 512:
        w[470] = NAN
    return w


def _same_pools(got: torch.Tensor, want: torch.Tensor) -> None:
    gb, wb = kc.block_view(got.cpu()), kc.block_view(want)
    assert torch.equal(gb, wb), f"{int((gb != wb).sum())} bytes differ"


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("quant", [QUANT_NONE, QUANT_FP8])
def test_cuda_kv_norm_rope_pool_nonfinite(quant):
    D, T, bs = 512, 37, 5
    g = torch.Generator().manual_seed(11 + quant)
    x = (torch.randn(T, D, generator=g) * 2).to(torch.bfloat16)
    x[3, 17] = INF                    # ss = inf: that dim NaN (inf * 0), the rest +-0
    x[4, 300] = NAN                   # the whole entry NaN
    x, w = x.cuda(), _nonfinite_weight(D, 3).cuda()
    pos = torch.randint(0, 1 << 16, (T,), generator=g).cuda()
    f = _freqs().cuda()
    n_rows = 9 * bs
    rows = torch.randperm(n_rows, generator=g)[:T].to(torch.int32)
    rows[7] = -1                                                  # not written
    pool = kc.allocate(kc.MODEL1, 9, bs, D, device="cuda")
    pool.fill_(0xCD)
    out = torch.full_like(x, 1.0)
    kv_norm_rope(x, w, pos, f, 1e-6, quant, pool, rows.cuda(), out=out)
    pre = kv_norm_rope(x, w, pos, f, 1e-6, QUANT_NONE)           # the entry before the sim
    torch.cuda.synchronize()
    pre = pre.cpu()
    assert bool(pre[:, 5].isnan().all()) and bool(pre[4].isnan().all())   # the case itself
    assert bool(pre[:, 70].isinf().any()) and bool(pre[3, 17].isnan())
    want = kc.allocate(kc.MODEL1, 9, bs, D)
    want.fill_(0xCD)
    ok = (rows >= 0).nonzero().flatten()
    r = rows[ok].long()
    kc.write_entries(want, r // bs, r % bs, pre[ok])
    _same_pools(pool, want)
    sim = torch.cat([fp8_e4m3_sim(pre[:, :448], 64), pre[:, 448:]], -1) if quant else pre
    assert_same_bits_nan_equal(out.cpu(), sim)


def _compress_inputs(d, m, lens, starts, seed, device):
    g = torch.Generator().manual_seed(seed)
    coff = 2 if m == 4 else 1
    w, B, T = coff * d, len(lens), sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    p = dict(kv=torch.randn(T, w, generator=g), score=torch.randn(T, w, generator=g) * 1.5,
             ape=torch.randn(m, w, generator=g) * 0.5, norm_weight=_nonfinite_weight(d, seed),
             freqs=_freqs(), cu=cu, starts=torch.tensor(starts, dtype=torch.int32),
             skv=torch.randn(B, coff * m, w, generator=g),
             ssc=torch.randn(B, coff * m, w, generator=g))
    return {k: v.to(device) for k, v in p.items()}


def _compress(p, m, quant, entries):
    lens = p["cu"][1:] - p["cu"][:-1]
    torch.ops.dsv4.compress_kv(p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"],
                               p["cu"], p["starts"], p["skv"], p["ssc"], entries, m,
                               int(lens.max()), 1e-6, quant, None, None)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("d,m,quant,fmt", [
    (512, 4, QUANT_FP8, kc.MODEL1), (512, 128, QUANT_FP8, kc.MODEL1),
    (512, 4, QUANT_NONE, kc.MODEL1), (128, 4, QUANT_NONE, kc.INDEXER),
    (128, 4, QUANT_FP4_HADAMARD, kc.INDEXER), (64, 4, QUANT_NONE, kc.INDEXER)])
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_cuda_compress_kv_fp8_nonfinite(d, m, quant, fmt, kind):
    """Dense FP8 store (one block of C entries per row) against the same kernel's bf16 entries
    packed by the Python writer (MODEL1 packs the entry before the FP8 simulation, so its bf16
    twin runs with quant 0; the indexer packs the FP4-simulated entry)."""
    if kind == "prefill":
        lens, starts = [3 * m + 2, 1, m], [0, 0, m - 1]
    else:                                   # one token completing a block: the fused kernel
        lens, starts = [1, 1, 1], [m - 1, 2 * m - 1, 7 * m - 1]
    C = 9
    p = _compress_inputs(d, m, lens, starts, seed=d + m, device="cuda")
    q = {k: v.clone() for k, v in p.items()}
    pool = kc.allocate(fmt, 3, C, d, device="cuda")
    pool.fill_(0xAB)
    _compress(p, m, quant, pool)
    twin_quant = QUANT_NONE if fmt == kc.MODEL1 else quant
    dense = torch.full((3, C, d), 7.0, dtype=torch.bfloat16, device="cuda")
    _compress(q, m, twin_quant, dense)
    torch.cuda.synchronize()
    dense = dense.cpu()
    written = dense[..., 0] != 7.0
    assert bool(written.any())
    if quant != QUANT_FP4_HADAMARD:       # the case: NaN reached the entry (the FP4 simulation
        assert bool(dense[written][:, 5].isnan().all())   # turns NaN into +-6 s: see the notes)
    want = kc.allocate(fmt, 3, C, d)
    want.fill_(0xAB)
    bi, ri = written.nonzero(as_tuple=True)
    kc.write_entries(want, bi, ri, dense[bi, ri])
    _same_pools(pool, want)
    if fmt == kc.MODEL1 and quant == QUANT_FP8:                  # the simulation (bf16 entries)
        r = {k: v.clone() for k, v in _compress_inputs(d, m, lens, starts, d + m, "cuda").items()}
        sim = torch.full((3, C, d), 7.0, dtype=torch.bfloat16, device="cuda")
        _compress(r, m, QUANT_FP8, sim)
        ref = torch.cat([fp8_e4m3_sim(dense[..., :448], 64), dense[..., 448:]], -1)
        assert_same_bits_nan_equal(sim.cpu()[written], ref[written])
