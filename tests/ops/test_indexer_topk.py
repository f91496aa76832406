"""torch.ops.dsv4.indexer_topk: the reference's ordering contract (CPU), the CUDA kernel against
fp64 scores of the same bf16 inputs (GPU), and torch.library.opcheck of both ops."""

from __future__ import annotations

import math

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
import dsv4.ops._ext as ext
from dsv4.layers.indexer import indexer_topk_reference as layer_reference
from dsv4.ops.indexer import (
    indexer_topk,
    indexer_topk_out,
    indexer_topk_reference,
    indexer_topk_varlen_reference,
)


def _gen(device, seed=None):
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return g


def make_inputs(T, B, C, H=64, D=128, device="cpu", integer=False, seed=None):
    """q [T,H,D] bf16, weights [T,H] fp32, keys [B,C,D] bf16. integer=True: small integers and
    power-of-two weights, so every score is exact in fp32 whatever the summation order."""
    g = _gen(device, seed)
    if integer:
        q = torch.randint(-3, 4, (T, H, D), generator=g, device=device).to(torch.bfloat16)
        keys = torch.randint(-3, 4, (B, C, D), generator=g, device=device).to(torch.bfloat16)
        choices = torch.tensor([0.25, 0.5, 1.0, 2.0, -0.5, -1.0], device=device)
        w = choices[torch.randint(0, 6, (T, H), generator=g, device=device)]
    else:
        q = torch.randn(T, H, D, generator=g, device=device).to(torch.bfloat16)
        keys = torch.randn(B, C, D, generator=g, device=device).to(torch.bfloat16)
        w = (torch.rand(T, H, generator=g, device=device) * 2 - 1) * 0.125
    return q, w, keys


def i32(x, device="cpu"):
    return torch.as_tensor(x, dtype=torch.int32, device=device)


def fp64_scores(q, w, keys, rows, n_valid):
    """[T, C] fp64 scores of the bf16 inputs (NaN kept); visible mask [T, C]."""
    kd = keys.double()[rows.long()]                                    # [T, C, D]
    dots = torch.einsum("thd,tcd->thc", q.double(), kd)
    s = (torch.where(dots < 0, 0.0, dots) * w.double()[:, :, None]).sum(1)  # ReLU keeps NaN
    bound = (torch.einsum("thd,tcd->thc", q.double().abs(), kd.abs()) * w.double().abs()[:, :, None]).sum(1)
    C = keys.shape[1]
    nv = n_valid.long().clamp(0, C)
    visible = torch.arange(C, device=q.device)[None, :] < nv[:, None]
    return s, visible, bound


def brute_force(q, w, keys, rows, n_valid, topk):
    """Independent per-query Python sort by (-score, index) over fp64 scores (exact inputs)."""
    s, visible, _ = fp64_scores(q, w, keys, rows, n_valid)
    out = torch.full((q.shape[0], topk), -1, dtype=torch.int32)
    for t in range(q.shape[0]):
        cand = [c for c in range(s.shape[1]) if visible[t, c] and not math.isnan(s[t, c].item())]
        cand.sort(key=lambda c: (-s[t, c].item(), c))
        for i, c in enumerate(cand[:topk]):
            out[t, i] = c
    return out


