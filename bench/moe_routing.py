"""MoE routing ops at V4-Flash shapes (dim 4096, 256 experts, top-6): ``moe_gate`` (learned
and hash layers), ``moe_dispatch``, ``moe_combine``, and the three together, at T = 1, 64,
4096, 16384 tokens, beside their PyTorch references on the same GPU.

Counted:
* gate: FLOPs 2·T·E·D (logits, bf16 tensor cores); bytes x (T·D·2) + gate weight (E·D·2)
  + outputs (T·k·8). Decode is bound by the 2 MB gate weight, prefill by the logits GEMM fed
  from L2.
* dispatch: bytes P·8 read (indices + weights) + P·12 written (row_ids, route_weight,
  pair_pos), P = T·k; latency-bound at every size here (1 to 3 small launches).
* combine: bytes P·D·2 (expert outputs) + T·D·2 (shared) read + T·D·2 written.
floor_us = max(FLOP floor at 767 TFLOP/s, byte floor at 4.22 TB/s). Times: median of CUDA-event
timings, after warm-up; inputs rotated beyond the 50 MB L2 where they are smaller.

    python bench/moe_routing.py [--quick]
"""

from __future__ import annotations

import sys

import torch

from _driver import cuda_time_us

PEAK_TFLOPS = 767.0
PEAK_TBPS = 4.22
L2_BYTES = 50 << 20
D, E, TOPK = 4096, 256, 6


def _time_us(fn, iters: int, warmup: int = 3) -> float:
    """Median over 5 samples of the mean per-call time of `iters` back-to-back calls fn(k)
    (the shared timer, bench/_driver.py)."""
    return cuda_time_us(fn, 5, warmup, calls=iters, indexed=True)

def _row(op, case, t, flops, nbytes, ref_t=None, note=""):
    floor = max(flops / (PEAK_TFLOPS * 1e6), nbytes / (PEAK_TBPS * 1e6))
    return dict(op=op, case=case, time_us=t, tflops=flops / t * 1e-6 if flops else None,
                pct_flops=100 * flops / t * 1e-6 / PEAK_TFLOPS if flops else None,
                gbps=nbytes / t * 1e-3, pct_bw=100 * nbytes / t * 1e-3 / (PEAK_TBPS * 1e3),
                floor_us=floor, ref_time_us=ref_t, speedup=(ref_t / t) if ref_t else None,
                note=note)


def _copies(nbytes: int) -> int:
    return max(1, min(8, (4 * L2_BYTES) // max(nbytes, 1)))


def _cases(T: int, with_ref: bool) -> list[dict]:
    from dsv4.ops.moe import (moe_combine_reference, moe_dispatch_reference,
                              moe_gate_reference)

    ops = torch.ops.dsv4
    g = torch.Generator(device="cuda").manual_seed(T)
    dev = "cuda"
    P = T * TOPK
    rows = []
    iters = 100 if T <= 64 else 20
    ref_iters = 5 if T <= 64 else 2

    # gate (learned, bias) and hash
    nx = _copies(T * D * 2)
    xs = [torch.randn(T, D, device=dev, generator=g).to(torch.bfloat16) for _ in range(nx)]
    w = (torch.randn(E, D, device=dev, generator=g) * D ** -0.5).to(torch.bfloat16)
    bias = torch.randn(E, device=dev, generator=g) * 0.05
    tid2eid = torch.rand(129280, E, device=dev, generator=g).argsort(-1)[:, :TOPK]
    ids = torch.randint(0, 129280, (T,), device=dev, generator=g)
    flops = 2.0 * T * E * D
    nbytes = T * D * 2 + E * D * 2 + T * TOPK * 8
    t_gate = _time_us(lambda k: ops.moe_gate(xs[k % nx], w, bias, None, None, TOPK, 1.5), iters)
    ref = _time_us(lambda k: moe_gate_reference(xs[k % nx], w, bias, None, None, TOPK, 1.5),
                   ref_iters, 1) if with_ref else None
    rows.append(_row("moe_gate", f"learned T={T}", t_gate, flops, nbytes, ref))
    t = _time_us(lambda k: ops.moe_gate(xs[k % nx], w, None, tid2eid, ids, TOPK, 1.5), iters)
    rows.append(_row("moe_gate", f"hash T={T}", t, flops, nbytes + T * TOPK * 8, None,
                     "int64 tid2eid [129280, 6]"))

    # dispatch
    weights, indices = ops.moe_gate(xs[0], w, bias, None, None, TOPK, 1.5)
    t_disp = _time_us(lambda k: ops.moe_dispatch(indices, weights, E), iters)
    ref = _time_us(lambda k: moe_dispatch_reference(indices, weights, E), ref_iters, 1) \
        if with_ref else None
    rows.append(_row("moe_dispatch", f"T={T} P={P}", t_disp, 0.0, P * 20 + (E + 1) * 4, ref,
                     "1 launch" if P <= 1024 else "3 launches"))

    # combine
    row_ids, offsets, rw, pos = ops.moe_dispatch(indices, weights, E)
    ny = _copies(P * D * 2)
    yps = [torch.randn(P, D, device=dev, generator=g).to(torch.bfloat16) for _ in range(ny)]
    shared = torch.randn(T, D, device=dev, generator=g).to(torch.bfloat16)
    nbytes = P * D * 2 + 2 * T * D * 2
    t_comb = _time_us(lambda k: ops.moe_combine(yps[k % ny], pos, shared), iters)
    ref = _time_us(lambda k: moe_combine_reference(yps[k % ny], pos, shared), ref_iters, 1) \
        if with_ref else None
    rows.append(_row("moe_combine", f"T={T}", t_comb, 0.0, nbytes, ref))

    total = t_gate + t_disp + t_comb
    rows.append(_row("routing total", f"gate+dispatch+combine T={T}", total, 2.0 * T * E * D,
                     T * D * 2 + E * D * 2 + P * 28 + nbytes, None,
                     "compare with the MoE layer time (bench_moe layer rows)"))
    return rows


def run(quick: bool = False) -> list[dict]:
    """One dict per case; [] without a GPU or the kernels."""
    if not torch.cuda.is_available():
        return []
    import dsv4.ops  # noqa: F401
    from dsv4.ops._ext import has_compiled_kernel

    for op in ("moe_gate", "moe_dispatch", "moe_combine"):
        if not has_compiled_kernel(op):
            print(f"moe_routing: no compiled CUDA kernel for {op}; skipped", file=sys.stderr)
            return []
    rows = []
    for T in ([1, 4096] if quick else [1, 64, 4096, 16384]):
        rows += _cases(T, with_ref=True)
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if v is not None))
