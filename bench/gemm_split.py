"""Benchmark of the fp32-weight linear on bf16 tensor cores (``dsv4.ops.split_gemm``: three bf16
GEMMs on an exact split of the weight) against PyTorch's fp32 GEMM (cuBLAS, CUDA cores), at
the compressors' projection shapes of V4-Flash (dim 4096; fused per layer: a CSA layer's
``wkv`` + ``wgate`` of its compressor (2 x 1024) and its indexer's (2 x 256) = 2560 rows, an
HCA layer's 2 x 512 = 1024), bf16 x of M rows.

FLOPs = 2·M·N·K (of the fp32 product; the split runs three times as many on tensor cores);
bytes = the fp32 weight once + x + the fp32 output (the split path also writes and reads its
bf16 terms and the output three times). Floor = max(FLOPs / 767 TFLOP/s, bytes / 4.22 TB/s):
that of the fp32 product on bf16 tensor cores, which neither path reaches exactly.

    python bench/bench_gemm.py --only split [--quick]
"""

from __future__ import annotations

import torch

from gemm_moe import PEAK_TBPS, PEAK_TFLOPS, _time_us

K = 4096
SHAPES = (("CSA compressors (fused)", 2560), ("HCA compressor (fused)", 1024))


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    from dsv4.ops.split_gemm import linear_bf16x3

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, N in SHAPES:
        w = torch.randn(N, K, device="cuda", generator=g) * K ** -0.5
        for M in ((64, 4096, 32768) if quick else (1, 64, 512, 2048, 4096, 32768)):
            x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
            flops = 2.0 * M * N * K
            nbytes = N * K * 4 + M * K * 2 + M * N * 4
            floor_us = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBPS * 1e12)) * 1e6
            reps = 5 if M >= 4096 else 20
            fp32_us = _time_us(lambda: torch.nn.functional.linear(x.float(), w), reps=reps)
            split_us = _time_us(lambda: linear_bf16x3(x, w), reps=reps)
            err = (linear_bf16x3(x, w) - x.double() @ w.double().t()).abs().max().item()
            err32 = (torch.nn.functional.linear(x.float(), w) - x.double() @ w.double().t()
                     ).abs().max().item()
            for label, t, ref in (("fp32 GEMM (cuBLAS)", fp32_us, None),
                                  ("split bf16 x3", split_us, fp32_us)):
                rows.append(dict(
                    op="fp32-weight linear", case=f"{name} {N}x{K} M={M} {label}",
                    time_us=t, tflops=flops / t / 1e6,
                    pct_flops=100 * flops / t / 1e6 / PEAK_TFLOPS,
                    gbps=nbytes / t / 1e3, pct_bw=100 * nbytes / t / 1e3 / (PEAK_TBPS * 1e3),
                    floor_us=floor_us, ref_time_us=ref,
                    speedup=(ref / t) if ref else None,
                    note=(f"max |err| vs fp64: split {err:.2e}, fp32 GEMM {err32:.2e}"
                          + ("; baseline = the fp32 GEMM" if ref else ""))))
                print(rows[-1])
            del x
    return rows
