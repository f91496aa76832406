"""torch.ops.dsv4.moe_up / moe_down (docs/contracts.md §B): the references against a per-pair
formula and against today's Expert module (CPU), corner cases, errors, opcheck; the CUDA kernels
against the fp32 reference with the 2x bf16 rule (GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv4.ops  # noqa: F401  (registers every op)
from dsv4.layers.moe import Expert
from dsv4.ops.grouped_gemm import (dequantize_experts, moe_down, moe_down_reference, moe_up,
                                   moe_up_reference)
from dsv4.ops.quant import fp8_e4m3_sim
from dsv4.quant import e8m0_to_float

from gemm_cases import FORMATS, moe_case, route

LIMIT = 10.0


def per_pair_up(x, row_ids, offsets, w_up_f, rw, limit):
    """Independent formula, one pair at a time: expert from the offsets, fp32 dot products,
    g/u rounded to x's dtype, then route_weight * silu(min(g, L)) * clamp(u, -L, L)."""
    P, N = row_ids.shape[0], w_up_f.shape[2]
    out = torch.zeros(P, N, dtype=x.dtype)
    offs = offsets.tolist()
    for p in range(offs[-1]):
        e = max(i for i in range(len(offs) - 1) if offs[i] <= p)
        xr = x[int(row_ids[p])].double()
        g = (w_up_f[e, 0].double() @ xr).to(x.dtype).double()
        u = (w_up_f[e, 1].double() @ xr).to(x.dtype).double()
        if limit > 0:
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        out[p] = (rw[p].double() * g * torch.sigmoid(g) * u).to(x.dtype)
    return out


def per_pair_down(h, offsets, w_down_f):
    P, D = h.shape[0], w_down_f.shape[1]
    out = torch.zeros(P, D, dtype=h.dtype)
    offs = offsets.tolist()
    for p in range(offs[-1]):
        e = max(i for i in range(len(offs) - 1) if offs[i] <= p)
        out[p] = (w_down_f[e].double() @ h[p].double()).to(h.dtype)
    return out


def _close_bf16(a, b, ulps=1):
    # fp32 vs fp64 accumulation may flip a bf16 rounding: allow `ulps` bf16 steps
    a, b = a.double(), b.double()
    tol = b.abs() * (ulps * 2.0 ** -7) + 1e-6
    assert bool(((a - b).abs() <= tol).all()), (a - b).abs().max()


# ---------------------------------------------------------------------------------------------
# References (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("limit", [LIMIT, 0.0])
def test_moe_up_reference_matches_per_pair_formula(fmt, limit):
    c = moe_case(T=9, K=64, N=32, E=4, topk=2, fmt=fmt, seed=1)
    h = moe_up_reference(c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale,
                         c.route_weight, limit, False)
    w_f = dequantize_experts(c.w_up, c.w_up_scale, 64)
    assert h.dtype == torch.bfloat16 and h.shape == (18, 32)
    _close_bf16(h, per_pair_up(c.x, c.row_ids, c.expert_offsets, w_f, c.route_weight, limit))


@pytest.mark.parametrize("fmt", FORMATS)
def test_moe_down_reference_matches_per_pair_formula(fmt):
    c = moe_case(T=9, K=64, N=64, E=4, topk=2, fmt=fmt, seed=2)
    y = moe_down_reference(c.h, c.expert_offsets, c.w_down, c.w_down_scale, False)
    w_f = dequantize_experts(c.w_down, c.w_down_scale, 64)
    assert y.dtype == torch.bfloat16 and y.shape == (18, 64)
    _close_bf16(y, per_pair_down(c.h, c.expert_offsets, w_f))


