"""Bad buffers given to the CUDA ops' glue (csrc/torch) raise a clear error instead of a crash or
a silently wrong result. Every argument a schema marks as written (``Tensor(a!)``, ...) is
refused as a broadcast (expanded) view before anything is written or launched: every token
would write one memory location (csrc/torch/glue_checks.h check_not_broadcast). Also: an o
with head_dim 0 given to grouped_oproj (an integer division by zero in the glue: the process
died). The CPU references refuse the same inputs (tests/ops/test_op_input_checks.py,
test_grouped_oproj.py).

The inputs come from each op's own tests (their builders are imported), with the shapes of
their CUDA tests."""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
from dsv4._kernel_digest import registered_ops
from dsv4.ops import _ext
from dsv4.ops import kv_cache as kc

from gemm_cases import moe_case  # (tests/ops/gemm_cases.py)
from test_compress_kv import _random_problem as compress_problem
from test_fp8_linear import make as fp8_linear_inputs
from test_grouped_oproj import make as oproj_inputs
from test_hca_attn import DECODE as HCA_DECODE
from test_hca_attn import make_problem as hca_problem
from test_indexer_topk import make_inputs as indexer_inputs
from test_mhc_ops import _inputs as mhc_inputs
from test_moe_routing import _opcheck_cases as moe_routing_cases
from test_qkv_rope import _freqs as rope_freqs
from test_qkv_rope import _pos as rope_pos
from test_sparse_attn import _random_case as attn_case

ops = torch.ops.dsv4
SENTINEL = 7
DEV = "cuda"
BF16, F32, I32 = (dict(dtype=dt, device=DEV) for dt in (torch.bfloat16, torch.float32,
                                                        torch.int32))


def _needs_kernel(op: str) -> None:
    if not _ext.has_compiled_kernel(op):
        pytest.skip(f"the extension has no compiled {op} kernel")


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _bcast(shape, dtype):
    """A broadcast view of `shape` (every element one memory location) holding SENTINEL."""
    return torch.full((1,) * len(shape), SENTINEL, dtype=dtype, device=DEV).expand(shape)


# ---------------------------------------------------------------------------------------------
# One correct call per op on fresh random inputs: each builder returns (call(buffers), {name:
# buffer}) with every written argument in the buffers.
# ---------------------------------------------------------------------------------------------
def _sparse_attn_out():
    a = attn_case(23, 64, 512, 300, 130, 500, 77, seed=_seed(), device=DEV,
                  dtype=torch.bfloat16)
    T, H, D = a["q"].shape
    return (lambda b: ops.sparse_attn_out(**a, **b),
            {"out": torch.empty(T, H, D, **BF16), "lse": torch.empty(T, H, **F32)})


def _hca_attn_out():
    a = hca_problem(HCA_DECODE, H=64, D=512, bs=64, W=128, seed=_seed(), device=DEV,
                    dtype=torch.bfloat16)
    T, H, D = a["q"].shape
    return (lambda b: ops.hca_attn_out(*a.values(), **b),
            {"out": torch.empty(T, H, D, **BF16), "lse": torch.empty(T, H, **F32)})


def _grouped_oproj_out():
    o, pos, freqs, wo_a, scale = oproj_inputs(3, 4, 128, 2, 128, "bf16", _seed(), DEV)
    return (lambda b: ops.grouped_oproj_out(o, pos, freqs, wo_a, scale, **b),
            {"out": torch.empty(3, 2, 128, **BF16)})


def _fp8_linear_out():
    x, q, s = fp8_linear_inputs(3, 96, 208, _seed(), device=DEV)
    return lambda b: ops.fp8_linear_out(x, q, s, False, **b), {"out": torch.empty(3, 96, **BF16)}


def _moe_up_out():
    c = moe_case(T=5, K=256, N=128, E=8, topk=2, fmt="bf16", seed=_seed()).to(DEV)
    return (lambda b: ops.moe_up_out(c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale,
                                     c.route_weight, 10.0, False, **b),
            {"h": torch.empty(c.row_ids.shape[0], 128, **BF16)})


