"""sparse_attn prefill side by side: the old wgmma kernel, the new warp-specialised kernel and
FlashMLA, in one process on identical inputs (kernels.md §4.1).

Usage: python bench/bench_sparse_prefill.py [--quick] [--build-flashmla] [--json PATH]

Cases: FlashMLA's four V4 prefill cases (4096 queries, head_dim 512, bf16 q / kv, fp32 sink,
softmax scale 512^-0.5; 64 heads / top-512 and 128 heads / top-1024 over 8K and 64K keys; the
top-k rows of each query are distinct, every 7th query has its last 5 lanes at -1), then two
decode batches (128 sequences x 2 queries, window 128 + compressed top-512 / top-1024, bf16
caches) where the op also takes the new kernel (no key split); FlashMLA's decode reads an FP8
cache, so it is not run there. The old and new kernels are both ``torch.ops.dsv4.sparse_attn``,
selected per call by DSV4_SPARSE_PREFILL=old|new; "persist" is the new kernel launched as a
persistent grid (DSV4_SPARSE_PREFILL_PERSISTENT=1: one CTA per SM looping over tiles); FlashMLA
is ``flash_mla_sparse_fwd``.

Timing (the method of ../shared/peers/side_by_side_flashmla.py): median of CUDA-event times,
a 256 MB buffer zeroed before every call (L2 flushed), the libraries alternating call by call.
FLOPs = 2 x keys x heads x (512 + 512) per query (FlashMLA's count); floor = the FLOP floor at
767 TFLOP/s (the byte floor, q + out + lse + indices + distinct kv rows at 4.22 TB/s, is lower
in every case). Outputs are cross-checked (max |a - b| / max |b|).

FlashMLA is imported from $FMLA_DIR (default /tmp/flashmla). With --build-flashmla (or
DSV4_BUILD_FLASHMLA=1) a missing build is made first with build_flashmla.sh, found at
$FLASHMLA_BUILD_SCRIPT, <repo>/.peers/, <repo>/peers/ or <repo>/../shared/peers/ (~2 min on 16
cores). Without FlashMLA the table has old and new only. JSON: --json, else
$OUT/bench_sparse_prefill.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch

PEAK_TFLOPS = 767.0
PEAK_TBPS = 4.22
D = 512
T_PREFILL = 4096
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMLA_DIR = os.environ.get("FMLA_DIR", "/tmp/flashmla")
# (heads, top-k, kv rows)
PREFILL = [(64, 512, 8192), (64, 512, 65536), (128, 1024, 8192), (128, 1024, 65536)]
DECODE = [(64, 512), (128, 1024)]  # (heads, compressed top-k); batch 128, 2 queries, window 128
# FlashMLA on this H200 side by side with dsv4 at 268a114 (kernels.md §4.1, 2026-12-05), for the
# note when FlashMLA cannot run here: prefill µs per case; decode µs with its FP8 cache.
FLASHMLA_BEFORE = {(64, 512, 8192): 593, (64, 512, 65536): 661, (128, 1024, 8192): 1848,
                   (128, 1024, 65536): 2057, (64, 512): 99.4, (128, 1024): 206.6}


def _build_script() -> str | None:
    cands = [os.environ.get("FLASHMLA_BUILD_SCRIPT", ""),
             os.path.join(REPO, ".peers", "build_flashmla.sh"),
             os.path.join(REPO, "peers", "build_flashmla.sh"),
             os.path.join(REPO, "..", "shared", "peers", "build_flashmla.sh")]
    return next((c for c in cands if c and os.path.isfile(c)), None)


def _flashmla(build: bool):
    """flash_mla_sparse_fwd, or None (with the reason printed)."""
    sys.path.insert(0, FMLA_DIR)
    for attempt in (0, 1):
        try:
            from flash_mla import flash_mla_sparse_fwd
            return flash_mla_sparse_fwd
        except Exception as e:  # not built here, or built for another torch
            err = e
        if attempt or not build:
            break
        script = _build_script()
        if script is None:
            print("bench_sparse_prefill: no build_flashmla.sh found")
            break
        print(f"bench_sparse_prefill: building FlashMLA with {script} into {FMLA_DIR}", flush=True)
        if subprocess.run(["bash", script, FMLA_DIR]).returncode != 0:
            print("bench_sparse_prefill: the FlashMLA build failed")
            break
        sys.modules.pop("flash_mla", None)
    print(f"bench_sparse_prefill: FlashMLA not importable from {FMLA_DIR} ({err!r}); skipped "
          "(--build-flashmla builds it)")
    return None


def _set_mode(mode: str, persistent: bool = False):
    def setup():
        os.environ["DSV4_SPARSE_PREFILL"] = mode
        if persistent:
            os.environ["DSV4_SPARSE_PREFILL_PERSISTENT"] = "1"
        else:
            os.environ.pop("DSV4_SPARSE_PREFILL_PERSISTENT", None)
    return setup


def _time(fns: dict, flush: torch.Tensor, iters: int, warm: int) -> dict:
    """fns: name -> (setup, call). Median µs per name; setup runs outside the timed window."""
    times = {k: [] for k in fns}
    for _ in range(warm):
        for setup, call in fns.values():
            setup()
            call()
    torch.cuda.synchronize()
    for _ in range(iters):
        for name, (setup, call) in fns.items():
            setup()
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _row(case, H, keys, T, nbytes, t, outs, fm_ref) -> dict:
    flops = 2.0 * T * H * keys * (D + D)
    floor = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBPS * 1e12)) * 1e6
    r = {"op": "sparse_attn", "case": case, "floor_us": floor,
         "old_us": t["old"], "new_us": t["new"], "flashmla_us": t.get("flashmla"),
         "persist_us": t.get("persist"),
         "new_over_old": t["new"] / t["old"],
         "persist_over_new": t["persist"] / t["new"] if "persist" in t else None,
         "persist_over_flashmla": t["persist"] / t["flashmla"]
         if "persist" in t and "flashmla" in t else None,
         "persist_vs_new_rel_diff": _rel(outs["persist"], outs["new"]) if "persist" in outs
         else None,
         "new_over_flashmla": t["new"] / t["flashmla"] if "flashmla" in t else None,
         "new_vs_old_rel_diff": _rel(outs["new"], outs["old"]),
         "new_vs_flashmla_rel_diff": _rel(outs["new"], outs["flashmla"])
         if "flashmla" in outs else None,
         "flashmla_before_us": fm_ref}
    for k in ("old", "new", "persist", "flashmla"):
        if k in t:
            r[f"{k}_tflops"] = flops / t[k] * 1e-6
            r[f"{k}_pct_peak"] = 100.0 * flops / t[k] * 1e-6 / PEAK_TFLOPS
    return r


def run(quick: bool = False, build_flashmla: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    import dsv4  # noqa: F401  (registers torch.ops.dsv4)

    fmla = _flashmla(build_flashmla)
    saved = os.environ.get("DSV4_SPARSE_PREFILL")
    saved_persist = os.environ.get("DSV4_SPARSE_PREFILL_PERSISTENT")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    iters, warm = (5, 2) if quick else (15, 3)
    rows = []
    try:
        for H, K, N in PREFILL[:1] if quick else PREFILL:
            q = torch.randn(T_PREFILL, H, D, device="cuda", generator=g).bfloat16()
            kv = torch.randn(N, D, device="cuda", generator=g).bfloat16()
            idx = torch.rand(T_PREFILL, N, device="cuda", generator=g).topk(K, dim=-1).indices.int()
            idx[::7, -5:] = -1
            sink = torch.randn(H, device="cuda", generator=g)
            scale = D ** -0.5
            dsv4_call = lambda: torch.ops.dsv4.sparse_attn(q, kv, idx, sink, scale)  # noqa: E731
            fns = {"old": (_set_mode("old"), dsv4_call), "new": (_set_mode("new"), dsv4_call),
                   "persist": (_set_mode("new", persistent=True), dsv4_call)}
            if fmla is not None:
                fns["flashmla"] = (lambda: None,
                                   lambda: fmla(q, kv[:, None, :], idx[:, None, :], scale, 512, sink))
            outs = {}
            for name, (setup, call) in fns.items():
                setup()
                outs[name] = call()[0].reshape(T_PREFILL, H, D)
            t = _time(fns, flush, iters, warm)
            nbytes = 2 * T_PREFILL * H * D * 2 + T_PREFILL * H * 4 + idx.numel() * 4 \
                + min(idx.numel(), N) * D * 2
            rows.append(_row(f"prefill T{T_PREFILL} h{H} top{K} kv{N // 1024}K", H, K, T_PREFILL,
                             nbytes, t, outs, FLASHMLA_BEFORE[(H, K, N)]))
            del q, kv, idx, outs
            torch.cuda.empty_cache()
        for H, K2 in [] if quick else DECODE:
            batch, n_comp = 128, 4096
            T = 2 * batch
            q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
            window = torch.randn(batch * 128, D, device="cuda", generator=g).bfloat16()
            comp = torch.randn(batch * n_comp, D, device="cuda", generator=g).bfloat16()
            seq = torch.arange(T, device="cuda") // 2
            win_idx = (seq[:, None] * 128 + torch.arange(128, device="cuda")).int()
            r = torch.rand(T, n_comp, device="cuda", generator=g).argsort(-1)[:, :K2]
            comp_idx = (seq[:, None] * n_comp + r).int()
            sink = torch.randn(H, device="cuda", generator=g)
            call = lambda: torch.ops.dsv4.sparse_attn(q, window, win_idx, sink, D ** -0.5,  # noqa: E731
                                                      None, comp, comp_idx)
            fns = {"old": (_set_mode("old"), call), "new": (_set_mode("new"), call),
                   "persist": (_set_mode("new", persistent=True), call)}
            outs = {}
            for name, (setup, c) in fns.items():
                setup()
                outs[name] = c()[0]
            t = _time(fns, flush, iters * 2, warm)
            nbytes = 2 * T * H * D * 2 + T * H * 4 + (win_idx.numel() + comp_idx.numel()) * 4 \
                + (win_idx.numel() + comp_idx.numel()) * D * 2
            rows.append(_row(f"decode b{batch} x2 h{H} window128+top{K2}", H, 128 + K2, T,
                             nbytes, t, outs, FLASHMLA_BEFORE[(H, K2)]))
            del q, window, comp, outs
            torch.cuda.empty_cache()
    finally:
        for name, value in (("DSV4_SPARSE_PREFILL", saved),
                            ("DSV4_SPARSE_PREFILL_PERSISTENT", saved_persist)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return rows


def _f(v, spec=",.1f"):
    return "–" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first prefill case only")
    ap.add_argument("--build-flashmla", action="store_true",
                    default=os.environ.get("DSV4_BUILD_FLASHMLA", "") not in ("", "0"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_sparse_prefill: no CUDA device; nothing to measure")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _driver import commit as _commit

    rows = run(a.quick, a.build_flashmla)
    print(f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} "
          f"· commit {_commit()}")
    print("| case | old µs (TFLOP/s) | new µs (TFLOP/s, % of 767) | persist µs (TFLOP/s) | "
          "FlashMLA µs (TFLOP/s) | new ÷ old | new ÷ FlashMLA | persist ÷ FlashMLA | floor µs | "
          "new vs old / FlashMLA rel diff | persist vs new rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fm = (f"{_f(r['flashmla_us'])} ({_f(r.get('flashmla_tflops'), '.0f')})"
              if r["flashmla_us"] is not None else f"– (earlier run: {r['flashmla_before_us']})")
        print(f"| {r['case']} | {_f(r['old_us'])} ({r['old_tflops']:.0f}) | {_f(r['new_us'])} "
              f"({r['new_tflops']:.0f}, {r['new_pct_peak']:.1f}%) | {_f(r['persist_us'])} "
              f"({_f(r.get('persist_tflops'), '.0f')}) | {fm} | {r['new_over_old']:.2f} "
              f"| {_f(r['new_over_flashmla'], '.2f')} | {_f(r['persist_over_flashmla'], '.2f')} "
              f"| {_f(r['floor_us'])} | "
              f"{r['new_vs_old_rel_diff']:.1e} / {_f(r['new_vs_flashmla_rel_diff'], '.1e')} | "
              f"{_f(r['persist_vs_new_rel_diff'], '.1e')} |")
    path = a.json or (os.path.join(os.environ["OUT"], "bench_sparse_prefill.json")
                      if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
