"""torch.ops.dsv4.mhc_pre / mhc_post / mhc_head: the ops (CPU = the layer references) against
training.md §7.1-7.2, the CUDA kernels against the references with the 2x-bf16 rule, Sinkhorn
on the GPU against the §7.1 vector and a matrix whose 19th and 20th iterations differ by 3e-3,
decode (one launch) and prefill (chunked) sizes, strided inputs, poisoned outputs, and
torch.library.opcheck."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers the ops)
from dsv4.layers.mhc import hc_head_reference, hc_post_reference, hc_pre_reference

from _profiling import cuda_kernel_names  # (tests/_profiling.py)

ops = torch.ops.dsv4
cuda = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]

L_71 = torch.tensor([[-3.3775196, -3.4570806, -0.7517357, -1.3016365],
                     [2.5461311, 2.0760274, -0.9480383, -6.3456583],
                     [0.9668248, -3.7900043, 1.0499495, 0.9244018],
                     [0.3595245, 3.7129736, 3.3503315, -0.7418345]])
COMB_71 = torch.tensor([[0.0405936, 0.0330831, 0.4034770, 0.5228455],
                        [0.6354968, 0.3504710, 0.0138882, 0.0001429],
                        [0.2995740, 0.0022724, 0.2342138, 0.4639388],
                        [0.0243346, 0.6141724, 0.3484201, 0.0130718]])


def _sinkhorn64(L: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """The official order (training.md §7.1) in float64, written out independently."""
    c = torch.softmax(L.double(), -1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def _slow_matrix() -> torch.Tensor:
    """Upper-triangular-like logits (-12 below the diagonal): Sinkhorn converges slowly, so
    19 and 20 iterations differ by ~3e-3."""
    return torch.tril(torch.full((4, 4), -12.0), diagonal=-1)


def test_slow_matrix_separates_19_from_20_iterations():
    L = _slow_matrix()
    assert (_sinkhorn64(L, 19) - _sinkhorn64(L, 20)).abs().max() > 2e-3


# ---------------------------------------------------------------------------------------------
# training.md §7.2 vectors through the ops (CPU: the references)
# ---------------------------------------------------------------------------------------------
def _vectors():
    X = torch.arange(12.).view(1, 1, 4, 3) / 10 - 0.5
    fn = ((torch.arange(24 * 12).view(24, 12) % 7) - 3) / 10
    return X, fn, torch.tensor([0.5, 0.25, 1.0]), torch.linspace(-1, 1, 24)


def test_ops_reproduce_hc_vectors():
    X, fn, scale, base = _vectors()
    u, post, comb = ops.mhc_pre(X, fn, scale, base, 1e-6, 20, 1e-6)
    torch.testing.assert_close(u.flatten(), torch.tensor([-0.026476, 0.094946, 0.216368]),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(post.flatten(), torch.tensor([0.656249, 0.656668, 0.844563, 0.869600]),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(comb[0, 0, 0], torch.tensor([0.158760, 0.151850, 0.374765, 0.314623]),
                               atol=2e-6, rtol=0)
    f = torch.tensor([1.0, -2.0, 0.5]).view(1, 1, 3)
    out = ops.mhc_post(f, X, post, comb)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.745732, -1.123016, 0.617607]),
                               atol=2e-6, rtol=0)
    y = ops.mhc_head(X, fn[:4], torch.tensor([0.5]), torch.tensor([0.1, -0.1, 0.2, -0.2]), 1e-6,
                     1e-6)
    torch.testing.assert_close(y.flatten(), torch.tensor([-0.116592, 0.085966, 0.288524]),
                               atol=2e-6, rtol=0)


def test_ops_reject_bad_shapes():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"fn must be float32 \[24, 32\]"):
        ops.mhc_pre(x, torch.randn(24, 31), torch.ones(3), torch.zeros(24), 1e-6, 20, 1e-6)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        ops.mhc_pre(x, torch.randn(24, 32), torch.ones(3), torch.zeros(24), 1e-6, 0, 1e-6)
    with pytest.raises(ValueError, match=r"comb must be float32 \[2, 4, 4\]"):
        ops.mhc_post(torch.randn(2, 8), x, torch.rand(2, 4), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match=r"scale must be float32 \[1\]"):
        ops.mhc_head(x, torch.randn(4, 32), torch.ones(3), torch.zeros(4), 1e-6, 1e-6)


@pytest.mark.parametrize("bad", ["post", "comb"])
def test_mhc_pre_out_bad_buffer_writes_nothing(bad):
    """A wrong-shaped later buffer is refused before u (or post) is written: the op leaves every
    buffer as it was (u used to be written, then post refused)."""
    X, fn, scale, base = _vectors()
    bufs = {"u": torch.full((1, 1, 3), 7.0), "post": torch.full((1, 1, 4), 7.0),
            "comb": torch.full((1, 1, 4, 4), 7.0)}
    bufs[bad] = torch.full((1, 1, 3) if bad == "post" else (1, 1, 4, 3), 7.0)
    with pytest.raises(ValueError, match=f"mhc_pre_out: {bad} must be"):
        ops.mhc_pre_out(X, fn, scale, base, 1e-6, 20, 1e-6, **bufs)
    for name, t in bufs.items():
        assert bool((t == 7.0).all()), f"{name} was written by a call that raised"


# ---------------------------------------------------------------------------------------------
# inputs and the tolerance rule
# ---------------------------------------------------------------------------------------------
def _inputs(T, d, seed, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (T,) if lead is None else lead
    x = (torch.randn(*shape, 4, d, generator=g) * 2).to(torch.bfloat16)
    fn = torch.randn(24, 4 * d, generator=g) * (4 * d) ** -0.5 * 3
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn(24, generator=g) * 0.5
    head = (torch.randn(4, 4 * d, generator=g) * (4 * d) ** -0.5, torch.rand(1, generator=g) + 0.5,
            torch.randn(4, generator=g) * 0.5)
    return x, fn, scale, base, head


def _assert_2x_bf16(got: torch.Tensor, ref32: torch.Tensor, ref16: torch.Tensor, what: str):
    """Kernel error vs the fp32 reference <= 2x that of the same reference run in bf16."""
    got, ref32, ref16 = got.float().cpu(), ref32.float().cpu(), ref16.float().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(ref32)), what
    err = (got - ref32).abs().max().item()
    err16 = (ref16 - ref32).abs().max().item()
    assert err <= 2 * err16 + 1e-6, f"{what}: kernel error {err:.3g} > 2 x bf16 error {err16:.3g}"
    # in fp64: an fp32 cosine of millions of elements is itself off by ~1e-5
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(), ref32.double().flatten(),
                                                dim=0)
    assert cos > 0.99999, f"{what}: cosine {cos}"


# ---------------------------------------------------------------------------------------------
# CUDA kernels
# ---------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("T,d", [(1, 4096), (3, 128), (4, 4096), (5, 136), (7, 40), (8, 4096),
                                 (9, 4096), (64, 136), (65, 128), (513, 256), (1000, 4096),
                                 (4096, 512), (2, 7168),
                                 # the decode kernel (mhc_pre T <= 16, mhc_head T <= 8): one
                                 # group (T <= 4), groups of 4 with a short last one (7, 13);
                                 # 17..64 the chunked path (test_decode_kernel_up_to_64_tokens
                                 # runs the decode kernel there); 65: the one-pass kernel
                                 (2, 4096), (7, 4096), (13, 4096), (63, 4096), (64, 4096),
                                 (65, 4096), (33, 8), (1, 7168),
                                 # the one-pass cluster kernel (T > 64 here, dim 1024 / 2048 /
                                 # 4096): tiles of 32 with a partial last one, more tiles than
                                 # clusters
                                 (80, 1024), (100, 2048), (2050, 2048), (4100, 1024)])
def test_mhc_pre_kernel_matches_reference(T, d):
    x, fn, scale, base, _ = _inputs(T, d, T + d)
    u32, post32, comb32 = hc_pre_reference(x.float(), fn, scale, base, 1e-6, 20, 1e-6)
    u16, _, _ = hc_pre_reference(x, fn, scale, base, 1e-6, 20, 1e-6)
    dev = [t.cuda() for t in (x, fn, scale, base)]
    u = torch.full((T, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    post = torch.full((T, 4), float("nan"), device="cuda")
    comb = torch.full((T, 4, 4), float("nan"), device="cuda")
    ops.mhc_pre_out(*dev, 1e-6, 20, 1e-6, u=u, post=post, comb=comb)
    _assert_2x_bf16(u, u32, u16, "u")
    torch.testing.assert_close(post.cpu(), post32, atol=2e-5, rtol=0)
    torch.testing.assert_close(comb.cpu(), comb32, atol=2e-5, rtol=0)
    u2, post2, comb2 = ops.mhc_pre(*dev, 1e-6, 20, 1e-6)        # bit-identical run to run
    assert torch.equal(u2, u) and torch.equal(post2, post) and torch.equal(comb2, comb)


@cuda
@pytest.mark.parametrize("iters", [19, 20])
# the decode kernel (one token; with DSV4_MHC_DECODE=all groups of 5 and of 8: the Sinkhorn on
# 3 and 4 warps beside the collapse), the two-kernel path, the one-pass cluster kernel (comb
# after the tiles)
@pytest.mark.parametrize("T,d", [(1, 64), (40, 64), (64, 64), (100, 64), (100, 1024)])
def test_mhc_pre_kernel_sinkhorn_vectors(monkeypatch, iters, T, d):
    """fn rows 0..23 = 0, base = the logits: the kernel's comb is Sinkhorn(base) exactly; the
    §7.1 vector and the slow matrix (19 vs 20 iterations differ by 3e-3) in fp64."""
    if DECODE_NEW:
        monkeypatch.setenv("DSV4_MHC_DECODE", "all")   # 40 / 64 tokens on the decode kernel
    x = torch.randn(T, 4, d, generator=torch.Generator().manual_seed(T + d))
    x = x.to(torch.bfloat16).cuda()
    fn = torch.zeros(24, 4 * d, device="cuda")
    scale = torch.tensor([1.0, 1.0, 3.0], device="cuda")
    for L, tol in ((L_71, 3e-7), (_slow_matrix(), 1e-6)):
        base = torch.cat([torch.linspace(-1, 1, 8), L.flatten()]).cuda()
        u, post, comb = ops.mhc_pre(x, fn, scale, base, 1e-6, iters, 1e-6)
        want = _sinkhorn64(L, iters).float()
        for t in range(T):
            torch.testing.assert_close(comb[t].cpu(), want, atol=tol, rtol=0)
        if iters == 20 and L is L_71:
            torch.testing.assert_close(comb[0].cpu(), COMB_71, atol=3e-7, rtol=0)
        pre = torch.sigmoid(base[:4]) + 1e-6
        torch.testing.assert_close(post, (2 * torch.sigmoid(base[4:8])).expand(T, 4),
                                   atol=1e-7, rtol=0)
        u_ref = (pre[None, :, None] * x.float()).sum(1).to(torch.bfloat16)
        assert (u.float() - u_ref.float()).abs().max() <= u_ref.float().abs().max() * 2 ** -7


@cuda
@pytest.mark.parametrize("T,d", [(1, 4096), (7, 40), (300, 4096), (64, 13 * 8)])
def test_mhc_post_kernel_matches_reference(T, d):
    g = torch.Generator().manual_seed(T * d)
    f = torch.randn(T, d, generator=g).to(torch.bfloat16)
    res = (torch.randn(T, 4, d, generator=g) * 3).to(torch.bfloat16)
    post = torch.rand(T, 4, generator=g) * 2
    comb = torch.softmax(torch.randn(T, 4, 4, generator=g), -1)
    ref32 = hc_post_reference(f.float(), res.float(), post, comb)
    ref16 = hc_post_reference(f, res, post, comb)
    out = torch.full((T, 4, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.mhc_post_out(f.cuda(), res.cuda(), post.cuda(), comb.cuda(), out=out)
    _assert_2x_bf16(out, ref32, ref16, "post")
    assert torch.equal(ops.mhc_post(f.cuda(), res.cuda(), post.cuda(), comb.cuda()), out)


@cuda
def test_mhc_post_kernel_odd_dim_and_strided_inputs():
    g = torch.Generator().manual_seed(3)
    T, d = 5, 13                                       # scalar path (dim % 8 != 0)
    f = torch.randn(T, 2 * d, generator=g).to(torch.bfloat16)[:, 1:d + 1]
    res = torch.randn(T, 4, d, generator=g).to(torch.bfloat16)
    post, comb = torch.rand(T, 4, generator=g), torch.rand(T, 4, 4, generator=g)
    ref16 = hc_post_reference(f, res, post, comb)
    out = ops.mhc_post(f.cuda(), res.cuda(), post.cuda(), comb.cuda())
    _assert_2x_bf16(out, hc_post_reference(f.float(), res.float(), post, comb), ref16, "post")


@cuda
def test_mhc_post_kernel_one_token_views_with_a_short_stride():
    """One token whose residual / f views have a token stride below 4·dim / dim (torch counts
    such a view as contiguous, so .contiguous() returned it unchanged and the kernel refused it
    with 'invalid argument'): copied, same values as the compact tensors."""
    g = torch.Generator().manual_seed(4)
    d = 64
    f = torch.randn(1, d, generator=g).to(torch.bfloat16).cuda()
    res = torch.randn(1, 4, d, generator=g).to(torch.bfloat16).cuda()
    post, comb = torch.rand(1, 4, generator=g).cuda(), torch.rand(1, 4, 4, generator=g).cuda()
    want = ops.mhc_post(f, res, post, comb)
    res1 = torch.empty(4 * d, dtype=res.dtype, device="cuda").as_strided((1, 4, d), (8, d, 1))
    res1.copy_(res)
    f1 = torch.empty(d, dtype=f.dtype, device="cuda").as_strided((1, d), (8, 1))
    f1.copy_(f)
    assert torch.equal(ops.mhc_post(f1, res1, post, comb), want)


@cuda
@pytest.mark.parametrize("T,d", [(1, 4096), (2, 128), (3, 136), (5, 4096), (8, 40), (9, 4096),
                                 (600, 256), (77, 1024), (1000, 4096),
                                 (7, 4096), (63, 4096), (64, 136), (64, 4096), (65, 4096)])
def test_mhc_head_kernel_matches_reference(T, d):
    x, _, _, _, (fn, scale, base) = _inputs(T, d, 7 * T + d)
    ref32 = hc_head_reference(x.float(), fn, scale, base, 1e-6, 1e-6)
    ref16 = hc_head_reference(x, fn, scale, base, 1e-6, 1e-6)
    y = torch.full((T, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.mhc_head_out(x.cuda(), fn.cuda(), scale.cuda(), base.cuda(), 1e-6, 1e-6, y=y)
    _assert_2x_bf16(y, ref32, ref16, "head")


@cuda
# decode kernel (groups of 4 and 1; 8 groups of 8 with DSV4_MHC_DECODE=all), chunked, one-pass
@pytest.mark.parametrize("T,d,mode", [(5, 4096, None), (64, 256, "all"), (64, 256, None),
                                      (100, 1024, None), (300, 256, None)])
def test_mhc_pre_and_head_replay_from_a_cuda_graph(monkeypatch, T, d, mode):
    """Captured once, replayed on new inputs copied into the captured buffers: the same values
    as eager calls on those inputs (no host sync or allocation-dependent state in the launch)."""
    if mode is not None and DECODE_NEW:
        monkeypatch.setenv("DSV4_MHC_DECODE", mode)
    x, fn, scale, base, (hfn, hscale, hbase) = _inputs(T, d, 11 * T + d)
    x2 = _inputs(T, d, 11 * T + d + 1)[0]
    dev = [t.cuda() for t in (x, fn, scale, base, hfn, hscale, hbase)]
    xc = dev[0]
    u = torch.empty(T, d, dtype=torch.bfloat16, device="cuda")
    post = torch.empty(T, 4, device="cuda")
    comb = torch.empty(T, 4, 4, device="cuda")
    y = torch.empty(T, d, dtype=torch.bfloat16, device="cuda")

    def step():
        ops.mhc_pre_out(xc, dev[1], dev[2], dev[3], 1e-6, 20, 1e-6, u=u, post=post, comb=comb)
        ops.mhc_head_out(xc, dev[4], dev[5], dev[6], 1e-6, 1e-6, y=y)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()                                         # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # replayed twice: the second replay finds the arrival counters the first one left behind
    # (a graph pool's fresh memory is likely zero, so one replay would not see a missing reset)
    for xr in (x2, _inputs(T, d, 11 * T + d + 2)[0]):
        xc.copy_(xr.cuda())
        for t in (u, post, comb, y):
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = ops.mhc_pre(xr.cuda(), *dev[1:4], 1e-6, 20, 1e-6)
        assert torch.equal(u, want[0]) and torch.equal(post, want[1])
        assert torch.equal(comb, want[2])
        assert torch.equal(y, ops.mhc_head(xr.cuda(), *dev[4:7], 1e-6, 1e-6))


@cuda
def test_mhc_pre_kernel_strided_and_batched_inputs():
    """[batch, seq, 4, d] streams that are a misaligned slice of a larger buffer."""
    x, fn, scale, base, _ = _inputs(6, 64, 1, lead=(2, 3))
    big = torch.zeros(2, 3, 4, 64 + 1, dtype=torch.bfloat16)
    big[..., 1:] = x
    xs = big.cuda()[..., 1:]                         # not contiguous, not 16-byte aligned
    u, post, comb = ops.mhc_pre(xs, fn.cuda(), scale.cuda(), base.cuda(), 1e-6, 20, 1e-6)
    u32, post32, comb32 = hc_pre_reference(x.float(), fn, scale, base, 1e-6, 20, 1e-6)
    assert u.shape == (2, 3, 64) and post.shape == (2, 3, 4) and comb.shape == (2, 3, 4, 4)
    _assert_2x_bf16(u, u32, hc_pre_reference(x, fn, scale, base, 1e-6, 20, 1e-6)[0], "u")
    torch.testing.assert_close(comb.cpu(), comb32, atol=2e-5, rtol=0)


@cuda
def test_mhc_kernels_reject_unsupported_shapes():
    x = torch.randn(2, 3, 12, device="cuda", dtype=torch.bfloat16)   # hc 3
    fn = torch.randn(15, 36, device="cuda")
    with pytest.raises(RuntimeError, match="hc_mult = 4"):
        ops.mhc_pre(x, fn, torch.ones(3, device="cuda"), torch.zeros(15, device="cuda"), 1e-6,
                    20, 1e-6)
    x = torch.randn(2, 4, 12, device="cuda", dtype=torch.bfloat16)   # dim % 8
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.mhc_head(x, torch.randn(4, 48, device="cuda"), torch.ones(1, device="cuda"),
                     torch.zeros(4, device="cuda"), 1e-6, 1e-6)


# ---------------------------------------------------------------------------------------------
# the one-pass prefill kernel (the default; DSV4_MHC_ONE_PASS=0 selects the chunked path)
# ---------------------------------------------------------------------------------------------
ONE_PASS = os.environ.get("DSV4_MHC_ONE_PASS") != "0"


@cuda
@pytest.mark.skipif(not ONE_PASS, reason="this is the child run")
def test_cuda_tests_again_with_the_chunked_prefill_path():
    """Every CUDA test of this file again with DSV4_MHC_ONE_PASS=0, which sends T > 64 at dim
    1024 / 2048 / 4096 (the parametrised sizes above) through the chunked two-phase path instead
    of the one-pass cluster kernel. In a child process, with a time limit: a fault or a hang
    there fails this test only, not the CUDA context of the rest of the suite."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DSV4_MHC_ONE_PASS="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rfEs",
                        "-p", "no:cacheprovider", str(Path(__file__).resolve())],
                       cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    print(r.stdout[-3000:])                           # the child's summary, in -rP / -s output
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