def test_clamp_is_active_in_the_case():
    # the swiglu limit must matter for the data above, else the limit tests prove nothing
    c = moe_case(T=9, K=64, N=32, E=4, topk=2, fmt="bf16", seed=1)
    a = moe_up_reference(c.x, c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, 1.0,
                         False)
    b = moe_up_reference(c.x, c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, 0.0,
                         False)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_references_equal_the_expert_module(dtype):
    """moe_down(moe_up(...)) row p == Expert(x[token], w) of today's layer (architecture.md §9)."""
    T, K, N, E = 7, 64, 32, 3
    c = moe_case(T=T, K=K, N=N, E=E, topk=2, fmt="bf16", seed=3, x_dtype=dtype)
    w_up = c.w_up.to(dtype)
    w_down = c.w_down.to(dtype)
    h = moe_up_reference(c.x, c.row_ids, c.expert_offsets, w_up, None, c.route_weight, LIMIT,
                         False)
    y = moe_down_reference(h, c.expert_offsets, w_down, None, False)
    offs = c.expert_offsets.tolist()
    for e in range(E):
        a, b = offs[e], offs[e + 1]
        if a == b:
            continue
        ex = Expert(K, N, LIMIT).to(dtype)
        with torch.no_grad():
            ex.w1.weight.copy_(w_up[e, 0])
            ex.w3.weight.copy_(w_up[e, 1])
            ex.w2.weight.copy_(w_down[e])
        want = ex(c.x[c.row_ids[a:b].long()], c.route_weight[a:b, None])
        if dtype == torch.float32:
            torch.testing.assert_close(y[a:b], want, rtol=1e-5, atol=1e-5)
        else:
            _close_bf16(y[a:b], want, ulps=2)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_act_quant_is_the_fp8_simulation_of_the_input(fmt):
    c = moe_case(T=6, K=128, N=128, E=2, topk=2, fmt=fmt, seed=4)
    a = moe_up_reference(c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale,
                         c.route_weight, LIMIT, True)
    b = moe_up_reference(fp8_e4m3_sim(c.x, 128), c.row_ids, c.expert_offsets, c.w_up,
                         c.w_up_scale, c.route_weight, LIMIT, False)
    assert torch.equal(a, b)
    a = moe_down_reference(c.h, c.expert_offsets, c.w_down, c.w_down_scale, True)
    b = moe_down_reference(fp8_e4m3_sim(c.h, 128), c.expert_offsets, c.w_down, c.w_down_scale,
                           False)
    assert torch.equal(a, b)
    assert not torch.equal(a, moe_down_reference(c.h, c.expert_offsets, c.w_down,
                                                 c.w_down_scale, False))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_quantized_formats_equal_their_dequantisation(fmt):
    c = moe_case(T=8, K=64, N=64, E=3, topk=2, fmt=fmt, seed=5)
    a = moe_up_reference(c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale,
                         c.route_weight, LIMIT, False)
    b = moe_up_reference(c.x, c.row_ids, c.expert_offsets,
                         dequantize_experts(c.w_up, c.w_up_scale, 64), None, c.route_weight,
                         LIMIT, False)
    assert torch.equal(a, b)


def test_corner_cases_empty_experts_skew_and_tail_rows():
    # every pair on one expert (others empty), and pairs past offsets[E] left at 0
    c = moe_case(T=5, K=64, N=32, E=4, topk=2, fmt="bf16", seed=6, skew="one")
    assert c.expert_offsets.tolist() == [0, 0, 0, 10, 10]
    h = moe_up(c.x, c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, LIMIT)
    assert bool((h != 0).any(-1).all())
    offs = c.expert_offsets.clone()
    offs[3:] = 6                       # the last 4 pairs belong to no expert
    h2 = moe_up(c.x, c.row_ids, offs, c.w_up, None, c.route_weight, LIMIT)
    assert torch.equal(h2[:6], h[:6]) and bool((h2[6:] == 0).all())
    out = torch.full_like(h, 7.0)
    moe_up(c.x, c.row_ids, offs, c.w_up, None, c.route_weight, LIMIT, out=out)
    assert torch.equal(out[:6], h[:6]) and bool((out[6:] == 7.0).all())
    y = moe_down(h, offs, c.w_down, None)
    assert bool((y[6:] == 0).all()) and bool((y[:6] != 0).any(-1).all())
    yo = torch.full_like(y, 3.0)
    moe_down(h, offs, c.w_down, None, out=yo)
    assert torch.equal(yo[:6], y[:6]) and bool((yo[6:] == 3.0).all())


def test_zero_pairs():
    c = moe_case(T=3, K=64, N=32, E=4, topk=2, fmt="fp8", seed=7)
    empty_i = torch.zeros(0, dtype=torch.int32)
    offs = torch.zeros(5, dtype=torch.int32)
    h = moe_up(c.x, empty_i, offs, c.w_up, c.w_up_scale, torch.zeros(0), LIMIT)
    assert h.shape == (0, 32) and h.dtype == torch.bfloat16
    y = moe_down(h, offs, c.w_down, c.w_down_scale)
    assert y.shape == (0, 64)


