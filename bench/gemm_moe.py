"""Benchmark of the routed-expert GEMMs ``moe_up`` / ``moe_down`` at V4-Flash shapes
(256 experts, top-6, dim 4096, moe_inter_dim 2048; kernels.md §4.6, issue 10 item 3).

Cases, for bf16 / FP8 (128x128 e8m0 scales) / FP4 (1x32 e8m0 scales) experts:

* prefill T = 4096 tokens (P = 24,576 pairs, every expert busy, ~96 rows each): FLOPs
  = 2·P·K·2N (up) + 2·P·N·K (down); the FLOP floor at 767 TFLOP/s (bf16 tensor cores, which
  every format runs on: sm_90 has no FP4 MMA and the FP8 weights are dequantised to bf16 in
  shared memory). Bytes = every busy expert's weights once + x / h / y; at T = 4096 the weights
  dominate (bf16 12.9 GB: the byte floor, 3.05 ms, is ABOVE the FLOP floor, 1.61 ms).
* decode T = 1, 8, 32, 128: bytes = the busy experts' weights (+ scales) once; GB/s of weight
  bytes is the figure of merit (target >= 3.0 TB/s).

Decode cases also time the skinny tile (``DSV4_GEMM_TILE=skinny``: a weight stream on CUDA
cores) against the 16-row tensor-core tile (``decode``) in the same process: fields
``decode_tile_us`` / ``vs_decode_tile`` of the skinny and ``auto_skinny`` rows.

Baselines in the same process (bf16 weights, same routing): ``torch._grouped_mm`` on the
pre-gathered rows (the GEMMs only: no gather, no SwiGLU: it favours the baseline) and a per-expert
cuBLAS loop (``x[rows_e] @ W_eᵀ``, host-side offsets precomputed). Variants: the automatic tile
and each forced tile (``DSV4_GEMM_TILE``), so the best can be kept.

    python bench/gemm_moe.py [--quick] [--experts E] [--prefill-tokens T] [--formats bf16,fp8]
                             [--no-decode]

``--experts 64 --prefill-tokens 32768 --formats bf16 --no-decode`` is the MoE of ``dsv4
bench``'s prefill row 64 x 512 (64 experts: ~3,000 rows per expert instead of ~96).
"""

from __future__ import annotations

import argparse
import os

import torch

from _driver import cuda_time_us

PEAK_TFLOPS = 767.0
PEAK_TBPS = 4.22
E, TOPK, K, N = 256, 6, 4096, 2048


def _time_us(fn, warmup=3, reps=20) -> float:
    return cuda_time_us(fn, reps, warmup)      # the shared timer (bench/_driver.py)

def _row(case: str, t_us: float, flops: float, wbytes: float, floor_us: float,
         ref_us, note: str) -> dict:
    """One moe_up + moe_down row: time, TFLOP/s and weight GB/s with their shares of the
    ceilings, the floor, and the speedup over ``ref_us`` (None: no baseline)."""
    return dict(op="moe_up+moe_down", case=case, time_us=t_us, tflops=flops / t_us / 1e6,
                pct_flops=100 * flops / t_us / 1e6 / PEAK_TFLOPS, gbps=wbytes / t_us / 1e3,
                pct_bw=100 * wbytes / t_us / 1e3 / (PEAK_TBPS * 1e3), floor_us=floor_us,
                ref_time_us=ref_us, speedup=(ref_us / t_us) if ref_us else None, note=note)