def _mhc_kernel_names(T, d):
    """The mHC kernels one mhc_pre + mhc_head call at (T, d) launches (CUDA profiler)."""
    x, fn, scale, base, (hfn, hscale, hbase) = _inputs(T, d, T + d)
    dev = [t.cuda() for t in (x, fn, scale, base, hfn, hscale, hbase)]

    def call():
        ops.mhc_pre(*dev[:4], 1e-6, 20, 1e-6)
        ops.mhc_head(dev[0], *dev[4:], 1e-6, 1e-6)
    return cuda_kernel_names(call, "mhc", "kernel")


@cuda
@pytest.mark.skipif(not ONE_PASS, reason="the DSV4_MHC_ONE_PASS=0 child run takes the chunked path")
def test_one_pass_kernel_is_the_one_that_runs():
    """By default mhc_pre / mhc_head at T > 64, dim 1024 / 4096 launch only the one-pass kernel
    (the child run above would otherwise test the same path twice); dim 512 keeps the chunked
    path's kernels."""
    names = _mhc_kernel_names(100, 1024)
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels (no CUPTI)")
    assert len(names) == 2 and all("mhc_wide_kernel" in n for n in names), names
    names = _mhc_kernel_names(100, 4096)
    assert len(names) == 2 and all("mhc_wide_kernel" in n for n in names), names
    assert not any("mhc_wide_kernel" in n for n in _mhc_kernel_names(100, 512))


