"""Benchmark of ``torch.ops.dsv4.sparse_attn`` decode on the FP8 MODEL1 cache (issue 9 item 4).

FlashMLA's V4 decode cases: batch 2 / 64 / 128 x 2 query tokens, window 128 (a 256-entry-page
pool) + compressed top-512 (h64) or top-1024 (h128) rows of a 64-entry-page pool (4096
entries per sequence). The same values are timed from the FP8 cache (584 B per key) and from
a bf16 copy (1024 B per key, the baseline in this process), through the old FP8 kernel
(DSV4_SPARSE_FP8=old) and the warp-specialised one (=new; =new2 with whole-sector producer
loads; =auto, the default, picks new above one CTA per SM; baseline of all: the old FP8
kernel). FLOPs = 2 x keys x heads x 1024;
bytes = q + out + distinct key bytes + indices. The issue's target: <= 0.9x FlashMLA's time
(bench/side_by_side_flashmla.py measures that ratio in one process).

    python bench/attn_fp8_decode.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from attn_common import row, time_us, with_fp8_kernel

D = 512
N_COMP = 4096


def _inputs(B, H, g):
    from dsv4.ops import kv_cache as kc
    T, K2 = 2 * B, (512 if H == 64 else 1024)
    q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
    win = (torch.randn(B * 256, D, device="cuda", generator=g) / 4).bfloat16()
    comp = (torch.randn(B * N_COMP, D, device="cuda", generator=g) / 4).bfloat16()
    wp = kc.allocate(kc.MODEL1, B, 256, D, device="cuda")
    r = torch.arange(B * 256, device="cuda")
    kc.write_entries(wp, r // 256, r % 256, win)
    cp = kc.allocate(kc.MODEL1, B * N_COMP // 64, 64, D, device="cuda")
    r = torch.arange(B * N_COMP, device="cuda")
    kc.write_entries(cp, r // 64, r % 64, comp)
    win16 = kc.read_pool(wp, D).view(-1, D)
    comp16 = kc.read_pool(cp, D).view(-1, D)
    seq = torch.arange(T, device="cuda") // 2
    idx = (seq[:, None] * 256 + 128 + torch.arange(128, device="cuda")).int()
    rr = torch.rand(T, N_COMP, device="cuda", generator=g).argsort(-1)[:, :K2]
    eidx = (seq[:, None] * N_COMP + rr).int()
    sink = torch.randn(H, device="cuda", generator=g)
    fp8 = (q, wp, idx, sink, D ** -0.5, None, cp, eidx)
    bf16 = (q, win16, idx, sink, D ** -0.5, None, comp16, eidx)
    keys = T * (128 + K2)
    distinct = B * 128 + min(T * K2, B * N_COMP)
    return fp8, bf16, 2.0 * keys * H * 2 * D, distinct, T, H, K2


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return []
    import dsv4.ops  # noqa: F401
    g = torch.Generator(device="cuda").manual_seed(0)
    fm = {(64, 2): 14.2, (64, 64): 48.3, (64, 128): 92.1, (128, 2): 16.6, (128, 64): 105.2,
          (128, 128): 203.6}
    out = []
    for H in (64, 128):
        for B in ((2, 128) if quick else (2, 64, 128)):
            fp8, bf16, flops, distinct, T, H_, K2 = _inputs(B, H, g)
            reps = 10 if quick else 30
            t8 = time_us(with_fp8_kernel("old", lambda: torch.ops.dsv4.sparse_attn(*fp8)), reps)
            t8n = time_us(with_fp8_kernel("new", lambda: torch.ops.dsv4.sparse_attn(*fp8)), reps)
            t8n2 = time_us(with_fp8_kernel("new2", lambda: torch.ops.dsv4.sparse_attn(*fp8)),
                           reps)
            t8a = time_us(with_fp8_kernel("auto", lambda: torch.ops.dsv4.sparse_attn(*fp8)),
                          reps)
            t16 = time_us(lambda: torch.ops.dsv4.sparse_attn(*bf16), reps)
            small = 2 * T * H * D * 2 + T * (128 + K2) * 4
            note = (f"FlashMLA (FP8, its own run on this H200): {fm[(H, B)]} us; "
                    f"target <= 0.9x FlashMLA in one process")
            out.append(row("sparse_attn", f"decode fp8 b{B} x2 h{H} win128+top{K2} (old)", t8,
                           flops, small + distinct * 584, t16, "the same values in bf16", note))
            out.append(row("sparse_attn", f"decode fp8 b{B} x2 h{H} win128+top{K2} (new)", t8n,
                           flops, small + distinct * 584, t8, "the old FP8 kernel", note))
            out.append(row("sparse_attn", f"decode fp8 b{B} x2 h{H} win128+top{K2} (new2)", t8n2,
                           flops, small + distinct * 584, t8, "the old FP8 kernel", note))
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            pick = "new" if T * ((H + 63) // 64) > sms else "old"
            out.append(row("sparse_attn", f"decode fp8 b{B} x2 h{H} win128+top{K2} (auto: {pick})",
                           t8a, flops, small + distinct * 584, t8, "the old FP8 kernel", note))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    for r in run(ap.parse_args().quick):
        print(r)