def _route(T, g):
    idx = torch.rand(T, E, device="cuda", generator=g).argsort(-1)[:, :TOPK]
    w = torch.rand(T, TOPK, device="cuda", generator=g) + 0.25
    expert = idx.flatten()
    order = torch.sort(expert * (T * TOPK) + torch.arange(T * TOPK, device="cuda"),
                       stable=True).indices
    row_ids = (order // TOPK).to(torch.int32)
    counts = torch.bincount(expert, minlength=E)
    offs = torch.zeros(E + 1, dtype=torch.int32, device="cuda")
    offs[1:] = counts.cumsum(0)
    return row_ids, offs, w.flatten()[order].float().contiguous(), counts


def _weights(fmt, g):
    """Random stacked expert weights in ``fmt`` (values need not be realistic, only finite)."""
    if fmt == "bf16":
        up = (torch.randn(E, 2, N, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02)
        down = (torch.randn(E, K, N, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02)
        return up, None, down, None
    if fmt == "fp8":
        def q(shape):
            b = torch.randint(0, 256, shape, device="cuda", generator=g, dtype=torch.uint8)
            b = torch.where((b & 0x7F) == 0x7F, b & 0xF7, b)  # no NaN codes
            return b.view(torch.float8_e4m3fn)
        def sc(shape):
            return torch.randint(118, 124, shape, device="cuda", generator=g,
                                 dtype=torch.uint8).view(torch.float8_e8m0fnu)
        return (q((E, 2, N, K)), sc((E, 2, N // 128, K // 128)), q((E, K, N)),
                sc((E, K // 128, N // 128)))
    def p(shape):
        return torch.randint(-128, 128, shape, device="cuda", generator=g, dtype=torch.int8)
    def sc(shape):
        return torch.randint(118, 124, shape, device="cuda", generator=g,
                             dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return p((E, 2, N, K // 2)), sc((E, 2, N, K // 32)), p((E, K, N // 2)), sc((E, K, N // 32))


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


#: (tile, pipeline) variants timed per case: the automatic tile, then each tile forced
#: (DSV4_GEMM_TILE); the two-warpgroup tiles with both pipelines (DSV4_GEMM_PIPE).
VARIANTS = [("auto", "serial"), ("auto", "overlap"), ("decode", "serial"),
            ("decode_deep", "serial"), ("medium", "serial"), ("medium", "overlap"),
            ("large", "serial"), ("large", "overlap"), ("huge", "serial"), ("huge", "overlap")]
QUICK_VARIANTS = VARIANTS[:2]


def variants(quick: bool, decode: bool) -> list[tuple[str, str]]:
    """The (tile, pipeline) variants of a case. Decode-size cases (a few rows per weight
    matrix) add the 16-row tensor-core tile (the baseline of the skinny tile, when quick) and
    the skinny tile (weight stream on CUDA cores), forced, with and without its next-unit L2
    prefetch ("skinny_nopf": DSV4_SKINNY_PREFETCH=0), and "auto_skinny": kAuto with
    DSV4_GEMM_SKINNY=1 (its wider rule: dense pairs <= 2, MoE pairs <= E). Plain "auto" takes
    the skinny tile for FP8 weights without expert offsets at one row (the default rule)."""
    v = list(QUICK_VARIANTS if quick else VARIANTS)
    if decode:
        if ("decode", "serial") not in v:
            v.append(("decode", "serial"))
        v += [("skinny", "serial"), ("skinny_nopf", "serial"), ("auto_skinny", "serial")]
    return v


def add_skinny_fields(row: dict, tile: str, t_us: float, times: dict) -> None:
    """A skinny / auto_skinny row: its time against the 16-row tile timed in the same process
    (``times`` maps tile -> us) as fields ``decode_tile_us`` / ``vs_decode_tile`` and in the
    note (the table's column)."""
    base = times.get("decode")
    if tile not in ("skinny", "skinny_nopf", "auto_skinny") or base is None:
        return
    row.update(decode_tile_us=base, vs_decode_tile=base / t_us)
    row["note"] = (f"{tile}: {base / t_us:.2f}x the 16-row tile ({base:.1f} us); "
                   + row.get("note", ""))


def _set_tile(tile, pipe="serial"):
    """Force a tile (DSV4_GEMM_TILE; "auto_skinny": kAuto with DSV4_GEMM_SKINNY=1;
    "skinny_nopf": the skinny tile without its L2 prefetch, DSV4_SKINNY_PREFETCH=0)."""
    os.environ.pop("DSV4_GEMM_SKINNY", None)
    os.environ.pop("DSV4_SKINNY_PREFETCH", None)
    if tile == "skinny_nopf":
        os.environ["DSV4_SKINNY_PREFETCH"] = "0"
        tile = "skinny"
    if tile == "auto_skinny":
        os.environ["DSV4_GEMM_SKINNY"] = "1"
        tile = "auto"
    if tile == "auto":
        os.environ.pop("DSV4_GEMM_TILE", None)
    else:
        os.environ["DSV4_GEMM_TILE"] = tile
    os.environ["DSV4_GEMM_PIPE"] = pipe


#: tiles timed with the warp-specialised mainloop (DSV4_GEMM_MAINLOOP=ws: bf16 kLarge / kHuge)
WS_TILES = ("auto", "large", "huge")


def mainloop_pair(fn, outs, tile, reps):
    """Times ``fn`` with the classic and the warp-specialised mainloop (DSV4_GEMM_MAINLOOP) of
    ``tile``, back to back in this process. Returns ``(classic_us, ws_us, same)``: ``same`` is
    whether the tensors ``outs`` hold the same bits after one call of each (the two mainloops
    run the same MMAs in the same order); a time is None where the run failed."""
    times, snaps = {}, {}
    before = os.environ.get("DSV4_GEMM_MAINLOOP")
    for ml in ("classic", "ws"):
        _set_tile(tile)
        os.environ["DSV4_GEMM_MAINLOOP"] = ml
        try:
            fn()
            torch.cuda.synchronize()
            snaps[ml] = [o.clone() for o in outs]
            times[ml] = _time_us(fn, reps=reps)
        except Exception as ex:  # noqa: BLE001
            print(f"mainloop {ml} tile {tile} failed: {ex}")
        finally:
            if before is None:
                os.environ.pop("DSV4_GEMM_MAINLOOP", None)
            else:
                os.environ["DSV4_GEMM_MAINLOOP"] = before
            _set_tile("auto")
    same = None
    if len(snaps) == 2:
        same = all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                   for a, b in zip(snaps["classic"], snaps["ws"]))
    return times.get("classic"), times.get("ws"), same


def run(quick: bool = False, formats=("bf16", "fp8", "fp4"), prefill_tokens: int = 4096,
        decode: bool = True) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    import dsv4.ops  # noqa: F401
    from dsv4.ops.grouped_gemm import moe_down, moe_up

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    decode_T = ((1, 128) if quick else (1, 8, 32, 128)) if decode else ()
    have_gmm = hasattr(torch, "_grouped_mm")
    for fmt in formats:
        w_up, s_up, w_down, s_down = _weights(fmt, g)
        per_expert_bytes = (_nbytes(w_up, s_up) + _nbytes(w_down, s_down)) / E
        cases = [("prefill", prefill_tokens)] + [("decode", t) for t in decode_T]
        for kind, T in cases:
            # several routings for decode so that the busy experts' weights are not in L2
            n_rot = 1 if kind == "prefill" else 8
            routes = [_route(T, g) for _ in range(n_rot)]
            xs = [torch.randn(T, K, device="cuda", generator=g).bfloat16() for _ in range(n_rot)]
            P = T * TOPK
            busy = sum(int((r[3] > 0).sum()) for r in routes) / n_rot
            flops = 2.0 * P * K * 2 * N + 2.0 * P * N * K
            wbytes = busy * per_expert_bytes
            nbytes = wbytes + P * (N * 2 * 2 + K * 2) + T * K * 2
            floor_us = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBPS * 1e12)) * 1e6
            hs = [torch.empty(P, N, device="cuda", dtype=torch.bfloat16) for _ in range(n_rot)]
            ys = [torch.empty(P, K, device="cuda", dtype=torch.bfloat16) for _ in range(n_rot)]
            it = [0]

            aq = [False]  # act_quant (the FP8-activation rows below)

            def ours():
                i = it[0] % n_rot
                it[0] += 1
                r = routes[i]
                moe_up(xs[i], r[0], r[1], w_up, s_up, r[2], 10.0, aq[0], out=hs[i])
                moe_down(hs[i], r[1], w_down, s_down, aq[0], out=ys[i])

            # baselines (bf16 weights, same routing): torch._grouped_mm and a per-expert loop
            base_us = loop_us = None
            if fmt == "bf16" and (kind == "prefill" or T == 128):
                r, x = routes[0], xs[0]
                xg = x[r[0].long()]
                ends = r[1][1:].contiguous()
                wu = w_up.view(E, 2 * N, K).transpose(1, 2)   # [E, K, 2N], K-major storage
                wd = w_down.transpose(1, 2)                    # [E, N, K]
                hg = torch.empty(P, N, device="cuda", dtype=torch.bfloat16)
                if have_gmm:
                    def gmm():
                        torch._grouped_mm(xg, wu, offs=ends)
                        torch._grouped_mm(hg, wd, offs=ends)
                    try:
                        base_us = _time_us(gmm, reps=10)
                    except Exception as ex:  # noqa: BLE001
                        print(f"gemm_moe: torch._grouped_mm failed: {ex}")
                offs = r[1].tolist()
                def loop():
                    for e in range(E):
                        a, b = offs[e], offs[e + 1]
                        if a != b:
                            xe = xg[a:b]
                            _ = xe @ w_up[e, 0].T, xe @ w_up[e, 1].T
                            _ = hg[a:b] @ w_down[e].T
                loop_us = _time_us(loop, warmup=1, reps=3)
            if fmt == "bf16":
                # the MoE's other path for bf16 experts (dsv4.layers.moe.experts_grouped_mm:
                # gather, torch._grouped_mm, moe_swiglu, torch._grouped_mm), which the layer
                # takes from GROUPED_MM_MIN_PAIRS_PER_EXPERT pairs per expert
                from dsv4.layers.moe import ExpertStack, experts_grouped_mm
                stack = ExpertStack(None, w_up, None, w_down, None)

                def gmm_path():
                    i = it[0] % n_rot
                    it[0] += 1
                    r = routes[i]
                    experts_grouped_mm(xs[i], r[0], r[1], r[2], stack, 10.0)
                try:
                    path_us = _time_us(gmm_path, reps=10 if kind == "prefill" else 30)
                    rows.append(_row(f"{fmt} {kind} T={T} grouped_mm path", path_us, flops,
                                     wbytes, floor_us, None,
                                     f"gather + torch._grouped_mm + moe_swiglu + "
                                     f"torch._grouped_mm; busy experts {busy:.0f}, "
                                     f"{P / E:.0f} pairs per expert"))
                    print(rows[-1])
                except Exception as ex:  # noqa: BLE001
                    print(f"gemm_moe: the grouped_mm path failed at {kind} T={T}: {ex}")
            times = {}
            for tile, pipe in variants(quick, kind == "decode"):
                _set_tile(tile, pipe)
                try:
                    reps = (10 if kind == "prefill" else 30) if tile == "auto" else 5
                    if kind == "decode" and tile in ("decode", "skinny", "skinny_nopf",
                                                     "auto_skinny"):
                        reps = 30
                    t_us = _time_us(ours, reps=reps)
                    if pipe == "serial":
                        times[tile] = t_us
                except Exception as ex:  # noqa: BLE001
                    print(f"gemm_moe: {fmt} {kind} T={T} tile {tile}/{pipe} failed: {ex}")
                    continue
                finally:
                    _set_tile("auto")
                rows.append(_row(
                    f"{fmt} {kind} T={T} tile={tile}/{pipe}", t_us, flops, wbytes, floor_us,
                    base_us, f"busy experts {busy:.0f}; weight bytes {wbytes / 1e9:.2f} GB; "
                    + (f"grouped_mm {base_us:.0f} us, " if base_us else "")
                    + (f"per-expert loop {loop_us:.0f} us" if loop_us else "")))
                add_skinny_fields(rows[-1], tile, t_us, times)
                print(rows[-1])
            # the warp-specialised mainloop against the classic one of the same tile (prefill,
            # bf16 weights: the path it serves), same process, same routing
            if fmt == "bf16" and kind == "prefill":
                it[0] = 0
                for tile in WS_TILES:
                    cl_us, ws_us, same = mainloop_pair(ours, [hs[0], ys[0]], tile, reps=10)
                    if ws_us is None:
                        continue
                    rows.append(_row(
                        f"{fmt} {kind} T={T} tile={tile} mainloop=ws", ws_us, flops, wbytes,
                        floor_us, cl_us,
                        f"baseline = the classic mainloop, tile {tile}, same process; "
                        f"bit-equal to it: {same}; "
                        + (f"grouped_mm {base_us:.0f} us" if base_us else "")))
                    print(rows[-1])
            # act_quant (quant_sim, FP8 activations): the bf16-MMA path (quantisation simulated,
            # weights dequantised in shared memory) against the FP8 x FP8 path
            # (DSV4_MOE_FP8_MMA=1, FP8 tensor cores), tile auto, in the same process
            if fmt != "bf16":
                aq[0] = True
                base_aq = None
                for path in ("bf16_mma", "fp8_mma"):
                    if path == "fp8_mma":
                        os.environ["DSV4_MOE_FP8_MMA"] = "1"
                    try:
                        t_us = _time_us(ours, reps=10 if kind == "prefill" else 30)
                    except Exception as ex:  # noqa: BLE001
                        print(f"gemm_moe: {fmt} {kind} T={T} act_quant {path} failed: {ex}")
                        continue
                    finally:
                        os.environ.pop("DSV4_MOE_FP8_MMA", None)
                    if path == "bf16_mma":
                        base_aq = t_us
                    rows.append(_row(
                        f"{fmt} {kind} T={T} act_quant {path}", t_us, flops, wbytes, floor_us,
                        base_aq, f"act_quant; baseline = the bf16_mma path; busy experts "
                        f"{busy:.0f}"))
                    print(rows[-1])
                aq[0] = False
            del hs, ys, xs, routes
        del w_up, s_up, w_down, s_down
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--experts", type=int, default=E, help="routed experts (V4-Flash: 256)")
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--formats", default="bf16,fp8,fp4", help="comma-separated: bf16,fp8,fp4")
    ap.add_argument("--no-decode", action="store_true", help="the prefill case only")
    a = ap.parse_args()
    E = a.experts
    run(a.quick, tuple(f for f in a.formats.split(",") if f), a.prefill_tokens, not a.no_decode)
