"""Shared helpers of the bench/attn_*.py modules: timing with an L2 flush and the result row
(the columns of bench_csa: time, TFLOP/s, GB/s, their share of the measured H200 ceilings,
the floor, the baseline run in the same process and the ratio to it)."""

from __future__ import annotations

from _driver import cuda_time_us

PEAK_TFLOPS = 767.0   # measured bf16 dense matmul on the project's H200
PEAK_BW = 4.22e12     # measured device-to-device copy, bytes/s


def time_us(fn, reps: int, warmup: int = 2) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn()`` in microseconds, the L2 flushed before
    every run (the shared timer, bench/_driver.py)."""
    return cuda_time_us(fn, reps, warmup, flush=True)

def row(op: str, case: str, t_us: float, flops: float, nbytes: float, base_us: float | None,
        base_name: str, note: str = "") -> dict:
    """One result row. ``base_us``: the baseline (named ``base_name``) timed in this process;
    ``speedup`` = base / this."""
    floor = max(flops / (PEAK_TFLOPS * 1e12), nbytes / PEAK_BW) * 1e6
    tflops = flops / (t_us * 1e-6) / 1e12 if flops else 0.0
    gbps = nbytes / (t_us * 1e-6) / 1e9
    return {
        "op": op,
        "case": case,
        "time_us": t_us,
        "tflops": tflops,
        "pct_flops": 100 * tflops / PEAK_TFLOPS,
        "gbps": gbps,
        "pct_bw": 100 * gbps * 1e9 / PEAK_BW,
        "floor_us": floor,
        "pct_floor": 100 * floor / t_us,
        "ref_time_us": base_us,
        "speedup": (base_us / t_us) if base_us else None,
        "note": f"baseline: {base_name}" + (f"; {note}" if note else ""),
    }


def with_fp8_kernel(kernel: str, fn):
    """``fn`` run with DSV4_SPARSE_FP8=kernel ("old" / "new" / "new2" / "auto": which
    sparse_attn kernel reads FP8 caches; read by the op at each call), the previous value
    restored after each call."""
    import os

    def call():
        prev = os.environ.get("DSV4_SPARSE_FP8")
        os.environ["DSV4_SPARSE_FP8"] = kernel
        try:
            return fn()
        finally:
            if prev is None:
                del os.environ["DSV4_SPARSE_FP8"]
            else:
                os.environ["DSV4_SPARSE_FP8"] = prev
    return call
