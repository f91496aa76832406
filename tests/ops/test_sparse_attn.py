"""torch.ops.dsv4.sparse_attn: the reference against a dense float64 formula and its edge contract
(CPU), the CUDA kernel against the fp32 reference with the tolerance rule (GPU), and opcheck."""

from __future__ import annotations

import math

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
import dsv4.ops._ext as ext
from dsv4.ops.attention import sparse_attn, sparse_attn_reference

from _fp8_kernels import FP8_KERNELS, both_fp8_kernels, needs_sm90  # (tests/_fp8_kernels.py)
from _profiling import cuda_kernel_names  # (tests/_profiling.py)


def _dense(q, kv, idx, sink, scale, lengths=None, extra=None):
    """float64: o = Σ e^s v / (Σ e^s + e^sink) over the listed valid rows, lse without the sink.

    ``extra`` = (extra_kv, extra_idx, extra_lengths) joins a second scope; indices outside
    [0, n) and lanes past the lengths are skipped."""
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), math.inf, dtype=torch.float64)
    scopes = [(kv, idx, lengths)] + ([extra] if extra is not None else [])
    for t in range(T):
        rows = []
        for src, ix, ln in scopes:
            k = ix.shape[1] if ln is None else max(0, min(int(ln[t]), ix.shape[1]))
            r = ix[t, :k]
            r = r[(r >= 0) & (r < src.shape[0])]
            rows.append(src[r].double())
        k = torch.cat(rows, 0)
        if len(k) == 0:
            continue
        s = q[t].double() @ k.T * scale                          # [H, n]
        e = torch.exp(s)
        out[t] = (e @ k) / (e.sum(-1) + torch.exp(sink.double()))[:, None]
        lse[t] = torch.logsumexp(s, -1)
    return out, lse