def check_selection(idx, q, w, keys, rows, n_valid, topk):
    """Selected SETS against fp64 scores: swaps only between scores equal within fp32 rounding.

    Exact -1 padding count, valid distinct non-NaN indices, descending order and the set
    property (no unselected score above the smallest selected one) within a tolerance that
    bounds the fp32 summation error (Σ|terms| · (D + H) · 2^-24 · 4)."""
    T, K = idx.shape
    assert K == topk and idx.dtype == torch.int32
    s, visible, bound = fp64_scores(q, w, keys, rows, n_valid)
    ok = visible & ~torch.isnan(s)
    m = ok.sum(1).clamp(max=topk)                                          # expected count
    pos = torch.arange(topk, device=idx.device)[None, :]
    filled = pos < m[:, None]
    idx = idx.long()
    assert bool(((idx >= 0) == filled).all()), "wrong number of indices / -1 padding"
    assert bool((idx[~filled] == -1).all()), "padding must be -1"
    safe = idx.clamp(min=0)
    assert bool((safe < keys.shape[1]).all())
    assert bool(ok.gather(1, safe)[filled].all()), "selected an invisible or NaN entry"
    srt = torch.where(filled, idx, -1 - pos).sort(1).values                # distinct if valid
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "repeated index"
    b = torch.where(torch.isfinite(bound), bound, 0.0)
    tol = 4 * (q.shape[2] + q.shape[1]) * 2.0**-24 * b.amax(1) + 1e-30    # [T]
    sel = s.gather(1, safe)
    sel_f = torch.where(filled, sel, math.inf)
    if topk > 1:  # descending within tol
        later = torch.where(filled[:, 1:], sel[:, 1:], -math.inf)
        assert bool((later <= sel_f[:, :-1] + tol[:, None]).all()), "not in descending order"
    min_sel = sel_f.amin(1)
    C = keys.shape[1]
    chosen = torch.zeros(T, C + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(1, torch.where(filled, idx, C), True)  # padding goes to a dummy column
    rest = torch.where(ok & ~chosen[:, :C], s, -math.inf).amax(1)
    assert bool((rest <= min_sel + tol).all()), "an unselected score beats a selected one"


# ---------------------------------------------------------------------------------------------
# CPU: the reference's contract
# ---------------------------------------------------------------------------------------------
def test_reference_matches_brute_force_on_exact_scores():
    q, w, keys = make_inputs(9, 3, 40, H=8, D=64, integer=True)
    rows = i32([0, 1, 2, 2, 1, 0, 2, 1, 0])
    n_valid = i32([0, 1, 3, 4, 5, 40, 39, 17, 100])                        # 100 clamps to 40
    for topk in (1, 4, 8, 50):
        got = indexer_topk_varlen_reference(q, w, keys, rows, n_valid, topk)
        assert got.dtype == torch.int32 and got.shape == (9, topk)
        assert torch.equal(got, brute_force(q, w, keys, rows, n_valid, topk))


def test_reference_ties_lowest_index_first_and_signed_zero():
    # every score is +0 or -0 (negative weights): all tie, lowest indices first
    q, _, _ = make_inputs(2, 1, 1, H=4, D=64)
    w = torch.tensor([[1.0, -1.0, 2.0, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    keys = torch.zeros(1, 30, 64, dtype=torch.bfloat16)
    got = indexer_topk_varlen_reference(q, w, keys, i32([0, 0]), i32([30, 7]), 10)
    assert got[0].tolist() == list(range(10))
    assert got[1].tolist() == list(range(7)) + [-1] * 3


def test_reference_nan_never_selected_and_minus_inf_is_a_value():
    q = torch.ones(1, 1, 64, dtype=torch.bfloat16)
    keys = torch.zeros(1, 6, 64, dtype=torch.bfloat16)
    keys[0, 1, 0] = float("nan")
    keys[0, 3, 0] = 5.0
    keys[0, 4, 0] = 5.0
    w = torch.tensor([[-math.inf]])
    # scores: [nan(0*-inf), nan, nan, -inf, -inf, nan]: -inf entries 3 and 4 are returned
    got = indexer_topk_varlen_reference(q, w, keys, i32([0]), i32([6]), 4)
    assert got.tolist() == [[3, 4, -1, -1]]
    w = torch.tensor([[1.0]])  # scores [0, nan, 0, 5, 5, 0]
    got = indexer_topk_varlen_reference(q, w, keys, i32([0]), i32([6]), 6)
    assert got.tolist() == [[3, 4, 0, 2, 5, -1]]


def test_reference_fewer_than_topk_and_n_valid_zero():
    q, w, keys = make_inputs(4, 2, 10, H=4, D=64)
    got = indexer_topk_varlen_reference(q, w, keys, i32([0, 1, 1, 0]), i32([0, -3, 3, 10]), 5)
    assert (got[0] == -1).all() and (got[1] == -1).all()
    assert (got[2, :3] >= 0).all() and set(got[2, :3].tolist()) == {0, 1, 2}
    assert (got[2, 3:] == -1).all()
    assert (got[3] >= 0).all()


def test_reference_rejects_bad_rows_and_shapes():
    q, w, keys = make_inputs(2, 2, 8, H=4, D=64)
    with pytest.raises(ValueError, match="rows must lie in"):
        indexer_topk_varlen_reference(q, w, keys, i32([0, 2]), i32([1, 1]), 2)
    with pytest.raises(ValueError, match="weights must be"):
        indexer_topk_varlen_reference(q, w[:, :3], keys, i32([0, 1]), i32([1, 1]), 2)


def test_layer_reference_is_int64_and_agrees_with_the_op():
    q, w, keys = make_inputs(37, 1, 9, H=4, D=64, integer=True)
    pos = torch.arange(37)
    got = layer_reference(q, w, keys[0], pos, 4, 5)
    assert got.dtype == torch.int64 and got.shape == (37, 5)
    ref = indexer_topk_varlen_reference(q, w, keys, torch.zeros(37, dtype=torch.int32),
                                        ((pos + 1) // 4).to(torch.int32), 5)
    assert torch.equal(got, ref.long())
    assert indexer_topk_reference is layer_reference


def test_op_cpu_contract_and_errors():
    q, w, keys = make_inputs(5, 2, 300, H=16, D=64, integer=True)
    rows, nv = i32([0, 1, 0, 1, 0]), i32([300, 129, 128, 127, 0])
    got = indexer_topk(q, w, keys, rows, nv, 8)
    assert torch.equal(got, brute_force(q, w, keys, rows, nv, 8))
    out = torch.full((5, 8), 12345, dtype=torch.int32)
    indexer_topk_out(q, w, keys, rows, nv, 8, out)
    assert torch.equal(out, got)
    q96 = torch.zeros(5, 16, 96, dtype=torch.bfloat16)
    with pytest.raises((ValueError, RuntimeError), match="head_dim must be"):
        indexer_topk(q96, w, torch.zeros(2, 4, 96, dtype=torch.bfloat16), rows, nv, 8)
    for bad_k in (0, 2049):
        with pytest.raises((ValueError, RuntimeError), match="topk must be in"):
            indexer_topk(q, w, keys, rows, nv, bad_k)
    with pytest.raises((ValueError, RuntimeError), match="int32"):
        indexer_topk(q, w, keys, rows.long(), nv, 8)


def test_check_selection_accepts_reference_and_rejects_corruption():
    """The set checker used by the CUDA tests must be able to fail."""
    q, w, keys = make_inputs(4, 2, 700, H=16, D=64)
    rows, nv = i32([0, 1, 1, 0]), i32([700, 300, 5, 0])
    ref = indexer_topk_varlen_reference(q, w, keys, rows, nv, 64)
    check_selection(ref, q, w, keys, rows, nv, 64)
    s, _, _ = fp64_scores(q, w, keys, rows, nv)
    worst = s[0, :700].argmin().item()
    corrupt = [ref.clone() for _ in range(5)]
    corrupt[0][0, 10] = worst                       # a low score in the set
    corrupt[1][2, 5] = 3                            # a padding slot filled (5 visible entries)
    corrupt[2][1, 0], corrupt[2][1, 63] = ref[1, 63], ref[1, 0]   # order broken
    corrupt[3][2, 4] = -1                           # one visible entry missing
    corrupt[4][0, 1] = ref[0, 0]                    # repeated index
    for bad in corrupt:
        with pytest.raises(AssertionError):
            check_selection(bad, q, w, keys, rows, nv, 64)


# ---------------------------------------------------------------------------------------------
# CUDA kernel vs fp64 scores
# ---------------------------------------------------------------------------------------------
needs_kernel = pytest.mark.skipif(not ext.HAS_C, reason="dsv4._C not built")
cuda = [pytest.mark.cuda, needs_kernel]


@pytest.fixture(params=["tree", "hist"])
def merge(request, monkeypatch):
    """How the kernel merges split key ranges (DSV4_INDEXER_TOPK_MERGE, read at each call):
    the candidate-list tree, or the histogram select for every decode plan with splits. The
    default ("auto") takes the histogram select beyond 16 splits; all give the same indices."""
    monkeypatch.setenv("DSV4_INDEXER_TOPK_MERGE", request.param)
    return request.param


@pytest.fixture(params=["auto", "tree", "hist"])
def merge3(request, monkeypatch):
    """As ``merge``, plus the default (unset: auto)."""
    if request.param == "auto":
        monkeypatch.delenv("DSV4_INDEXER_TOPK_MERGE", raising=False)
    else:
        monkeypatch.setenv("DSV4_INDEXER_TOPK_MERGE", request.param)
    return request.param


@pytest.fixture(params=["wgmma", "mma"])
def scan(request, monkeypatch):
    """The decode scan: on wgmma (the default where eligible: sm_90, head_dim 128, <= 128 heads)
    or on mma.sync (DSV4_INDEXER_WGMMA=0, read at each call); both give the same indices."""
    if request.param == "wgmma":
        monkeypatch.delenv("DSV4_INDEXER_WGMMA", raising=False)
    else:
        monkeypatch.setenv("DSV4_INDEXER_WGMMA", "0")
    return request.param


def _run_cuda(q, w, keys, rows, n_valid, topk):
    out = torch.full((q.shape[0], topk), 0x7F7F7F7F, dtype=torch.int32, device=q.device)  # poison
    indexer_topk_out(q, w, keys, rows, n_valid, topk, out)
    got = indexer_topk(q, w, keys, rows, n_valid, topk)
    assert torch.equal(out, got), "out-variant and functional op differ"
    return got


@pytest.mark.parametrize("D,H", [(128, 64), (64, 8), (64, 16), (128, 1), (128, 100)])
@pytest.mark.parametrize("topk", [1, 4, 8, 512, 1024])
@pytest.mark.cuda
@needs_kernel
def test_cuda_lengths_decode(D, H, topk, merge):
    lens = [0, 1, 3, 4, 5, 127, 128, 129, 3000, 5000]
    B = len(lens)
    q, w, keys = make_inputs(B, B, 5000, H=H, D=D, device="cuda")
    rows = i32(list(range(B))[::-1], "cuda")
    nv = i32(lens, "cuda")
    got = _run_cuda(q, w, keys, rows, nv, topk)
    check_selection(got, q, w, keys, rows, nv, topk)


@pytest.mark.parametrize("topk", [4, 8, 512])
@pytest.mark.cuda
@needs_kernel
def test_cuda_exact_scores_equal_reference(topk, merge, scan):
    """Integer data: scores are exact, so the kernel must equal the reference bit for bit."""
    q, w, keys = make_inputs(12, 4, 3000, device="cuda", integer=True)
    rows = i32([0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3], "cuda")
    nv = i32([0, 1, 3, 5, 127, 128, 129, 1000, 2999, 3000, 2048, 4000], "cuda")
    got = _run_cuda(q, w, keys, rows, nv, topk)
    ref = indexer_topk_varlen_reference(q.cpu(), w.cpu(), keys.cpu(), rows.cpu(), nv.cpu(), topk)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("topk", [8, 512])
@pytest.mark.cuda
@needs_kernel
def test_cuda_prefill_varlen_causal(topk):
    """Two sequences (lengths not multiples of 8) with causal n_valid, exact integer scores."""
    lens = [515, 333]
    rows = torch.cat([torch.full((n,), b, dtype=torch.int32) for b, n in enumerate(lens)])
    nv = torch.cat([(torch.arange(n) + 1) // 4 for n in lens]).to(torch.int32)
    q, w, keys = make_inputs(sum(lens), 2, max(lens) // 4, device="cuda", integer=True)
    got = _run_cuda(q, w, keys, rows.cuda(), nv.cuda(), topk)
    ref = indexer_topk_varlen_reference(q.cpu(), w.cpu(), keys.cpu(), rows, nv, topk)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.cuda
@needs_kernel
def test_cuda_long_decode_split_merge(merge3):
    """Few queries, long rows: the key range is split over CTAs and merged (two-level tree)."""
    q, w, keys = make_inputs(3, 3, 65536, device="cuda")
    rows, nv = i32([2, 0, 1], "cuda"), i32([65536, 40001, 1025], "cuda")
    for topk in (512, 1024, 2048):
        got = _run_cuda(q, w, keys, rows, nv, topk)
        check_selection(got, q, w, keys, rows, nv, topk)
        for _ in range(2):  # deterministic across relaunches
            assert torch.equal(indexer_topk(q, w, keys, rows, nv, topk), got)


@pytest.mark.parametrize("T", [3, 64])
@pytest.mark.cuda
@needs_kernel
def test_cuda_all_equal_scores_give_lowest_indices(T, merge):
    q, w, _ = make_inputs(T, 1, 1, device="cuda")
    keys = torch.zeros(1, 3000, 128, dtype=torch.bfloat16, device="cuda")
    nv = torch.full((T,), 3000, dtype=torch.int32, device="cuda")
    got = _run_cuda(q, w, keys, torch.zeros_like(nv), nv, 512)
    assert torch.equal(got, torch.arange(512, dtype=torch.int32, device="cuda").expand(T, 512))


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.cuda
@needs_kernel
def test_cuda_ties_at_threshold(T, merge):
    """sglang #30645: seq 8320, topk 2048, 100 distinct winners + 8220 exact zeros."""
    n, topk = 8320, 2048
    q = torch.ones(T, 64, 128, dtype=torch.bfloat16, device="cuda")
    w = torch.full((T, 64), 0.5, device="cuda")
    keys = torch.zeros(1, n, 128, dtype=torch.bfloat16, device="cuda")
    winners = torch.randperm(n, device="cuda")[:100]
    keys[0, winners, torch.arange(100, device="cuda") % 128] = torch.arange(
        1, 101, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    nv = torch.full((T,), n, dtype=torch.int32, device="cuda")
    got = _run_cuda(q, w, keys, torch.zeros_like(nv), nv, topk)
    zeros = torch.ones(n, dtype=torch.bool, device="cuda")
    zeros[winners] = False
    expected = torch.cat([winners.flip(0), zeros.nonzero().flatten()[:topk - 100]]).to(torch.int32)
    assert torch.equal(got, expected.expand(T, topk))


@pytest.mark.cuda
@needs_kernel
def test_cuda_low_mantissa_bits(merge):
    """Scores that share their top 16 bits (tilelang #1351, sglang #37591), many exact ties."""
    n, topk = 20000, 1024
    q = torch.zeros(2, 1, 128, dtype=torch.bfloat16, device="cuda")
    q[:, 0, 0], q[:, 0, 1], q[:, 0, 2] = 1.0, 2.0**-8, 2.0**-16
    keys = torch.zeros(1, n, 128, dtype=torch.bfloat16, device="cuda")
    keys[0, :, 0] = 1.0
    keys[0, :, 1] = torch.randint(0, 16, (n,), device="cuda").to(torch.bfloat16)
    keys[0, :, 2] = torch.randint(0, 256, (n,), device="cuda").to(torch.bfloat16)
    w = torch.ones(2, 1, device="cuda")
    rows, nv = i32([0, 0], "cuda"), i32([n, n - 7], "cuda")
    got = _run_cuda(q, w, keys, rows, nv, topk)
    ref = indexer_topk_varlen_reference(q.cpu(), w.cpu(), keys.cpu(), rows.cpu(), nv.cpu(), topk)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("T", [2, 128])
@pytest.mark.cuda
@needs_kernel
def test_cuda_nan_keys_never_selected(T, merge):
    q, w, keys = make_inputs(T, 1, 4000, device="cuda", integer=True)
    bad = torch.rand(4000, device="cuda") < 0.1
    keys[0, bad, 5] = float("nan")
    nv = (torch.arange(T, device="cuda") * 31 if T > 2 else torch.tensor([4000, 2000], device="cuda")).to(torch.int32)
    rows = torch.zeros_like(nv)
    got = _run_cuda(q, w, keys, rows, nv, 512)
    ref = indexer_topk_varlen_reference(q.cpu(), w.cpu(), keys.cpu(), rows.cpu(), nv.cpu(), 512)
    assert torch.equal(got.cpu(), ref)
    sel = got[got >= 0].long()
    assert not bool(bad[sel].any())


@pytest.mark.cuda
@needs_kernel
def test_cuda_all_n_valid_zero_batch_32():
    q, w, keys = make_inputs(32, 32, 64, device="cuda")
    nv = torch.zeros(32, dtype=torch.int32, device="cuda")
    got = _run_cuda(q, w, keys, torch.arange(32, dtype=torch.int32, device="cuda"), nv, 512)
    assert bool((got == -1).all())


@pytest.mark.cuda
@needs_kernel
def test_cuda_70000_queries():
    T = 70000
    q, w, keys = make_inputs(T, 4, 64, H=8, D=64, device="cuda", integer=True)
    rows = torch.randint(0, 4, (T,), device="cuda", dtype=torch.int32)
    nv = torch.randint(0, 71, (T,), device="cuda", dtype=torch.int32)
    got = _run_cuda(q, w, keys, rows, nv, 8)
    ref = indexer_topk_varlen_reference(q.cpu(), w.cpu(), keys.cpu(), rows.cpu(), nv.cpu(), 8)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.cuda
@needs_kernel
def test_cuda_strided_and_misaligned_layouts():
    """A key store sliced from a larger buffer (kept as is) and a misaligned one (copied)."""
    q, w, big = make_inputs(6, 3, 1000, device="cuda", integer=True)
    rows, nv = i32([0, 1, 2, 0, 1, 2], "cuda"), i32([600, 599, 3, 0, 129, 600], "cuda")
    ref = indexer_topk_varlen_reference(q.cpu(), w.cpu(), big[:, :600].cpu(), rows.cpu(), nv.cpu(), 64)
    assert torch.equal(_run_cuda(q, w, big[:, :600], rows, nv, 64).cpu(), ref)
    flat = torch.empty(3 * 600 * 128 + 1, dtype=torch.bfloat16, device="cuda")
    mis = flat[1:].view(3, 600, 128)
    mis.copy_(big[:, :600])
    assert torch.equal(_run_cuda(q, w, mis, rows, nv, 64).cpu(), ref)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous q
    assert torch.equal(_run_cuda(qt, w, big[:, :600], rows, nv, 64).cpu(), ref)


@pytest.mark.cuda
@needs_kernel
def test_cuda_rejects_unsupported_inputs():
    q, w, keys = make_inputs(2, 1, 16, device="cuda")
    rows, nv = i32([0, 0], "cuda"), i32([16, 16], "cuda")
    with pytest.raises(RuntimeError, match="q must be bfloat16"):
        indexer_topk(q.float(), w, keys, rows, nv, 4)
    with pytest.raises(RuntimeError, match="weights must be float32"):
        indexer_topk(q, w.bfloat16(), keys, rows, nv, 4)
    with pytest.raises(RuntimeError, match="int32"):
        indexer_topk(q, w, keys, rows.long(), nv, 4)
    with pytest.raises(RuntimeError, match="topk must be in"):
        indexer_topk(q, w, keys, rows, nv, 4096)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        indexer_topk(q[:, :, :96].contiguous(), w, keys[:, :, :96].contiguous(), rows, nv, 4)
    with pytest.raises(RuntimeError, match="device"):
        indexer_topk(q, w.cpu(), keys, rows, nv, 4)


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake/meta, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------------------------
def _opcheck_samples(device):
    samples = []
    for (T, B, C, H, D, k) in [(5, 2, 40, 8, 64, 4), (3, 3, 300, 64, 128, 16)]:
        q, w, keys = make_inputs(T, B, C, H=H, D=D, device=device)
        rows = torch.arange(T, device=device, dtype=torch.int32) % B
        nv = torch.randint(0, C + 1, (T,), device=device, dtype=torch.int32)
        samples.append((q, w, keys, rows, nv, k))
    return samples


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])])
def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.dsv4.indexer_topk.default, args)
        out = torch.empty(args[0].shape[0], args[5], dtype=torch.int32, device=device)
        torch.library.opcheck(torch.ops.dsv4.indexer_topk_out.default, (*args, out))


# ---------------------------------------------------------------------------------------------
# 1M-token context (262,144 compressed entries), decode: many splits per query, so the default
# merge is the histogram select; every mode must equal the reference exactly
# ---------------------------------------------------------------------------------------------
N_1M = (1 << 20) // 4


def _run_paged(q, w, pool, rows, nv, topk, table):
    out = torch.full((q.shape[0], topk), 0x7F7F7F7F, dtype=torch.int32, device=q.device)  # poison
    indexer_topk_out(q, w, pool, rows, nv, topk, out, table)
    assert torch.equal(indexer_topk(q, w, pool, rows, nv, topk, table), out)
    return out


@pytest.mark.parametrize("H", [1, 64, 100, 128])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.cuda
@needs_kernel
def test_cuda_decode_heads_scans_exact(H, fp8, scan, monkeypatch):
    """Every head count the wgmma scan takes (one head block, padded heads, two head blocks)
    on each scan, bf16 and paged FP8 keys, with the histogram select, rows ending mid-tile and
    mid-block; integer data: exact equality."""
    from dsv4.ops import kv_cache as kc
    from _paged import scattered_tables  # (tests/_paged.py)
    monkeypatch.setenv("DSV4_INDEXER_TOPK_MERGE", "hist")
    N, bs, topk = 20_000, 256, 512
    q, w, keys = make_inputs(3, 2, N, H=H, device="cuda", integer=True, seed=H + 7 * fp8)
    rows, nv = i32([0, 1, 0], "cuda"), i32([N, N - 77, 12_345], "cuda")
    if fp8:
        table, nb = scattered_tables([N, N], bs, -(-N // bs), seed=4)
        pool = kc.allocate(kc.INDEXER, nb, bs, 128, device="cuda")
        s = torch.arange(N)
        for b in range(2):
            blk = table[b, s // bs].long()
            kc.write_entries(pool, blk.cuda(), (s % bs).cuda(), keys[b])
        table = table.cuda()
        got = _run_paged(q, w, pool, rows, nv, topk, table)
        want = indexer_topk_varlen_reference(q, w, pool, rows, nv, topk, table)
    else:
        got = _run_cuda(q, w, keys, rows, nv, topk)
        want = indexer_topk_varlen_reference(q, w, keys, rows, nv, topk)
    assert torch.equal(got, want)


@pytest.mark.cuda
@needs_kernel
def test_cuda_1m_decode_exact_equals_reference(merge3, scan):
    """Batch 1 (and 2: MTP-like) at 1M, integer data: many exact ties among 262,144 scores."""
    q, w, keys = make_inputs(2, 1, N_1M, device="cuda", integer=True, seed=11)
    rows, nv = i32([0, 0], "cuda"), i32([N_1M, N_1M - 1], "cuda")
    for T in (1, 2):
        got = _run_cuda(q[:T], w[:T], keys, rows[:T], nv[:T], 512)
        want = indexer_topk_varlen_reference(q[:T], w[:T], keys, rows[:T], nv[:T], 512)
        assert torch.equal(got, want)
        assert torch.equal(indexer_topk(q[:T], w[:T], keys, rows[:T], nv[:T], 512), got)


@pytest.mark.cuda
@needs_kernel
def test_cuda_1m_paged_fp8_decode_equals_reference(merge3, scan):
    """The runtime's layout at 1M: FP8 indexer keys (132 B) in a paged pool of 256-entry
    blocks, scattered block ids, a missing block (-1) in one row, rows that end mid-block."""
    from dsv4.ops import kv_cache as kc
    from _paged import scattered_tables  # (tests/_paged.py)
    bs, B, T, topk = 256, 2, 3, 512
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-3, 4, (T, 64, 128), generator=g).to(torch.bfloat16)
    w = torch.tensor([0.25, 0.5, 1.0, -0.5])[torch.randint(0, 4, (T, 64), generator=g)]
    keys = torch.randint(-3, 4, (B, N_1M, 128), generator=g).to(torch.bfloat16)
    max_blocks = N_1M // bs
    table, nb = scattered_tables([N_1M] * B, bs, max_blocks, seed=3)
    table[1, 77] = -1                             # a missing block: its keys are never selected
    pool = kc.allocate(kc.INDEXER, nb, bs, 128)
    s = torch.arange(N_1M)
    for b in range(B):
        blk = table[b, s // bs].long()
        ok = blk >= 0
        kc.write_entries(pool, blk[ok], (s % bs)[ok], keys[b][ok])
    pool_cuda = kc.allocate(kc.INDEXER, nb, bs, 128, device="cuda").copy_(pool)
    rows, nv = i32([0, 1, 0], "cuda"), i32([N_1M, N_1M - 3, 200_001], "cuda")
    table_cuda = table.cuda()
    got = _run_paged(q.cuda(), w.cuda(), pool_cuda, rows, nv, topk, table_cuda)
    want = indexer_topk_varlen_reference(q.cuda(), w.cuda(), pool_cuda, rows, nv, topk,
                                         table_cuda)
    assert torch.equal(got, want)
    assert not bool(((got[1] >= 77 * bs) & (got[1] < 78 * bs)).any())


@pytest.mark.cuda
@needs_kernel
def test_cuda_1m_all_equal_scores_empty_scope_and_short_rows(merge3):
    """All scores equal (the topk-th key's bin holds every key: the histogram select's
    full-scan fallback): lowest indices first; a query that sees nothing gets -1s; one that
    sees fewer entries than topk gets all of them, then -1s."""
    q, w, _ = make_inputs(4, 1, 1, device="cuda", seed=3)
    keys = torch.zeros(2, N_1M, 128, dtype=torch.bfloat16, device="cuda")
    rows, nv = i32([0, 1, 0, 1], "cuda"), i32([N_1M, 0, 300, 131_073], "cuda")
    got = _run_cuda(q, w, keys, rows, nv, 512)
    ar = torch.arange(512, dtype=torch.int32, device="cuda")
    assert torch.equal(got[0], ar) and torch.equal(got[3], ar)
    assert bool((got[1] == -1).all())
    assert torch.equal(got[2], torch.where(ar < 300, ar, -1))


@pytest.mark.cuda
@needs_kernel
def test_cuda_long_ties_at_threshold(merge3):
    """100 winners among 100,000 exact zeros, topk 2048: the 1,948 lowest-index zeros follow
    the winners (the boundary bin holds ~100K keys: the fallback path)."""
    n, topk = 100_000, 2048
    q = torch.ones(1, 8, 128, dtype=torch.bfloat16, device="cuda")
    w = torch.full((1, 8), 0.5, device="cuda")
    keys = torch.zeros(1, n, 128, dtype=torch.bfloat16, device="cuda")
    winners = torch.randperm(n, generator=_gen("cpu", 7))[:100].cuda()
    keys[0, winners, torch.arange(100, device="cuda") % 128] = torch.arange(
        1, 101, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    nv = torch.full((1,), n, dtype=torch.int32, device="cuda")
    got = _run_cuda(q, w, keys, torch.zeros_like(nv), nv, topk)
    zeros = torch.ones(n, dtype=torch.bool, device="cuda")
    zeros[winners] = False
    expected = torch.cat([winners.flip(0), zeros.nonzero().flatten()[:topk - 100]])
    assert torch.equal(got[0], expected.to(torch.int32))


@pytest.mark.cuda
@needs_kernel
def test_cuda_long_float_scores_cross_split_boundaries(merge3):
    """Random float scores, contexts that end just past split / chunk / tile boundaries."""
    q, w, keys = make_inputs(3, 3, 70_000, H=16, device="cuda", seed=21)
    rows, nv = i32([2, 0, 1], "cuda"), i32([70_000, 65_537, 40_961], "cuda")
    for topk in (512, 1024):
        got = _run_cuda(q, w, keys, rows, nv, topk)
        check_selection(got, q, w, keys, rows, nv, topk)


# ---------------------------------------------------------------------------------------------
# Short and medium decode rows (the latency cases of issue 9: N <= 32K entries, batch 1 .. 64).
# A decode split may be 128 keys (one m-tile per warp), so these shapes cross tile, split and
# topk boundaries; every merge mode, including "legacy" (the previous split size of max(1024,
# 2 topk) keys and the previous selection tail), must give the reference's indices exactly
# (integer data: exact scores).
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["auto", "tree", "hist", "legacy"])
def merge4(request, monkeypatch):
    """As ``merge3``, plus "legacy" (the previous decode code path: split size and selection
    tail)."""
    if request.param == "auto":
        monkeypatch.delenv("DSV4_INDEXER_TOPK_MERGE", raising=False)
    else:
        monkeypatch.setenv("DSV4_INDEXER_TOPK_MERGE", request.param)
    return request.param


SHORT_LENS = [1, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2047, 4097]


@pytest.mark.parametrize("topk", [512, 2048])
@pytest.mark.cuda
@needs_kernel
def test_cuda_short_decode_batch1_equals_reference(topk, merge4):
    """Batch 1, one row of C = 8192 keys seen up to N entries: N < k, N == k, N = k + 1, tile
    and split boundaries. Each N is its own call (the split plan follows the shapes)."""
    q, w, keys = make_inputs(1, 1, 8192, device="cuda", integer=True, seed=31)
    for n in SHORT_LENS:
        rows, nv = i32([0], "cuda"), i32([n], "cuda")
        got = _run_cuda(q, w, keys, rows, nv, topk)
        want = indexer_topk_varlen_reference(q, w, keys, rows, nv, topk)
        assert torch.equal(got, want), f"N={n}"
        m = min(n, topk)
        assert bool((got[0, :m] >= 0).all()) and bool((got[0, m:] == -1).all())


@pytest.mark.cuda
@needs_kernel
def test_cuda_short_decode_capacity_much_larger_than_row(merge4):
    """The runtime's cache: capacity 65,536 entries (many splits), 1,024 visible (the e2e case
    at 4,096 tokens); most splits see nothing."""
    q, w, keys = make_inputs(2, 2, 65536, device="cuda", integer=True, seed=32)
    rows, nv = i32([1, 0], "cuda"), i32([1024, 700], "cuda")
    for T in (1, 2):
        got = _run_cuda(q[:T], w[:T], keys, rows[:T], nv[:T], 512)
        want = indexer_topk_varlen_reference(q[:T], w[:T], keys, rows[:T], nv[:T], 512)
        assert torch.equal(got, want)


@pytest.mark.parametrize("T", [8, 64])
@pytest.mark.cuda
@needs_kernel
def test_cuda_short_decode_batches_equal_reference(T, merge4):
    """Batch 8 / 64, one query per row (rows reversed), lengths 0 (and clamped negatives),
    k - 1 .. k + 1, 1024, 2048 and the full capacity 2304."""
    q, w, keys = make_inputs(T, T, 2304, device="cuda", integer=True, seed=33 + T)
    lens = [0, 511, 512, 513, 1024, 2048, 2304, 300]
    nv = i32([lens[t % 8] - (t // 8) % 3 for t in range(T)], "cuda")
    rows = i32(list(range(T))[::-1], "cuda")
    got = _run_cuda(q, w, keys, rows, nv, 512)
    want = indexer_topk_varlen_reference(q, w, keys, rows, nv.clamp(min=0), 512)
    assert torch.equal(got, want)


@pytest.mark.cuda
@needs_kernel
def test_cuda_short_decode_nan_ties_and_empty(merge4):
    """NaN keys from entry 600 on (never selected), an all-zero row (ties: lowest indices in
    order across split boundaries), a query that sees nothing."""
    q, w, keys = make_inputs(4, 2, 3000, device="cuda", integer=True, seed=34)
    keys[0, 600:, 3] = float("nan")
    keys[1].zero_()
    rows, nv = i32([0, 1, 0, 1], "cuda"), i32([3000, 3000, 0, 1500], "cuda")
    got = _run_cuda(q, w, keys, rows, nv, 512)
    want = indexer_topk_varlen_reference(q, w, keys, rows, nv, 512)
    assert torch.equal(got, want)
    ar = torch.arange(512, dtype=torch.int32, device="cuda")
    assert torch.equal(got[1], ar) and torch.equal(got[3], ar)
    assert bool((got[2] == -1).all())
    assert bool((got[0, :512] < 600).all())


@pytest.mark.cuda
@needs_kernel
def test_cuda_short_decode_float_scores(merge4):
    """Random float scores (selected sets within the fp32 summation tolerance), D 64 / 128."""
    for D, H in ((128, 64), (64, 16)):
        q, w, keys = make_inputs(3, 3, 6000, H=H, D=D, device="cuda", seed=35)
        rows, nv = i32([1, 2, 0], "cuda"), i32([6000, 1025, 2000], "cuda")
        for topk in (512, 1024):
            got = _run_cuda(q, w, keys, rows, nv, topk)
            check_selection(got, q, w, keys, rows, nv, topk)
