"""Benchmark of ``torch.ops.dsv4.sparse_attn`` at FlashMLA's DeepSeek-V4 shapes (kernels.md §4.1).

Cases (D = 512, bf16 q / kv, fp32 sink, softmax scale 512^-0.5):

* prefill: 4096 query tokens, random top-k rows of an 8K or 64K-row kv array; V4-Flash
  (64 heads, top-512) and V4-Pro (128 heads, top-1024).
* decode: batch {2, 64, 128} x 2 query tokens per sequence; main scope = the sequence's
  128-slot SWA window (all valid), extra scope = top-512 (64 heads) or top-1024 (128 heads)
  random rows of the sequence's compressed store (4096 entries each).

FLOPs = 2 x attended keys x heads x (512 + 512) per token (FlashMLA's count). Bytes (the DRAM
floor) = q + out + lse + indices + each distinct kv row once (min(tokens x k, rows) rows per
scope; repeated gathers hit L2). Reference = ``sparse_attn_reference`` on the GPU (gather +
einsum in fp32, chunked over tokens). FlashMLA numbers: its own V4 test cases on the same H200
(kernel time from the profiler); its decode numbers use an FP8 KV cache, dsv4 reads bf16.

    python bench/csa_sparse_attn.py [--quick]
"""

from __future__ import annotations

import argparse
import math

import torch

from _driver import cuda_time_us

PEAK_TFLOPS = 767.0   # measured bf16 dense matmul on the project's H200
PEAK_TBPS = 4.22      # measured device-to-device copy
L2_BYTES = 50 << 20
D = 512

# (case, tokens, heads, main topk, main rows, extra topk, extra rows, decode batch, FlashMLA us)
_PREFILL = [
    ("prefill T4096 h64 top512 kv8K", 64, 512, 8192, 516.0),
    ("prefill T4096 h64 top512 kv64K", 64, 512, 65536, 594.0),
    ("prefill T4096 h128 top1024 kv8K", 128, 1024, 8192, 1771.0),
    ("prefill T4096 h128 top1024 kv64K", 128, 1024, 65536, 1966.0),
]
_DECODE_FLASHMLA = {(64, 2): 14.2, (64, 64): 48.3, (64, 128): 92.1,
                    (128, 2): 16.6, (128, 64): 105.2, (128, 128): 203.6}
_N_COMP = 4096  # compressed entries per sequence in the decode cases


def _prefill_inputs(H, K, N, g):
    T = 4096
    q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
    kv = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    idx = torch.randint(0, N, (T, K), device="cuda", generator=g, dtype=torch.int32)
    return dict(q=q, kv=kv, indices=idx)


def _decode_inputs(H, batch, g):
    T, K2 = 2 * batch, (512 if H == 64 else 1024)
    q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
    window = torch.randn(batch * 128, D, device="cuda", generator=g).bfloat16()
    comp = torch.randn(batch * _N_COMP, D, device="cuda", generator=g).bfloat16()
    seq = torch.arange(T, device="cuda") // 2
    idx = (seq[:, None] * 128 + torch.arange(128, device="cuda")).int()
    # distinct random compressed rows of the token's own sequence
    r = torch.rand(T, _N_COMP, device="cuda", generator=g).argsort(-1)[:, :K2]
    extra_idx = (seq[:, None] * _N_COMP + r).int()
    return dict(q=q, kv=window, indices=idx, extra_kv=comp, extra_indices=extra_idx)


def _bytes(a) -> float:
    T, H, _ = a["q"].shape
    total = 2 * T * H * D * 2 + T * H * 4
    for kv, idx in ((a["kv"], a["indices"]), (a.get("extra_kv"), a.get("extra_indices"))):
        if kv is None:
            continue
        total += idx.numel() * 4 + min(idx.numel(), kv.shape[0]) * D * 2
    return float(total)


def _input_bytes(a) -> int:
    return sum(v.numel() * v.element_size() for v in a.values() if isinstance(v, torch.Tensor))


