"""Benchmark of ``grouped_oproj`` (inverse RoPE on the last 64 dims of every head + the
per-group wo_a projection; issue 9 item 2, kernels.md §4.5) at V4-Flash shapes: o [T, 64 heads,
512], 8 groups of 4096 features, o_lora_rank 1024; wo_a bf16 or FP8 (128x128 e8m0 scales).

Baseline in the same process: today's formula of layers/attention.py (``apply_rope`` inverse,
then ``torch.einsum("tgd,grd->tgr")`` in bf16: cuBLAS batched GEMM) and the einsum alone.
Targets: T = 1 with FP8 wo_a within 1.3x of the weight-byte floor (32 MB at 4.22 TB/s = 7.95 us);
T = 8192 bf16 >= 650 TFLOP/s including the inverse RoPE (cuBLAS einsum alone: 641 measured).

    python bench/gemm_oproj.py [--quick] [--cublas]

``--cublas``: only the prefill-size rows of the grouped_oproj kernel against the cuBLAS form
(``dsv4.ops.grouped_oproj.oproj_cublas``) that output_projection takes for a bf16 wo_a.
"""

from __future__ import annotations

import argparse

import torch

from gemm_moe import (PEAK_TBPS, PEAK_TFLOPS, WS_TILES, _set_tile, _time_us, add_skinny_fields,
                      mainloop_pair, variants)

