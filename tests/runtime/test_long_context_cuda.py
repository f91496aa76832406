"""--mode 1m's memory planning against the GPU (runs on the H200): the meta-device measure of
one prefill chunk's transient matches what the CUDA caching allocator sees for the same step;
the streamed bench build leaves no dead expert storage; the attention-stack timing captures
and replays on a real cache."""

from __future__ import annotations

import pytest
import torch

from dsv4.runtime import Engine, SamplingParams, bench
from dsv4.runtime.floors import _tensor_bytes
from dsv4.runtime.long_context import WORKSPACE_ALLOWANCE, step_transient, time_attention_decode

pytestmark = pytest.mark.cuda


def _flash2(experts=8):
    """V4-Flash width, one CSA + one HCA layer, few experts (fast to build)."""
    return bench.build_config("flash", 2, experts)


def test_meta_transient_matches_the_allocator_for_one_prefill_chunk():
    cfg = _flash2()
    m = bench.build_model(cfg, "fp8", "cuda")
    m._low_precision_head(torch.bfloat16)
    eng = Engine(m, max_batch=1, max_model_len=8192 + 8, max_num_batched_tokens=2048,
                 head_dtype=torch.bfloat16, kv_cache="fp8", indexer_cache="fp8")
    g = torch.Generator().manual_seed(0)
    eng.add_request(torch.randint(0, cfg.vocab_size, (8192,), generator=g).tolist(),
                    SamplingParams(max_new_tokens=1, eos_token_id=-1))
    for _ in range(3):                      # chunks [0, 6144): warm every lazy allocation
        eng.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    eng.step()                              # the chunk [6144, 8192)
    torch.cuda.synchronize()
    real = torch.cuda.max_memory_allocated() - before
    meta = step_transient(cfg, 2048, 8192, "fp8", "fp8", "fp8").peak
    assert 0.85 * meta <= real <= meta + WORKSPACE_ALLOWANCE, (real, meta)


def test_streamed_build_holds_only_the_model():
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    cfg = _flash2(16)
    m = bench.build_model(cfg, "fp8", "cuda")
    held = torch.cuda.memory_allocated() - base
    stacks = sum(t.numel() * t.element_size() for blk in m.layers
                 for t in (blk.ffn._stack.w_up, blk.ffn._stack.w_up_scale,
                           blk.ffn._stack.w_down, blk.ffn._stack.w_down_scale))
    model = _tensor_bytes(m)            # (experts' buffers view the stacks: counted once)
    assert stacks < model
    assert model <= held < 1.02 * model + (64 << 20), (held, model)


def test_attention_decode_timing_on_graphs():
    cfg = _flash2()
    m = bench.build_model(cfg, "fp8", "cuda")
    eng = Engine(m, max_batch=1, max_model_len=4096, max_num_batched_tokens=4096,
                 head_dtype=torch.bfloat16, kv_cache="fp8", indexer_cache="fp8")
    rid = eng.add_request(list(range(3000)), SamplingParams(max_new_tokens=8, eos_token_id=-1))
    for _ in range(3):
        eng.step()
    req = eng.requests[rid]
    from dsv4.layers.varlen import StepBatch
    batch = StepBatch.build([req.num_computed], [1], [req.slot], [req.block_table], [0], "cuda",
                            max_blocks=eng.runner.max_blocks)
    with torch.no_grad():
        t = time_attention_decode(m, eng.cache.layers, batch, reps=5)
    assert t["core_calls"] == [["indexer_topk", "sparse_attn"], ["hca_attn"]]
    assert t["attention"] > 0 and t["core"] > 0
    assert all(v > 0 for v in t["per_layer"] + t["core_per_layer"])
    assert set(t["per_op"]) == {"indexer_topk", "sparse_attn", "hca_attn"}
    assert all(v > 0 for v in t["per_op"].values()) and t["indexer_tree"] > 0
    outs = [o for o in eng.step()]          # the engine goes on (graphs, the same cache)
    assert outs and all(o.request_id == rid for o in outs)
