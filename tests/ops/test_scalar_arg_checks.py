"""Float scalar arguments of the torch.ops.dsv4 ops outside their domain (NaN, inf, an epsilon
<= 0 or one that rounds to 0 in float32, ...) raise an error that names the argument, the
accepted values and the value given, instead of a silently wrong result: the CPU references
(ValueError) and the CUDA glue (RuntimeError, csrc/torch/scalar_checks.h) refuse the same
values, before anything is written (an _out buffer or a cache keeps its contents). The
boundary values that stay accepted (the smallest positive float32 epsilon, a scale of 0, ...)
run. The cases are shared by the CPU and the CUDA tests; the inputs come from each op's own
tests (their builders are imported), with the shapes of their CUDA tests."""

from __future__ import annotations

import math
import re

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
from dsv4._kernel_digest import registered_ops
from dsv4.ops import _ext
from dsv4.ops import kv_cache as kc

from gemm_cases import moe_case  # (tests/ops/gemm_cases.py)
from test_compress_kv import _random_problem as compress_problem
from test_hca_attn import DECODE as HCA_DECODE
from test_hca_attn import make_problem as hca_problem
from test_mhc_ops import _inputs as mhc_inputs
from test_moe_routing import _opcheck_cases as moe_routing_cases
from test_qkv_rope import _freqs as rope_freqs
from test_qkv_rope import _pos as rope_pos
from test_sparse_attn import _random_case as attn_case

ops = torch.ops.dsv4
SENTINEL = 7
NAN, INF = math.nan, math.inf
F32_TRUE_MIN = 2.0 ** -149                   # the smallest positive float32 (subnormal)
F32_MIN = 1.1754943508222875e-38             # the smallest normal float32
F32_MAX = 3.4028234663852886e38

# Accepted sets (python/dsv4/ops/_ext.py check_finite_f32 / check_positive_f32, the same in
# csrc/torch/scalar_checks.h): bad values, good values and the words of the message.
FINITE = dict(bad=(NAN, INF, -INF, 1e39, -1e39), good=(0.0, -0.5, F32_MAX),
              says="must be a finite float32")
POSITIVE = dict(bad=(NAN, INF, -INF, 0.0, -0.0, -1e-6, 7e-46, 1e39), good=(F32_TRUE_MIN, F32_MAX),
                says="must be a finite float32 > 0")
LIMIT = dict(bad=(NAN, INF, -INF, -1.0, F32_MIN / 2), good=(0.0, F32_MIN),
             says=r"must be 0 \(no clamp\) or a finite float32 >= 1.17549435e-38")


# ---------------------------------------------------------------------------------------------
# One call per op: each builder takes the device and returns (call(value, buffers), {name:
# buffer}) with the scalar under test at `value` and every buffer the call writes in place.
# ---------------------------------------------------------------------------------------------
def _sparse_attn(dev, out):
    a = attn_case(23, 64, 512, 300, 130, 500, 77, seed=1, device=dev, dtype=torch.bfloat16)
    a.pop("softmax_scale", None)
    T, H, D = a["q"].shape
    bufs = {"out": torch.empty(T, H, D, dtype=torch.bfloat16, device=dev),
            "lse": torch.empty(T, H, device=dev)} if out else {}
    q, kv, idx, sink = a.pop("q"), a.pop("kv"), a.pop("indices"), a.pop("attn_sink")
    if out:
        return lambda v, b: ops.sparse_attn_out(q, kv, idx, sink, v, **a, **b), bufs
    return lambda v, b: ops.sparse_attn(q, kv, idx, sink, v, **a), bufs


