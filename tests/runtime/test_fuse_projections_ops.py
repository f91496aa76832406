"""Model.fuse_projections in the runtime: ``dsv4 bench``'s model launches fewer GEMMs per
decode step (counted as bench/count_step_ops.py counts them: the engine's eager decode step on
the CPU, every layer forced onto its kernel path), and its tokens do not change."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import pytest
import torch

from dsv4.runtime import bench

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(argv):
    p = argparse.ArgumentParser()
    bench._add_arguments(p)
    p.set_defaults(batch=[1], context=[64], experts=2, steps=2)
    return p.parse_args(argv)


def _linears_per_step(model, a, batch: int) -> float:
    """aten::linear calls per eager decode step of ``batch`` rows (count_step_ops' method)."""
    from torch.profiler import ProfilerActivity, profile

    from dsv4.runtime.long_context import _kernel_path_everywhere
    count = _script("count_step_ops")
    sys.path.insert(0, BENCH)            # count_step_ops / profile_decode import each other
    try:
        engine = _script("profile_decode").engine
        with torch.no_grad(), _kernel_path_everywhere():
            eng = engine(model, a, batch, a.context[0], graphs=False)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(a.steps):
                    eng.step()
    finally:
        sys.path.remove(BENCH)
    return count.outermost_aten_counts(prof.events())["aten::linear"] / a.steps


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_decode_step_launches_fewer_gemms(batch):
    """The bench's two layers (one CSA, one HCA) at tiny width: the linears per decode step
    drop by Σ (members − 1) over the fused groups, 9 for this structure (CSA: wq_a + wkv +
    weights_proj, 4 compressor projections; HCA: wq_a + wkv, 2 compressor projections; each
    MoE: the shared expert's w1 + w3), the same at V4-Flash width."""
    a = _args(["--model", "tiny", "--layers", "2"])
    cfg = bench.build_config(a.model, a.layers, a.experts)
    plain = bench.build_model(cfg, a.weights, "cpu", a.seed, fuse=False)
    fused = bench.build_model(cfg, a.weights, "cpu", a.seed)
    assert not plain.projections_fused and fused.projections_fused
    groups = fused.fused_projection_groups()
    saved = sum(len(m) - 1 for m in groups.values())
    assert saved == (2 + 3) + (1 + 1) + 2 * 1
    before = _linears_per_step(plain, a, batch)
    after = _linears_per_step(fused, a, batch)
    assert before == 23                    # what bench/README.md's count shows unfused
    assert after == before - saved == 14


def test_bench_build_weights_equal_unfused():
    """build_model(fuse=True) holds the same parameters (names, values, bytes) as
    build_model(fuse=False); the native-FP8 build fuses only what stays a plain parameter
    (the fp32 compressor projections)."""
    from dsv4.runtime.floors import weight_bytes
    cfg = bench.build_config("tiny", 2, 2)
    for weights in ("bf16", "fp8"):
        f = bench.build_model(cfg, weights, "cpu", 0)
        u = bench.build_model(cfg, weights, "cpu", 0, fuse=False)
        sf, su = f.state_dict(), u.state_dict()
        assert list(sf) == list(su) and all(torch.equal(sf[k], su[k]) for k in sf)
        assert weight_bytes(f) == weight_bytes(u)
        groups = f.fused_projection_groups()
        if weights == "fp8":
            assert set(groups) == {"layers.0.attn.compressor", "layers.1.attn.compressor"}
        else:
            assert len(groups) == 6


def test_generate_serving_helper_fuses():
    import dsv4
    from dsv4.runtime.generate import fuse_projections_for_serving
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny())
    assert fuse_projections_for_serving(m) and m.projections_fused
    assert not fuse_projections_for_serving(object())


@pytest.mark.parametrize("tokens,context", [(2048, 4096), (8192, 65536)])
def test_prefill_transient(tokens, context):
    """The transient of a prefill step (the layer planner's meta-device measure,
    long_context.step_transient, V4-Flash width, one CSA + one HCA layer): unfused, exactly
    the measure of the model code (the layers project where they always did); fused, the
    CSA layer's input group output lives as long as its ``wkv`` columns, which the kernel
    core holds through the attention's peak: + T x (q_lora_rank + index_n_heads) bf16 (the
    wq_a and weights_proj columns), under 1% of the step's transient."""
    from dsv4.runtime import long_context as L
    cfg = bench.build_config("flash", 2, 0)
    peaks = []
    for fuse in (False, True):
        model, cache, batch = L._meta_step(cfg, tokens, context, "bf16", "bf16", "bf16", None)
        model.compact_head()
        if fuse:
            model.fuse_projections()
            assert len(model.fused_projection_groups()) == 6
        mode = L._LiveBytes()
        ids = torch.zeros(tokens, dtype=torch.long, device="meta")
        with torch.no_grad(), L._kernel_path_everywhere(), mode:
            model.forward_step(ids, cache.layers, batch, torch.bfloat16)
        peaks.append(mode.peak)
    assert peaks[0] == L.step_transient(cfg, tokens, context).peak
    assert peaks[1] - peaks[0] == tokens * (cfg.q_lora_rank + cfg.index_n_heads) * 2
    assert peaks[1] < 1.01 * peaks[0]
