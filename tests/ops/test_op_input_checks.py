"""Bad inputs to the torch.ops.dsv4 references (CPU) raise clear errors instead of a silently
wrong result: integer q/kv, out/lse buffers of the wrong dtype, a q of the wrong rank given
to indexer_topk (used to be an IndexError from the head-dim check), and unknown config
overrides (used to be dropped without a word)."""

from __future__ import annotations

import math

import pytest
import torch

import dsv4
from dsv4.config import ConfigError, ModelConfig

pytest.importorskip("dsv4.ops.attention")
pytest.importorskip("dsv4.ops.indexer")


def _attn_inputs(T=5, H=4, D=64, N=20):
    return (torch.randn(T, H, D), torch.randn(N, D),
            torch.randint(0, N, (T, 8), dtype=torch.int32), torch.randn(H))


@pytest.mark.parametrize("which", ["q", "kv", "extra_kv"])
def test_sparse_attn_rejects_integer_activations(which):
    q, kv, idx, sink = _attn_inputs()
    extra = torch.randn(7, q.shape[2])
    args = {"q": q, "kv": kv, "extra_kv": extra}
    args[which] = args[which].round().to(torch.int32)
    with pytest.raises((ValueError, RuntimeError), match=f"{which} must be a floating-point"):
        torch.ops.dsv4.sparse_attn(args["q"], args["kv"], idx, sink, 0.125, None,
                                   args["extra_kv"], torch.zeros_like(idx), None)


@pytest.mark.parametrize("bad", ["out", "lse"])
def test_sparse_attn_out_rejects_wrong_buffer_dtypes(bad):
    q, kv, idx, sink = _attn_inputs()
    out = torch.empty(q.shape, dtype=torch.int32 if bad == "out" else q.dtype)
    lse = torch.empty(q.shape[:2], dtype=torch.int32 if bad == "lse" else torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="sparse_attn_out: out must have"):
        torch.ops.dsv4.sparse_attn_out(q, kv, idx, sink, 0.125, out=out, lse=lse)
    # the right buffers still work and hold the op's result
    out, lse = torch.empty(q.shape), torch.empty(q.shape[:2])
    torch.ops.dsv4.sparse_attn_out(q, kv, idx, sink, 0.125, out=out, lse=lse)
    ref_out, ref_lse = torch.ops.dsv4.sparse_attn(q, kv, idx, sink, 0.125)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def _indexer_inputs(T=5, H=8, D=64, B=2, C=30):
    return (torch.randn(T, H, D), torch.rand(T, H), torch.randn(B, C, D),
            torch.randint(0, B, (T,), dtype=torch.int32),
            torch.randint(1, C, (T,), dtype=torch.int32))


@pytest.mark.parametrize("op", ["indexer_topk", "indexer_topk_out"])
def test_indexer_topk_wrong_rank_q_names_the_shape(op):
    q, w, keys, rows, nv = _indexer_inputs()
    extra = (torch.empty(q.shape[0], 8, dtype=torch.int32),) if op.endswith("out") else ()
    with pytest.raises((ValueError, RuntimeError), match=r"q must be \[tokens, heads, head_dim\]"):
        getattr(torch.ops.dsv4, op)(q[0], w, keys, rows, nv, 8, *extra)


def test_indexer_topk_rejects_integer_queries():
    q, w, keys, rows, nv = _indexer_inputs()
    with pytest.raises((ValueError, RuntimeError), match="must be floating-point"):
        torch.ops.dsv4.indexer_topk(q.round().to(torch.int32), w, keys, rows, nv, 8)
    got = torch.ops.dsv4.indexer_topk(q, w, keys, rows, nv, 8)
    assert got.dtype == torch.int32 and got.shape == (q.shape[0], 8)
    assert bool(((got >= -1) & (got < nv[:, None])).all())


def test_unknown_config_override_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(
        __import__("json").dumps(ModelConfig.tiny().to_hf_dict()))
    assert ModelConfig.from_json(tmp_path, quant_sim=False).quant_sim is False
    with pytest.raises(ConfigError, match="quantsim"):
        ModelConfig.from_json(tmp_path, quantsim=False)
    with pytest.raises(ConfigError, match="unknown config override"):
        dsv4.Model.from_pretrained(tmp_path, device="cpu", dtype=torch.float32,
                                   progress=False, window_sise=4)