def _assert_matches_dense(out, lse, ref_o, ref_l, atol=1e-5):
    torch.testing.assert_close(out.double(), ref_o, atol=atol, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l))
    assert bool((lse[torch.isinf(lse)] > 0).all())
    fin = torch.isfinite(ref_l)
    torch.testing.assert_close(lse.double()[fin], ref_l[fin], atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# CPU: the reference and the registered CPU op
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,H,D,N,K", [(1, 1, 16, 5, 3), (7, 4, 64, 40, 12), (33, 3, 32, 200, 70)])
def test_matches_dense_formula(T, H, D, N, K):
    g = torch.Generator().manual_seed(T * 100 + K)
    q = torch.randn(T, H, D, generator=g)
    kv = torch.randn(N, D, generator=g)
    idx = torch.randint(0, N, (T, K), generator=g)
    idx[:, 0] = -1                                  # -1 at the front of a row
    idx[-1, 1:] = torch.randperm(N, generator=g)[:K - 1]   # distinct rows
    idx[0] = -1                                     # an all-invalid row
    sink = torch.randn(H, generator=g)
    out, lse = sparse_attn_reference(q, kv, idx, sink, D ** -0.5)
    ref_o, ref_l = _dense(q, kv, idx, sink, D ** -0.5)
    _assert_matches_dense(out, lse, ref_o, ref_l)
    assert (out[0] == 0).all() and (lse[0] == math.inf).all()


def test_sink_limits():
    q = torch.randn(3, 2, 8)
    kv = torch.randn(6, 8)
    idx = torch.tensor([[0, 1, 2], [3, -1, 5], [-1, -1, 4]])
    plain, lse = sparse_attn_reference(q, kv, idx, torch.full((2,), -math.inf), 0.3)
    for t in range(3):
        rows = idx[t][idx[t] >= 0]
        w = torch.softmax(q[t] @ kv[rows].T * 0.3, -1)
        torch.testing.assert_close(plain[t], w @ kv[rows], atol=1e-6, rtol=1e-5)
    out, lse2 = sparse_attn_reference(q, kv, idx, torch.full((2,), math.inf), 0.3)
    assert (out == 0).all() and torch.equal(lse, lse2)       # lse never includes the sink
    big, _ = sparse_attn_reference(q * 1e4, kv, idx, torch.zeros(2), 1.0)   # huge logits
    assert torch.isfinite(big).all()


def test_rejects_out_of_range_indices():
    q, kv = torch.randn(2, 1, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        sparse_attn_reference(q, kv, torch.tensor([[0], [3]]), torch.zeros(1), 1.0)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        sparse_attn_reference(q, kv, torch.tensor([[0], [-2]]), torch.zeros(1), 1.0)
    # Lanes past topk_length are never looked at, whatever they hold.
    out, _ = sparse_attn_reference(q, kv, torch.tensor([[0, 99], [1, -7]]), torch.zeros(1), 1.0,
                                   topk_length=torch.tensor([1, 1]))
    assert torch.isfinite(out).all()


def _random_case(T, H, D, N1, K1, N2=0, K2=0, seed=0, device="cpu", dtype=torch.float32,
                 lengths=True, sink_inf=True):
    """Inputs exercising the whole contract: two scopes, lengths with garbage tail lanes, -1 at
    the front (a whole first block), indices >= n and < -1, duplicates, all-invalid rows."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(T, H, D, generator=g) * 1.5).to(dtype)
    kv = torch.randn(N1, D, generator=g).to(dtype)

    def indices(N, K):
        idx = torch.randint(0, max(N, 1), (T, K), generator=g, dtype=torch.int32)
        if N == 0:
            idx.fill_(-1)
        u = torch.rand(T, K, generator=g)
        idx[u < 0.1] = -1
        idx[(u >= 0.1) & (u < 0.15)] = N + 3                      # past the end
        idx[(u >= 0.15) & (u < 0.18)] = -5                        # below -1
        idx[1::7, : min(K, 70)] = -1                              # first block (+) all -1
        if K > 4:
            idx[2::7, 1::3] = idx[2::7, :1]                       # duplicates
        idx[3::7] = -1                                            # all-invalid rows
        return idx

    def length(idx):
        K = idx.shape[1]
        ln = torch.randint(0, K + 1, (T,), generator=g, dtype=torch.int32)
        ln[0::5] = K
        ln[1::5] = -3                                             # clamps to 0
        ln[2::5] = K + 100                                        # clamps to K
        lanes = torch.arange(K)[None, :]
        tail = lanes >= ln[:, None].clamp_min(0)
        garbage = torch.randint(-(2**31), 2**31 - 1, (T, K), generator=g, dtype=torch.int32)
        garbage[:, ::2] = 0                                       # valid-looking garbage
        return ln, torch.where(tail, garbage, idx)

    idx1 = indices(N1, K1)
    len1 = None
    if lengths:
        len1, idx1 = length(idx1)
    extra = {}
    if K2 or N2:
        idx2 = indices(N2, K2)
        len2 = None
        if lengths:
            len2, idx2 = length(idx2)
        extra = dict(extra_kv=torch.randn(N2, D, generator=g).to(dtype), extra_indices=idx2,
                     extra_topk_length=len2)
    sink = torch.randn(H, generator=g) + 1
    if sink_inf and H >= 2:
        sink[0], sink[-1] = math.inf, -math.inf
    args = dict(q=q, kv=kv, indices=idx1, attn_sink=sink, softmax_scale=D ** -0.5,
                topk_length=len1, **extra)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _dense_of(a):
    extra = None
    if a.get("extra_kv") is not None:
        extra = (a["extra_kv"].cpu(), a["extra_indices"].cpu(),
                 None if a.get("extra_topk_length") is None else a["extra_topk_length"].cpu())
    return _dense(a["q"].cpu(), a["kv"].cpu(), a["indices"].cpu(), a["attn_sink"].cpu(),
                  a["softmax_scale"], None if a.get("topk_length") is None
                  else a["topk_length"].cpu(), extra)


@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("T,H,D,N1,K1,N2,K2", [(9, 3, 32, 50, 70, 0, 0), (14, 2, 16, 40, 65, 30, 9),
                                               (8, 1, 8, 0, 5, 20, 66)])
def test_op_two_scopes_lengths_and_invalid_indices(T, H, D, N1, K1, N2, K2, lengths):
    a = _random_case(T, H, D, N1, K1, N2, K2, seed=T + K1 + lengths, lengths=lengths)
    out, lse = torch.ops.dsv4.sparse_attn(**a)
    assert out.shape == (T, H, D) and lse.shape == (T, H) and lse.dtype == torch.float32
    ref_o, ref_l = _dense_of(a)
    _assert_matches_dense(out, lse, ref_o, ref_l)
    if N2 == 0:
        assert (lse[3::7] == math.inf).all()                        # all-invalid rows
    if H >= 2:
        assert (out[:, 0] == 0).all()                               # sink = +inf head


def test_op_skips_out_of_range_but_direct_reference_raises():
    q, kv = torch.randn(2, 2, 8), torch.randn(5, 8)
    idx = torch.tensor([[0, 5, 1], [-9, 2, 2]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\[-1, 5\)"):
        sparse_attn_reference(q, kv, idx, torch.zeros(2), 0.3)
    out, lse = torch.ops.dsv4.sparse_attn(q, kv, idx, torch.zeros(2), 0.3)
    clean = torch.where((idx >= 0) & (idx < 5), idx, -1)
    ref_o, ref_l = sparse_attn_reference(q, kv, clean, torch.zeros(2), 0.3)
    torch.testing.assert_close(out, ref_o)
    torch.testing.assert_close(lse, ref_l)


def test_op_two_scopes_equal_one_concatenated_scope():
    g = torch.Generator().manual_seed(3)
    q, kv1, kv2 = torch.randn(6, 4, 32, generator=g), torch.randn(20, 32, generator=g), \
        torch.randn(30, 32, generator=g)
    i1 = torch.randint(-1, 20, (6, 7), generator=g, dtype=torch.int32)
    i2 = torch.randint(-1, 30, (6, 11), generator=g, dtype=torch.int32)
    sink = torch.randn(4, generator=g)
    out, lse = torch.ops.dsv4.sparse_attn(q, kv1, i1, sink, 0.2, None, kv2, i2)
    cat = torch.cat([i1, torch.where(i2 >= 0, i2 + 20, -1)], 1)
    ref_o, ref_l = sparse_attn_reference(q, torch.cat([kv1, kv2]), cat, sink, 0.2)
    torch.testing.assert_close(out, ref_o)
    torch.testing.assert_close(lse, ref_l)


def test_reference_nan_in_an_unread_row_stays_out():
    # invalid / unused lanes gather row 0 with weight 0; a NaN in row 0 must not reach tokens
    # that never read row 0 (0 x NaN): only the tokens whose valid lanes list row 0 are NaN
    a = _random_case(29, 2, 16, 40, 24, seed=3)
    a["kv"][0, 5] = float("nan")
    out, lse = sparse_attn_reference(**a, skip_out_of_range=True)
    idx, ln = a["indices"].long(), a["topk_length"].clamp(0, a["indices"].shape[1]).long()
    used = torch.arange(idx.shape[1])[None, :] < ln[:, None]
    reads0 = ((idx == 0) & used).any(1)
    assert reads0.any() and not reads0.all()
    assert torch.equal(torch.isnan(out).any(-1).any(-1), reads0)
    clean = {**a, "kv": a["kv"].clone()}
    clean["kv"][0] = 0
    out0, lse0 = sparse_attn_reference(**clean, skip_out_of_range=True)
    torch.testing.assert_close(out[~reads0], out0[~reads0], rtol=0, atol=0)
    torch.testing.assert_close(lse[~reads0], lse0[~reads0], rtol=0, atol=0)


def test_op_empty_shapes():
    q = torch.randn(0, 2, 8)
    out, lse = torch.ops.dsv4.sparse_attn(q, torch.randn(3, 8), torch.zeros(0, 4, dtype=torch.int32),
                                          torch.zeros(2), 1.0)
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)
    q = torch.randn(3, 2, 8)
    for kv, idx in ((torch.randn(3, 8), torch.zeros(3, 0, dtype=torch.int32)),    # k = 0
                    (torch.randn(0, 8), torch.zeros(3, 4, dtype=torch.int32))):   # no kv rows
        out, lse = torch.ops.dsv4.sparse_attn(q, kv, idx, torch.zeros(2), 1.0)
        assert (out == 0).all() and (lse == math.inf).all()


def test_op_rejects_bad_arguments():
    q, kv = torch.randn(2, 2, 8), torch.randn(5, 8)
    idx = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises((ValueError, RuntimeError), match="shape mismatch"):
        torch.ops.dsv4.sparse_attn(q, kv, idx, torch.zeros(3), 1.0)
    with pytest.raises((ValueError, RuntimeError), match="given together"):
        torch.ops.dsv4.sparse_attn(q, kv, idx, torch.zeros(2), 1.0, None, kv)
    with pytest.raises((ValueError, RuntimeError), match="topk_length must have shape"):
        torch.ops.dsv4.sparse_attn(q, kv, idx, torch.zeros(2), 1.0, torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("name", ["topk_length", "extra_topk_length"])
@pytest.mark.parametrize("length", [[1.5, 2.0], [True, False]])
def test_op_rejects_lengths_that_are_not_integers(name, length):
    """A lane count is an integer (int32 on CUDA, any integer dtype for the reference): a float
    length was truncated (1.5 read as 1 lane) and a bool read as 0 / 1 lanes, silently."""
    q, kv = torch.randn(2, 2, 8), torch.randn(5, 8)
    idx = torch.zeros(2, 3, dtype=torch.int32)
    args = dict(topk_length=None, extra_kv=kv, extra_indices=idx, extra_topk_length=None)
    args[name] = torch.tensor(length)
    with pytest.raises((ValueError, RuntimeError),
                       match=rf"{name} must be an integer tensor, got torch\.(float32|bool)"):
        torch.ops.dsv4.sparse_attn(q, kv, idx, torch.zeros(2), 1.0, *args.values())


def test_public_wrapper_out_variant_cpu():
    a = _random_case(6, 2, 16, 30, 10, 20, 5, seed=11)
    out = torch.full((6, 2, 16), float("nan"))
    lse = torch.full((6, 2), float("nan"))
    o2, l2 = sparse_attn(**a, out=out, lse=lse)
    assert o2 is out and l2 is lse
    ref_o, ref_l = torch.ops.dsv4.sparse_attn(**a)
    torch.testing.assert_close(out, ref_o)
    torch.testing.assert_close(lse, ref_l)
    with pytest.raises(ValueError, match="both out and lse"):
        sparse_attn(**a, out=out)


def test_bf16_compute_is_a_coarser_version_of_the_reference():
    a = _random_case(10, 4, 64, 100, 40, seed=5, sink_inf=False)
    ref_o, ref_l = sparse_attn_reference(**a, skip_out_of_range=True)
    lo_o, lo_l = sparse_attn_reference(**a, skip_out_of_range=True, compute_dtype=torch.bfloat16)
    err = (lo_o - ref_o).abs().max().item()
    assert 0 < err < 0.1, err        # bf16 math is visibly but boundedly worse
    assert torch.equal(torch.isinf(lo_l), torch.isinf(ref_l))


def _opcheck_samples(device, dtype):
    return [
        _random_case(5, 2, 64, 30, 9, seed=1, device=device, dtype=dtype),
        _random_case(4, 3, 64, 20, 70, 25, 6, seed=2, device=device, dtype=dtype),
        _random_case(3, 1, 128, 10, 4, seed=3, device=device, dtype=dtype, lengths=False),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])])
def test_opcheck(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for a in _opcheck_samples(device, dtype):
        args = (a["q"], a["kv"], a["indices"], a["attn_sink"], a["softmax_scale"],
                a.get("topk_length"), a.get("extra_kv"), a.get("extra_indices"),
                a.get("extra_topk_length"))
        torch.library.opcheck(torch.ops.dsv4.sparse_attn.default, args)
        T, H, D = a["q"].shape
        out = torch.empty(T, H, D, dtype=dtype, device=device)
        lse = torch.empty(T, H, dtype=torch.float32, device=device)
        torch.library.opcheck(torch.ops.dsv4.sparse_attn_out.default, args,
                              dict(out=out, lse=lse))


# ---------------------------------------------------------------------------------------------
# CUDA kernel vs the fp32 reference
# ---------------------------------------------------------------------------------------------
needs_kernel = pytest.mark.skipif("sparse_attn" not in ext.info()["cuda_compiled_ops"],
                                  reason="dsv4._C built without the sparse_attn kernel")


def _poison_allocator(numel: int, dtype: torch.dtype) -> None:
    """Fill, then free, a block the caching allocator will hand to the op's outputs: an element
    the kernel does not write then reads NaN."""
    torch.full((numel,), float("nan"), dtype=dtype, device="cuda")


def _check_kernel(a, out_variant=False):
    """Kernel (bf16 in, bf16 out) vs the fp32 reference of the same bf16-rounded inputs:
    error <= 2x the error of the reference run in bf16 math (+ a tiny floor); inf/NaN
    positions equal; no poisoned element left."""
    q = a["q"]
    T, H, D = q.shape
    if out_variant:
        out = torch.full((T, H, D), float("nan"), dtype=torch.bfloat16, device="cuda")
        lse = torch.full((T, H), float("nan"), device="cuda")
        torch.ops.dsv4.sparse_attn_out(**a, out=out, lse=lse)
    else:
        _poison_allocator(T * H * D, torch.bfloat16)
        _poison_allocator(T * H, torch.float32)
        out, lse = torch.ops.dsv4.sparse_attn(**a)
    assert out.shape == (T, H, D) and out.dtype == torch.bfloat16
    assert lse.shape == (T, H) and lse.dtype == torch.float32
    fp32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v)
            for k, v in a.items()}
    ref_o, ref_l = sparse_attn_reference(**fp32, skip_out_of_range=True)
    lo_o, lo_l = sparse_attn_reference(**a, skip_out_of_range=True, compute_dtype=torch.bfloat16)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (poisoned) output"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l))
    assert bool((lse[torch.isinf(lse)] > 0).all())
    err_o = (out.float() - ref_o).abs().max().item()
    base_o = (lo_o.float() - ref_o).abs().max().item()
    assert err_o <= 2 * base_o + 1e-5, (err_o, base_o)
    fin = torch.isfinite(ref_l)
    if fin.any():
        err_l = (lse - ref_l)[fin].abs().max().item()
        base_l = (lo_l - ref_l)[fin].abs().max().item()
        assert err_l <= 2 * base_l + 1e-5, (err_l, base_l)
    if ref_o.abs().sum() > 0:
        cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref_o.flatten(), dim=0)
        assert cos.item() > 0.9999, cos.item()
    return out, lse


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("D", [64, 128, 512])
@pytest.mark.parametrize("H", [1, 4, 64, 128])
@pytest.mark.parametrize("scopes", ["main", "two"])
def test_cuda_matches_reference(D, H, scopes):
    if scopes == "main":
        a = _random_case(23, H, D, 300, 200, seed=D + H, device="cuda", dtype=torch.bfloat16)
    else:
        a = _random_case(23, H, D, 300, 130, 500, 77, seed=D * H, device="cuda",
                         dtype=torch.bfloat16)
    out, lse = _check_kernel(a)
    if H >= 2:
        assert (out[:, 0] == 0).all()                                # sink = +inf
    if scopes == "main":
        assert (lse[3::7] == math.inf).all()                         # all-invalid rows


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_cuda_decode_shapes_split_path(H, batch):
    # Few tokens, window 128 + compressed top-k: the kernel splits keys over CTAs and merges.
    T, D = 2 * batch, 512
    g = torch.Generator().manual_seed(batch * H)
    K2 = 512 if H == 64 else 1024
    a = _random_case(T, H, D, 128 * batch, 128, 2048 * batch, K2, seed=batch + H,
                     device="cuda", dtype=torch.bfloat16, sink_inf=False)
    seq = torch.arange(T) // 2
    a["indices"] = (seq[:, None] * 128 + torch.arange(128)).int().cuda()
    a["topk_length"] = torch.randint(1, 129, (T,), generator=g, dtype=torch.int32).cuda()
    a["extra_topk_length"] = torch.randint(0, K2 + 1, (T,), generator=g, dtype=torch.int32).cuda()
    for out_variant in (False, True):
        _check_kernel(a, out_variant)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("T,K2", [(1, 8000), (1, 4100), (3, 2000)])
def test_cuda_decode_many_splits(T, K2):
    """One to three decode tokens over window 128 + a long compressed list (up to 127 key
    blocks): more than 64 splits at T = 1, each of one or two blocks, merged by the combine
    kernel's split groups (ragged last group); lengths cut some splits empty."""
    D, H = 512, 64
    g = torch.Generator().manual_seed(K2 + T)
    a = _random_case(T, H, D, 128 * T, 128, 3 * K2, K2, seed=K2 + T, device="cuda",
                     dtype=torch.bfloat16, sink_inf=False)
    a["indices"] = (torch.arange(T)[:, None] * 128 + torch.arange(128)).int().cuda()
    ln2 = torch.randint(K2 // 2, K2 + 1, (T,), generator=g, dtype=torch.int32)
    ln2[0] = K2
    a["extra_topk_length"] = ln2.cuda()
    for out_variant in (False, True):
        _check_kernel(a, out_variant)


# FP8 (MODEL1) caches: both kernels (DSV4_SPARSE_FP8 = old / new) against the fp32 reference
# of the same FP8 bytes, and bit-equal to each other (the new kernel keeps the old one's math).
def _fp8_pools(a, bs1=64, bs2=64):
    """``a`` with kv / extra_kv replaced by MODEL1 FP8 pools (block sizes bs1 / bs2) holding
    the same rows, quantised (dsv4.ops.kv_cache, the writers' format)."""
    from dsv4.ops import kv_cache as kc
    out = dict(a)
    for name, bs in (("kv", bs1), ("extra_kv", bs2)):
        x = a.get(name)
        if x is None:
            continue
        n = x.shape[0]
        assert n % bs == 0, (name, n, bs)
        pool = kc.allocate(kc.MODEL1, n // bs, bs, x.shape[1], device=x.device)
        r = torch.arange(n, device=x.device)
        kc.write_entries(pool, r // bs, r % bs, x.float())
        out[name] = pool
    return out


@pytest.mark.cuda
@needs_kernel
@needs_sm90
@pytest.mark.parametrize("H,K2", [(64, 512), (128, 1024)])
@pytest.mark.parametrize("batch", [1, 2, 64, 128])
def test_cuda_fp8_decode_both_kernels(H, K2, batch, monkeypatch):
    """Decode (2 queries per sequence, b up to 128): window 128 (pages of 256) + compressed
    top-K2 (pages of 64) from FP8 pools; -1 / out-of-range / duplicate indices, garbage lanes
    past the lengths, extra lengths 0..K2 crossing every 64-key block boundary; split path at
    small batch, poisoned outputs."""
    T, D, N2 = 2 * batch, 512, 4096
    g = torch.Generator().manual_seed(7 * batch + H)
    a = _random_case(T, H, D, 256 * batch, 128, N2, K2, seed=batch + 3 * H, device="cuda",
                     dtype=torch.bfloat16, sink_inf=batch == 1)
    seq = torch.arange(T) // 2
    win = (seq[:, None] * 256 + 128 + torch.arange(128)).int()
    win[0, :70] = -1                                              # before position 0
    a["indices"] = win.cuda()
    a["topk_length"] = torch.randint(1, 129, (T,), generator=g, dtype=torch.int32).cuda()
    ln2 = torch.randint(0, K2 + 1, (T,), generator=g, dtype=torch.int32)
    ln2[0], ln2[-1] = 0, K2
    a["extra_topk_length"] = ln2.cuda()
    out, lse = both_fp8_kernels(_check_kernel, _fp8_pools(a, 256, 64), monkeypatch)
    if batch == 1 and H >= 2:
        assert (out[:, 0] == 0).all()                                # sink = +inf


@pytest.mark.cuda
@needs_kernel
@needs_sm90
@pytest.mark.parametrize("H", [3, 64, 128])
def test_cuda_fp8_prefill_shapes_both_kernels(H, monkeypatch):
    """Many tokens (no split): the contract cases of _random_case (all-invalid rows, a whole
    first block of -1, indices >= n and < -1) over FP8 pools, partial head tiles."""
    a = _random_case(300, H, 512, 640, 200, 512, 77, seed=H, device="cuda",
                     dtype=torch.bfloat16)
    out, lse = both_fp8_kernels(_check_kernel, _fp8_pools(a), monkeypatch)
    assert (lse[3::7] == math.inf).all()                             # all-invalid rows


@pytest.mark.cuda
@needs_kernel
@needs_sm90
def test_cuda_fp8_many_tokens_grid_limit(monkeypatch):
    """70,000 query tokens (> 65535: grid.x only) over FP8 pools, both kernels."""
    a = _random_case(70000, 1, 512, 640, 24, 128, 8, seed=11, device="cuda",
                     dtype=torch.bfloat16, sink_inf=False)
    both_fp8_kernels(_check_kernel, _fp8_pools(a), monkeypatch, out_variants=(False,))


def _fp8_kernel_names(a):
    """The sparse_attn kernels one call on ``a`` launches (CUDA profiler)."""
    return cuda_kernel_names(lambda: torch.ops.dsv4.sparse_attn(**a), "sparse_attn")


@pytest.mark.cuda
@needs_kernel
@needs_sm90
@pytest.mark.parametrize("setting", [None, "auto"])
def test_cuda_fp8_auto_picks_the_kernel_by_grid_size(setting, monkeypatch):
    """Unset (or ``auto``), DSV4_SPARSE_FP8 picks the warp-specialised kernel when the grid has
    more (token, 64-head tile) CTAs than the GPU has SMs and the wgmma kernel otherwise; ``old``
    and ``new`` force theirs."""
    if setting is None:
        monkeypatch.delenv("DSV4_SPARSE_FP8", raising=False)
    else:
        monkeypatch.setenv("DSV4_SPARSE_FP8", setting)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    small = _fp8_pools(_random_case(4, 64, 512, 256, 64, seed=5, device="cuda",
                                    dtype=torch.bfloat16))
    big = _fp8_pools(_random_case(sms + 1, 64, 512, 256, 64, seed=6, device="cuda",
                                  dtype=torch.bfloat16))
    names = _fp8_kernel_names(small)
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels (no CUPTI)")
    assert not any("fp8_ws" in n for n in names), names
    assert any("fp8_ws" in n for n in _fp8_kernel_names(big))
    monkeypatch.setenv("DSV4_SPARSE_FP8", "old")
    assert not any("fp8_ws" in n for n in _fp8_kernel_names(big))
    monkeypatch.setenv("DSV4_SPARSE_FP8", "new")
    assert any("fp8_ws" in n for n in _fp8_kernel_names(small))


@pytest.mark.cuda
@needs_kernel
@needs_sm90
def test_cuda_fp8_kernel_switch_rejects_bad_values(monkeypatch):
    a = _fp8_pools(_random_case(4, 64, 512, 64, 16, seed=2, device="cuda", dtype=torch.bfloat16))
    monkeypatch.setenv("DSV4_SPARSE_FP8", "fast")
    with pytest.raises(RuntimeError,
                       match="DSV4_SPARSE_FP8 must be 'auto', 'old', 'new' or 'new2'"):
        torch.ops.dsv4.sparse_attn(**a)


@pytest.mark.cuda
@needs_kernel
@needs_sm90
@pytest.mark.parametrize("H,K2,batch", [(64, 512, 2), (128, 1024, 64)])
def test_cuda_fp8_nan_codes_give_nan_where_the_reference_does(H, K2, batch, monkeypatch):
    """A NaN activation that reached the cache (e4m3 NaN codes 0x7f in a window key, 0xff in
    the last nope dim of a compressed key, written by dsv4.ops.kv_cache): both FP8 kernels give
    NaN in exactly the output rows (and lse) where the fp32 reference does, i.e. the tokens
    that read those keys, and the tolerance rule elsewhere; the two kernels agree bit for bit
    (a NaN equals any NaN). Split path at batch 2; sinks +-inf included."""
    from _fp8_nan import (assert_nan_where_reference, assert_same_bits_nan_equal,
                          poison_allocator, tokens_reading, write_nan)
    T = 2 * batch
    g = torch.Generator().manual_seed(17 * batch + H)
    a = _random_case(T, H, 512, 256 * batch, 128, 4096, K2, seed=batch + 5 * H, device="cuda",
                     dtype=torch.bfloat16)
    seq = torch.arange(T) // 2
    a["indices"] = (seq[:, None] * 256 + 128 + torch.arange(128)).int().cuda()
    a["topk_length"] = torch.randint(1, 129, (T,), generator=g, dtype=torch.int32).cuda()
    a["topk_length"][2:4] = 128
    ln2 = torch.randint(0, K2 + 1, (T,), generator=g, dtype=torch.int32)
    ln2[-1] = K2
    a["extra_topk_length"] = ln2.cuda()
    a = _fp8_pools(a, 256, 64)
    k1 = 1 * 256 + 128 + 5                                   # sequence 1's window: tokens 2, 3
    # k2: the compressed key fewest tokens read (at least one). Not key 0: the reference
    # gathers row 0 for invalid lanes (weight 0, but 0 * NaN = NaN), so a NaN there also
    # reaches tokens that do not read it.
    e, used = a["extra_indices"].cpu().long(), torch.arange(K2)[None, :] < ln2[:, None]
    reads = torch.zeros(T, 4096, dtype=torch.bool)
    reads[torch.arange(T)[:, None].expand_as(e)[used & (e > 0) & (e < 4096)],
          e[used & (e > 0) & (e < 4096)]] = True
    count = reads.sum(0)
    k2 = int(torch.where(count > 0, count, T + 1).argmin())
    write_nan(a["kv"], k1, 5, negative=False)
    write_nan(a["extra_kv"], k2, 447, negative=True)
    nan_tokens = (tokens_reading(a["indices"], a["topk_length"], k1) |
                  tokens_reading(a["extra_indices"], a["extra_topk_length"], k2))
    fp32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v)
            for k, v in a.items()}
    ref_o, ref_l = sparse_attn_reference(**fp32, skip_out_of_range=True)
    lo_o, lo_l = sparse_attn_reference(**a, skip_out_of_range=True, compute_dtype=torch.bfloat16)
    res = {}
    for kernel in FP8_KERNELS:
        monkeypatch.setenv("DSV4_SPARSE_FP8", kernel)
        poison_allocator(T * H * 512, torch.bfloat16)
        poison_allocator(T * H, torch.float32)
        out, lse = torch.ops.dsv4.sparse_attn(**a)
        assert_nan_where_reference(out, lse, ref_o, ref_l, lo_o, lo_l, nan_tokens)
        res[kernel] = out, lse
    for kernel in FP8_KERNELS[1:]:
        assert_same_bits_nan_equal(res["old"][0], res[kernel][0])
        assert_same_bits_nan_equal(res["old"][1], res[kernel][1])


@pytest.mark.cuda
@needs_kernel
def test_cuda_out_variant_poisoned_buffers():
    a = _random_case(17, 64, 512, 400, 150, 300, 70, seed=9, device="cuda", dtype=torch.bfloat16)
    _check_kernel(a, out_variant=True)


@pytest.mark.cuda
@needs_kernel
def test_cuda_many_tokens_grid_limit():
    # T > 65535 query tokens over a few hundred keys (FlashMLA #182: s_q on gridDim.y).
    a = _random_case(70000, 1, 64, 400, 300, seed=7, device="cuda", dtype=torch.bfloat16,
                     sink_inf=False)
    _check_kernel(a)


@pytest.mark.cuda
@needs_kernel
def test_cuda_strided_and_misaligned_inputs():
    a = _random_case(9, 4, 128, 200, 70, 100, 30, seed=4, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(200, 128 + 64, device="cuda").bfloat16()
    a["kv"] = base[:, 32:160]                     # row stride 192 (> D), aligned
    a["extra_kv"] = torch.randn(100 * 128 + 1, device="cuda").bfloat16()[1:].view(100, 128)
    a["q"] = a["q"].transpose(0, 1).contiguous().transpose(0, 1)   # [T, H, D] with H outer
    a["indices"] = a["indices"].t().contiguous().t()               # column-major indices
    _check_kernel(a)


@pytest.mark.cuda
@needs_kernel
def test_cuda_sink_limits_and_empty_rows():
    a = _random_case(12, 8, 512, 100, 64, seed=8, device="cuda", dtype=torch.bfloat16)
    a["indices"][0] = -1
    a["indices"][1, :] = 100                      # all >= n_kv
    a["topk_length"] = None
    a["attn_sink"] = torch.tensor([math.inf, -math.inf] * 4, device="cuda")
    out, lse = _check_kernel(a)
    assert (out[:2] == 0).all() and (lse[:2] == math.inf).all()
    assert (out[:, 0::2] == 0).all()              # sink = +inf heads


@pytest.mark.cuda
@needs_kernel
def test_cuda_rejects_unsupported_inputs():
    a = _random_case(4, 2, 64, 20, 8, seed=1, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="q must be bfloat16"):
        torch.ops.dsv4.sparse_attn(**{**a, "q": a["q"].float()})
    with pytest.raises(RuntimeError, match="kv must be bfloat16"):
        torch.ops.dsv4.sparse_attn(**{**a, "kv": a["kv"].float()})
    with pytest.raises(RuntimeError, match="indices must be int32"):
        torch.ops.dsv4.sparse_attn(**{**a, "indices": a["indices"].long()})
    with pytest.raises(RuntimeError, match="head_dim must be 64, 128, 256 or 512"):
        torch.ops.dsv4.sparse_attn(**{**a, "q": a["q"][..., :32], "kv": a["kv"][:, :32]})
    with pytest.raises(RuntimeError, match="attn_sink must be float32"):
        torch.ops.dsv4.sparse_attn(**{**a, "attn_sink": a["attn_sink"].bfloat16()})
    out = torch.empty(4, 2, 64, device="cuda")
    with pytest.raises(RuntimeError, match="out must be bfloat16"):
        torch.ops.dsv4.sparse_attn_out(**a, out=out, lse=torch.empty(4, 2, device="cuda"))
