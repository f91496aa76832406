"""Benchmark of the fused q / kv paths: ``torch.ops.dsv4.q_norm_rope`` and ``kv_norm_rope``.

q path: [T, 64 heads, 512] bf16 -> weight-free RMSNorm -> RoPE (the V4-Flash query), T = 1,
128, 4096, 65536; and the indexer query [T, 64, 128] -> RoPE -> Hadamard -> FP4.
kv path: [T, 512] -> kv_norm -> RoPE -> FP8 simulation -> output + FP8 MODEL1 window write.
Baseline in the same process: the PyTorch references (the separate ops the layer runs today).
Memory-bound: floor = bytes read + written at 4.22 TB/s.

    python bench/attn_qkv_rope.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from attn_common import row, time_us


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    import dsv4.ops  # noqa: F401
    from dsv4.layers.rope import rope_frequencies
    from dsv4.ops import kv_cache as kc
    from dsv4.ops.qkv_rope import (QUANT_FP4_HADAMARD, QUANT_FP8, kv_norm_rope_reference,
                                   q_norm_rope_reference)
    g = torch.Generator(device="cuda").manual_seed(0)
    f = rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0).cuda()
    out = []
    for T in ((1, 4096) if quick else (1, 128, 4096, 65536)):
        pos = torch.arange(T, device="cuda")
        x = torch.randn(T, 64, 512, device="cuda", generator=g).bfloat16()
        o = torch.empty_like(x)
        t = time_us(lambda: torch.ops.dsv4.q_norm_rope_out(x, pos, f, 1e-6, True, 0, out=o), 20)
        tr = time_us(lambda: q_norm_rope_reference(x, pos, f, 1e-6), 5)
        out.append(row("q_norm_rope", f"q T{T} h64 d512 norm+rope", t, 0.0, 2.0 * x.numel() * 2,
                       tr, "PyTorch reference (separate ops)"))
        xi = torch.randn(T, 64, 128, device="cuda", generator=g).bfloat16()
        oi = torch.empty_like(xi)
        t = time_us(lambda: torch.ops.dsv4.q_norm_rope_out(xi, pos, f, 1e-6, False,
                                                           QUANT_FP4_HADAMARD, out=oi), 20)
        tr = time_us(lambda: q_norm_rope_reference(xi, pos, f, 1e-6, False, QUANT_FP4_HADAMARD), 5)
        out.append(row("q_norm_rope", f"indexer q T{T} h64 d128 rope+hadamard+fp4", t, 0.0,
                       2.0 * xi.numel() * 2, tr, "PyTorch reference (separate ops)"))
        xk = torch.randn(T, 512, device="cuda", generator=g).bfloat16()
        w = torch.rand(512, device="cuda", generator=g) + 0.5
        ok = torch.empty_like(xk)
        n_rows = max(T, 128)
        pool = kc.allocate(kc.MODEL1, (n_rows + 127) // 128, 128, 512, device="cuda")
        rows = torch.arange(T, dtype=torch.int32, device="cuda")
        t = time_us(lambda: torch.ops.dsv4.kv_norm_rope_out(xk, w, pos, f, 1e-6, QUANT_FP8, pool,
                                                            rows, out=ok), 20)
        tr = time_us(lambda: kv_norm_rope_reference(xk, w, pos, f, 1e-6, QUANT_FP8, pool, rows), 3)
        out.append(row("kv_norm_rope", f"kv T{T} d512 norm+rope+fp8 + MODEL1 write", t, 0.0,
                       T * (512 * 2 * 2 + 584.0), tr, "PyTorch reference (separate ops)"))
        del x, o, xi, oi, xk, ok, pool
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    for r in run(ap.parse_args().quick):
        print(r)