# ---------------------------------------------------------------------------------------------
# Buffers written in place must not be broadcast (expanded) views: the op refuses such a buffer
# before writing anything. Used to be: the other buffers of a multi-output _out op written, then
# torch's copy_ refused the broadcast one (sparse_attn_out, hca_attn_out, moe_gate_out,
# moe_dispatch_out, mhc_pre_out; kv_norm_rope_out had written the caches), or, for writes by
# index (compress_kv's state / entries, kv_norm_rope's caches), no error at all and every row
# landing on the same memory.
# ---------------------------------------------------------------------------------------------
def _bcast(t: torch.Tensor) -> torch.Tensor:
    """A broadcast view of t's shape (every element one memory location) holding 7s."""
    return torch.full((1,) * t.dim(), 7, dtype=t.dtype).expand(t.shape)


def _buffer_cases():
    from dsv4.ops.hca_attn import dense_block_table

    q, kv, idx, sink = _attn_inputs()
    T, H, D = q.shape

    def attn(bufs):
        torch.ops.dsv4.sparse_attn_out(q, kv, idx, sink, 0.125, **bufs)

    def hca(bufs):
        torch.ops.dsv4.hca_attn_out(q, kv, idx, sink, 0.125, None, torch.randn(2, 4, D),
                                    dense_block_table(2), torch.tensor([0, 1, 0, 1, 1],
                                                                      dtype=torch.int32),
                                    torch.full((T,), 3, dtype=torch.int32), **bufs)

    attn_bufs = {"out": torch.empty(T, H, D), "lse": torch.empty(T, H)}
    x, wg = torch.randn(4, 16), torch.randn(8, 16)
    ind = torch.randint(0, 8, (4, 2), dtype=torch.int32)
    mx = torch.randn(2, 4, 8)
    kx, kw, kpos = torch.randn(3, 64), torch.rand(64) + 0.5, torch.arange(3)
    kfreqs, krows = torch.rand(8), torch.tensor([0, 1, 2], dtype=torch.int32)

    def kv_rope(bufs):
        torch.ops.dsv4.kv_norm_rope(kx, kw, kpos, kfreqs, 1e-6, 0, bufs["cache"], krows,
                                    bufs["cache2"], krows)

    def kv_rope_out(bufs):
        torch.ops.dsv4.kv_norm_rope_out(kx, kw, kpos, kfreqs, 1e-6, 0, bufs["cache"], krows,
                                        out=bufs["out"])

    ck = {"state_kv": torch.zeros(2, 8, 128), "state_score": torch.full((2, 8, 128), -math.inf),
          "entries": torch.zeros(2, 4, 64, dtype=torch.bfloat16)}

    def compress(bufs):
        torch.ops.dsv4.compress_kv(torch.randn(6, 128), torch.randn(6, 128),
                                   torch.randn(4, 128), torch.ones(64), torch.rand(16),
                                   torch.tensor([0, 3, 6], dtype=torch.int32),
                                   torch.zeros(2, dtype=torch.int32), bufs["state_kv"],
                                   bufs["state_score"], bufs["entries"], 4, 3, 1e-6, 0)

    return {
        "sparse_attn_out": (attn, attn_bufs),
        "hca_attn_out": (hca, attn_bufs),
        "moe_gate_out": (lambda b: torch.ops.dsv4.moe_gate_out(x, wg, None, None, None, 2, 1.0,
                                                               **b),
                         {"weights": torch.empty(4, 2), "indices": torch.empty(4, 2,
                                                                               dtype=torch.int32)}),
        "moe_dispatch_out": (lambda b: torch.ops.dsv4.moe_dispatch_out(ind, torch.rand(4, 2), 8,
                                                                       **b),
                             {"row_ids": torch.empty(8, dtype=torch.int32),
                              "expert_offsets": torch.empty(9, dtype=torch.int32),
                              "route_weight": torch.empty(8),
                              "pair_pos": torch.empty(4, 2, dtype=torch.int32)}),
        "mhc_pre_out": (lambda b: torch.ops.dsv4.mhc_pre_out(mx, torch.randn(24, 32),
                                                             torch.ones(3), torch.zeros(24),
                                                             1e-6, 20, 1e-6, **b),
                        {"u": torch.empty(2, 8), "post": torch.empty(2, 4),
                         "comb": torch.empty(2, 4, 4)}),
        "kv_norm_rope": (kv_rope, {"cache": torch.zeros(4, 64, dtype=torch.bfloat16),
                                   "cache2": torch.zeros(4, 64, dtype=torch.bfloat16)}),
        "kv_norm_rope_out": (kv_rope_out, {"cache": torch.zeros(4, 64, dtype=torch.bfloat16),
                                           "out": torch.empty(3, 64)}),
        "compress_kv": (compress, ck),
        **_single_buffer_cases(),
    }


