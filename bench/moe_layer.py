"""One whole MoE layer at V4-Flash shapes (dim 4096, 256 routed experts, top-6,
moe_inter_dim 2048, one shared expert; learned routing) from T = 1 to 4096 tokens: the layer's
kernel path (moe_gate → moe_dispatch → moe_up → moe_down → moe_combine, plus the shared
expert), the same path with torch._grouped_mm for the expert GEMMs (bf16), and the official
per-expert loop (Python loop over experts, cuBLAS per expert, .tolist() host sync), all in
the same process on the same layer and inputs.

Columns: time_us = the kernel path called from Python (eager); graph_us = the same path
replayed from a CUDA graph (GPU time without Python/launch overhead: what the runtime's
captured decode step pays); grouped_mm_us / loop_us = the baselines (eager); routing_pct =
(gate + dispatch + combine) / graph_us.
Counted: FLOPs = 2·T·(k + 1)·3·D·N (routed + shared) + 2·T·E·D (gate); bytes = the weights of
the experts that received a token (bf16 2 B/weight; FP4 0.5 B + scales) + shared expert + gate
weight + activations. floor_us = max(FLOP floor at 767 TFLOP/s, byte floor at 4.22 TB/s).
Experts: bf16, and FP4 (the release format, with the official FP8 activation quantisation)
when moe_up / moe_down are compiled.

    python bench/moe_layer.py [--quick]
"""

from __future__ import annotations

import sys
from unittest import mock

import torch

from _driver import cuda_time_us

PEAK_TFLOPS = 767.0
PEAK_TBPS = 4.22


def _time_us(fn, reps: int = 10, warmup: int = 2) -> float:
    return cuda_time_us(fn, reps, warmup)      # the shared timer (bench/_driver.py)

def _graph_us(fn, reps: int = 20) -> float | None:
    """GPU time of fn replayed from a CUDA graph (None if it cannot be captured)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # report, do not fail the bench
        print(f"moe_layer: CUDA graph capture failed: {e}", file=sys.stderr)
        return None
    return _time_us(graph.replay, reps)


def _official_loop(moe, x, ids):
    """The official MoE.forward: per-expert where() + index_add_, then + shared expert."""
    weights, indices = moe.gate(x, ids)
    y = torch.zeros_like(x, dtype=torch.float32)
    counts = torch.bincount(indices.flatten().long(), minlength=len(moe.experts)).tolist()
    for e, cnt in enumerate(counts):
        if cnt:
            tok, slot = torch.where(indices == e)
            y.index_add_(0, tok, moe.experts[e](x[tok], weights[tok, slot, None]).float())
    return (y + moe.shared_experts(x).float()).to(x.dtype)


def _build(cfg):
    from dsv4.layers.moe import MoE

    with torch.device("cuda"):
        moe = MoE(cfg, cfg.n_hash_layers)      # fp32 init on the GPU, stacked
    moe = moe.to(torch.bfloat16)               # restacked in bf16
    moe.gate.bias.data = moe.gate.bias.data.float()  # fp32, as Model.to keeps it
    return moe


def _to_fp4(moe, cfg):
    from dsv4.quant import fp4_pack

    for ex in moe.experts:
        for name in ("w1", "w3", "w2"):
            lin = getattr(ex, name)
            q, s = fp4_pack(lin.weight.detach())
            lin.set_quantized(q, s, "fp4", torch.bfloat16)
            lin.act_quant, lin.config = True, cfg     # the release: FP8 activation quant
    moe.restack()
    torch.cuda.empty_cache()


def _case(moe, cfg, T, fmt, with_baselines):
    import dsv4
    import dsv4.layers.moe as moe_mod

    ops = torch.ops.dsv4
    g = torch.Generator(device="cuda").manual_seed(T)
    D, N, E, k = cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts, cfg.n_activated_experts
    x = torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16)
    ids = torch.zeros(T, dtype=torch.long, device="cuda")
    dsv4.set_backend("cuda")
    with torch.no_grad():
        run = lambda: moe(x, ids)  # noqa: E731
        t = _time_us(run)
        t_graph = _graph_us(run)
        w, idx = moe.gate(x, ids)
        busy = int((torch.bincount(idx.flatten().long(), minlength=E) > 0).sum())
        # routing share: the three routing ops alone on the same inputs
        row_ids, offsets, rw, pos = ops.moe_dispatch(idx, w, E)
        yp = torch.randn(T * k, D, device="cuda", generator=g).to(torch.bfloat16)
        t_route = _graph_us(lambda: (moe.gate(x, ids), ops.moe_dispatch(idx, w, E),
                                     ops.moe_combine(yp, pos, x)))
        t_gmm = t_loop = None
        if with_baselines and fmt == "bf16":
            with mock.patch.object(moe_mod, "_grouped_kernels_available", lambda: False):
                t_gmm = _time_us(run)
            dsv4.set_backend("reference")
            try:
                t_loop = _time_us(lambda: _official_loop(moe, x, ids), reps=3, warmup=1)
            finally:
                dsv4.set_backend("cuda")
    wbytes = 2.0 if fmt == "bf16" else 0.5 + 1.0 / 32
    flops = 2.0 * T * (k + 1) * 3 * D * N + 2.0 * T * E * D
    nbytes = (busy * 3 * D * N * wbytes + 3 * D * N * 2 + E * D * 2
              + T * D * 2 * 3 + T * k * (D + N) * 2 * 2)
    floor = max(flops / (PEAK_TFLOPS * 1e6), nbytes / (PEAK_TBPS * 1e6))
    best = t_graph or t
    return dict(op="moe_layer", case=f"{fmt} T={T}", time_us=t, graph_us=t_graph,
                tflops=flops / best * 1e-6, pct_flops=100 * flops / best * 1e-6 / PEAK_TFLOPS,
                gbps=nbytes / best * 1e-3, pct_bw=100 * nbytes / best * 1e-3 / (PEAK_TBPS * 1e3),
                floor_us=floor, grouped_mm_us=t_gmm, vs_grouped_mm=(t_gmm / t) if t_gmm else None,
                loop_us=t_loop, vs_loop=(t_loop / t) if t_loop else None,
                routing_pct=(100 * t_route / best) if t_route else None,
                note=f"{busy} busy experts; % columns from graph_us")


def run(quick: bool = False) -> list[dict]:
    """One dict per case; [] without a GPU or the routing kernels."""
    if not torch.cuda.is_available():
        return []
    import dsv4
    from dsv4.layers.moe import _grouped_kernels_available

    from dsv4.ops._ext import has_compiled_kernel

    for op in ("moe_gate", "moe_dispatch", "moe_combine"):
        if not has_compiled_kernel(op):
            print(f"moe_layer: no compiled CUDA kernel for {op}; skipped", file=sys.stderr)
            return []
    cfg = dsv4.ModelConfig.flash()
    torch.manual_seed(0)
    moe = _build(cfg)
    tokens = [1, 4096] if quick else [1, 8, 64, 512, 4096]
    rows = [_case(moe, cfg, T, "bf16", with_baselines=True) for T in tokens]
    if _grouped_kernels_available() and not quick:
        _to_fp4(moe, cfg)
        rows += [_case(moe, cfg, T, "fp4", with_baselines=False) for T in tokens]
    del moe
    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if v is not None))