def _hca_attn(dev, out):
    a = hca_problem(HCA_DECODE, H=64, D=512, bs=64, W=128, seed=1, device=dev,
                    dtype=torch.bfloat16)
    T, H, D = a["q"].shape
    before = [a[k] for k in ("q", "kv", "indices", "attn_sink")]
    after = [a[k] for k in ("topk_length", "extra_kv", "extra_block_table", "extra_rows",
                            "extra_lengths")]
    if out:
        bufs = {"out": torch.empty(T, H, D, dtype=torch.bfloat16, device=dev),
                "lse": torch.empty(T, H, device=dev)}
        return lambda v, b: ops.hca_attn_out(*before, v, *after, **b), bufs
    return lambda v, b: ops.hca_attn(*before, v, *after), {}


def _rms_norm(dev):
    x = torch.randn(5, 256, device=dev).bfloat16()
    x[1] = 0  # an all-zero row: eps alone keeps it finite
    w = torch.rand(256, device=dev) + 0.5
    return lambda v, b: ops.rms_norm(x, w, v), {}


def _q_norm_rope(dev, out):
    T, H, D = 7, 8, 128
    x = (torch.randn(T, H, D, device=dev) * 2).bfloat16()
    x[2, 3] = 0
    pos, f = rope_pos(T, 3).to(dev), rope_freqs(64).to(dev)
    if out:
        return (lambda v, b: ops.q_norm_rope_out(x, pos, f, v, True, 0, **b),
                {"out": torch.empty_like(x)})
    return lambda v, b: ops.q_norm_rope(x, pos, f, v, True, 0), {}


def _kv_norm_rope(dev, out):
    """A bf16 ring [rows, 512] as cache, an FP8 MODEL1 pool as cache2."""
    T, D = 9, 512
    x = (torch.randn(T, D, device=dev) * 2).bfloat16()
    x[4] = 0
    w = torch.rand(D, device=dev) + 0.5
    pos, f = rope_pos(T, 3).to(dev), rope_freqs(64).to(dev)
    rows = torch.randperm(T + 5)[:T].to(device=dev, dtype=torch.int32)
    bufs = {"cache": torch.empty(T + 5, D, dtype=torch.bfloat16, device=dev),
            "cache2": kc.allocate(kc.MODEL1, 2, 7, D, device=dev)}
    if out:
        bufs["out"] = torch.empty(T, D, dtype=torch.bfloat16, device=dev)
        return (lambda v, b: ops.kv_norm_rope_out(x, w, pos, f, v, 0, b["cache"], rows,
                                                  b["cache2"], rows, out=b["out"]), bufs)
    return (lambda v, b: ops.kv_norm_rope(x, w, pos, f, v, 0, b["cache"], rows, b["cache2"],
                                          rows), bufs)


def _compress_kv(dev):
    """Ratio 4, two rows of 4 new tokens (one entry completes per row), bf16 entries."""
    p = compress_problem(64, 4, 2, 8, dev, 5, dtype=torch.bfloat16, capacity=4)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32, device=dev)
    starts = torch.zeros(2, dtype=torch.int32, device=dev)

    def call(v, b):
        ops.compress_kv(p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], cu, starts,
                        b["state_kv"], b["state_score"], b["entries"], 4, 4, v, 0)
    return call, {k: p[k] for k in ("state_kv", "state_score", "entries")}


def _mhc(dev, op, which):
    """`which`: the scalar under test (norm_eps or eps); the other one is 1e-6."""
    T, d = 7, 256
    x, fn, scale, base, head = (t.to(dev) if isinstance(t, torch.Tensor) else
                                tuple(h.to(dev) for h in t) for t in mhc_inputs(T, d, 11))
    x[3] = 0

    def eps(v):
        return (v, 1e-6) if which == "norm_eps" else (1e-6, v)
    if op == "mhc_pre":
        return lambda v, b: ops.mhc_pre(x, fn, scale, base, eps(v)[0], 20, eps(v)[1]), {}
    if op == "mhc_pre_out":
        bufs = {"u": torch.empty(T, d, dtype=x.dtype, device=dev),
                "post": torch.empty(T, 4, device=dev), "comb": torch.empty(T, 4, 4, device=dev)}
        return (lambda v, b: ops.mhc_pre_out(x, fn, scale, base, eps(v)[0], 20, eps(v)[1], **b),
                bufs)
    if op == "mhc_head":
        return lambda v, b: ops.mhc_head(x, *head, *eps(v)), {}
    return (lambda v, b: ops.mhc_head_out(x, *head, *eps(v), **b),
            {"y": torch.empty(T, d, dtype=x.dtype, device=dev)})