def _time_us(fn, arg_sets, warmup: int, reps: int) -> float:
    """Median over reps of one call timed with CUDA events, cycling through arg_sets (copies of
    the inputs, so that inputs smaller than L2 are not served from it; bench/_driver.py)."""
    return cuda_time_us(lambda k: fn(arg_sets[k % len(arg_sets)]), reps, warmup, indexed=True)

def _run_case(name, a, H, flashmla_us, quick, with_ref):
    import dsv4.ops  # noqa: F401
    from dsv4.ops.attention import sparse_attn_reference

    T = a["q"].shape[0]
    a["attn_sink"] = torch.randn(H, device="cuda")
    a["softmax_scale"] = D ** -0.5
    keys = a["indices"].shape[1] + (a["extra_indices"].shape[1] if "extra_indices" in a else 0)
    flops = 2.0 * keys * H * (D + D) * T
    nbytes = _bytes(a)
    copies = max(1, min(16, math.ceil(2 * L2_BYTES / max(1, _input_bytes(a)))))
    arg_sets = [a] + [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
                      for _ in range(copies - 1)]
    t = _time_us(lambda x: torch.ops.dsv4.sparse_attn(**x), arg_sets, 3 if quick else 5,
                 5 if quick else 20)
    ref_t = None
    if with_ref:
        ref_t = _time_us(lambda x: sparse_attn_reference(**x, skip_out_of_range=True), arg_sets,
                         1, 1 if quick else 3)
    floor = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBPS * 1e12)) * 1e6
    return {
        "op": "sparse_attn",
        "case": name,
        "time_us": t,
        "tflops": flops / t * 1e-6,
        "gbps": nbytes / t * 1e-3,
        "pct_flops": 100.0 * flops / t * 1e-6 / PEAK_TFLOPS,
        "pct_bw": 100.0 * nbytes / t * 1e-3 / (PEAK_TBPS * 1e3),
        "ref_time_us": ref_t,
        "speedup": (ref_t / t) if ref_t else None,
        "floor_us": floor,
        "note": (f"FlashMLA on this H200: {flashmla_us:.1f} us "
                 f"({flops / flashmla_us * 1e-6:.0f} TFLOP/s"
                 + (", FP8 KV)" if "decode" in name else ")")
                 + f"; dsv4/FlashMLA time = {t / flashmla_us:.2f}"),
    }


def run(quick: bool = False) -> list[dict]:
    """One dict per case (keys: op, case, time_us, tflops, gbps, pct_flops, pct_bw, ref_time_us,
    speedup, floor_us, note). ``quick``: fewer cases and repetitions."""
    if not torch.cuda.is_available():
        return []
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    prefill = _PREFILL[:1] if quick else _PREFILL
    for name, H, K, N, fm in prefill:
        a = _prefill_inputs(H, K, N, g)
        rows.append(_run_case(name, a, H, fm, quick, with_ref=True))
        del a
        torch.cuda.empty_cache()
    batches = (2, 64) if quick else (2, 64, 128)
    for H in (64, 128):
        for b in batches:
            a = _decode_inputs(H, b, g)
            name = f"decode b{b} x2 h{H} window128+top{512 if H == 64 else 1024}"
            rows.append(_run_case(name, a, H, _DECODE_FLASHMLA[(H, b)], quick, with_ref=True))
            del a
            torch.cuda.empty_cache()
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    res = run(args.quick)
    if not res:
        print("no CUDA device: nothing to time")
    hdr = (f"{'case':<44} {'time us':>9} {'TFLOP/s':>8} {'GB/s':>7} {'%flops':>6} {'%bw':>5} "
           f"{'ref us':>10} {'speedup':>8} {'floor us':>9}  note")
    print(hdr)
    for r in res:
        print(f"{r['case']:<44} {r['time_us']:9.1f} {r['tflops']:8.1f} {r['gbps']:7.0f} "
              f"{r['pct_flops']:6.1f} {r['pct_bw']:5.1f} {_fmt(r['ref_time_us'], '10.1f')} "
              f"{_fmt(r['speedup'], '8.1f')} {r['floor_us']:9.1f}  {r['note']}")
