"""FlashMLA vs dsv4 attention on identical inputs, in one process on one GPU (issue 9).

An extension of ``../shared/peers/side_by_side_flashmla.py`` (same timing method: medians of
CUDA-event timings with the L2 flushed before every call, the two libraries alternating):

* prefill: ``flash_mla_sparse_fwd`` (bf16 KV) vs ``torch.ops.dsv4.sparse_attn``; 4096 queries,
  h64/top-512 and h128/top-1024, 8K and 64K keys.
* decode, FP8 cache: ``flash_mla_with_kvcache`` on the MODEL1 FP8 cache (584 B/token) vs
  ``torch.ops.dsv4.sparse_attn`` reading THE SAME FP8 bytes (window 128 in a 256-entry-page
  cache + compressed top-512 / top-1024 in a 64-entry-page cache), b = 2, 64, 128, 2 q/seq.
  dsv4 on the dequantised bf16 values is timed too (the previous comparison).
* Every dsv4 FP8 kernel is timed (``DSV4_SPARSE_FP8=old``: dequantisation between the GEMMs;
  ``=new``: the warp-specialised kernel; ``=new2``: the same with whole-sector producer loads);
  ``dsv4_us`` / ``ratio_dsv4_over_fmla`` are the old kernel's, ``dsv4_new_us`` /
  ``ratio_new_over_fmla`` the new one's, ``dsv4_new2_us`` / ``ratio_new2_over_fmla`` new2's
  (outputs checked equal: ``new_equals_old``, ``new2_equals_old``).
* decode, HCA-style (FlashMLA's MODEL1 CONFIG3/4: compressed scope in pages of 2 entries with
  per-sequence entry counts up to 1024): FlashMLA with the full index list + extra_topk_length
  vs ``torch.ops.dsv4.hca_attn`` (block table + per-query counts, no index list), same FP8
  bytes, b = 2, 64, 128 at h64 and h128.

Outputs are cross-checked (relative max difference printed). One ``RESULT {json}`` line per
case; all results to ``$OUT/side_by_side.json``.

On the GPU machine (FlashMLA built from the peers tarball, never committed)::

    bash ../shared/peers/build_flashmla.sh /tmp/flashmla
    FMLA_DIR=/tmp/flashmla python3 bench/side_by_side_flashmla.py [--quick] [--only prefill,decode,hca]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

FMLA_DIR = os.environ.get("FMLA_DIR", "/tmp/flashmla")
sys.path.insert(0, FMLA_DIR)
sys.path.insert(0, os.path.join(FMLA_DIR, "tests"))

from attn_common import with_fp8_kernel  # noqa: E402  (bench/attn_common.py)

DEV = "cuda"
D = 512


def _timeit(fns, flush, iters=20, warm=3):
    times = {k: [] for k in fns}
    for _ in range(warm):
        for f in fns.values():
            f()
    torch.cuda.synchronize()
    for _ in range(iters):
        for k, f in fns.items():
            flush.zero_()
            a, b = torch.cuda.Event(True), torch.cuda.Event(True)
            a.record()
            f()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _emit(results, r):
    results.append(r)
    print("RESULT", json.dumps(r), flush=True)


def prefill_cases(results, flush, quick):
    from flash_mla import flash_mla_sparse_fwd
    shapes = [(64, 512, 8192), (64, 512, 65536), (128, 1024, 8192), (128, 1024, 65536)]
    for (h, topk, skv) in shapes[:1] if quick else shapes:
        sq = 4096
        q = torch.randn(sq, h, D, device=DEV, dtype=torch.bfloat16)
        kv = torch.randn(skv, D, device=DEV, dtype=torch.bfloat16)
        idx = torch.rand(sq, skv, device=DEV).topk(topk, dim=-1).indices.int()
        idx[::7, -5:] = -1
        sink = torch.randn(h, device=DEV, dtype=torch.float32)
        scale = D ** -0.5
        f_out = lambda: flash_mla_sparse_fwd(q, kv[:, None, :], idx[:, None, :], scale, 512, sink)  # noqa: E731
        d_out = lambda: torch.ops.dsv4.sparse_attn(q, kv, idx, sink, scale)  # noqa: E731
        fo, do = f_out()[0], d_out()[0]
        t = _timeit({"flashmla": f_out, "dsv4": d_out}, flush, iters=5 if quick else 10)
        flops = 2 * sq * h * topk * (D + 512)
        _emit(results, dict(kind="prefill", h=h, topk=topk, skv=skv, flashmla_us=t["flashmla"],
                            dsv4_us=t["dsv4"], ratio_dsv4_over_fmla=t["dsv4"] / t["flashmla"],
                            dsv4_tflops=flops / t["dsv4"] / 1e6,
                            fmla_tflops=flops / t["flashmla"] / 1e6, out_rel_diff=_rel(do, fo)))
        del q, kv, idx


def _caches(b, s_k, bs, es_k, ebs):
    """FlashMLA MODEL1 FP8 caches (window pages of bs, compressed pages of ebs) and their
    dequantised bf16 values."""
    import quant as fq
    lay = fq.FP8KVCacheLayout.MODEL1_FP8Sparse
    nb, enb = b * s_k // bs, b * es_k // ebs
    k_raw = (torch.randn(nb, bs, 1, D, device=DEV) / 4).bfloat16()
    ek_raw = (torch.randn(enb, ebs, 1, D, device=DEV) / 4).bfloat16()
    kc = fq.quantize_k_cache(k_raw, lay)
    ekc = fq.quantize_k_cache(ek_raw, lay)
    kd = fq.dequantize_k_cache(kc, lay).reshape(-1, D).bfloat16()
    ekd = fq.dequantize_k_cache(ekc, lay).reshape(-1, D).bfloat16()
    return kc, ekc, kd, ekd


def _as_pool(cache):
    """FlashMLA's [num_blocks, page, 1, 584] float8 view of padded blocks -> dsv4's uint8
    [num_blocks, page, 584] pool (the same bytes; dsv4.ops.kv_cache layout)."""
    return cache.view(torch.uint8).squeeze(2)


def decode_cases(results, flush, quick):
    from flash_mla import flash_mla_with_kvcache, get_mla_metadata
    for (h, etopk) in [(64, 512), (128, 1024)]:
        for b in ([2, 64] if quick else [2, 64, 128]):
            sq, topk, s_k, es_k, bs, ebs = 2, 128, 16384, 16384, 256, 64
            q = torch.randn(b, sq, h, D, device=DEV, dtype=torch.bfloat16)
            kc, ekc, kd, ekd = _caches(b, s_k, bs, es_k, ebs)
            base = (torch.arange(b, device=DEV) * s_k)[:, None, None]
            ebase = (torch.arange(b, device=DEV) * es_k)[:, None, None]
            win = base + (s_k - topk) + torch.arange(topk, device=DEV)[None, None, :].expand(b, sq, topk)
            eidx = ebase + torch.rand(b, sq, es_k // 4, device=DEV).topk(etopk, dim=-1).indices
            win, eidx = win.int().contiguous(), eidx.int().contiguous()
            sink = torch.randn(h, device=DEV, dtype=torch.float32)
            scale = D ** -0.5
            meta = get_mla_metadata()[0]
            f_out = lambda: flash_mla_with_kvcache(q, kc, None, None, 512, meta, None, scale, False,  # noqa: E731
                                                   True, win, sink, ekc, eidx)
            qf = q.reshape(b * sq, h, D)
            w2, e2 = win.reshape(b * sq, topk), eidx.reshape(b * sq, etopk)
            pool, epool = _as_pool(kc), _as_pool(ekc)
            d8 = with_fp8_kernel("old", lambda: torch.ops.dsv4.sparse_attn(qf, pool, w2, sink, scale, None,  # noqa: E731
                                                                       epool, e2))
            d8n = with_fp8_kernel("new", lambda: torch.ops.dsv4.sparse_attn(qf, pool, w2, sink, scale, None,  # noqa: E731
                                                                        epool, e2))
            d8n2 = with_fp8_kernel("new2", lambda: torch.ops.dsv4.sparse_attn(qf, pool, w2, sink, scale, None,  # noqa: E731
                                                                          epool, e2))
            d16 = lambda: torch.ops.dsv4.sparse_attn(qf, kd, w2, sink, scale, None, ekd, e2)  # noqa: E731
            fo = f_out()[0].reshape(b * sq, h, D)
            o8, o8n, o8n2, o16 = d8()[0], d8n()[0], d8n2()[0], d16()[0]
            t = _timeit({"flashmla": f_out, "dsv4_fp8": d8, "dsv4_fp8_new": d8n,
                         "dsv4_fp8_new2": d8n2, "dsv4_bf16": d16},
                        flush, iters=10 if quick else 30)
            flops = 2 * b * sq * h * (topk + etopk) * (D + 512)
            _emit(results, dict(kind="decode_fp8", h=h, etopk=etopk, b=b, flashmla_us=t["flashmla"],
                                dsv4_us=t["dsv4_fp8"], dsv4_new_us=t["dsv4_fp8_new"],
                                dsv4_bf16_us=t["dsv4_bf16"],
                                ratio_dsv4_over_fmla=t["dsv4_fp8"] / t["flashmla"],
                                ratio_new_over_fmla=t["dsv4_fp8_new"] / t["flashmla"],
                                ratio_bf16_over_fmla=t["dsv4_bf16"] / t["flashmla"],
                                out_rel_diff=_rel(o8, fo), out_rel_diff_new=_rel(o8n, fo),
                                new_equals_old=bool(torch.equal(o8n, o8)),
                                fp8_vs_bf16_equal=bool(torch.equal(o8, o16)),
                                dsv4_tflops=flops / t["dsv4_fp8"] / 1e6,
                                dsv4_new_tflops=flops / t["dsv4_fp8_new"] / 1e6,
                                dsv4_new2_us=t["dsv4_fp8_new2"],
                                ratio_new2_over_fmla=t["dsv4_fp8_new2"] / t["flashmla"],
                                new2_equals_old=bool(torch.equal(o8n2, o8)),
                                target_ratio=0.9))
            del q, kc, ekc, kd, ekd


def hca_cases(results, flush, quick):
    """FlashMLA MODEL1 CONFIG3/4 (HCA-style) vs dsv4.hca_attn on the same FP8 caches."""
    from flash_mla import flash_mla_with_kvcache, get_mla_metadata
    from dsv4.ops.hca_attn import hca_attn
    for h in (64, 128):
        for b in ([2, 128] if quick else [2, 64, 128]):
            sq, topk, s_k, es_k, bs, ebs, etopk = 2, 128, 16384, 16384, 256, 2, 1024
            q = torch.randn(b, sq, h, D, device=DEV, dtype=torch.bfloat16)
            kc, ekc, _, _ = _caches(b, s_k, bs, es_k, ebs)
            base = (torch.arange(b, device=DEV) * s_k)[:, None, None]
            win = base + (s_k - topk) + torch.arange(topk, device=DEV)[None, None, :].expand(b, sq, topk)
            win = win.int().contiguous()
            # entries 0 .. n_b - 1 of each sequence (n_b random in [0, 1024], as FlashMLA's test),
            # blocks of the sequence in order: physical row = b * es_k + s.
            g = torch.Generator(device=DEV).manual_seed(b + h)
            n_b = torch.randint(0, etopk + 1, (b,), device=DEV, generator=g, dtype=torch.int32)
            s = torch.arange(etopk, device=DEV)
            eidx = ((torch.arange(b, device=DEV) * es_k)[:, None] + s[None, :]).int()
            eidx = torch.where(s[None, :] < n_b[:, None], eidx, -1)[:, None, :].expand(b, sq, etopk)
            eidx = eidx.contiguous()
            sink = torch.randn(h, device=DEV, dtype=torch.float32)
            scale = D ** -0.5
            meta = get_mla_metadata()[0]
            f_out = lambda: flash_mla_with_kvcache(q, kc, None, None, 512, meta, None, scale, False,  # noqa: E731
                                                   True, win, sink, ekc, eidx, None, n_b)
            qf = q.reshape(b * sq, h, D)
            w2 = win.reshape(b * sq, topk)
            pool, epool = _as_pool(kc), _as_pool(ekc)
            blocks_per_seq = es_k // ebs
            table = (torch.arange(b, device=DEV)[:, None] * blocks_per_seq
                     + torch.arange(blocks_per_seq, device=DEV)[None, :]).int()
            rows = (torch.arange(b * sq, device=DEV) // sq).int()
            lengths = n_b.repeat_interleave(sq)
            d_call = lambda: hca_attn(qf, pool, w2, sink, scale, None, epool, table, rows, lengths)  # noqa: E731
            d_out, d_new = with_fp8_kernel("old", d_call), with_fp8_kernel("new", d_call)
            d_new2 = with_fp8_kernel("new2", d_call)
            fo = f_out()[0].reshape(b * sq, h, D)
            do, dn, dn2 = d_out()[0], d_new()[0], d_new2()[0]
            t = _timeit({"flashmla": f_out, "dsv4": d_out, "dsv4_new": d_new, "dsv4_new2": d_new2},
                        flush, iters=10 if quick else 30)
            keys = (topk * b * sq + int(lengths.sum()))
            flops = 2 * h * keys * (D + 512)
            _emit(results, dict(kind="hca_decode_fp8", h=h, b=b, max_entries=etopk,
                                flashmla_us=t["flashmla"], dsv4_us=t["dsv4"],
                                dsv4_new_us=t["dsv4_new"],
                                ratio_dsv4_over_fmla=t["dsv4"] / t["flashmla"],
                                ratio_new_over_fmla=t["dsv4_new"] / t["flashmla"],
                                out_rel_diff=_rel(do, fo), out_rel_diff_new=_rel(dn, fo),
                                new_equals_old=bool(torch.equal(dn, do)),
                                dsv4_tflops=flops / t["dsv4"] / 1e6,
                                dsv4_new_tflops=flops / t["dsv4_new"] / 1e6,
                                dsv4_new2_us=t["dsv4_new2"],
                                ratio_new2_over_fmla=t["dsv4_new2"] / t["flashmla"],
                                new2_equals_old=bool(torch.equal(dn2, do)),
                                target_us=100.0 if h == 64 else 130.0))
            del q, kc, ekc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="prefill,decode,hca")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("side_by_side_flashmla: no CUDA device")
        return 0
    try:
        import flash_mla  # noqa: F401
    except ImportError as e:
        print(f"side_by_side_flashmla: FlashMLA not importable from {FMLA_DIR} ({e}); build it "
              "with ../shared/peers/build_flashmla.sh and set FMLA_DIR")
        return 0
    import dsv4  # noqa: F401  (registers torch.ops.dsv4)
    torch.manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    results: list[dict] = []
    todo = a.only.split(",")
    if "prefill" in todo:
        prefill_cases(results, flush, a.quick)
    if "decode" in todo:
        decode_cases(results, flush, a.quick)
    if "hca" in todo:
        hca_cases(results, flush, a.quick)
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, "side_by_side.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("side_by_side done", torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