def _moe_gate(dev, out):
    (fn, args, bufs), = [c for c in moe_routing_cases(dev)
                         if c[0]._schema.name == "dsv4::" + ("moe_gate_out" if out else "moe_gate")
                         and c[1][2] is not None]
    return lambda v, b: fn(*args[:-1], v, **b), bufs


def _moe_up(dev, out):
    c = moe_case(T=5, K=256, N=128, E=8, topk=2, fmt="bf16", seed=3).to(dev)
    a = (c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale, c.route_weight)
    if out:
        return (lambda v, b: ops.moe_up_out(*a, v, False, **b),
                {"h": torch.empty(c.row_ids.shape[0], 128, dtype=c.x.dtype, device=dev)})
    return lambda v, b: ops.moe_up(*a, v, False), {}


def _moe_swiglu(dev):
    gu = torch.randn(6, 64, device=dev).bfloat16()
    w = torch.rand(6, device=dev)
    return lambda v, b: ops.moe_swiglu(gu, w, v), {}


# (op, float argument) -> (builder(device), accepted set)
CASES = {
    ("sparse_attn", "softmax_scale"): (lambda d: _sparse_attn(d, False), FINITE),
    ("sparse_attn_out", "softmax_scale"): (lambda d: _sparse_attn(d, True), FINITE),
    ("hca_attn", "softmax_scale"): (lambda d: _hca_attn(d, False), FINITE),
    ("hca_attn_out", "softmax_scale"): (lambda d: _hca_attn(d, True), FINITE),
    ("rms_norm", "eps"): (_rms_norm, POSITIVE),
    ("q_norm_rope", "eps"): (lambda d: _q_norm_rope(d, False), POSITIVE),
    ("q_norm_rope_out", "eps"): (lambda d: _q_norm_rope(d, True), POSITIVE),
    ("kv_norm_rope", "eps"): (lambda d: _kv_norm_rope(d, False), POSITIVE),
    ("kv_norm_rope_out", "eps"): (lambda d: _kv_norm_rope(d, True), POSITIVE),
    ("compress_kv", "eps"): (_compress_kv, POSITIVE),
    ("mhc_pre", "norm_eps"): (lambda d: _mhc(d, "mhc_pre", "norm_eps"), POSITIVE),
    ("mhc_pre", "eps"): (lambda d: _mhc(d, "mhc_pre", "eps"), POSITIVE),
    ("mhc_pre_out", "norm_eps"): (lambda d: _mhc(d, "mhc_pre_out", "norm_eps"), POSITIVE),
    ("mhc_pre_out", "eps"): (lambda d: _mhc(d, "mhc_pre_out", "eps"), POSITIVE),
    ("mhc_head", "norm_eps"): (lambda d: _mhc(d, "mhc_head", "norm_eps"), POSITIVE),
    ("mhc_head", "eps"): (lambda d: _mhc(d, "mhc_head", "eps"), FINITE),
    ("mhc_head_out", "norm_eps"): (lambda d: _mhc(d, "mhc_head_out", "norm_eps"), POSITIVE),
    ("mhc_head_out", "eps"): (lambda d: _mhc(d, "mhc_head_out", "eps"), FINITE),
    ("moe_gate", "route_scale"): (lambda d: _moe_gate(d, False), FINITE),
    ("moe_gate_out", "route_scale"): (lambda d: _moe_gate(d, True), FINITE),
    ("moe_up", "swiglu_limit"): (lambda d: _moe_up(d, False), LIMIT),
    ("moe_up_out", "swiglu_limit"): (lambda d: _moe_up(d, True), LIMIT),
    ("moe_swiglu", "limit"): (_moe_swiglu, LIMIT),
}
BAD = [(op, arg, v) for (op, arg), (_, s) in CASES.items() for v in s["bad"]]
GOOD = [(op, arg, v) for (op, arg), (_, s) in CASES.items() for v in s["good"]]


