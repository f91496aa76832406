"""KV compressor (torch.ops.dsv4.compress_kv) at V4-Flash shapes: prefill 4K / 16K / 64K tokens
and decode at batch 1 / 32 / 128, for the CSA main KV (head_dim 512, ratio 4, FP8 sim), the
HCA main KV (512, ratio 128, FP8 sim) and the indexer keys (128, ratio 4, Hadamard + FP4 sim).

Bytes counted: kv + score read (fp32, T x coff*head_dim each) + bf16 entries written; the op is
bound by those bytes (a handful of flops per byte), so floor_us is the byte floor at 4.22 TB/s.
FLOPs counted (nominal): 5 per score element (ape add, max, exp, sum, weighted accumulate).
The reference is compress_kv_reference on the same GPU (a Python loop over rows).

Usage: python bench/csa_compress_kv.py [--quick]
"""

from __future__ import annotations

import sys

import torch

from _driver import cuda_time_us

PEAK_TFLOPS = 767.0
PEAK_TBPS = 4.22
L2_BYTES = 50 << 20

# (name, head_dim, compress_ratio, quant)
SHAPES = [("csa d512 r4 fp8", 512, 4, 1), ("hca d512 r128 fp8", 512, 128, 1),
          ("indexer d128 r4 fp4", 128, 4, 2)]


def _time_us(fn, iters: int, warmup: int = 3) -> float:
    """Median of 5 samples of the mean per-call time of ``iters`` calls ``fn(k)`` (k rotates
    the inputs; the shared timer, bench/_driver.py)."""
    return cuda_time_us(fn, 5, warmup, calls=iters, indexed=True)

def _case(name: str, d: int, m: int, quant: int, batch: int, n_per_row: int, decode: bool,
          with_ref: bool) -> dict:
    from dsv4.layers.rope import rope_frequencies
    from dsv4.ops.compressor import compress_kv_reference

    dev = "cuda"
    coff = 2 if m == 4 else 1
    w = coff * d
    T = batch * n_per_row
    g = torch.Generator(device="cpu").manual_seed(0)
    starts = (torch.randint(0, 4096, (batch,), generator=g) if decode
              else torch.zeros(batch, dtype=torch.int64))
    capacity = int(((starts + n_per_row) // m).max()) + 1
    n_entries = int(((starts % m + n_per_row) // m).sum())
    tok_bytes = T * w * 4 * 2
    copies = max(1, min(8, (4 * L2_BYTES) // max(tok_bytes, 1)))  # rotate inputs beyond L2
    kvs = [torch.randn(T, w, device=dev) for _ in range(copies)]
    scs = [torch.randn(T, w, device=dev) for _ in range(copies)]
    ape = torch.randn(m, w, device=dev) * 0.5
    weight = torch.rand(d, device=dev) + 0.5
    freqs = rope_frequencies(64, 160000.0, 65536, 16.0, 32.0, 1.0).to(dev)
    cu = torch.arange(0, T + 1, n_per_row, dtype=torch.int32, device=dev)
    starts_t = starts.to(torch.int32).to(dev)
    skv = torch.randn(batch, coff * m, w, device=dev)
    ssc = torch.randn(batch, coff * m, w, device=dev)
    entries = torch.zeros(batch, capacity, d, dtype=torch.bfloat16, device=dev)

    def kernel(k: int) -> None:
        torch.ops.dsv4.compress_kv(kvs[k % copies], scs[k % copies], ape, weight, freqs, cu,
                                   starts_t, skv, ssc, entries, m, n_per_row, 1e-6, quant)

    iters = 200 if decode else (20 if T >= 65536 else 50)
    t = _time_us(kernel, iters)
    ref_t = None
    if with_ref:
        def reference(k: int) -> None:
            compress_kv_reference(kvs[k % copies], scs[k % copies], ape, weight, freqs, cu,
                                  starts_t, skv, ssc, entries, m, n_per_row, 1e-6, quant)
        ref_t = _time_us(reference, 3 if decode or T >= 16384 else 5, warmup=1)
    nbytes = tok_bytes + n_entries * d * 2
    flops = 5.0 * T * w
    floor = max(nbytes / (PEAK_TBPS * 1e6), flops / (PEAK_TFLOPS * 1e6))
    kind = "decode" if decode else "prefill"
    return dict(op="compress_kv", case=f"{name} {kind} B={batch} n={n_per_row}",
                time_us=t, tflops=flops / t * 1e-6, gbps=nbytes / t * 1e-3,
                pct_flops=100 * flops / t * 1e-6 / PEAK_TFLOPS,
                pct_bw=100 * nbytes / t * 1e-3 / (PEAK_TBPS * 1e3), ref_time_us=ref_t,
                speedup=(ref_t / t) if ref_t else None, floor_us=floor,
                note=f"{n_entries} entries; starts random in [0, 4096)" if decode
                else f"{n_entries} entries")


def run(quick: bool = False) -> list[dict]:
    """One dict per case (keys of bench/bench_csa.py); [] without a GPU or the CUDA kernel."""
    if not torch.cuda.is_available():
        return []
    import dsv4.ops  # noqa: F401  (registers the op)

    from dsv4.ops._ext import has_compiled_kernel
    if not has_compiled_kernel("compress_kv"):
        print("csa_compress_kv: no compiled CUDA kernel for compress_kv; skipped",
              file=sys.stderr)
        return []
    rows = []
    prefill = [4096] if quick else [4096, 16384, 65536]
    decode = [1, 128] if quick else [1, 32, 128]
    for name, d, m, quant in SHAPES:
        for T in prefill:
            rows.append(_case(name, d, m, quant, 1, T, False, with_ref=True))
        for B in decode:
            rows.append(_case(name, d, m, quant, B, 1, True, with_ref=True))
    return rows


if __name__ == "__main__":
    results = run(quick="--quick" in sys.argv)
    cols = ("case", "time_us", "gbps", "pct_bw", "floor_us", "ref_time_us", "speedup", "note")
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