H, HD, G, R = 64, 512, 8, 1024
DG = H * HD // G


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    import dsv4.ops  # noqa: F401
    from dsv4.layers.rope import apply_rope, rope_frequencies
    from dsv4.ops.grouped_oproj import grouped_oproj
    from dsv4.quant import fp8_block_dequantize

    g = torch.Generator(device="cuda").manual_seed(2)
    freqs = rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0).cuda()
    n_rot = 8
    b = torch.randint(0, 256, (n_rot, G * R, DG), device="cuda", generator=g, dtype=torch.uint8)
    q8 = torch.where((b & 0x7F) == 0x7F, b & 0xF7, b).view(torch.float8_e4m3fn)
    s8 = torch.randint(118, 124, (n_rot, G * R // 128, DG // 128), device="cuda", generator=g,
                       dtype=torch.uint8).view(torch.float8_e8m0fnu)
    w16 = torch.stack([fp8_block_dequantize(q8[i], s8[i]) for i in range(2)]).view(2, G, R, DG)
    rows = []
    for T in ((1, 8, 8192) if quick else (1, 8, 64, 256, 8192)):
        o = torch.randn(T, H, HD, device="cuda", generator=g).bfloat16()
        pos = torch.randint(0, 1 << 20, (T,), device="cuda", generator=g)
        out = torch.empty(T, G, R, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * T * G * R * DG
        for fmt in ("bf16", "fp8"):
            nw = 2 if fmt == "bf16" else n_rot
            wbytes = G * R * DG * (2 if fmt == "bf16" else 1)
            nbytes = wbytes + T * (H * HD + G * R) * 2
            floor_us = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBPS * 1e12)) * 1e6
            it = [0]

            def ours():
                i = it[0] % nw
                it[0] += 1
                if fmt == "bf16":
                    grouped_oproj(o, pos, freqs, w16[i], None, out=out)
                else:
                    grouped_oproj(o, pos, freqs, q8[i].view(G, R, DG),
                                  s8[i].view(G, R // 128, DG // 128), out=out)

            def layer_formula():
                i = it[0] % 2
                it[0] += 1
                orot = apply_rope(o, pos[:, None], freqs, inverse=True).view(T, G, DG)
                torch.einsum("tgd,grd->tgr", orot, w16[i])

            def einsum_only():
                i = it[0] % 2
                it[0] += 1
                torch.einsum("tgd,grd->tgr", o.view(T, G, DG), w16[i])

            ref_us = _time_us(layer_formula, reps=20)
            ein_us = _time_us(einsum_only, reps=20)
            times = {}
            for tile, pipe in variants(quick, T <= 64):
                _set_tile(tile, pipe)
                try:
                    t_us = _time_us(ours, reps=20 if tile in ("auto", "decode", "skinny",
                                                              "skinny_nopf", "auto_skinny")
                                    else 7)
                    if pipe == "serial":
                        times[tile] = t_us
                except Exception as ex:  # noqa: BLE001
                    print(f"gemm_oproj: {fmt} T={T} tile {tile}/{pipe} failed: {ex}")
                    continue
                finally:
                    _set_tile("auto")
                rows.append(dict(
                    op="grouped_oproj", case=f"{fmt} wo_a T={T} tile={tile}/{pipe}",
                    time_us=t_us,
                    tflops=flops / t_us / 1e6, pct_flops=100 * flops / t_us / 1e6 / PEAK_TFLOPS,
                    gbps=wbytes / t_us / 1e3,
                    pct_bw=100 * wbytes / t_us / 1e3 / (PEAK_TBPS * 1e3), floor_us=floor_us,
                    ref_time_us=ref_us, speedup=ref_us / t_us,
                    note=f"apply_rope+einsum {ref_us:.1f} us; einsum alone {ein_us:.1f} us "
                         f"({flops / ein_us / 1e6:.0f} TFLOP/s); ratio to floor "
                         f"{t_us / floor_us:.2f}"))
                add_skinny_fields(rows[-1], tile, t_us, times)
                print(rows[-1])
            # the warp-specialised mainloop (bf16 wo_a, prefill) against the classic one of the
            # same tile, same process; same wo_a (w16[0]) for both, so the bits can be compared
            if fmt == "bf16" and T >= 2048:
                def ours_one():
                    grouped_oproj(o, pos, freqs, w16[0], None, out=out)
                for tile in WS_TILES:
                    cl_us, ws_us, same = mainloop_pair(ours_one, [out], tile, reps=20)
                    if ws_us is None:
                        continue
                    rows.append(dict(
                        op="grouped_oproj", case=f"{fmt} wo_a T={T} tile={tile} mainloop=ws",
                        time_us=ws_us,
                        tflops=flops / ws_us / 1e6,
                        pct_flops=100 * flops / ws_us / 1e6 / PEAK_TFLOPS,
                        gbps=wbytes / ws_us / 1e3,
                        pct_bw=100 * wbytes / ws_us / 1e3 / (PEAK_TBPS * 1e3), floor_us=floor_us,
                        ref_time_us=cl_us, speedup=(cl_us / ws_us) if cl_us else None,
                        note=f"baseline = the classic mainloop, tile {tile}, same process; "
                             f"bit-equal to it: {same}; einsum alone {ein_us:.1f} us; ratio to "
                             f"floor {ws_us / floor_us:.2f}"))
                    print(rows[-1])
    rows += cublas_rows(quick, freqs, w16, g)
    return rows


def cublas_rows(quick: bool, freqs, w16, g) -> list[dict]:
    """bf16 wo_a at prefill sizes: the grouped_oproj kernel (tile auto) against
    ``dsv4.ops.grouped_oproj.oproj_cublas`` (q_norm_rope by -angle + the cuBLAS einsum, what
    output_projection takes from OPROJ_CUBLAS_MIN_TOKENS tokens), same process, same inputs."""
    from dsv4.ops.grouped_oproj import grouped_oproj, oproj_cublas

    rows = []
    for T in ((2048, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)):
        o = torch.randn(T, H, HD, device="cuda", generator=g).bfloat16()
        pos = torch.randint(0, 1 << 20, (T,), device="cuda", generator=g)
        flops = 2.0 * T * G * R * DG
        nbytes = G * R * DG * 2 + T * (H * HD + G * R) * 2
        floor_us = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBPS * 1e12)) * 1e6
        k_us = _time_us(lambda: grouped_oproj(o, pos, freqs, w16[0], None), reps=10)
        c_us = _time_us(lambda: oproj_cublas(o, pos, freqs, w16[0]), reps=10)
        diff = (grouped_oproj(o, pos, freqs, w16[0], None).float()
                - oproj_cublas(o, pos, freqs, w16[0]).float()).abs().max().item()
        for label, t, ref in (("kernel (tile auto)", k_us, None), ("cuBLAS form", c_us, k_us)):
            rows.append(dict(
                op="grouped_oproj", case=f"bf16 wo_a T={T} {label}", time_us=t,
                tflops=flops / t / 1e6, pct_flops=100 * flops / t / 1e6 / PEAK_TFLOPS,
                gbps=nbytes / t / 1e3, pct_bw=100 * nbytes / t / 1e3 / (PEAK_TBPS * 1e3),
                floor_us=floor_us, ref_time_us=ref, speedup=(ref / t) if ref else None,
                note=(f"max |kernel - cuBLAS form| {diff:.3g}"
                      + ("; baseline = the kernel" if ref else ""))))
            print(rows[-1])
        del o
    return rows


def run_cublas_only() -> list[dict]:
    """Only :func:`cublas_rows`, at every size (``--cublas``)."""
    from dsv4.layers.rope import rope_frequencies

    g = torch.Generator(device="cuda").manual_seed(3)
    freqs = rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0).cuda()
    w16 = (torch.randn(1, G, R, DG, device="cuda", generator=g) * DG ** -0.5).bfloat16()
    return cublas_rows(False, freqs, w16, g)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cublas", action="store_true",
                    help="only the kernel vs cuBLAS-form rows at prefill sizes")
    a = ap.parse_args()
    run_cublas_only() if a.cublas else run(a.quick)
