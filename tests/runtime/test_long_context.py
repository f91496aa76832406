"""--mode 1m memory planning: one prefill chunk's transient (measured on the meta device from
the model's own code) does not grow with the context; the layer-count arithmetic of --layers
auto; the attention-stack timing's structure (CPU: eager, the kernel path's ops forced)."""

from __future__ import annotations

import argparse

import pytest
import torch

from dsv4.runtime import bench, long_context
from dsv4.runtime.long_context import LayerFit, step_transient


def test_chunk_transient_does_not_grow_with_the_context():
    """V4-Flash width, one CSA + one HCA layer, FP8 caches, native weights: a 512-token chunk
    at 4K and at 1M context allocates the same bytes; twice the chunk, twice the bytes
    (within the few fixed-size tensors)."""
    cfg = bench.build_config("flash", 2, 16)
    a = step_transient(cfg, 512, 4096, "fp8", "fp8", "fp8")
    b = step_transient(cfg, 512, 1 << 20, "fp8", "fp8", "fp8")
    c = step_transient(cfg, 1024, 1 << 20, "fp8", "fp8", "fp8")
    # by hand: at its peak the CSA attention holds wq_b's output, the normed q and the
    # attention output, [T, 64 heads, 512] bf16 each, and the residual streams [T, 4, 4096]
    by_hand = 512 * (3 * 64 * 512 * 2 + 4 * 4096 * 2)
    # the only context-sized tensor: the row's block table as int64 (8 B per 1024 tokens)
    assert 0 <= b.peak - a.peak <= 8 * ((1 << 20) - 4096) // 1024
    assert by_hand <= a.peak < 1.2 * by_hand      # + the normed input, qr, index lists, ...
    assert 1.95 * a.peak < c.peak < 2.05 * a.peak
    assert {op for _, op, _, _ in a.top[:3]} == {"fp8_linear", "q_norm_rope", "sparse_attn"}


def test_attention_decode_step_does_not_grow_with_the_context():
    """One decode token through each layer's Attention module (V4-Flash width, CSA + HCA, FP8
    caches, native weights) at 64K and at 1M context: the same ops on the same shapes. What
    grows: the KV pools and block tables the ops that read or write the cache take (the pools
    are passed, never copied; CSA's picks become flat rows through the block table in one
    ``paged_rows`` op); no op's output grows."""
    cfg = bench.build_config("flash", 2, 16)
    a = long_context.attention_decode_ops(cfg, 1 << 16, "fp8", "fp8", "fp8")
    b = long_context.attention_decode_ops(cfg, 1 << 20, "fp8", "fp8", "fp8")
    kinds = [cfg.layer_kind(i) for i in range(2)]
    assert kinds == ["csa", "hca"]
    kv_ops = {"dsv4.compress_kv", "dsv4.indexer_topk", "dsv4.sparse_attn", "dsv4.hca_attn"}
    for kind, small, big in zip(kinds, a, b):
        assert [r.op for r in small] == [r.op for r in big]
        assert [r.op for r0, r in zip(small, big) if r0.outputs != r.outputs] == []
        grown_in = {r.op for r0, r in zip(small, big) if r0.inputs != r.inputs}
        assert grown_in <= kv_ops | {"dsv4.paged_rows"}, grown_in
        assert ("dsv4.paged_rows" in grown_in) == (kind == "csa")
        assert any(r.op == ("dsv4.indexer_topk" if kind == "csa" else "dsv4.hca_attn")
                   for r in big)


def test_step_transient_rejects_a_chunk_longer_than_the_context():
    with pytest.raises(ValueError, match="tokens must be in"):
        step_transient(bench.build_config("tiny", 2, 0), 10, 5)


def test_layer_fit_counts_what_fits():
    gb = 10 ** 9
    plan = LayerFit(budget=100 * gb, fixed=4 * gb, transient=5 * gb, margin=3 * gb)
    # 4 GB CSA / 2 GB HCA layers, pool 0.1 GB per layer: 88 GB for layers and pool
    layer = [4 * gb, 2 * gb]

    def pool(n):
        return n * gb // 10

    n = plan.count(lambda i: layer[i % 2], pool, limit=100)
    used = sum(layer[i % 2] for i in range(n))
    assert used + pool(n) + 12 * gb <= 100 * gb
    assert used + layer[n % 2] + pool(n + 1) + 12 * gb > 100 * gb
    assert n == 28                      # 14 pairs: 84 GB + 2.8 GB of pool
    assert plan.count(lambda i: layer[i % 2], pool, limit=5) == 5
    tight = LayerFit(budget=10 * gb, fixed=4 * gb, transient=5 * gb, margin=3 * gb)
    assert tight.count(lambda i: gb, pool, limit=8) == 1        # one layer at least
    assert plan.fits(10 * gb, 4 * gb, gb) and not plan.fits(84 * gb, 4 * gb, 2 * gb)


