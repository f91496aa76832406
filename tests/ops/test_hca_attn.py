"""torch.ops.dsv4.hca_attn (HCA dense path, docs/contracts.md §A.4) and FP8 (MODEL1) key caches in
sparse_attn / hca_attn.

CPU: the reference against a float64 brute force over the keys each query may see (window +
its first n_c(t) compressed entries through a scattered block table), the empty-row / sink
contract, FP8 pools == their dequantised bf16 pools, opcheck. GPU: the kernel against the fp32
reference with the 2x bf16 rule on prefill (varlen, lengths crossing 128-token boundaries) and
decode (1-2 queries per sequence) shapes, poisoned outputs, 70,000 queries, empty scopes, and
the FP8 kernel bit-equal to the bf16 kernel on the dequantised cache.
"""

from __future__ import annotations

import math

import pytest
import torch

import dsv4.ops  # noqa: F401
import dsv4.ops._ext as ext
from dsv4.ops import kv_cache as kc
from dsv4.ops.attention import sparse_attn_reference
from dsv4.ops.hca_attn import dense_block_table, hca_attn, hca_attn_reference, hca_entry_counts

from _fp8_kernels import FP8_KERNELS, both_fp8_kernels, needs_sm90  # (tests/_fp8_kernels.py)
from _paged import scattered_tables  # noqa: E402  (tests/_paged.py)

RATIO = 128


def _brute(q, keys_per_token, sink, scale):
    """float64 per query: o = Σ e^s k / (Σ e^s + e^sink), lse without the sink; 0 / +inf when
    the query has no key."""
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), math.inf, dtype=torch.float64)
    for t in range(T):
        k = keys_per_token[t]
        if len(k) == 0:
            continue
        s = q[t].double() @ k.double().T * scale
        e = torch.exp(s)
        out[t] = (e @ k.double()) / (e.sum(-1) + torch.exp(sink.double()))[:, None]
        lse[t] = torch.logsumexp(s, -1)
    return out, lse


