"""mHC kernels on the GPU (hc_mult 4, dim 4096 = V4-Flash): mhc_pre, mhc_post, mhc_head and
pre + post together, at T = 1, 8, 64, 4096, 16384 tokens, beside the PyTorch references
(dsv4.layers.mhc.*_reference) on the same GPU.

Bytes counted (the op is bound by them; FLOPs are a few per byte, the projection runs on
tensor cores):
* pre:  x (T·4·D·2) + fn (24·4D·4 = 1.5 MB) + u (T·D·2) + post/comb (T·80)
* post: f (T·D·2) + residual (T·4·D·2) + out (T·4·D·2) + post/comb (T·80)
* head: x (T·4·D·2) + fn (4·4D·4) + y (T·D·2)
fn differs per layer and site in the model (86 sites × 1.5 MB do not fit in L2), so T <= 64
rotates 64 copies of fn; x is rotated when it is smaller than 4 × L2. Times are GPU times of
calls replayed from a CUDA graph (no launch overhead; what the runtime's captured step pays),
median of 5 samples. Every T > 64 runs twice: the chunked path (DSV4_MHC_ONE_PASS=0), then
the one-pass cluster kernel (the default there; rows "T=… one-pass", whose reference column is
the chunked path's time in this process). T <= 64 runs the previous paths (DSV4_MHC_DECODE=old,
rows "T=… previous": the fused mix kernel at T <= 8, the chunked path above) and then the
decode kernel (DSV4_MHC_DECODE=all, rows "T=… decode", whose reference column is the previous
path's time in this process); by default mhc_pre takes the decode kernel up to T = 16 and
mhc_head up to T = 8, the previous path above (kMhcPreDecodeTokens / kMhcHeadDecodeTokens in
csrc/include/dsv4/mhc.h). Target (issue 10):
pre + post >= 3.5 TB/s at T >= 4096; decode one launch each.

Usage: python bench/bench_mhc.py [--quick] [--json F] [--markdown F]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import graph_time_us  # noqa: E402

PEAK_TBPS = 4.22
L2_BYTES = 50 << 20
D = 4096
COLUMNS = ("op", "case", "time_us", "gbps", "pct_bw", "floor_us", "ref_time_us", "speedup",
           "note")


# Per-call GPU time of fn(k) from one CUDA graph of `iters` calls (bench/_driver.py; this module's
# name for it is what bench/profile_kernels.py patches).
_graph_time_us = graph_time_us


def _row(op, case, t, nbytes, ref_t, note=""):
    return dict(op=op, case=case, time_us=t, gbps=nbytes / t * 1e-3,
                pct_bw=100 * nbytes / t * 1e-3 / (PEAK_TBPS * 1e3),
                floor_us=nbytes / (PEAK_TBPS * 1e6), ref_time_us=ref_t,
                speedup=(ref_t / t) if ref_t else None, note=note)


def _cases(T: int, chunked: list[dict] | None = None, decode: bool = False) -> list[dict]:
    """The four rows at T tokens. `chunked`: the rows of the default (chunked) path at the same
    T, timed just before in this process; given, this is the one-pass run (DSV4_MHC_ONE_PASS=1
    set by the caller) and its reference column is the chunked path's time. `decode`: the
    decode kernel's run (DSV4_MHC_DECODE=all set by the caller), `chunked` then holds the rows
    of the previous path (DSV4_MHC_DECODE=old: the fused mix kernel at T <= 8, the chunked path
    above), its reference column."""
    from dsv4.layers.mhc import hc_head_reference, hc_post_reference, hc_pre_reference

    ops = torch.ops.dsv4
    g = torch.Generator(device="cuda").manual_seed(T)
    K = 4 * D
    xb = T * K * 2
    nx = max(1, min(8, (4 * L2_BYTES) // xb))
    nf = 64 if T <= 64 else 1
    xs = [(torch.randn(T, 4, D, device="cuda", generator=g) * 2).to(torch.bfloat16)
          for _ in range(nx)]
    fns = [torch.randn(24, K, device="cuda", generator=g) * K ** -0.5 for _ in range(nf)]
    hfns = [torch.randn(4, K, device="cuda", generator=g) * K ** -0.5 for _ in range(nf)]
    scale = torch.rand(3, device="cuda", generator=g) + 0.5
    base = torch.randn(24, device="cuda", generator=g) * 0.5
    f = torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16)
    _, post, comb = ops.mhc_pre(xs[0], fns[0], scale, base, 1e-6, 20, 1e-6)
    iters = 200 if T <= 64 else (20 if T <= 4096 else 5)
    ref_iters = 20 if T <= 64 else 3

    def pre(k):
        return ops.mhc_pre(xs[k % nx], fns[k % nf], scale, base, 1e-6, 20, 1e-6)

    def pre_ref(k):
        return hc_pre_reference(xs[k % nx], fns[k % nf], scale, base, 1e-6, 20, 1e-6)

    def post_k(k):
        return ops.mhc_post(f, xs[k % nx], post, comb)

    def post_ref(k):
        return hc_post_reference(f, xs[k % nx], post, comb)

    def head(k):
        return ops.mhc_head(xs[k % nx], hfns[k % nf], scale[:1], base[:4], 1e-6, 1e-6)

    def head_ref(k):
        return hc_head_reference(xs[k % nx], hfns[k % nf], scale[:1], base[:4], 1e-6, 1e-6)

    b_pre = xb + 24 * K * 4 + T * D * 2 + T * 80
    b_post = T * D * 2 + 2 * xb + T * 80
    b_head = xb + 4 * K * 4 + T * D * 2
    t_pre, t_post, t_head = (_graph_time_us(fn, iters) for fn in (pre, post_k, head))
    if chunked is None:
        r_pre, r_post, r_head = (_graph_time_us(fn, ref_iters)
                                 for fn in (pre_ref, post_ref, head_ref))
        launches = "1 launch" if T <= 8 else f"{2 * -(-T // 512)} launches (chunks of 512)"
        case, ref_note = f"T={T}", ""
        if T <= 64:
            case = f"T={T} previous"
    elif decode:
        r_pre, r_post, r_head = (chunked[i]["time_us"] for i in (0, 1, 3))
        launches = "1 launch (decode kernel) + a memset of its counters"
        case, ref_note = f"T={T} decode", "; ref = the previous path (DSV4_MHC_DECODE=old)"

    else:
        r_pre, r_post, r_head = (chunked[i]["time_us"] for i in (0, 1, 3))
        # (the chunked path runs instead where a 16-CTA cluster cannot: check_mhc prints it)
        launches = "1 launch (one pass, clusters of 16 CTAs)"
        case, ref_note = f"T={T} one-pass", "; ref = the chunked path"
    return [
        _row("mhc_pre", case, t_pre, b_pre, r_pre, launches + ref_note),
        _row("mhc_post", case, t_post, b_post, r_post, "1 launch" + ref_note),
        _row("mhc_pre+post", case, t_pre + t_post, b_pre + b_post, r_pre + r_post,
             "target >= 3.5 TB/s at T >= 4096" + ref_note),
        _row("mhc_head", case, t_head, b_head, r_head, launches + ref_note),
    ]


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    import dsv4.ops  # noqa: F401
    from dsv4.ops._ext import has_compiled_kernel

    for op in ("mhc_pre", "mhc_post", "mhc_head"):
        if not has_compiled_kernel(op):
            print(f"bench_mhc: no compiled CUDA kernel for {op}; skipped", file=sys.stderr)
            return []
    rows = []
    user_choice = {k: os.environ.get(k) for k in ("DSV4_MHC_ONE_PASS", "DSV4_MHC_DECODE")}
    os.environ["DSV4_MHC_ONE_PASS"] = "0"     # the chunked path, whatever the default
    with torch.no_grad():
        # 8: decode at batch 8; 16 / 32 / 64: where the decode kernel meets the chunked path
        # (the default's crossover: 16 tokens for mhc_pre, 8 for mhc_head)
        for T in ([1, 8, 16, 32, 64, 4096] if quick else [1, 8, 16, 32, 64, 4096, 16384]):
            # T <= 64: first the previous paths (DSV4_MHC_DECODE=old), then the decode kernel
            if T <= 64:
                os.environ["DSV4_MHC_DECODE"] = "old"
            rows += _cases(T)
            failed = False
            if T > 64:
                # the same sizes through the one-pass kernel (the default; correct on an H100,
                # H100-5): a failure is reported, and ends the runs (a fault poisons the context)
                os.environ["DSV4_MHC_ONE_PASS"] = "1"
                try:
                    rows += _cases(T, chunked=rows[-4:])
                except RuntimeError as e:
                    print(f"bench_mhc: the one-pass path failed at T={T}: {e}", file=sys.stderr)
                    failed = True
                finally:
                    os.environ["DSV4_MHC_ONE_PASS"] = "0"
            else:
                # the decode kernel at every T <= 64 against the previous path, timed just before
                os.environ["DSV4_MHC_DECODE"] = "all"
                try:
                    rows += _cases(T, chunked=rows[-4:], decode=True)
                except RuntimeError as e:
                    print(f"bench_mhc: the decode kernel failed at T={T}: {e}", file=sys.stderr)
                    failed = True
                finally:
                    os.environ.pop("DSV4_MHC_DECODE", None)
            if failed:
                break
    for k, v in user_choice.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return rows


def main(argv=None) -> int:
    from _driver import run_bench  # one command line and table format for all benches

    return run_bench("bench_mhc", __doc__, {"mhc": run}, COLUMNS, "T = 1, 8, 64 and 4096 only",
                     argv)


if __name__ == "__main__":
    sys.exit(main())