def _single_buffer_cases():
    """The _out ops that write one buffer, refused as the CUDA glue refuses them (used to be:
    refused only by torch's copy_, a RuntimeError that does not name the argument; and
    moe_up_out / moe_down_out, which write the rows below expert_offsets[E] only, took a
    broadcast buffer without an error when no row was routed)."""
    from dsv4.layers.rope import rope_frequencies
    from dsv4.quant import fp8_block_quantize
    from gemm_cases import moe_case  # (tests/ops/gemm_cases.py)

    qx, pos, freqs = torch.randn(3, 2, 64), torch.arange(3), rope_frequencies(64, 10000.0)
    lx, (lw, ls) = torch.randn(2, 128), fp8_block_quantize(torch.randn(64, 128))
    o, wo_a = torch.randn(3, 4, 64), torch.randn(2, 16, 128)
    mc = moe_case(T=3, K=32, N=16, E=4, topk=2, fmt="bf16", seed=0, x_dtype=torch.float32)
    P = mc.row_ids.shape[0]
    iq, iw, ik = torch.randn(3, 2, 64), torch.randn(3, 2), torch.randn(2, 6, 64)
    irows, ivalid = torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([4, 6, 2],
                                                                          dtype=torch.int32)
    mx, mf, mres = torch.randn(3, 4, 8), torch.randn(3, 8), torch.randn(3, 4, 8)
    mpost, mcomb = torch.rand(3, 4), torch.rand(3, 4, 4)
    y_pair, pair_pos = torch.randn(6, 8), torch.tensor([[0, 3], [1, -1], [5, 2]],
                                                       dtype=torch.int32)
    ops = torch.ops.dsv4
    return {
        "q_norm_rope_out": (lambda b: ops.q_norm_rope_out(qx, pos, freqs, 1e-6, True, 0, **b),
                            {"out": torch.empty(3, 2, 64)}),
        "fp8_linear_out": (lambda b: ops.fp8_linear_out(lx, lw, ls, False, **b),
                           {"out": torch.empty(2, 64)}),
        "grouped_oproj_out": (lambda b: ops.grouped_oproj_out(o, pos, freqs, wo_a, None, **b),
                              {"out": torch.empty(3, 2, 16)}),
        "moe_up_out": (lambda b: ops.moe_up_out(mc.x, mc.row_ids, mc.expert_offsets, mc.w_up,
                                                None, mc.route_weight, 10.0, False, **b),
                       {"h": torch.empty(P, 16)}),
        "moe_down_out": (lambda b: ops.moe_down_out(mc.h.float(), mc.expert_offsets, mc.w_down,
                                                    None, False, **b),
                         {"y": torch.empty(P, 32)}),
        "indexer_topk_out": (lambda b: ops.indexer_topk_out(iq, iw, ik, irows, ivalid, 4, **b),
                             {"indices": torch.empty(3, 4, dtype=torch.int32)}),
        "mhc_post_out": (lambda b: ops.mhc_post_out(mf, mres, mpost, mcomb, **b),
                         {"out": torch.empty(3, 4, 8)}),
        "mhc_head_out": (lambda b: ops.mhc_head_out(mx, torch.randn(4, 32), torch.ones(1),
                                                    torch.zeros(4), 1e-6, 1e-6, **b),
                         {"y": torch.empty(3, 8)}),
        "moe_combine_out": (lambda b: ops.moe_combine_out(y_pair, pair_pos, None, **b),
                            {"y": torch.empty(3, 8)}),
    }


_BUFFER_CASES = [(op, name) for op, (_, bufs) in _buffer_cases().items() for name in bufs]


@pytest.mark.parametrize("op,bad", _BUFFER_CASES, ids=[f"{o}-{b}" for o, b in _BUFFER_CASES])
def test_broadcast_buffer_is_refused_before_any_write(op, bad):
    run, bufs = _buffer_cases()[op]
    run({k: v.clone() for k, v in bufs.items()})  # the buffers as given work
    bufs = {k: (_bcast(v) if k == bad else torch.full_like(v, 7)) for k, v in bufs.items()}
    with pytest.raises(ValueError, match=f"{bad} must not be broadcast"):
        run(bufs)
    for name, t in bufs.items():
        assert bool((t == 7).all()), f"{op}: {name} was written by a call that raised"