# ---------------------------------------------------------------------------------------------
# the decode kernel (T <= 64; DSV4_MHC_DECODE=old selects the previous paths)
# ---------------------------------------------------------------------------------------------
DECODE_NEW = os.environ.get("DSV4_MHC_DECODE") != "old"


def _pre_and_head_kernels(T, d):
    """(mhc_pre's kernel names, mhc_head's) of one call each at (T, d)."""
    x, fn, scale, base, (hfn, hscale, hbase) = _inputs(T, d, T + d)
    dev = [t.cuda() for t in (x, fn, scale, base, hfn, hscale, hbase)]
    pre = cuda_kernel_names(lambda: ops.mhc_pre(*dev[:4], 1e-6, 20, 1e-6), "mhc", "kernel")
    head = cuda_kernel_names(lambda: ops.mhc_head(dev[0], *dev[4:], 1e-6, 1e-6), "mhc", "kernel")
    return pre, head


@cuda
@pytest.mark.skipif(not DECODE_NEW, reason="this is the DSV4_MHC_DECODE=old child run")
def test_decode_kernel_is_the_one_that_runs(monkeypatch):
    """By default mhc_pre runs mhc_decode_kernel alone up to 16 tokens and mhc_head up to 8;
    above that, to 64 tokens, the chunked path's mix + finish kernels; T = 65 the one-pass
    kernel (the chunked path in the DSV4_MHC_ONE_PASS=0 child run). DSV4_MHC_DECODE=all (read at each call) takes the decode kernel to 64 tokens for
    both; =old brings back the previous fused kernel at T = 8."""
    def only(names, kernel):
        return len(names) == 1 and kernel in names[0]

    pre, head = _pre_and_head_kernels(1, 4096)
    if not pre:
        pytest.skip("the profiler recorded no CUDA kernels (no CUPTI)")
    for T, pre_dec, head_dec in ((1, True, True), (8, True, True), (9, True, False),
                                 (16, True, False), (17, False, False), (64, False, False)):
        pre, head = _pre_and_head_kernels(T, 4096)
        assert only(pre, "mhc_decode_kernel") == pre_dec, (T, pre)
        assert only(head, "mhc_decode_kernel") == head_dec, (T, head)
        if not pre_dec:   # the chunked path: mix, then finish (no one-pass kernel below 65)
            assert len(pre) == 2 and "mhc_mix_kernel" in pre[0] and "finish" in pre[1], (T, pre)
        if not head_dec:
            assert len(head) == 2 and "mhc_mix_kernel" in head[0], (T, head)
    pre, head = _pre_and_head_kernels(65, 4096)   # the one-pass kernel (chunked in that child run)
    prefill = "mhc_wide_kernel" if ONE_PASS else "mhc_mix_kernel"
    assert prefill in pre[0] and prefill in head[0], (pre, head)
    assert not any("mhc_decode_kernel" in n for n in pre + head), (pre, head)
    monkeypatch.setenv("DSV4_MHC_DECODE", "all")
    for T in (17, 64):
        pre, head = _pre_and_head_kernels(T, 4096)
        assert only(pre, "mhc_decode_kernel") and only(head, "mhc_decode_kernel"), (T, pre, head)
    pre, head = _pre_and_head_kernels(65, 4096)
    assert not any("mhc_decode_kernel" in n for n in pre + head), (pre, head)
    # DSV4_MHC_DECODE_GROUP takes effect (the instance's largest group G: 1, 4 or 8; the
    # default at T = 8 and 13 is groups of 4, G = 4), so the forced-group tests test what they say
    for group, T, G in (("1", 8, 1), ("8", 13, 8)):
        monkeypatch.setenv("DSV4_MHC_DECODE_GROUP", group)   # (DSV4_MHC_DECODE=all from above)
        names = _mhc_kernel_names(T, 4096)
        # (<NT, G> or <NT, G, cooperative>, demangled or mangled)
        pat = re.compile(rf"mhc_decode_kernel(<[13], ?{G}[,>]|ILi[13]ELi{G}E)")
        assert len(names) == 2 and all(pat.search(n) for n in names), (group, names)
    monkeypatch.delenv("DSV4_MHC_DECODE_GROUP")
    monkeypatch.setenv("DSV4_MHC_DECODE", "old")
    names = _mhc_kernel_names(8, 4096)
    assert names and not any("mhc_decode_kernel" in n for n in names), names


