"""Benchmark of ``torch.ops.dsv4.indexer_topk``: Lightning Indexer scoring + top-k (CSA layers).

Cases (H = 64 indexer heads, D = 128, bf16 q / keys, fp32 weights; architecture.md §5):

* decode: one query per sequence, batch 1 / 32 / 128, contexts 8K / 128K / 1M tokens, i.e.
  N = ctx / 4 compressed entries per sequence (every entry visible), topk 512 (V4-Flash) and
  1024 (V4-Pro). Memory-bound: the floor is the key bytes (N · 256 B per query) at 4.22 TB/s.
* prefill: 4K / 16K / 64K tokens of one sequence with causal visibility n_valid[t] = (t+1) // 4.
  Tensor-core-bound: FLOPs = Σ_t n_valid[t] · H · D · 2 at 767 TFLOP/s.

Timing: CUDA events around the out-variant, median of several runs after a warm-up, L2 flushed
(256 MB write) before every run, so no case benefits from keys cached by the previous run.
The PyTorch reference (``indexer_topk_varlen_reference`` on the GPU, chunked so that it fits)
is timed once or twice per case.

Batch-1 decode at 1M context (the runtime's case: FP8 keys, 132 B, in a paged pool of
256-entry blocks; and dense bf16): the split-range merge is timed both ways in one process, the
candidate-list tree (``DSV4_INDEXER_TOPK_MERGE=tree``, the previous default: its row is the
baseline, ``ref_time_us``) and the default (histogram select beyond 16 splits); both results
are compared (identical indices required). The scan alone (scoring without selection) is measured by the
C++ check binary: ``check_indexer_topk --bench`` (csrc/tests/check_indexer_topk.cu).

Short decode rows (the decode-step latency of issue 9: batch 1 .. 64, N = 1K .. 32K entries;
"b=1 N=1024 in C=65536" is the e2e case at 4,096 tokens with a cache of 256K tokens): the
default split size (a decode split may be 128 keys) against the previous one
(``DSV4_INDEXER_TOPK_MERGE=legacy``: at least max(1024, 2 topk) keys per split, so a short row
was scored by one CTA, and the previous selection tail), same process, same inputs; the legacy
time is ``ref_time_us`` and the indices must be identical. The note adds the times with the
merge forced to the tree and to the histogram select (with and without the programmatic
dependent launch of its select kernel, ``DSV4_INDEXER_TOPK_PDL=0``). Run alone with
``--short``.

    python bench/csa_indexer.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from _driver import cuda_time_us

import dsv4.ops  # noqa: F401  (registers every op)
import dsv4.ops._ext as ext
from dsv4.ops.indexer import indexer_topk_varlen_reference

PEAK_TFLOPS = 767.0   # measured bf16 dense on the project's H200
PEAK_BW = 4.22e12     # measured device copy, bytes/s
HEADS, HEAD_DIM = 64, 128


def _time_us(fn, reps: int) -> float:
    """Median time of ``fn`` in microseconds (CUDA events), L2 flushed before each run (the
    shared timer, bench/_driver.py)."""
    return cuda_time_us(fn, reps, 1, flush=True)

def _inputs(T: int, B: int, N: int, seed: int):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    q = torch.randn(T, HEADS, HEAD_DIM, generator=g, device="cuda").to(torch.bfloat16)
    keys = torch.empty(B, N, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    for b in range(B):  # row by row: no fp32 temporary of the whole store
        keys[b] = torch.randn(N, HEAD_DIM, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.rand(T, HEADS, generator=g, device="cuda") * 2 - 1) * (HEADS ** -0.5 * HEAD_DIM ** -0.5)
    return q, w, keys


def _case(op_case: str, q, w, keys, rows, n_valid, topk, key_bytes, flops, reps, ref_reps,
          kernel: bool, note: str) -> dict:
    T = q.shape[0]
    out = torch.empty(T, topk, dtype=torch.int32, device="cuda")
    t_us = _time_us(lambda: torch.ops.dsv4.indexer_topk_out(q, w, keys, rows, n_valid, topk, out),
                    reps)
    ref_us = None
    if ref_reps > 0:
        ref_us = _time_us(lambda: indexer_topk_varlen_reference(q, w, keys, rows, n_valid, topk),
                          ref_reps)
    floor_us = max(flops / (PEAK_TFLOPS * 1e12), key_bytes / PEAK_BW) * 1e6
    tflops = flops / (t_us * 1e-6) / 1e12
    gbps = key_bytes / (t_us * 1e-6) / 1e9
    return {
        "op": "indexer_topk",
        "case": op_case,
        "time_us": t_us,
        "tflops": tflops,
        "gbps": gbps,
        "pct_flops": 100 * tflops / PEAK_TFLOPS,
        "pct_bw": 100 * gbps * 1e9 / PEAK_BW,
        "ref_time_us": ref_us,
        "speedup": (ref_us / t_us) if ref_us else None,
        "floor_us": floor_us,
        "note": note if kernel else "CUDA kernel not compiled: this times the reference; " + note,
    }


def _with_merge(mode: str | None, fn):
    """Runs fn() with DSV4_INDEXER_TOPK_MERGE set to ``mode`` (None: unset = default)."""
    old = os.environ.pop("DSV4_INDEXER_TOPK_MERGE", None)
    try:
        if mode is not None:
            os.environ["DSV4_INDEXER_TOPK_MERGE"] = mode
        return fn()
    finally:
        os.environ.pop("DSV4_INDEXER_TOPK_MERGE", None)
        if old is not None:
            os.environ["DSV4_INDEXER_TOPK_MERGE"] = old


N_1M = (1 << 20) // 4        # the indexer's keys at 1M context (compression ratio 4)


def keys_1m(g: torch.Generator):
    """One sequence's 1M-context indexer keys, dense bf16 [N_1M, D], and the same keys in the
    runtime's layout: the FP8 (132 B) pool of 256-entry blocks with scattered block ids, and
    its block table [1, N_1M / 256]. Returns (keys, pool, table)."""
    from dsv4.ops import kv_cache as kc
    bs = 256
    keys = torch.randn(N_1M, HEAD_DIM, generator=g, device="cuda").to(torch.bfloat16)
    nb = N_1M // bs
    pool = kc.allocate(kc.INDEXER, nb + 1, bs, HEAD_DIM, device="cuda")
    perm = torch.randperm(nb, generator=g, device="cuda")          # scattered block ids
    s = torch.arange(N_1M, device="cuda")
    kc.write_entries(pool, perm[s // bs], s % bs, keys)
    return keys, pool, perm.to(torch.int32)[None, :]


def queries_1m(T: int, g: torch.Generator):
    """T decode queries over keys_1m's sequence: q [T, H, D] bf16, weights [T, H], rows,
    n_valid (every key visible)."""
    q = torch.randn(T, HEADS, HEAD_DIM, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.rand(T, HEADS, generator=g, device="cuda") * 2 - 1) * (HEADS ** -0.5 * HEAD_DIM ** -0.5)
    rows = torch.zeros(T, dtype=torch.int32, device="cuda")
    nv = torch.full((T,), N_1M, dtype=torch.int32, device="cuda")
    return q, w, rows, nv


def merge_rows(kernel: bool) -> list[dict]:
    """Batch 1 (and 2) at 1M context, paged FP8 keys and dense bf16 keys: the histogram select
    (default) against the candidate-list tree (baseline, same process, same inputs)."""
    N, topk = N_1M, 512
    out_rows = []
    g = torch.Generator(device="cuda")
    g.manual_seed(1)
    keys, pool, table = keys_1m(g)
    for T in (1, 2):
        q, w, rows, nv = queries_1m(T, g)
        for label, kv, tb, key_bytes in (("FP8 paged", pool, table, N * 132),
                                         ("bf16 dense", keys[None], None, N * HEAD_DIM * 2)):
            out = torch.empty(T, topk, dtype=torch.int32, device="cuda")

            def call():
                torch.ops.dsv4.indexer_topk_out(q, w, kv, rows, nv, topk, out, tb)

            def timed():
                call()
                first = out.clone()
                return _time_us(call, 20), first
            tree_us, tree_out = _with_merge("tree", timed)
            hist_us, hist_out = _with_merge(None, timed)
            same = torch.equal(tree_out, hist_out)
            floor_us = T * key_bytes / PEAK_BW * 1e6
            gbps = T * key_bytes / (hist_us * 1e-6) / 1e9
            flops = 2.0 * T * N * HEADS * HEAD_DIM
            out_rows.append({
                "op": "indexer_topk", "case": f"decode b={T} 1M {label} topk=512 (merge: default)",
                "time_us": hist_us, "tflops": flops / (hist_us * 1e-6) / 1e12,
                "gbps": gbps, "pct_flops": 100 * flops / (hist_us * 1e-6) / 1e12 / PEAK_TFLOPS,
                "pct_bw": 100 * gbps * 1e9 / PEAK_BW, "ref_time_us": tree_us,
                "speedup": tree_us / hist_us, "floor_us": floor_us,
                "note": ("baseline (ref) = the candidate-list tree merge, same process; "
                         f"indices {'identical' if same else 'DIFFER (bug)'}")
                        if kernel else "CUDA kernel not compiled"})
    return out_rows


# (batch, N visible entries, capacity C of the key rows): the short-decode latency cases
SHORT_CASES = ((1, 1024, 1024), (1, 1024, 65536), (1, 2048, 2048), (1, 8192, 8192),
               (1, 32768, 32768), (8, 1024, 16384), (32, 2048, 2048), (64, 1024, 1024),
               (32, 32768, 32768))


def short_rows(kernel: bool, quick: bool = False) -> list[dict]:
    """Decode at short and medium contexts: the default split plan against "legacy" (the
    previous split size), same process, same inputs, indices compared."""
    out_rows = []
    topk = 512
    cases = SHORT_CASES[:-1] if quick else SHORT_CASES  # (b=32 N=32K: the 128K row below)
    for b, n, cap in cases:
        q, w, keys = _inputs(b, b, cap, seed=1000 + b + n)
        rows = torch.arange(b, dtype=torch.int32, device="cuda")
        nv = torch.full((b,), n, dtype=torch.int32, device="cuda")
        out = torch.empty(b, topk, dtype=torch.int32, device="cuda")

        def call():
            torch.ops.dsv4.indexer_topk_out(q, w, keys, rows, nv, topk, out)

        def timed():
            call()
            first = out.clone()
            return _time_us(call, 30), first
        legacy_us, legacy_out = _with_merge("legacy", timed)
        new_us, new_out = _with_merge(None, timed)
        # the two merges at the new split size (which one the default should take here)
        tree_us, tree_out = _with_merge("tree", timed)
        hist_us, hist_out = _with_merge("hist", timed)
        old_pdl = os.environ.get("DSV4_INDEXER_TOPK_PDL")
        os.environ["DSV4_INDEXER_TOPK_PDL"] = "0"  # the histogram select launched plainly
        try:
            hist_plain_us, hist_plain_out = _with_merge("hist", timed)
        finally:
            if old_pdl is None:
                del os.environ["DSV4_INDEXER_TOPK_PDL"]
            else:
                os.environ["DSV4_INDEXER_TOPK_PDL"] = old_pdl
        same = all(torch.equal(legacy_out, o)
                   for o in (new_out, tree_out, hist_out, hist_plain_out))
        key_bytes = b * n * HEAD_DIM * 2
        flops = 2.0 * b * n * HEADS * HEAD_DIM
        floor_us = key_bytes / PEAK_BW * 1e6
        gbps = key_bytes / (new_us * 1e-6) / 1e9
        where = "" if cap == n else f" in C={cap}"
        out_rows.append({
            "op": "indexer_topk", "case": f"decode short b={b} N={n}{where} topk={topk}",
            "time_us": new_us, "tflops": flops / (new_us * 1e-6) / 1e12, "gbps": gbps,
            "pct_flops": 100 * flops / (new_us * 1e-6) / 1e12 / PEAK_TFLOPS,
            "pct_bw": 100 * gbps * 1e9 / PEAK_BW, "ref_time_us": legacy_us,
            "speedup": legacy_us / new_us, "floor_us": floor_us,
            "tree_us": tree_us, "hist_us": hist_us, "hist_plain_us": hist_plain_us,
            "note": ("baseline (ref) = the previous code path (DSV4_INDEXER_TOPK_MERGE=legacy), "
                     f"same process; forced tree {tree_us:.1f} us, forced hist {hist_us:.1f} us "
                     f"(without PDL {hist_plain_us:.1f} us); "
                     f"indices {'identical' if same else 'DIFFER (bug)'}")
                    if kernel else "CUDA kernel not compiled"})
        del q, w, keys
    torch.cuda.empty_cache()
    return out_rows


def run(quick: bool = False, short_only: bool = False) -> list[dict]:
    """One dict per case (keys: op, case, time_us, tflops, gbps, pct_flops, pct_bw, ref_time_us,
    speedup, floor_us, note). gbps counts compressed-key bytes (decode: every query reads its
    row; prefill: the row once)."""
    if not torch.cuda.is_available():
        return []
    kernel = "indexer_topk_out" in ext.info()["cuda_usable_ops"]
    if short_only:
        return short_rows(kernel)
    results = short_rows(kernel, quick) + merge_rows(kernel)
    batches = (1, 32) if quick else (1, 32, 128)
    contexts = (8192, 131072) if quick else (8192, 131072, 1048576)
    topks = (512,) if quick else (512, 1024)
    for ctx in contexts:
        N = ctx // 4
        for batch in batches:
            q, w, keys = _inputs(batch, batch, N, seed=ctx + batch)
            rows = torch.arange(batch, dtype=torch.int32, device="cuda")
            n_valid = torch.full((batch,), N, dtype=torch.int32, device="cuda")
            for topk in topks:
                key_bytes = batch * N * HEAD_DIM * 2
                flops = 2.0 * batch * N * HEADS * HEAD_DIM
                ref_reps = 1 if batch * N > (1 << 22) else 3
                results.append(_case(
                    f"decode b={batch} ctx={ctx // 1024}K N={N} topk={topk}", q, w, keys, rows,
                    n_valid, topk, key_bytes, flops, reps=5 if key_bytes > (1 << 30) else 20,
                    ref_reps=ref_reps, kernel=kernel,
                    note="memory-bound: floor = key bytes / 4.22 TB/s"))
            del q, w, keys
            torch.cuda.empty_cache()
    for tokens in ((4096,) if quick else (4096, 16384, 65536)):
        N = tokens // 4
        q, w, keys = _inputs(tokens, 1, N, seed=tokens)
        rows = torch.zeros(tokens, dtype=torch.int32, device="cuda")
        n_valid = ((torch.arange(tokens, device="cuda") + 1) // 4).to(torch.int32)
        flops = 2.0 * HEADS * HEAD_DIM * float(n_valid.sum())
        for topk in topks:
            results.append(_case(
                f"prefill T={tokens} causal N={N} topk={topk}", q, w, keys, rows, n_valid, topk,
                N * HEAD_DIM * 2, flops, reps=3 if tokens >= 65536 else 7,
                ref_reps=1 if tokens >= 16384 else 2, kernel=kernel,
                note="tensor-core-bound (mma.sync): floor = FLOPs / 767 TFLOP/s"))
        del q, w, keys
        torch.cuda.empty_cache()
    return results


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--short", action="store_true",
                    help="only the short-decode rows (default vs legacy split size)")
    a = ap.parse_args()
    rows = run(quick=a.quick, short_only=a.short)
    if not rows:
        print("no CUDA device")
        return
    print(f"{'case':<46} {'time us':>10} {'floor us':>9} {'GB/s':>8} {'%bw':>6} {'TFLOP/s':>8} "
          f"{'%flops':>7} {'ref us':>11} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:<46} {r['time_us']:>10.1f} {r['floor_us']:>9.1f} {r['gbps']:>8.0f} "
              f"{r['pct_bw']:>6.1f} {r['tflops']:>8.1f} {r['pct_flops']:>7.1f} "
              f"{_fmt(r['ref_time_us'], '>11.0f')} {_fmt(r['speedup'], '>8.1f')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
