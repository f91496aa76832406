"""Benchmark of ``fp8_linear`` (FP8 128x128 block-scaled weights, bf16 activations) at the
V4-Flash dense linear shapes, beside "dequantise the weight, then cuBLAS" (what the native-weight
Linear did before) and plain cuBLAS on a resident bf16 weight, in the same process.

Shapes [out, in] (architecture.md §12.2): wq_a 1024x4096, wq_b 32768x1024, wkv 512x4096,
wo_b 4096x8192, shared expert w1 2048x4096 and w2 4096x2048; tokens M = 1, 8, 64 (decode: weight
bytes / time is the figure of merit) and 8192 (prefill: TFLOP/s; FLOP floor at 767 TFLOP/s
since the kernel multiplies in bf16). Floors: max(2·M·N·K / 767 TFLOP/s, bytes / 4.22 TB/s)
with bytes = FP8 weight + scales + x + y.

    python bench/gemm_linear.py [--quick]
"""

from __future__ import annotations

import argparse
import os

import torch

from gemm_moe import PEAK_TBPS, PEAK_TFLOPS, _set_tile, _time_us, add_skinny_fields, variants

SHAPES = [("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096),
          ("wo_b", 4096, 8192), ("shared w1", 2048, 4096), ("shared w2", 4096, 2048)]


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    import dsv4.ops  # noqa: F401
    from dsv4.ops.gemm import fp8_linear
    from dsv4.quant import fp8_block_dequantize

    g = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    shapes = SHAPES[:2] if quick else SHAPES
    for name, N, K in shapes:
        n_rot = 8  # weight copies, so that decode reads come from HBM (not L2)
        b = torch.randint(0, 256, (n_rot, N, K), device="cuda", generator=g, dtype=torch.uint8)
        qs = torch.where((b & 0x7F) == 0x7F, b & 0xF7, b).view(torch.float8_e4m3fn)
        ss = torch.randint(118, 124, (n_rot, N // 128, K // 128), device="cuda", generator=g,
                           dtype=torch.uint8).view(torch.float8_e8m0fnu)
        w16 = fp8_block_dequantize(qs[0], ss[0])
        for M in ((1, 8, 8192) if quick else (1, 8, 64, 8192)):
            x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            flops = 2.0 * M * N * K
            wbytes = N * K + ss[0].numel()
            nbytes = wbytes + M * (K + N) * 2
            floor_us = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBPS * 1e12)) * 1e6
            it = [0]

            def ours():
                i = it[0] % n_rot
                it[0] += 1
                fp8_linear(x, qs[i], ss[i], False, out=out)

            def dequant_cublas():
                i = it[0] % n_rot
                it[0] += 1
                torch.nn.functional.linear(x, fp8_block_dequantize(qs[i], ss[i]))

            deq_us = _time_us(dequant_cublas, reps=10)
            cublas_us = _time_us(lambda: torch.nn.functional.linear(x, w16), reps=20)
            times = {}
            for tile, pipe in variants(quick, M <= 64):
                _set_tile(tile, pipe)
                try:
                    t_us = _time_us(ours, reps=20 if tile in ("auto", "decode", "skinny",
                                                              "skinny_nopf", "auto_skinny")
                                    else 7)
                    if pipe == "serial":
                        times[tile] = t_us
                except Exception as ex:  # noqa: BLE001
                    print(f"gemm_linear: {name} M={M} tile {tile}/{pipe} failed: {ex}")
                    continue
                finally:
                    _set_tile("auto")
                rows.append(dict(
                    op="fp8_linear", case=f"{name} {N}x{K} M={M} tile={tile}/{pipe}",
                    time_us=t_us,
                    tflops=flops / t_us / 1e6, pct_flops=100 * flops / t_us / 1e6 / PEAK_TFLOPS,
                    gbps=wbytes / t_us / 1e3,
                    pct_bw=100 * wbytes / t_us / 1e3 / (PEAK_TBPS * 1e3), floor_us=floor_us,
                    ref_time_us=deq_us, speedup=deq_us / t_us,
                    note=f"dequant+cuBLAS {deq_us:.1f} us; cuBLAS on resident bf16 "
                         f"{cublas_us:.1f} us"))
                add_skinny_fields(rows[-1], tile, t_us, times)
                print(rows[-1])
        del qs, ss, w16
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    run(ap.parse_args().quick)