def _moe_down_out():
    c = moe_case(T=5, K=256, N=128, E=8, topk=2, fmt="bf16", seed=_seed()).to(DEV)
    return (lambda b: ops.moe_down_out(c.h, c.expert_offsets, c.w_down, c.w_down_scale, False,
                                       **b),
            {"y": torch.empty(c.row_ids.shape[0], 256, **BF16)})


def _indexer_topk_out():
    q, w, keys = indexer_inputs(4, 2, 300, H=64, D=128, device=DEV)
    rows, n_valid = torch.tensor([1, 0, 1, 0], **I32), torch.tensor([300, 5, 129, 0], **I32)
    return (lambda b: ops.indexer_topk_out(q, w, keys, rows, n_valid, 64, **b),
            {"indices": torch.empty(4, 64, **I32)})


def _mhc(op):
    T, d = 7, 256
    x, fn, scale, base, head = (t.to(DEV) if isinstance(t, torch.Tensor) else
                                tuple(h.to(DEV) for h in t) for t in mhc_inputs(T, d, _seed()))
    if op == "mhc_pre_out":
        return (lambda b: ops.mhc_pre_out(x, fn, scale, base, 1e-6, 20, 1e-6, **b),
                {"u": torch.empty(T, d, **BF16), "post": torch.empty(T, 4, **F32),
                 "comb": torch.empty(T, 4, 4, **F32)})
    if op == "mhc_head_out":
        return (lambda b: ops.mhc_head_out(x, *head, 1e-6, 1e-6, **b),
                {"y": torch.empty(T, d, **BF16)})
    f = torch.randn(T, d, **BF16)
    post, comb = torch.rand(T, 4, **F32) * 2, torch.softmax(torch.randn(T, 4, 4, **F32), -1)
    return (lambda b: ops.mhc_post_out(f, x, post, comb, **b),
            {"out": torch.empty(T, 4, d, **BF16)})


def _moe_routing(op):
    (fn, args, bufs), = [c for c in moe_routing_cases(DEV) if c[0]._schema.name == "dsv4::" + op]
    return lambda b: fn(*args, **b), bufs


def _q_norm_rope_out():
    T, H, D = 37, 8, 128
    x = (torch.randn(T, H, D, device=DEV) * 2).bfloat16()
    pos, f = rope_pos(T, _seed()).to(DEV), rope_freqs(64).to(DEV)
    return (lambda b: ops.q_norm_rope_out(x, pos, f, 1e-6, True, 0, **b),
            {"out": torch.empty(T, H, D, **BF16)})


def _kv_norm_rope(op):
    """A bf16 ring [rows, 512] as cache, an FP8 MODEL1 pool as cache2."""
    T, D = 9, 512
    x = (torch.randn(T, D, device=DEV) * 2).bfloat16()
    w = torch.rand(D, device=DEV) + 0.5
    pos, f = rope_pos(T, _seed()).to(DEV), rope_freqs(64).to(DEV)
    rows = torch.randperm(T + 5)[:T].to(**I32)
    bufs = {"cache": torch.empty(T + 5, D, **BF16),
            "cache2": kc.allocate(kc.MODEL1, 2, 7, D, device=DEV)}
    if op == "kv_norm_rope":
        return lambda b: ops.kv_norm_rope(x, w, pos, f, 1e-6, 0, b["cache"], rows,
                                          b["cache2"], rows), bufs

    def call(b):
        ops.kv_norm_rope_out(x, w, pos, f, 1e-6, 0, b["cache"], rows, b["cache2"], rows,
                             out=b["out"])
    return call, {**bufs, "out": torch.empty(T, D, **BF16)}


def _compress_kv(entries):
    """Ratio 4, two rows of 4 new tokens (one entry completes per row) into `entries`: bf16 or
    fp32 [rows, 4, head_dim], an FP8 MODEL1 pool (head_dim 512) or FP8 indexer keys (128)."""
    d = {"model1": 512, "fp8_indexer": 128}.get(entries, 64)
    dtype = torch.float32 if entries == "fp32" else torch.bfloat16
    p = compress_problem(d, 4, 2, 8, DEV, _seed(), dtype=dtype, capacity=4)
    if entries in ("model1", "fp8_indexer"):
        p["entries"] = kc.allocate(kc.MODEL1 if entries == "model1" else kc.INDEXER, 2, 4, d,
                                   device=DEV)
    cu, starts = torch.tensor([0, 4, 8], **I32), torch.zeros(2, **I32)

    def call(b):
        ops.compress_kv(p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], cu, starts,
                        b["state_kv"], b["state_score"], b["entries"], 4, 4, 1e-6, 0)
    return call, {k: p[k] for k in ("state_kv", "state_score", "entries")}


