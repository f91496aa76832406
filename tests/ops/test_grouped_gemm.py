"""torch.ops.dsv4.moe_up / moe_down (contracts.md §B): the references against a per-pair formula
and against today's Expert module (CPU), corner cases, errors, opcheck; the CUDA kernels against
the fp32 reference with the 2x bf16 rule (GPU)."""

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