def test_layers_auto_is_parsed_and_only_for_the_1m_mode():
    from dsv4 import cli
    a = cli.build_parser().parse_args(["bench", "--mode", "1m", "--layers", "auto"])
    assert a.layers == "auto"
    assert cli.build_parser().parse_args(["bench", "--layers", "3"]).layers == 3
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--layers", "0"])
    a = cli.build_parser().parse_args(["bench", "--layers", "auto"])
    with pytest.raises(ValueError, match="--layers auto is for --mode 1m"):
        bench.run(a)
    assert bench.max_layers("flash") == 43


def test_attention_decode_timing_records_each_layers_core_ops(monkeypatch):
    """On CPU with the attention layers forced onto their kernel path (the ops' references):
    the CSA layer's core is indexer_topk + sparse_attn, the HCA layer's hca_attn; times are
    positive and the module time covers the core."""
    import dsv4.layers.attention as attention
    monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    torch.manual_seed(0)
    cfg = bench.build_config("tiny", 2, 0)
    m = bench.build_model(cfg, "bf16", "cpu")
    args = argparse.Namespace(chunk=64, head="bf16", no_graphs=True, seed=0, steps=2,
                              repeats=1)
    pre, dec = bench.bench_1m(m, args, context=200)
    assert dec["attn_kinds"] == ["csa", "hca"]
    assert dec["attn_core_ms"] > 0 and dec["attn_ms"] > 0
    assert all(v > 0 for v in dec["attn_layer_ms"] + dec["attn_core_layer_ms"])
    assert dec["attn_core_floor_ms"] < dec["attn_floor_ms"]
    assert dec["attn_core_flash_ms"] == pytest.approx(
        21 * dec["attn_core_layer_ms"][0] + 20 * dec["attn_core_layer_ms"][1])
    eng = bench._engine(m, args, 1, 64)
    from dsv4.runtime.request import SamplingParams
    rid = eng.add_request(list(range(40)), SamplingParams(max_new_tokens=4, eos_token_id=-1))
    next(iter(eng.stream()))
    req = eng.requests[rid]
    from dsv4.layers.varlen import StepBatch
    batch = StepBatch.build([req.num_computed], [1], [req.slot], [req.block_table], [0], "cpu",
                            max_blocks=eng.runner.max_blocks)
    with torch.no_grad():
        t = long_context.time_attention_decode(m, eng.cache.layers, batch, reps=2)
    assert t["core_calls"] == [["indexer_topk", "sparse_attn"], ["hca_attn"]]
    assert set(t["per_op"]) == {"indexer_topk", "sparse_attn", "hca_attn"}
    assert all(v > 0 for v in t["per_op"].values()) and t["indexer_tree"] > 0
    assert set(dec["attn_core_op_ms"]) == set(t["per_op"]) and dec["attn_indexer_tree_ms"] > 0