def _check_decode_kernel(monkeypatch, T, d, seed):
    """mhc_pre / mhc_head at (T, d) with DSV4_MHC_DECODE=all (the decode kernel up to 64
    tokens for both ops) into NaN-filled outputs: u and y against the fp32 reference with the
    2x-bf16 rule, post and comb to 2e-5."""
    x, fn, scale, base, (hfn, hscale, hbase) = _inputs(T, d, seed)
    u32, post32, comb32 = hc_pre_reference(x.float(), fn, scale, base, 1e-6, 20, 1e-6)
    u16 = hc_pre_reference(x, fn, scale, base, 1e-6, 20, 1e-6)[0]
    y32 = hc_head_reference(x.float(), hfn, hscale, hbase, 1e-6, 1e-6)
    y16 = hc_head_reference(x, hfn, hscale, hbase, 1e-6, 1e-6)
    dev = [t.cuda() for t in (x, fn, scale, base, hfn, hscale, hbase)]
    monkeypatch.setenv("DSV4_MHC_DECODE", "all")
    u = torch.full((T, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    post = torch.full((T, 4), float("nan"), device="cuda")
    comb = torch.full((T, 4, 4), float("nan"), device="cuda")
    ops.mhc_pre_out(*dev[:4], 1e-6, 20, 1e-6, u=u, post=post, comb=comb)
    _assert_2x_bf16(u, u32, u16, "u")
    torch.testing.assert_close(post.cpu(), post32, atol=2e-5, rtol=0)
    torch.testing.assert_close(comb.cpu(), comb32, atol=2e-5, rtol=0)
    y = torch.full((T, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.mhc_head_out(dev[0], *dev[4:], 1e-6, 1e-6, y=y)
    _assert_2x_bf16(y, y32, y16, "head")


@cuda
@pytest.mark.skipif(not DECODE_NEW, reason="this is the DSV4_MHC_DECODE=old child run")
@pytest.mark.parametrize("T,d", [(9, 4096), (17, 1024), (33, 8), (40, 136), (63, 4096),
                                 (64, 4096)])
def test_decode_kernel_up_to_64_tokens(monkeypatch, T, d):
    """DSV4_MHC_DECODE=all: the decode kernel where the default rule takes the chunked path
    (mhc_head above 8 tokens, mhc_pre above 16; groups of 4 up to 32 tokens, then up to 8 groups
    with a short last one): against the fp32 reference with the 2x-bf16 rule, post and comb to
    2e-5."""
    _check_decode_kernel(monkeypatch, T, d, 3 * T + d)


@cuda
@pytest.mark.skipif(not DECODE_NEW, reason="this is the DSV4_MHC_DECODE=old child run")
@pytest.mark.parametrize("group", ["1", "3", "8"])
@pytest.mark.parametrize("T,d", [(8, 4096), (13, 136), (64, 4096)])
def test_decode_kernel_every_group_size(monkeypatch, group, T, d):
    """DSV4_MHC_DECODE_GROUP forces the tokens per finisher group (by default 4 at T = 8 and 13,
    8 at T = 64): a token per group, groups of 3 with a short last one, groups of 8 (one short
    group at T = 8 and 13): u and y against the fp32 reference with the 2x-bf16 rule, post and
    comb to 2e-5."""
    monkeypatch.setenv("DSV4_MHC_DECODE_GROUP", group)
    _check_decode_kernel(monkeypatch, T, d, 5 * T + d)   # T = 13 / 64: the decode kernel


@cuda
@pytest.mark.skipif(not DECODE_NEW or not ONE_PASS, reason="a child run")
def test_cuda_tests_again_with_the_previous_decode_path():
    """The kernel tests of this file again with DSV4_MHC_DECODE=old (T <= 8: the fused mix
    kernel; 9..64: the prefill paths), which stays selectable and is the bench's baseline. In a
    child process with a time limit: a fault there fails this test only."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DSV4_MHC_DECODE="old")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rfEs",
                        "-p", "no:cacheprovider", "-k",
                        "matches_reference or sinkhorn or cuda_graph or strided",
                        str(Path(__file__).resolve())],
                       cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    x, fn, scale, base, (hfn, hscale, hbase) = _inputs(5, 16, 0, lead=(1, 5))
    x = x.to(device, dt)
    fn, scale, base = fn.to(device), scale.to(device), base.to(device)
    hfn, hscale, hbase = hfn.to(device), hscale.to(device), hbase.to(device)
    u, post, comb = ops.mhc_pre(x, fn, scale, base, 1e-6, 20, 1e-6)
    f = torch.randn_like(u)
    cases = [
        (ops.mhc_pre.default, (x, fn, scale, base, 1e-6, 20, 1e-6), {}),
        (ops.mhc_pre_out.default, (x, fn, scale, base, 1e-6, 20, 1e-6),
         dict(u=torch.empty_like(u), post=torch.empty_like(post), comb=torch.empty_like(comb))),
        (ops.mhc_post.default, (f, x, post, comb), {}),
        (ops.mhc_post_out.default, (f, x, post, comb), dict(out=torch.empty_like(x))),
        (ops.mhc_head.default, (x, hfn, hscale, hbase, 1e-6, 1e-6), {}),
        (ops.mhc_head_out.default, (x, hfn, hscale, hbase, 1e-6, 1e-6),
         dict(y=torch.empty_like(u))),
    ]
    for op, args, kwargs in cases:
        torch.library.opcheck(op, args, kwargs)
