"""Benchmark of ``torch.ops.dsv4.indexer_topk`` on paged keys (docs/contracts.md §A.2) and on FP8
indexer keys (132 B per key, issue 9 item 4).

Decode: one query per sequence, 64 heads x 128 dims, batch 32 / 128, 128K and 1M context (N =
ctx / 4 keys per sequence, all visible), top-512. Key layouts: dense bf16 [B, N, 128] (the
baseline, same process), a paged bf16 pool (64-key blocks scattered), a paged FP8 pool. The
floor is the key bytes (256 B bf16 / 132 B FP8 per key) at 4.22 TB/s.

    python bench/attn_indexer_paged.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from attn_common import row, time_us

H, HD, BS = 64, 128, 64


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    import dsv4.ops  # noqa: F401
    from dsv4.ops import kv_cache as kc
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for ctx in ((131072,) if quick else (131072, 1048576)):
        N = ctx // 4
        for B in ((32,) if quick else (32, 128)):
            if B * N * HD * 2 > (20 << 30):
                continue
            q = torch.randn(B, H, HD, device="cuda", generator=g).bfloat16()
            w = (torch.rand(B, H, device="cuda", generator=g) * 2 - 1) * 0.01
            keys = torch.empty(B, N, HD, dtype=torch.bfloat16, device="cuda")
            for b in range(B):
                keys[b] = torch.randn(N, HD, device="cuda", generator=g).bfloat16()
            rows = torch.arange(B, dtype=torch.int32, device="cuda")
            nv = torch.full((B,), N, dtype=torch.int32, device="cuda")
            nbs = N // BS
            perm = torch.randperm(B * nbs, device="cuda", generator=g).int()
            table = perm.view(B, nbs).contiguous()
            pool = torch.empty(B * nbs, BS, HD, dtype=torch.bfloat16, device="cuda")
            pool[table.long().view(-1)] = keys.view(B * nbs, BS, HD)
            topk = 512
            res = torch.empty(B, topk, dtype=torch.int32, device="cuda")
            reps = 5 if ctx > 200000 else 20
            t_dense = time_us(lambda: torch.ops.dsv4.indexer_topk_out(q, w, keys, rows, nv, topk,
                                                                      res), reps)
            t_paged = time_us(lambda: torch.ops.dsv4.indexer_topk_out(q, w, pool, rows, nv, topk,
                                                                      res, table), reps)
            flops = 2.0 * B * N * H * HD
            out.append(row("indexer_topk", f"decode paged bf16 b{B} ctx{ctx // 1024}K top{topk}",
                           t_paged, flops, B * N * HD * 2.0, t_dense, "dense bf16 keys"))
            del pool
            fp8 = kc.allocate(kc.INDEXER, B * nbs, BS, HD, device="cuda")
            for b in range(B):
                s = torch.arange(N, device="cuda")
                kc.write_entries(fp8, table[b, s // BS].long(), s % BS, keys[b])
            t_fp8 = time_us(lambda: torch.ops.dsv4.indexer_topk_out(q, w, fp8, rows, nv, topk,
                                                                    res, table), reps)
            out.append(row("indexer_topk", f"decode paged fp8 b{B} ctx{ctx // 1024}K top{topk}",
                           t_fp8, flops, B * N * (HD + 4.0), t_dense, "dense bf16 keys",
                           "FP8 keys converted to bf16 in shared memory"))
            del fp8, keys, q, w
            torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    for r in run(ap.parse_args().quick):
        print(r)