@pytest.mark.parametrize("op", ["compress_kv", "kv_norm_rope"])
def test_fp8_pool_without_the_pool_layout_is_refused_before_any_write(op):
    """A uint8 MODEL1 pool whose rows are not 584 bytes apart is refused before anything is
    written (used to be: compress_kv wrote row 0's state, kv_norm_rope the first cache, then
    the pool's layout check refused the call)."""
    from dsv4.ops import kv_cache

    d = 512
    pool = kv_cache.allocate(kv_cache.MODEL1, 2, 8, d)[:, ::2]  # row stride 2 x 584 bytes
    written = torch.zeros(2, 8, 2 * d) if op == "compress_kv" else \
        torch.zeros(8, d, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="a pool must have row stride 584"):
        if op == "compress_kv":
            torch.ops.dsv4.compress_kv(
                torch.randn(10, 2 * d), torch.randn(10, 2 * d), torch.randn(4, 2 * d),
                torch.ones(d), torch.rand(32), torch.tensor([0, 5, 10], dtype=torch.int32),
                torch.zeros(2, dtype=torch.int32), written,
                torch.full((2, 8, 2 * d), -math.inf), pool, 4, 5, 1e-6, 0)
        else:
            rows = torch.tensor([0, 1, 2], dtype=torch.int32)
            torch.ops.dsv4.kv_norm_rope(torch.randn(3, d), torch.ones(d), torch.arange(3),
                                        torch.rand(32), 1e-6, 0, written, rows, pool, rows)
    assert bool((written == 0).all())
    assert bool((pool == 0).all())


def test_check_writable_takes_an_empty_expanded_buffer():
    """An empty tensor has no element to share: an expanded empty view is not refused (the CUDA
    glue's at::has_internal_overlap says the same), a non-empty one is."""
    from dsv4.ops._ext import check_writable

    check_writable("op", out=torch.empty(0, 1).expand(0, 4))
    with pytest.raises(ValueError, match="out must not be broadcast"):
        check_writable("op", out=torch.empty(2, 1).expand(2, 4))


# ---------------------------------------------------------------------------------------------
# Inputs the CUDA glue refuses (csrc/torch/*.cpp) that the references took without a word.
# ---------------------------------------------------------------------------------------------
def _hca_inputs(T=5, H=4, D=64):
    from dsv4.ops.hca_attn import dense_block_table

    q, kv, idx, sink = _attn_inputs(T, H, D)
    return dict(q=q, kv=kv, indices=idx, attn_sink=sink, softmax_scale=0.125, topk_length=None,
                extra_kv=torch.randn(2, 4, D), extra_block_table=dense_block_table(2),
                extra_rows=torch.arange(T, dtype=torch.int32) % 2,
                extra_lengths=torch.full((T,), 3, dtype=torch.int32))


_HCA_WINDOW_CASES = {
    # name: (change to the arguments, words of the error)
    "topk_length": (lambda a, T: {"topk_length": torch.ones(T + 2, dtype=torch.int32)},
                    r"topk_length must have shape"),
    "indices_rank": (lambda a, T: {"indices": a["indices"][:, 0]}, r"indices \[tokens, k\]"),
    "indices_dtype": (lambda a, T: {"indices": a["indices"].float()}, "indices must be an integer"),
    "attn_sink": (lambda a, T: {"attn_sink": a["attn_sink"][:1]}, "shape mismatch"),
    "kv_head_dim": (lambda a, T: {"kv": a["kv"][:, :32]}, "shape mismatch"),
}


@pytest.mark.parametrize("T", [5, 0])
@pytest.mark.parametrize("case", list(_HCA_WINDOW_CASES))
def test_hca_attn_checks_the_window_scope_for_every_call(case, T):
    """hca_attn's window scope (kv, indices, attn_sink, topk_length) is checked as the CUDA glue
    checks it (used to be: only by sparse_attn_reference on slices of it, so a topk_length of
    the wrong length was sliced to fit and taken, and with no query nothing was checked)."""
    a = _hca_inputs()
    a = {k: (v[:T] if k in ("q", "indices", "extra_rows", "extra_lengths") else v)
         for k, v in a.items()}
    change, words = _HCA_WINDOW_CASES[case]
    torch.ops.dsv4.hca_attn(*a.values())  # the inputs as given work
    a.update(change(a, T))
    with pytest.raises(ValueError, match=f"hca_attn: .*{words}"):
        torch.ops.dsv4.hca_attn(*a.values())