def test_errors_are_clear():
    c = moe_case(T=4, K=64, N=32, E=2, topk=2, fmt="fp8", seed=8)
    args = (c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale, c.route_weight, LIMIT, False)
    with pytest.raises(ValueError, match="w_up_scale is required"):
        moe_up_reference(*args[:4], None, *args[5:])
    with pytest.raises(ValueError, match=r"w_up_scale must be \[2, 2, 1, 1\]"):
        moe_up_reference(*args[:4], c.w_up_scale[:, :, :, :0], *args[5:])
    with pytest.raises(ValueError, match="row_ids must be int32"):
        moe_up_reference(c.x, c.row_ids.long(), *args[2:])
    bad = c.expert_offsets.clone()
    bad[1] = 100
    with pytest.raises(ValueError, match="non-decreasing"):
        moe_up_reference(c.x, c.row_ids, bad, *args[3:])
    rows = c.row_ids.clone()
    rows[0] = 4
    with pytest.raises(ValueError, match=r"row_ids must lie in \[0, T = 4\)"):
        moe_up_reference(c.x, rows, *args[2:])
    with pytest.raises(ValueError, match="act_quant needs dim divisible by 128"):
        moe_up_reference(*args[:7], True)
    with pytest.raises(ValueError, match="w_down must be"):
        moe_down_reference(c.h, c.expert_offsets, c.w_down[0], None, False)
    with pytest.raises(ValueError, match="int8 packed FP4"):
        moe_down_reference(c.h, c.expert_offsets, c.w_down.view(torch.float8_e5m2), None, False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    # float32 scales (the "-Base" checkpoints' format) and, for FP8 weights, no schema test:
    # opcheck's schema check compares tensors with arithmetic that e8m0 / e4m3 do not implement
    c = moe_case(T=5, K=64, N=32, E=3, topk=2, fmt=fmt, seed=9)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    if fmt != "bf16":
        c.w_up_scale, c.w_down_scale = e8m0_to_float(c.w_up_scale), e8m0_to_float(c.w_down_scale)
    if fmt == "fp8":
        utils = utils[1:]
    up = (c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale, c.route_weight, LIMIT, False)
    torch.library.opcheck(torch.ops.dsv4.moe_up.default, up, test_utils=utils)
    h = torch.empty(c.row_ids.shape[0], 32, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dsv4.moe_up_out.default, up, {"h": h}, test_utils=utils)
    hh = c.h[:, :32].contiguous()
    w_down = c.w_down[..., : (16 if fmt == "fp4" else 32)].contiguous()
    s_down = None
    if fmt == "fp8":
        s_down = c.w_down_scale
    elif fmt == "fp4":
        s_down = c.w_down_scale[..., :1].contiguous()
    down = (hh, c.expert_offsets, w_down, s_down, False)
    torch.library.opcheck(torch.ops.dsv4.moe_down.default, down, test_utils=utils)
    y = torch.empty(hh.shape[0], 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dsv4.moe_down_out.default, down, {"y": y}, test_utils=utils)


def test_route_helper_is_expert_major_and_stable():
    row_ids, offs, rw = route(T=6, E=5, topk=3, seed=10)
    offs = offs.tolist()
    assert offs[0] == 0 and offs[-1] == 18
    for e in range(5):
        seg = row_ids[offs[e]:offs[e + 1]].tolist()
        assert seg == sorted(seg)


# ---------------------------------------------------------------------------------------------
# CUDA kernels against the fp32 reference (2x bf16 rule), corner cases, tiles
# ---------------------------------------------------------------------------------------------
TILES = ("auto", "decode", "decode_deep", "medium", "large", "huge", "skinny")


def _set_tile(monkeypatch, tile, pipe="serial"):
    """Force the kernel's tile (DSV4_GEMM_TILE) and pipeline (DSV4_GEMM_PIPE) variants."""
    if tile == "auto":
        monkeypatch.delenv("DSV4_GEMM_TILE", raising=False)
    else:
        monkeypatch.setenv("DSV4_GEMM_TILE", tile)
    monkeypatch.setenv("DSV4_GEMM_PIPE", pipe)


def _assert_2x_bf16_rule(kernel, ref_bf16, truth, what):
    """Kernel error against the fp32 truth <= 2x the error of the bf16 reference (+ a floor for
    outputs the bf16 reference gets exactly); inf/NaN positions equal."""
    k, r, t = kernel.double(), ref_bf16.double(), truth.double()
    assert torch.equal(torch.isnan(k), torch.isnan(t)), f"{what}: NaN positions differ"
    fin = torch.isfinite(t)
    assert torch.equal(torch.isfinite(k), fin), f"{what}: inf positions differ"
    k_err = (k - t)[fin].abs().max().item() if fin.any() else 0.0
    r_err = (r - t)[fin].abs().max().item() if fin.any() else 0.0
    floor = 1e-6 * (t[fin].abs().max().item() if fin.any() else 1.0)
    assert k_err <= 2 * r_err + floor, \
        f"{what}: kernel err {k_err:.3g} > 2 x bf16 ref err {r_err:.3g}"
    if fin.any() and t[fin].abs().max() > 0:
        cos = torch.nn.functional.cosine_similarity(k[fin].flatten(), t[fin].flatten(), dim=0)
        assert cos > 0.999, f"{what}: cosine similarity {cos:.6f}"


def _truth_up(c, limit, act_quant):
    """fp32 math with no intermediate bf16 rounding (the reference on fp32 inputs)."""
    K = c.x.shape[1]
    x = fp8_e4m3_sim(c.x, 128) if act_quant else c.x
    return moe_up_reference(x.float(), c.row_ids, c.expert_offsets,
                            dequantize_experts(c.w_up, c.w_up_scale, K), None, c.route_weight,
                            limit, False)


def _truth_down(c, h, act_quant):
    N = h.shape[1]
    hin = fp8_e4m3_sim(h, 128) if act_quant else h
    return moe_down_reference(hin.float(), c.expert_offsets,
                              dequantize_experts(c.w_down, c.w_down_scale, N), None, False)


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """a and b hold the same values, NaN where the other has NaN (same dtype and shape)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN positions differ"
    keep = ~torch.isnan(a)
    assert torch.equal(a[keep], b[keep])


def _check_case_cuda(c, limit=LIMIT, act_quant=False):
    cc = c.to("cuda")
    P, N = c.row_ids.shape[0], c.w_up.shape[2]
    D = c.w_down.shape[1]
    n_used = int(c.expert_offsets[-1])
    # moe_up (out variant on a NaN-poisoned buffer: rows past offsets[E] must stay untouched)
    h = torch.full((P, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_up(cc.x, cc.row_ids, cc.expert_offsets, cc.w_up, cc.w_up_scale, cc.route_weight, limit,
           act_quant, out=h)
    torch.cuda.synchronize()
    h = h.cpu()
    assert bool(torch.isnan(h[n_used:]).all()), "moe_up_out wrote past offsets[E]"
    ref = moe_up_reference(c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale,
                           c.route_weight, limit, act_quant)
    _assert_2x_bf16_rule(h[:n_used], ref[:n_used], _truth_up(c, limit, act_quant)[:n_used],
                         "moe_up")
    hf = moe_up(cc.x, cc.row_ids, cc.expert_offsets, cc.w_up, cc.w_up_scale, cc.route_weight,
                limit, act_quant).cpu()
    # the functional op equals its out-variant bit for bit, NaN positions included (a NaN
    # weight scale poisons outputs; NaN != NaN, so torch.equal alone cannot compare them)
    _assert_same_bits(hf[:n_used], h[:n_used])
    assert bool((hf[n_used:] == 0).all())
    # moe_down on the reference's h
    y = torch.full((P, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_down(ref.cuda(), cc.expert_offsets, cc.w_down, cc.w_down_scale, act_quant, out=y)
    y = y.cpu()
    assert bool(torch.isnan(y[n_used:]).all()), "moe_down_out wrote past offsets[E]"
    yref = moe_down_reference(ref, c.expert_offsets, c.w_down, c.w_down_scale, act_quant)
    _assert_2x_bf16_rule(y[:n_used], yref[:n_used], _truth_down(c, ref, act_quant)[:n_used],
                         "moe_down")
    yf = moe_down(ref.cuda(), cc.expert_offsets, cc.w_down, cc.w_down_scale, act_quant).cpu()
    _assert_same_bits(yf[:n_used], y[:n_used])
    assert bool((yf[n_used:] == 0).all())


@pytest.mark.cuda
@pytest.mark.parametrize("pipe", ["serial", "overlap"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("T,K,N,E,topk", [(37, 128, 64, 8, 2), (5, 256, 128, 8, 2),
                                          (300, 128, 256, 4, 2)])
def test_cuda_matches_reference(monkeypatch, pipe, fmt, tile, T, K, N, E, topk):
    _set_tile(monkeypatch, tile, pipe)
    _check_case_cuda(moe_case(T=T, K=K, N=N, E=E, topk=topk, fmt=fmt, seed=T + K + N))


@pytest.mark.cuda
@pytest.mark.parametrize("pipe", ["serial", "overlap"])
@pytest.mark.parametrize("fmt,K,N", [("bf16", 72, 40), ("fp8", 208, 48), ("fp4", 160, 96),
                                     ("fp8", 192, 144)])
def test_cuda_widths_not_multiples_of_the_tile(monkeypatch, pipe, fmt, K, N):
    _set_tile(monkeypatch, "auto", pipe)
    # K / N not multiples of 64 or of the 128-wide FP8 blocks (partial scale blocks); N is the
    # input width of the down projection, which FP8 weights need in multiples of 16
    _check_case_cuda(moe_case(T=29, K=K, N=N, E=5, topk=2, fmt=fmt, seed=K * N))


@pytest.mark.cuda
@pytest.mark.parametrize("fmt,K,N", [("fp8", 208, 144), ("fp4", 160, 96)])
@pytest.mark.parametrize("tile,pipe", [("decode", "serial"), ("large", "serial"),
                                       ("large", "overlap"), ("huge", "overlap"),
                                       ("skinny", "serial")])
def test_cuda_nan_and_tiny_weight_scales(monkeypatch, fmt, K, N, tile, pipe):
    """e8m0 weight scales 255 (NaN) and 2-3 (2^-125, 2^-124: outside the range where the kernel
    converts with one bf16x2 multiply) in a few blocks, K not a multiple of 64 (zero-filled
    chunks in the NaN block): NaN exactly where the fp32 truth has it, the rest by the 2x bf16
    rule. moe_down runs on a finite random h, so its own blocks are what it tests."""
    _set_tile(monkeypatch, tile, pipe)
    c = moe_case(T=37, K=K, N=N, E=4, topk=2, fmt=fmt, seed=K + N)
    su, sd = c.w_up_scale.view(torch.uint8), c.w_down_scale.view(torch.uint8)
    su[0, 0, -1, -1] = 255  # expert 0, gate, last row block (FP4: row) and last k block
    su[1, 1, 0, 0] = 2
    sd[3, -1, 0] = 255
    sd[0, 0, -1] = 3
    assert bool((c.expert_offsets[1:] > c.expert_offsets[:-1]).all()), "an expert got no pairs"
    cc = c.to("cuda")
    P, n_used = c.row_ids.shape[0], int(c.expert_offsets[-1])
    h = torch.full((P, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_up(cc.x, cc.row_ids, cc.expert_offsets, cc.w_up, cc.w_up_scale, cc.route_weight, LIMIT,
           False, out=h)
    ref = moe_up_reference(c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale,
                           c.route_weight, LIMIT, False)
    truth = _truth_up(c, LIMIT, False)[:n_used]
    assert bool(torch.isnan(truth).any()) and not bool(torch.isnan(truth).all())
    _assert_2x_bf16_rule(h.cpu()[:n_used], ref[:n_used], truth, "moe_up")
    y = torch.full((P, K), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_down(cc.h, cc.expert_offsets, cc.w_down, cc.w_down_scale, False, out=y)
    yref = moe_down_reference(c.h, c.expert_offsets, c.w_down, c.w_down_scale, False)
    ytruth = _truth_down(c, c.h, False)[:n_used]
    assert bool(torch.isnan(ytruth).any()) and not bool(torch.isnan(ytruth).all())
    _assert_2x_bf16_rule(y.cpu()[:n_used], yref[:n_used], ytruth, "moe_down")


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("tile,pipe", [("decode", "serial"), ("large", "overlap"),
                                       ("skinny", "serial")])
def test_cuda_float32_scales_not_powers_of_two(monkeypatch, fmt, tile, pipe):
    """float32 weight scales (the "-Base" checkpoints' kind) that are not powers of two: the
    kernel may not take its bf16x2-multiply shortcut (exact only for a power-of-two scale)."""
    _set_tile(monkeypatch, tile, pipe)
    c = moe_case(T=37, K=256, N=144 if fmt == "fp8" else 96, E=4, topk=2, fmt=fmt, seed=21)
    g = torch.Generator().manual_seed(22)
    for name in ("w_up_scale", "w_down_scale"):
        s = e8m0_to_float(getattr(c, name))
        setattr(c, name, s * (1.0 + torch.rand(s.shape, generator=g)))  # in [1, 2) x 2^e
    _check_case_cuda(c)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("skew", ["one", "half"])
@pytest.mark.parametrize("tile,pipe", [("auto", "serial"), ("decode", "serial"),
                                       ("huge", "serial"), ("large", "overlap"),
                                       ("skinny", "serial")])
def test_cuda_skewed_routing_and_empty_experts(monkeypatch, fmt, skew, tile, pipe):
    _set_tile(monkeypatch, tile, pipe)
    # skew "one": every pair on one expert, 600 rows (several row tiles), 7 experts empty
    _check_case_cuda(moe_case(T=300, K=128, N=64, E=8, topk=2, fmt=fmt, seed=11, skew=skew))


# decode sizes: the skinny tile (a weight stream on CUDA cores, 1 / 2 / 4 / 8 activation rows
# per unit) against the 16-row tensor-core tile it replaces at small T
DECODE_T = (1, 2, 7, 8, 9, 16, 33)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tile", ["skinny", "decode"])
@pytest.mark.parametrize("T", DECODE_T)
@pytest.mark.parametrize("skew", [None, "one", "half"])
def test_cuda_decode_sizes(monkeypatch, fmt, tile, T, skew):
    """T = 1 .. 33 tokens (top-2 of 8 experts: 2 .. 66 pairs; units of 2 / 4 / 8 rows and an
    expert split over several row tiles), routing spread, all on one expert, or on half of the
    experts (empty experts), SwiGLU with the clamp."""
    _set_tile(monkeypatch, tile)
    _check_case_cuda(moe_case(T=T, K=256, N=128, E=8, topk=2, fmt=fmt, seed=500 + T,
                              skew=skew))


@pytest.mark.cuda
@pytest.mark.parametrize("fmt,K,N", [("bf16", 2048, 256), ("fp8", 2048, 256), ("fp4", 4096, 256),
                                     ("fp8", 208, 144), ("bf16", 72, 40), ("fp4", 160, 96)])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_cuda_skinny_k_split_and_partial_blocks(monkeypatch, fmt, K, N, T):
    """Long k (the skinny tile splits it over 2-4 warps per row group, two chunks in flight per
    lane) and k / N that are not multiples of the 128-wide FP8 scale blocks."""
    _set_tile(monkeypatch, "skinny")
    _check_case_cuda(moe_case(T=T, K=K, N=N, E=4, topk=2, fmt=fmt, seed=K + N + T))


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_skinny_auto_rule(monkeypatch, fmt):
    """DSV4_GEMM_SKINNY=1 lets kAuto pick the skinny tile (MoE: pairs <= E; here 8 <= 8):
    same outputs as the forced tile, bit for bit (one kernel, fixed reduction order)."""
    c = moe_case(T=4, K=256, N=128, E=8, topk=2, fmt=fmt, seed=77).to("cuda")
    args = (c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale, c.route_weight, LIMIT, False)
    _set_tile(monkeypatch, "skinny")
    forced = moe_up(*args)
    again = moe_up(*args)
    _set_tile(monkeypatch, "auto")
    monkeypatch.setenv("DSV4_GEMM_SKINNY", "1")
    auto = moe_up(*args)
    _set_tile(monkeypatch, "skinny")
    monkeypatch.setenv("DSV4_SKINNY_PREFETCH", "0")  # the L2 prefetch changes no value
    no_prefetch = moe_up(*args)
    _assert_same_bits(forced, again)  # deterministic
    _assert_same_bits(auto, forced)
    _assert_same_bits(no_prefetch, forced)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("tile", ["decode", "large"])
def test_cuda_act_quant_is_exact(monkeypatch, fmt, tile):
    _set_tile(monkeypatch, tile)
    c = moe_case(T=40, K=256, N=128, E=4, topk=2, fmt=fmt, seed=12)
    _check_case_cuda(c, act_quant=True)
    cc = c.to("cuda")
    args = (cc.row_ids, cc.expert_offsets, cc.w_up, cc.w_up_scale, cc.route_weight, LIMIT)
    a = moe_up(cc.x, *args, True)
    b = moe_up(fp8_e4m3_sim(cc.x, 128), *args, False)
    assert torch.equal(a, b), "in-kernel activation quantisation differs from fp8_e4m3_sim"
    a = moe_down(cc.h, cc.expert_offsets, cc.w_down, cc.w_down_scale, True)
    b = moe_down(fp8_e4m3_sim(cc.h, 128), cc.expert_offsets, cc.w_down, cc.w_down_scale, False)
    assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_act_quant_nonfinite_blocks():
    # a 1x128 block holding inf or NaN gets scale 1 in fp8_e4m3_sim; the kernel must agree
    c = moe_case(T=6, K=256, N=64, E=2, topk=1, fmt="fp8", seed=13)
    c.x[1, 5] = float("inf")
    c.x[2, 130] = float("nan")
    cc = c.to("cuda")
    args = (cc.row_ids, cc.expert_offsets, cc.w_up, cc.w_up_scale, cc.route_weight, 0.0)
    a = moe_up(cc.x, *args, True)
    b = moe_up(fp8_e4m3_sim(cc.x, 128), *args, False)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.cuda
def test_cuda_limits_and_zero_pairs():
    c = moe_case(T=16, K=128, N=64, E=4, topk=2, fmt="bf16", seed=14)
    c.x = c.x * 8  # g and u far beyond the clamp
    _check_case_cuda(c, limit=LIMIT)
    _check_case_cuda(c, limit=0.0)
    cc = c.to("cuda")
    offs = torch.zeros(5, dtype=torch.int32, device="cuda")
    h = moe_up(cc.x, cc.row_ids[:0], offs, cc.w_up, None, cc.route_weight[:0], LIMIT)
    assert h.shape == (0, 64)
    y = moe_down(h, offs, cc.w_down, None)
    assert y.shape == (0, 128)
    # P > 0 but every expert empty: the functional ops return zeros
    h = moe_up(cc.x, cc.row_ids, offs, cc.w_up, None, cc.route_weight, LIMIT)
    assert bool((h == 0).all())


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 8, 256])
def test_cuda_v4_flash_shapes(fmt, T):
    """V4-Flash expert shapes (dim 4096, inter 2048, top-6) with 32 of the 256 experts (the
    kernel does not care how many exist; 32 keeps the weights small), reference on the GPU."""
    check_v4_flash_shapes(fmt, T, T, "V4")


def check_v4_flash_shapes(fmt, T, seed, what):
    """moe_up and moe_down at V4-Flash expert shapes (4096 -> 2048, top-6, 32 experts) for T
    tokens in ``fmt``, against the GPU reference with the 2x bf16 rule (also the ws mainloop's
    test, test_grouped_gemm_ws.py)."""
    E, K, N = 32, 4096, 2048
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    row_ids, offs, rw = route(T, E, 6, seed=T, device="cuda")
    x = (torch.randn(T, K, device="cuda", generator=g) * 2).bfloat16()
    w_up = torch.randn(E, 2, N, K, device="cuda", generator=g) * K ** -0.5 * 2
    w_down = torch.randn(E, K, N, device="cuda", generator=g) * N ** -0.5
    from gemm_cases import MoECase, quantize_stack
    wq_up, s_up = quantize_stack(w_up, fmt)
    wq_down, s_down = quantize_stack(w_down, fmt)
    del w_up, w_down
    c = MoECase(x, row_ids, offs, rw, wq_up, s_up, wq_down, s_down, x[:0])
    h = moe_up(x, row_ids, offs, wq_up, s_up, rw, LIMIT)
    ref = moe_up_reference(x, row_ids, offs, wq_up, s_up, rw, LIMIT, False)
    _assert_2x_bf16_rule(h, ref, _truth_up(c, LIMIT, False), f"moe_up {what}")
    y = moe_down(ref, offs, wq_down, s_down)
    yref = moe_down_reference(ref, offs, wq_down, s_down, False)
    _assert_2x_bf16_rule(y, yref, _truth_down(c, ref, False), f"moe_down {what}")


@pytest.mark.cuda
def test_cuda_opcheck():
    c = moe_case(T=5, K=128, N=64, E=3, topk=2, fmt="fp4", seed=15).to("cuda")
    c.w_up_scale = e8m0_to_float(c.w_up_scale)
    c.w_down_scale = e8m0_to_float(c.w_down_scale)
    up = (c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale, c.route_weight, LIMIT, False)
    torch.library.opcheck(torch.ops.dsv4.moe_up.default, up)
    h = torch.empty(10, 64, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.dsv4.moe_up_out.default, up, {"h": h})
    down = (c.h, c.expert_offsets, c.w_down, c.w_down_scale, False)
    torch.library.opcheck(torch.ops.dsv4.moe_down.default, down)
    y = torch.empty(10, 128, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.dsv4.moe_down_out.default, down, {"y": y})


@pytest.mark.cuda
def test_cuda_errors_are_clear():
    c = moe_case(T=4, K=64, N=32, E=2, topk=2, fmt="bf16", seed=16).to("cuda")
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        moe_up(c.x.float(), c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, LIMIT)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        moe_up(c.x, c.row_ids, c.expert_offsets, c.w_up.transpose(2, 3).contiguous()
               .transpose(2, 3), None, c.route_weight, LIMIT)
    with pytest.raises(RuntimeError, match=r"expert_offsets must be int32 \[E \+ 1\]"):
        moe_up(c.x, c.row_ids, c.expert_offsets[:-1], c.w_up, None, c.route_weight, LIMIT)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose data pointer is 2 bytes past a 16-byte boundary (contiguous strides)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    assert v.data_ptr() % 16 != 0 and v.is_contiguous()
    return v


@pytest.mark.cuda
def test_cuda_misaligned_and_one_row_views():
    """Inputs the kernels cannot read in place (a misaligned contiguous view, a one-row view
    whose row stride is not a multiple of 8) are copied, and one-row outputs with such a stride
    are written in place: same values as the aligned call (before: 'launch failed: invalid
    argument', since .contiguous() returns those views unchanged)."""
    c = moe_case(T=6, K=128, N=64, E=3, topk=2, fmt="fp8", seed=17).to("cuda")
    args = (c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale, c.route_weight, LIMIT, False)
    h = moe_up(c.x, *args)
    assert torch.equal(moe_up(_misaligned(c.x), *args), h)
    y = moe_down(h, c.expert_offsets, c.w_down, c.w_down_scale, False)
    assert torch.equal(moe_down(_misaligned(h), c.expert_offsets, c.w_down, c.w_down_scale,
                                False), y)
    # one token, one pair: x, h and the out buffers as one-row views with a row stride of 3
    x1 = c.x[:1].clone()
    one = (torch.zeros(1, dtype=torch.int32, device="cuda"),
           torch.tensor([0, 1, 1, 1], dtype=torch.int32, device="cuda"), c.w_up, c.w_up_scale,
           c.route_weight[:1], LIMIT, False)
    h1 = moe_up(x1, *one)
    odd = torch.full((3 * 128 + 128,), float("nan"), dtype=torch.bfloat16, device="cuda")
    x_odd = odd.as_strided((1, 128), (3, 1))
    x_odd.copy_(x1)
    assert torch.equal(moe_up(x_odd, *one), h1)
    h_out = odd.as_strided((1, 64), (3, 1))
    moe_up(x1, *one, out=h_out)
    assert torch.equal(h_out, h1)
    y1 = moe_down(h1, one[1], c.w_down, c.w_down_scale, False)
    y_out = torch.full((1, 3 * 128 + 128), float("nan"), dtype=torch.bfloat16,
                       device="cuda").as_strided((1, 128), (3, 1))
    moe_down(h1, one[1], c.w_down, c.w_down_scale, False, out=y_out)
    assert torch.equal(y_out, y1)