def make_problem(seqs, H=4, D=64, bs=5, W=8, seed=0, device="cpu", dtype=torch.float32,
                 fp8=False):
    """A varlen HCA step: ``seqs`` = [(start, n_new, n_entries_stored)]. Window scope: W keys
    per query (rows of a kv array with -1 before position 0); compressed scope: each
    sequence's stored entries in a shared pool, blocks scattered and out of order."""
    g = torch.Generator().manual_seed(seed)
    T = sum(n for _, n, _ in seqs)
    q = (torch.randn(T, H, D, generator=g) * 1.5)
    n_kv = 3 * W * len(seqs) + T
    kv = torch.randn(n_kv, D, generator=g)
    pos, rows = [], []
    for b, (s, n, _) in enumerate(seqs):
        pos += list(range(s, s + n))
        rows += [b] * n
    pos = torch.tensor(pos)
    rows = torch.tensor(rows, dtype=torch.int32)
    win = torch.randint(0, n_kv, (T, W), generator=g, dtype=torch.int32)
    win[pos[:, None] - torch.arange(W)[None, :] < 0] = -1    # before position 0
    stored = [c for _, _, c in seqs]
    max_blocks = max(max(stored), 1) // bs + 2
    table, nb = scattered_tables(stored, bs, max_blocks, seed=seed)
    pool = torch.randn(nb, bs, D, generator=g)
    lengths = hca_entry_counts(pos, RATIO)
    sink = torch.randn(H, generator=g)
    if H >= 2:
        sink[0], sink[-1] = math.inf, -math.inf
    a = dict(q=q.to(dtype), kv=kv.to(dtype), indices=win, attn_sink=sink,
             softmax_scale=D ** -0.5, topk_length=None, extra_kv=pool.to(dtype),
             extra_block_table=table, extra_rows=rows, extra_lengths=lengths)
    if fp8:
        assert D == 512
        kvp = kc.allocate(kc.MODEL1, (n_kv + 15) // 16, 16, D)
        r = torch.arange(n_kv)
        kc.write_entries(kvp, r // 16, r % 16, kv)
        pp = kc.allocate(kc.MODEL1, nb, bs, D)
        r = torch.arange(nb * bs)
        kc.write_entries(pp, r // bs, r % bs, pool.reshape(-1, D))
        a["kv"], a["extra_kv"] = kvp, pp
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


def _keys_of(a):
    """Per query: the window rows then the compressed entries it sees (independent of the op:
    a Python walk of the block table)."""
    kv = a["kv"].cpu()
    pool = a["extra_kv"].cpu()
    if kv.dtype == torch.uint8:
        kv = kc.read_pool(kv, 512, torch.float32).reshape(-1, 512)
        pool = kc.read_pool(pool, 512, torch.float32)
    nb, bs = pool.shape[:2]
    table = a["extra_block_table"].cpu()
    keys = []
    for t in range(a["q"].shape[0]):
        w = [int(i) for i in a["indices"][t] if 0 <= int(i) < kv.shape[0]]
        ks = [kv[i] for i in w]
        r = int(a["extra_rows"][t])
        n = int(a["extra_lengths"][t])
        if 0 <= r < table.shape[0]:
            n = max(0, min(n, table.shape[1] * bs))
            for i in range(n):
                blk = int(table[r, i // bs])
                if 0 <= blk < nb:
                    ks.append(pool[blk, i % bs])
        keys.append(torch.stack(ks) if ks else torch.zeros(0, kv.shape[1]))
    return keys


def _assert_close_to(out, lse, ref_o, ref_l, atol=1e-5):
    torch.testing.assert_close(out.double(), ref_o, atol=atol, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l))
    fin = torch.isfinite(ref_l)
    torch.testing.assert_close(lse.double()[fin], ref_l[fin], atol=atol, rtol=1e-5)


# Sequences crossing 128-token boundaries: (start, new tokens, stored entries).
PREFILL = [(0, 300, 2), (120, 17, 1), (0, 127, 0), (250, 9, 2)]
DECODE = [(127, 1, 1), (1023, 2, 8), (5, 1, 0), (300, 2, 2)]


@pytest.mark.parametrize("seqs", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_reference_matches_brute_force(seqs):
    a = make_problem(seqs, seed=len(seqs))
    out, lse = hca_attn_reference(**a)
    ref_o, ref_l = _brute(a["q"], _keys_of(a), a["attn_sink"], a["softmax_scale"])
    _assert_close_to(out, lse, ref_o, ref_l)
    assert (out[:, 0] == 0).all()                 # sink +inf
    got_o, got_l = torch.ops.dsv4.hca_attn(*a.values())
    torch.testing.assert_close(got_o, out)
    torch.testing.assert_close(got_l, lse)


def test_counts_and_dense_store():
    pos = torch.tensor([0, 126, 127, 128, 254, 255, 256, 1 << 20])
    assert hca_entry_counts(pos, 128).tolist() == [0, 0, 1, 1, 1, 2, 2, 8192]
    # A dense per-sequence store [B, C, D] is the pool with block_size C.
    a = make_problem(PREFILL, seed=3)
    B = len(PREFILL)
    dense = torch.randn(B, 4, 64)
    a["extra_kv"], a["extra_block_table"] = dense, dense_block_table(B)
    out, _ = hca_attn_reference(**a)
    keys = _keys_of(a)
    assert max(len(k) for k in keys) > 8
    ref_o, _ = _brute(a["q"], keys, a["attn_sink"], a["softmax_scale"])
    torch.testing.assert_close(out.double(), ref_o, atol=1e-5, rtol=1e-5)


def test_empty_scopes_bad_rows_and_missing_blocks():
    a = make_problem(DECODE, seed=5)
    a["indices"][:] = -1                          # no window key anywhere
    a["extra_lengths"][0] = 0                     # no entry either: out 0, lse +inf
    a["extra_rows"][1] = 99                       # a row outside the table: no entry
    a["extra_block_table"][3, 0] = -1             # a missing block
    out, lse = hca_attn_reference(**a)
    ref_o, ref_l = _brute(a["q"], _keys_of(a), a["attn_sink"], a["softmax_scale"])
    _assert_close_to(out, lse, ref_o, ref_l)
    assert (out[0] == 0).all() and (lse[0] == math.inf).all()
    assert (lse[1] == math.inf).all()


def test_out_variant_and_errors():
    a = make_problem(DECODE, seed=6)
    T, H, D = a["q"].shape
    out, lse = torch.full((T, H, D), float("nan")), torch.full((T, H), float("nan"))
    hca_attn(*a.values(), out=out, lse=lse)
    ref_o, ref_l = hca_attn_reference(**a)
    assert torch.equal(out, ref_o) and torch.equal(lse, ref_l)
    with pytest.raises((ValueError, RuntimeError), match="extra_rows must be int32"):
        torch.ops.dsv4.hca_attn(*{**a, "extra_rows": a["extra_rows"].long()}.values())
    with pytest.raises((ValueError, RuntimeError), match="extra_block_table must be int32"):
        torch.ops.dsv4.hca_attn(*{**a, "extra_block_table": a["extra_block_table"][0]}.values())


def test_fp8_pools_equal_dequantised_pools():
    a = make_problem(DECODE, D=512, seed=7, fp8=True)
    out, lse = hca_attn_reference(**a)
    deq = {**a, "kv": kc.read_pool(a["kv"], 512, torch.float32).reshape(-1, 512),
           "extra_kv": kc.read_pool(a["extra_kv"], 512, torch.float32)}
    o2, l2 = hca_attn_reference(**deq)
    assert torch.equal(out, o2) and torch.equal(lse, l2)
    # sparse_attn over the same FP8 pools, with an explicit index list
    idx = torch.randint(-1, a["extra_kv"].shape[0] * a["extra_kv"].shape[1],
                        (a["q"].shape[0], 9), dtype=torch.int32)
    s1 = torch.ops.dsv4.sparse_attn(a["q"], a["kv"], a["indices"], a["attn_sink"], 0.04, None,
                                    a["extra_kv"], idx)
    s2 = sparse_attn_reference(a["q"], deq["kv"], a["indices"], a["attn_sink"], 0.04, None,
                               deq["extra_kv"].reshape(-1, 512), idx)
    assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])])
def test_opcheck(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = make_problem(DECODE, seed=8, device=device, dtype=dtype)
    args = tuple(a.values())
    torch.library.opcheck(torch.ops.dsv4.hca_attn.default, args)
    T, H, D = a["q"].shape
    out = torch.empty(T, H, D, dtype=dtype, device=device)
    lse = torch.empty(T, H, device=device)
    torch.library.opcheck(torch.ops.dsv4.hca_attn_out.default, args, dict(out=out, lse=lse))


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
needs_kernel = pytest.mark.skipif("hca_attn" not in ext.info()["cuda_compiled_ops"],
                                  reason="dsv4._C built without the hca_attn kernel")


def _check_kernel(a, out_variant=False):
    """Kernel vs the fp32 reference: error <= 2x the bf16 reference's (+1e-5); inf positions
    equal; poisoned outputs fully written."""
    T, H, D = a["q"].shape
    if out_variant:
        out = torch.full((T, H, D), float("nan"), dtype=torch.bfloat16, device="cuda")
        lse = torch.full((T, H), float("nan"), device="cuda")
        torch.ops.dsv4.hca_attn_out(*a.values(), out=out, lse=lse)
    else:
        torch.full((T * H * D,), float("nan"), dtype=torch.bfloat16, device="cuda")
        torch.full((T * H,), float("nan"), device="cuda")
        out, lse = torch.ops.dsv4.hca_attn(*a.values())
    fp32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v)
            for k, v in a.items()}
    ref_o, ref_l = hca_attn_reference(**fp32)
    lo_o, lo_l = hca_attn_reference(**a, compute_dtype=torch.bfloat16)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten output"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l))
    err = (out.float() - ref_o).abs().max().item()
    base = (lo_o.float() - ref_o).abs().max().item()
    assert err <= 2 * base + 1e-5, (err, base)
    fin = torch.isfinite(ref_l)
    if fin.any():
        e_l = (lse - ref_l)[fin].abs().max().item()
        b_l = (lo_l - ref_l)[fin].abs().max().item()
        assert e_l <= 2 * b_l + 1e-5, (e_l, b_l)
    return out, lse