def _ids(params):
    return [f"{op}-{arg}-{v!r}" for op, arg, v in params]


def _message(op: str, arg: str, v: float) -> str:
    """The op, the argument, the accepted values and the value given, as the CUDA glue (C++
    `<<` of a double: %g, 6 digits) or the reference (Python's repr) prints it."""
    base = op.removesuffix("_out")
    shown = "|".join(re.escape(s) for s in (f"{v:.6g}", repr(v)))
    return rf"{base}.*: {arg} {CASES[(op, arg)][1]['says']}.*, got (?:{shown})$"


def test_every_float_argument_has_a_case():
    """(CPU) Each `float` argument of a schema in the glue (csrc/torch) has a case above."""
    floats = {(op, a.name) for op in registered_ops()
              for a in getattr(ops, op).default._schema.arguments
              if str(a.type) == "float"}
    assert floats == set(CASES)


def _refused(dev, op, arg, v, error):
    call, bufs = CASES[(op, arg)][0](dev)
    for t in bufs.values():
        t.fill_(SENTINEL)
    with pytest.raises(error, match=_message(op, arg, v)):
        call(v, bufs)
    if dev == "cuda":
        torch.cuda.synchronize()
    for name, t in bufs.items():
        assert bool((t == SENTINEL).all()), f"{op}: {name} was written by a call that raised"


def _accepted(dev, op, arg, v):
    call, bufs = CASES[(op, arg)][0](dev)
    got = call(v, bufs)
    if v != F32_TRUE_MIN:
        return
    # the smallest epsilon keeps the all-zero row / token of the inputs finite
    outs = [t for t in (got if isinstance(got, tuple) else (got,)) if t is not None]
    outs += [bufs[k] for k in ("out", "y", "u", "post", "comb", "entries") if k in bufs]
    assert outs
    for t in outs:
        assert bool(torch.isfinite(t.float()).all()), f"{op}({arg}={v!r}): not finite"


@pytest.mark.parametrize("op,arg,value", BAD, ids=_ids(BAD))
def test_reference_refuses(op, arg, value):
    _refused("cpu", op, arg, value, ValueError)


@pytest.mark.parametrize("op,arg,value", GOOD, ids=_ids(GOOD))
def test_reference_accepts(op, arg, value):
    _accepted("cpu", op, arg, value)


def _needs_kernel(op: str) -> None:
    if not _ext.has_compiled_kernel(op.removesuffix("_out")):
        pytest.skip(f"the extension has no compiled {op} kernel")


@pytest.mark.cuda
@pytest.mark.parametrize("op,arg,value", BAD, ids=_ids(BAD))
def test_cuda_glue_refuses_before_any_write(op, arg, value):
    _needs_kernel(op)
    _refused("cuda", op, arg, value, RuntimeError)


@pytest.mark.cuda
@pytest.mark.parametrize("op,arg,value", GOOD, ids=_ids(GOOD))
def test_cuda_glue_accepts(op, arg, value):
    _needs_kernel(op)
    _accepted("cuda", op, arg, value)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_q_norm_rope_without_norm_ignores_eps(dev):
    """norm = False never reads eps (the indexer and the inverse RoPE pass 0): not refused."""
    if dev == "cuda":
        _needs_kernel("q_norm_rope")
    T, H, D = 7, 8, 128
    x = (torch.randn(T, H, D, device=dev) * 2).bfloat16()
    pos, f = rope_pos(T, 3).to(dev), rope_freqs(64).to(dev)
    want = ops.q_norm_rope(x, pos, f, 1e-6, False, 0)
    for eps in (0.0, -1.0, NAN, INF):
        assert torch.equal(ops.q_norm_rope(x, pos, f, eps, False, 0), want)