@pytest.mark.parametrize("op", ["sparse_attn", "hca_attn"])
def test_attention_refuses_an_fp8_scope_with_a_float_one(op):
    """kv and extra_kv are both FP8 (MODEL1) pools or both floating-point, as the CUDA glue
    requires (used to be: the references dequantised the pool and took the mix)."""
    from dsv4.ops import kv_cache

    D, T = 512, 3
    q, sink = torch.randn(T, 2, D), torch.randn(2)
    pool = kv_cache.allocate(kv_cache.MODEL1, 2, 4, D)
    idx = torch.zeros(T, 2, dtype=torch.int32)
    for kv, extra in ((pool, torch.randn(2, 4, D)), (torch.randn(8, D), pool)):
        if op == "sparse_attn":
            args = (q, kv, idx, sink, 0.1, None,
                    extra if extra.dtype == torch.uint8 else extra.flatten(0, 1), idx)
        else:
            a = _hca_inputs(T, 2, D)
            a.update(q=q, kv=kv, indices=idx, attn_sink=sink, extra_kv=extra)
            args = tuple(a.values())
        with pytest.raises(ValueError, match=f"{op}: kv and extra_kv must both be FP8 pools or "
                                             "both floating-point"):
            getattr(torch.ops.dsv4, op)(*args)


@pytest.mark.parametrize("op", ["sparse_attn", "hca_attn", "q_norm_rope"])
def test_zero_heads_are_refused(op):
    """q with no head: the CUDA glue's "at least one head" (used to be: an empty result)."""
    if op == "q_norm_rope":
        with pytest.raises(ValueError, match="q_norm_rope: x must have at least one head"):
            torch.ops.dsv4.q_norm_rope(torch.randn(3, 0, 64), torch.arange(3), torch.rand(8),
                                       1e-6, True, 0)
        return
    a = _hca_inputs(H=0)
    if op == "sparse_attn":
        args = (a["q"], a["kv"], a["indices"], a["attn_sink"], 0.125)
    else:
        args = tuple(a.values())
    with pytest.raises(ValueError, match=f"{op}: q must have at least one head"):
        getattr(torch.ops.dsv4, op)(*args)


def test_mhc_post_out_refuses_out_aliasing_residual():
    """out=residual (an in-place residual update) is refused, as the CUDA glue refuses it (its
    kernel reads residual while writing out); used to be computed on CPU."""
    f, res = torch.randn(3, 8), torch.randn(3, 4, 8)
    post, comb = torch.rand(3, 4), torch.rand(3, 4, 4)
    before = res.clone()
    with pytest.raises(ValueError, match="mhc_post_out: out must not alias residual or f"):
        torch.ops.dsv4.mhc_post_out(f, res, post, comb, out=res)
    assert torch.equal(res, before)
    out = torch.empty_like(res)
    torch.ops.dsv4.mhc_post_out(f, res, post, comb, out=out)
    torch.testing.assert_close(out, torch.ops.dsv4.mhc_post(f, res, post, comb))


def test_moe_grouped_gemms_refuse_what_the_cuda_glue_refuses():
    """No expert (E = 0) or more than 1024, and moe_up pairs without tokens (used to be: zero
    rows returned)."""
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    x, w_up, w_down = torch.randn(3, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 16, 8)
    rows, rw, h = i32([0, 1, 2, 0]), torch.rand(4), torch.randn(4, 8)
    ops = torch.ops.dsv4
    ops.moe_up(x, rows, i32([0, 2, 4]), w_up, None, rw, 0.0, False)
    ops.moe_down(h, i32([0, 2, 4]), w_down, None, False)
    with pytest.raises(ValueError, match=r"moe_up: E must be in \[1, 1024\]"):
        ops.moe_up(x, rows, i32([0]), w_up[:0], None, rw, 0.0, False)
    with pytest.raises(ValueError, match=r"moe_down: E must be in \[1, 1024\]"):
        ops.moe_down(h, i32([0]), w_down[:0], None, False)
    with pytest.raises(ValueError, match=r"moe_down: E must be in \[1, 1024\]"):
        ops.moe_down(h, torch.zeros(1026, dtype=torch.int32), torch.randn(1025, 8, 8), None,
                     False)
    with pytest.raises(ValueError, match="moe_up: pairs need tokens: x has 0 rows but P = 4"):
        ops.moe_up(x[:0], rows, i32([0, 0, 0]), w_up, None, rw, 0.0, False)


def test_grouped_oproj_refuses_more_than_1024_groups():
    o = torch.randn(2, 1025, 2)
    pos, freqs = torch.arange(2), torch.rand(1)
    torch.ops.dsv4.grouped_oproj(o[:, :1024], pos, freqs, torch.randn(1024, 8, 2), None)
    with pytest.raises(ValueError, match=r"groups of whole heads \(G <= 1024\)"):
        torch.ops.dsv4.grouped_oproj(o, pos, freqs, torch.randn(1025, 8, 2), None)