def _bf16(a):
    return {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
                and k in ("q", "kv", "extra_kv") else v) for k, v in a.items()}


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("D,H", [(512, 64), (512, 128), (128, 16), (64, 3)])
@pytest.mark.parametrize("seqs", [PREFILL, DECODE], ids=["prefill", "decode"])
@pytest.mark.parametrize("bs", [64, 61, 2])
def test_cuda_matches_reference(D, H, seqs, bs):
    seqs = [(s, n, max(c, (s + n) // RATIO)) for s, n, c in seqs]
    a = make_problem(seqs, H=H, D=D, bs=bs, W=128, seed=D + H + bs, device="cuda",
                     dtype=torch.bfloat16)
    out, lse = _check_kernel(a)
    if H >= 2:
        assert (out[:, 0] == 0).all()
    _check_kernel(a, out_variant=True)


@pytest.mark.cuda
@needs_kernel
def test_cuda_long_prefill_many_entries():
    """A 4096-token prefill at position 0: counts 0..32 cross every 128 boundary; plus a
    2-token decode at 64K positions (512 entries, split path)."""
    a = make_problem([(0, 4096, 32), (65534, 2, 512)], H=64, D=512, bs=64, W=128, seed=1,
                     device="cuda", dtype=torch.bfloat16)
    _check_kernel(a)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("seqs", [[(1048575, 1, 8192)], [(1048575, 1, 8192), (300000, 1, 2400)]],
                         ids=["b1-1M", "b2"])
def test_cuda_decode_at_1m_context(seqs):
    """Decode at 1M context (8,192 entries in blocks of 8, the runtime's paging): 130 key splits
    of one block at batch 1 (65 of two at batch 2), merged by the combine kernel."""
    a = make_problem(seqs, H=64, D=512, bs=8, W=128, seed=11, device="cuda",
                     dtype=torch.bfloat16)
    _check_kernel(a)


@pytest.mark.cuda
@needs_kernel
def test_cuda_empty_scopes_and_sink():
    a = make_problem(DECODE, H=8, D=512, bs=3, W=128, seed=2, device="cuda",
                     dtype=torch.bfloat16)
    a["indices"][0] = -1
    a["extra_lengths"][0] = 0
    a["extra_rows"][1] = -4
    a["indices"][1] = 10 ** 6                    # >= n_kv: invalid
    a["extra_block_table"][2:, :] = -1           # missing blocks
    out, lse = _check_kernel(a)
    assert (out[:2] == 0).all() and (lse[:2] == math.inf).all()


@pytest.mark.cuda
@needs_kernel
def test_cuda_70000_queries():
    seqs = [(1000 * i, 700, (1000 * i + 700) // RATIO) for i in range(100)]
    a = make_problem(seqs, H=1, D=64, bs=7, W=16, seed=3, device="cuda", dtype=torch.bfloat16)
    assert a["q"].shape[0] == 70000
    _check_kernel(a)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() != (9, 0), reason="FP8 caches need sm_90")
@pytest.mark.parametrize("seqs", [PREFILL, DECODE, [(65534, 2, 512)] * 64],
                         ids=["prefill", "decode", "decode-b64"])
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("kernel", FP8_KERNELS)
def test_cuda_fp8_equals_bf16_kernel_on_dequantised_cache(seqs, H, kernel, monkeypatch):
    """Both FP8 kernels (DSV4_SPARSE_FP8) dequantise into the same bf16 tile the bf16 kernel
    loads: bit-equal outputs (hca_attn and sparse_attn), and the tolerance rule against the
    fp32 reference. The bf16 side is the same sparse_attn kernel family (DSV4_SPARSE_PREFILL=old):
    the warp-specialised prefill kernel, the default for unsplit bf16 calls, sums in another
    order and reads no FP8 pool."""
    monkeypatch.setenv("DSV4_SPARSE_FP8", kernel)
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "old")
    seqs = [(s, n, max(c, (s + n) // RATIO)) for s, n, c in seqs]
    a = make_problem(seqs, H=H, D=512, bs=64, W=128, seed=H, fp8=True)
    deq = {**a, "kv": kc.read_pool(a["kv"], 512).reshape(-1, 512),
           "extra_kv": kc.read_pool(a["extra_kv"], 512)}
    cu = lambda d: {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}  # noqa: E731
    a8, a16 = cu(_bf16(a)), cu(_bf16(deq))
    o8, l8 = torch.ops.dsv4.hca_attn(*a8.values())
    o16, l16 = torch.ops.dsv4.hca_attn(*a16.values())
    torch.cuda.synchronize()
    assert torch.equal(o8, o16) and torch.equal(l8, l16)
    _check_kernel(a16)
    # sparse_attn with explicit lists over the same FP8 pools
    T = a8["q"].shape[0]
    n2 = a8["extra_kv"].shape[0] * a8["extra_kv"].shape[1]
    idx = torch.randint(-1, n2, (T, 200), dtype=torch.int32, device="cuda")
    s8 = torch.ops.dsv4.sparse_attn(a8["q"], a8["kv"], a8["indices"], a8["attn_sink"], 0.04, None,
                                    a8["extra_kv"], idx)
    s16 = torch.ops.dsv4.sparse_attn(a16["q"], a16["kv"], a16["indices"], a16["attn_sink"], 0.04,
                                     None, a16["extra_kv"].reshape(-1, 512), idx)
    assert torch.equal(s8[0], s16[0]) and torch.equal(s8[1], s16[1])


def _cuda(a):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _bf16(a).items()}


@pytest.mark.cuda
@needs_kernel
@needs_sm90
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("B,bs", [(2, 2), (64, 2), (128, 64)])
def test_cuda_fp8_decode_both_kernels(H, B, bs, monkeypatch):
    """HCA decode, FP8 pools: B sequences x 2 queries at random positions, so the entry counts
    (pos + 1) // 128 run over 0..1024 (crossing every 64-entry block), window 128 with -1
    before position 0, scattered blocks of 2 or 64 entries; split path at B = 2."""
    g = torch.Generator().manual_seed(B + H + bs)
    pos = torch.randint(0, 1024 * RATIO - 1, (B,), generator=g)
    pos[0], pos[-1] = 0, 1024 * RATIO - 2                      # counts 0 / 1 and 1024
    seqs = [(int(p), 2, (int(p) + 2) // RATIO) for p in pos]
    a = _cuda(make_problem(seqs, H=H, D=512, bs=bs, W=128, seed=B * H + bs, fp8=True))
    both_fp8_kernels(_check_kernel, a, monkeypatch)


@pytest.mark.cuda
@needs_kernel
@needs_sm90
def test_cuda_fp8_70000_queries_both_kernels(monkeypatch):
    seqs = [(1000 * i, 700, (1000 * i + 700) // RATIO) for i in range(100)]
    a = _cuda(make_problem(seqs, H=1, D=512, bs=8, W=16, seed=5, fp8=True))  # 8 x 584 B: 16-byte blocks
    assert a["q"].shape[0] == 70000
    both_fp8_kernels(_check_kernel, a, monkeypatch, out_variants=(False,))


@pytest.mark.cuda
@needs_kernel
@needs_sm90
@pytest.mark.parametrize("H,B,bs", [(64, 2, 2), (128, 64, 64)])
def test_cuda_fp8_nan_codes_give_nan_where_the_reference_does(H, B, bs, monkeypatch):
    """HCA decode over FP8 pools holding a NaN activation (e4m3 NaN code 0x7f in a window
    key, 0xff in the last nope dim of sequence 1's first compressed entry, written by
    dsv4.ops.kv_cache): both FP8 kernels give NaN in exactly the output rows (and lse) where
    the fp32 reference does, the tolerance rule elsewhere, and agree bit for bit (a NaN equals
    any NaN). Split path at B = 2; sinks +-inf included."""
    from _fp8_nan import (assert_nan_where_reference, assert_same_bits_nan_equal,
                          poison_allocator, tokens_reading, write_nan)
    g = torch.Generator().manual_seed(3 * B + H + bs)
    pos = torch.randint(RATIO, 1024 * RATIO - 1, (B,), generator=g)
    pos[-1] = 1024 * RATIO - 2
    seqs = [(int(p), 2, (int(p) + 2) // RATIO) for p in pos]
    a = make_problem(seqs, H=H, D=512, bs=bs, W=128, seed=B * H + bs + 1, fp8=True)
    T, n_kv = a["q"].shape[0], int(a["indices"].max()) + 1
    # The window key fewest tokens read (at least one), and the first entry of the first
    # sequence whose first block is not block 0. Never row 0 of a scope: the reference gathers
    # it for invalid lanes (weight 0, but 0 * NaN = NaN), so a NaN there also reaches tokens
    # that do not read it.
    win = a["indices"].long()
    count = torch.zeros(n_kv, dtype=torch.long).index_add_(
        0, win[win >= 0], torch.ones(int((win >= 0).sum()), dtype=torch.long))
    count[0] = 0
    k1 = int(torch.where(count > 0, count, T + 1).argmin())
    seq = next(b for b in range(B) if int(a["extra_block_table"][b, 0]) > 0)
    write_nan(a["kv"], k1, 5, negative=False)
    write_nan(a["extra_kv"], int(a["extra_block_table"][seq, 0]) * bs, 447, negative=True)
    nan_tokens = tokens_reading(a["indices"], None, k1) | (
        (a["extra_rows"] == seq) & (a["extra_lengths"] >= 1))
    a = _cuda(a)
    fp32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v)
            for k, v in a.items()}
    ref_o, ref_l = hca_attn_reference(**fp32)
    lo_o, lo_l = hca_attn_reference(**a, compute_dtype=torch.bfloat16)
    res = {}
    for kernel in FP8_KERNELS:
        monkeypatch.setenv("DSV4_SPARSE_FP8", kernel)
        poison_allocator(T * H * 512, torch.bfloat16)
        poison_allocator(T * H, torch.float32)
        out, lse = torch.ops.dsv4.hca_attn(*a.values())
        assert_nan_where_reference(out, lse, ref_o, ref_l, lo_o, lo_l, nan_tokens)
        res[kernel] = out, lse
    for kernel in FP8_KERNELS[1:]:
        assert_same_bits_nan_equal(res["old"][0], res[kernel][0])
        assert_same_bits_nan_equal(res["old"][1], res[kernel][1])


@pytest.mark.cuda
@needs_kernel
def test_cuda_rejects_mixed_formats():
    a = make_problem(DECODE, D=512, seed=9, fp8=True)
    a = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _bf16(a).items()}
    a["extra_kv"] = torch.zeros(2, 4, 512, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match=r"hca_attn \(CUDA\): kv and extra_kv must both be "
                                            r"FP8 pools or both bfloat16"):
        torch.ops.dsv4.hca_attn(*a.values())