# case -> (builder, the written arguments to try); the op is the case's name before "["
CASES = {
    "sparse_attn_out": (_sparse_attn_out, ("out", "lse")),
    "hca_attn_out": (_hca_attn_out, ("out", "lse")),
    "grouped_oproj_out": (_grouped_oproj_out, ("out",)),
    "fp8_linear_out": (_fp8_linear_out, ("out",)),
    "moe_up_out": (_moe_up_out, ("h",)),
    "moe_down_out": (_moe_down_out, ("y",)),
    "indexer_topk_out": (_indexer_topk_out, ("indices",)),
    "mhc_pre_out": (lambda: _mhc("mhc_pre_out"), ("u", "post", "comb")),
    "mhc_post_out": (lambda: _mhc("mhc_post_out"), ("out",)),
    "mhc_head_out": (lambda: _mhc("mhc_head_out"), ("y",)),
    "moe_gate_out": (lambda: _moe_routing("moe_gate_out"), ("weights", "indices")),
    "moe_dispatch_out": (lambda: _moe_routing("moe_dispatch_out"),
                         ("row_ids", "expert_offsets", "route_weight", "pair_pos")),
    "moe_combine_out": (lambda: _moe_routing("moe_combine_out"), ("y",)),
    "q_norm_rope_out": (_q_norm_rope_out, ("out",)),
    "kv_norm_rope": (lambda: _kv_norm_rope("kv_norm_rope"), ("cache", "cache2")),
    "kv_norm_rope_out": (lambda: _kv_norm_rope("kv_norm_rope_out"), ("cache", "cache2", "out")),
    "compress_kv[bf16]": (lambda: _compress_kv("bf16"), ("state_kv", "state_score", "entries")),
    "compress_kv[fp32]": (lambda: _compress_kv("fp32"), ("entries",)),
    "compress_kv[model1]": (lambda: _compress_kv("model1"), ("entries",)),
    "compress_kv[fp8_indexer]": (lambda: _compress_kv("fp8_indexer"), ("entries",)),
}
_PARAMS = [(case, name) for case, (_, names) in CASES.items() for name in names]


def test_every_written_argument_has_a_case():
    """(CPU) Each argument that a schema of the glue (csrc/torch) marks as written has a case
    above: a new out-variant or buffer gets its refusal tested."""
    written = {(op, a.name) for op in registered_ops()
               for a in getattr(ops, op).default._schema.arguments
               if a.alias_info is not None and a.alias_info.is_write}
    assert {(case.split("[")[0], name) for case, name in _PARAMS} == written


@pytest.mark.cuda
@pytest.mark.parametrize("case,bad", _PARAMS, ids=[f"{c}-{n}" for c, n in _PARAMS])
def test_broadcast_buffer_is_refused_before_any_write(case, bad):
    _needs_kernel(case.split("[")[0])
    call, bufs = CASES[case][0]()
    call(bufs)  # a correct call (fresh buffers, then the sentinel in place: same layouts)
    bufs = {k: _bcast(v.shape, v.dtype) if k == bad else v.fill_(SENTINEL)
            for k, v in bufs.items()}
    with pytest.raises(RuntimeError, match="must not be broadcast"):
        call(bufs)
    torch.cuda.synchronize()
    for name, t in bufs.items():
        assert bool((t == SENTINEL).all()), f"{case}: {name} was written by a call that raised"


@pytest.mark.cuda
def test_grouped_oproj_refuses_head_dim_zero():
    _needs_kernel("grouped_oproj")
    o, pos, freqs, wo_a, scale = oproj_inputs(3, 4, 128, 2, 128, "bf16", _seed(), DEV)
    with pytest.raises(RuntimeError, match="head_dim must be >= 1"):
        torch.ops.dsv4.grouped_oproj(o[..., :0], pos, freqs, wo_a, scale)