def test_layer_plan_builds_the_layers_layer_fit_counts():
    """--layers auto end to end on CPU: a budget of 7.5 tiny layers' bytes (+ the fixed
    parts) stops the streamed build where LayerFit says, from the bytes each built layer
    measured."""
    from dsv4.runtime.floors import _tensor_bytes
    args = argparse.Namespace(chunk=64, head="bf16", kv_cache="bf16", indexer_cache="bf16",
                              weights="bf16", experts=0, steps=2)
    measured = lambda blocks: sum(_tensor_bytes(b) for b in blocks)      # noqa: E731
    cfg = bench.build_config("tiny", 2, 0)
    one = bench.build_model(cfg, "bf16", "cpu")
    sizes = [_tensor_bytes(b) for b in one.layers]          # CSA, HCA
    plan0, _, info0 = bench.layer_plan("tiny", args, 4096, free=0, allocated=measured)
    # the non-layer weights as held: bf16 embedding + the compact bf16 head
    assert plan0.fixed == bench.non_layer_bytes(cfg, "bf16") == 4 * cfg.vocab_size * cfg.dim
    over = plan0.fixed + plan0.transient + plan0.margin
    budget = over + int(3.75 * sum(sizes)) + info0["pool_bytes"](8)
    plan, fits, info = bench.layer_plan("tiny", args, 4096, free=budget, allocated=measured)
    want = plan.count(lambda i: sizes[i % 2], info["pool_bytes"], limit=100)
    assert want == 7
    big = bench.build_config("tiny", 12, 0)
    m = bench.build_model(big, "bf16", "cpu", fits=fits)
    assert len(m.layers) == m.config.n_layers == want
    assert info["layer_bytes"][:2] == sizes                  # measured, block by block
    assert plan.transient > 0 and plan.margin == 2 << 30


def test_1m_mode_last_chunk_only():
    """--prefill-1m last: the cache holds the first context - chunk tokens (random pool), the
    last chunk is prefilled; the pool's bytes per token are those of the full prefill, and the
    row's floor is that of the chunk at its position."""
    from dsv4.runtime.floors import prefill_floor
    torch.manual_seed(0)
    m = bench.build_model(bench.build_config("tiny", 2, 0), "bf16", "cpu")
    args = argparse.Namespace(chunk=64, head="bf16", no_graphs=True, seed=0, steps=2,
                              repeats=1)
    full = bench.bench_1m(m, args, context=300)
    args.prefill_1m = "last"
    last = bench.bench_1m(m, args, context=300)
    assert [r["kind"] for r in last] == ["prefill-1m-last", "decode-1m"]
    assert last[0]["tokens"] == 64 and last[0]["context"] == 300 == full[0]["tokens"]
    fl = prefill_floor(m, 1, 64, start=236)
    assert last[0]["floor_tok_s"] == pytest.approx(64 / fl["seconds"])
    assert last[1]["kv_bytes_per_token"] == full[1]["kv_bytes_per_token"]
    assert last[1]["tok_s"] > 0


def _interleave(make_cm):
    """Thread A enters ``make_cm()``; thread B then tries to enter one too; A leaves (after
    B entered, or after 0.5 s if B cannot enter while A is inside); then B leaves."""
    import threading
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    errors = []

    def a():
        try:
            with make_cm():
                a_in.set()
                b_in.wait(0.5)
        except BaseException as e:      # pragma: no cover - reported below
            errors.append(e)
        finally:
            a_in.set()
            a_out.set()

    def b():
        a_in.wait(5)
        try:
            with make_cm():
                b_in.set()
                a_out.wait(5)
        except BaseException as e:      # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=f) for f in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert not errors and not any(t.is_alive() for t in ts)


def test_run_time_patches_do_not_leak_across_threads():
    """Two threads using the meta-device kernel-path patch (or bench's expert factory) at
    once: afterwards every patched library global is the original again (interleaved, each
    thread used to restore what the other had patched in, leaving the patch for good)."""
    import dsv4.layers.attention as attention
    import dsv4.layers.linear as linear
    import dsv4.layers.mhc as mhc
    import dsv4.layers.moe as moe
    import dsv4.layers.norm as norm
    before = (attention.use_kernels, mhc._use_kernels, moe._grouped_kernels_available,
              linear.Linear._fp8_kernel, moe.MoE.kernel_path_stack, moe.Gate.forward,
              moe.Expert, norm.RMSNorm.kernel_serves)
    _interleave(long_context._kernel_path_everywhere)
    cfg = bench.build_config("tiny", 2, 0)

    class _Factory(bench._expert_factory):
        def __exit__(self, *exc):           # no experts are built here: skip the count
            self.calls = self.config.n_routed_experts + self.config.n_shared_experts
            return super().__exit__(*exc)
    _interleave(lambda: _Factory(cfg, "layers.0.", {}, frozenset()))
    after = (attention.use_kernels, mhc._use_kernels, moe._grouped_kernels_available,
             linear.Linear._fp8_kernel, moe.MoE.kernel_path_stack, moe.Gate.forward,
             moe.Expert, norm.RMSNorm.kernel_serves)
    assert after == before
