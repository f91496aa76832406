"""Greedy sampling of a decode step on the GPU: the argmax (and finiteness flags) of L rows of
the 129,280 V4 logits, torch's one-pass reductions against the sampler's two-stage ones
(dsv4.runtime.sampler.argmax_rows / rows_finite: per 808-element chunk, then over the 160
chunks), L = 1, 8, 64.

Rows: ``argmax`` (torch.argmax vs argmax_rows) and ``sample_greedy`` (ids + flags into the
step's output: torch.argmax + isfinite.all + copy vs the sampler's two-stage path;
``sample_greedy argmax_finite``: the one-kernel op the sampler takes on CUDA against the
two-stage path, with the logits read once). Times: the
GPU time per call from a CUDA graph of 20 calls (what a captured decode step pays), and the
eager time per call (launches included). Floor: the logits read once at 4.22 TB/s
(sample_greedy reads them twice: argmax and isfinite). Baseline: torch's op in the same
process. Prediction (bench/README.md): torch's argmax of one row ~37 µs (measured in the H100
decode profile, 2026-12-05), the two-stage ~6-8 µs in a graph (3 kernels of ~2 µs each).

Usage: python bench/bench_sampler.py [--quick] [--json F] [--markdown F]
"""

from __future__ import annotations

import os
import sys

import torch

PEAK_TBPS = 4.22
V = 129280
CALLS = 20
COLUMNS = ("op", "case", "time_us", "eager_us", "floor_us", "pct_bw", "base_us",
           "base_eager_us", "speedup", "note")


def _graph_us(fn) -> float:
    """GPU µs per call: CALLS calls captured in one CUDA graph (bench/_driver.py)."""
    from _driver import graph_time_us
    return graph_time_us(lambda k: fn(), CALLS)


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    from _driver import cuda_time_us
    import dsv4.ops  # noqa: F401  (registers the ops)
    from dsv4.ops._ext import has_compiled_kernel
    from dsv4.runtime.sampler import argmax_rows, rows_finite, two_stage_chunk

    os.environ["DSV4_SAMPLER_TWO_STAGE"] = "1"      # (the default) this bench times it
    two_stage_chunk.cache_clear()
    c = two_stage_chunk(V)
    assert c, "no two-stage chunk for the V4 vocabulary"
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for L in ((1, 8) if quick else (1, 8, 64)):
        x = torch.randn(L, V, device="cuda", generator=g) * 3
        out = torch.empty(2, L, dtype=torch.long, device="cuda")
        assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
        floor = L * V * 4 / (PEAK_TBPS * 1e6)

        def torch_argmax():
            torch.argmax(x, dim=-1, out=out[0])

        def two_stage():
            argmax_rows(x, out=out[0])

        def torch_greedy():
            torch.argmax(x, dim=-1, out=out[0])
            out[1].copy_(torch.isfinite(x).all(dim=-1))

        def two_stage_greedy():
            argmax_rows(x, out=out[0])
            out[1].copy_(rows_finite(x))

        def kernel_greedy():
            out.copy_(torch.ops.dsv4.argmax_finite(x))

        cases = [("argmax", two_stage, torch_argmax, floor),
                 ("sample_greedy", two_stage_greedy, torch_greedy, 2 * floor)]
        if has_compiled_kernel("argmax_finite"):
            assert torch.equal(torch.ops.dsv4.argmax_finite(x)[0], torch.argmax(x, dim=-1))
            cases.append(("sample_greedy argmax_finite", kernel_greedy, two_stage_greedy, floor))
        for op, new, base, fl in cases:
            t, tb = _graph_us(new), _graph_us(base)
            e, eb = cuda_time_us(new, reps=10, calls=CALLS), cuda_time_us(base, reps=10,
                                                                            calls=CALLS)
            rows.append(dict(op=op, case=f"L={L} V={V} chunk {c}", time_us=t, eager_us=e,
                             floor_us=fl, pct_bw=100 * fl / t, base_us=tb, base_eager_us=eb,
                             speedup=tb / t, note="graph times; base = " + (
                                 "the two-stage path" if "argmax_finite" in op else
                                 "torch's one-pass op")))
    return rows


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _driver import run_bench  # one command line and table format for all benches

    return run_bench("bench_sampler", __doc__, {"sampler": run}, COLUMNS, "L = 1 and 8 only",
                     argv)


if __name__ == "__main__":
    sys.exit(main())
