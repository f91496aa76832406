"""GEMM kernels on the GPU: routed-expert GEMMs (moe_up + moe_down, bf16 / FP8 / FP4 experts),
the FP8 block-scaled linear, the grouped output projection and the fp32-weight linear on
split bf16 GEMMs (the compressors' projections), at V4-Flash shapes, beside
torch._grouped_mm / a per-expert cuBLAS loop / dequantise+cuBLAS / the einsum in the same process.

Usage: python bench/bench_gemm.py [--quick] [--only moe,linear,oproj,split]
                                  [--json results.json] [--markdown table.md]

Each family has its module beside this file (``gemm_<family>.py`` with ``run(quick)`` returning
one dict per case); this driver runs them in one process, prints one table and writes JSON /
Markdown (default: ``$OUT/bench_gemm.json`` and ``.md`` when ``$OUT`` is set). Columns: time
(median of CUDA-event timings), TFLOP/s and weight GB/s with their share of the H200 ceilings
measured on the project's machine (767 TFLOP/s bf16, 4.22 TB/s), the floor (max of FLOP and byte
floors), the baseline time and the speedup over it (the note names the baseline). Every kernel
row names its tile variant (``tile=auto`` is what the ops pick; the others are forced through
``DSV4_GEMM_TILE``), so the best variant per case can be read off one run.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import run_bench  # noqa: E402  (one command line and table format for all benches)
from bench_csa import COLUMNS  # noqa: E402  (the CSA table's columns)

FAMILIES = {f: f"gemm_{f}" for f in ("moe", "linear", "oproj", "split")}


def main(argv=None) -> int:
    return run_bench("bench_gemm", __doc__, FAMILIES, COLUMNS,
                     "fewer cases, the automatic tile only", argv)


if __name__ == "__main__":
    sys.exit(main())
