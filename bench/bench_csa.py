"""Compressed Sparse Attention kernels on the GPU: compressor, Lightning Indexer + top-k, sparse
attention with sink, at V4-Flash / V4-Pro shapes and FlashMLA's own V4 cases.

Usage: python bench/bench_csa.py [--quick] [--only sparse_attn,indexer,compress_kv]
                                 [--json results.json] [--markdown table.md]

Each op family has its module beside this file (``csa_<family>.py`` with ``run(quick)``
returning one dict per case); this driver runs them in one process, prints one table and
writes JSON / Markdown (default: ``$OUT/bench_csa.json`` and ``.md`` when ``$OUT`` is set).
Columns: time (median of CUDA-event timings), TFLOP/s and GB/s with their share of the H200
ceilings measured on the project's machine (767 TFLOP/s bf16, 4.22 TB/s), the floor
(max of FLOP and byte floors), the PyTorch reference on the same GPU and the speedup over it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import run_bench  # noqa: E402  (one command line and table format for all benches)

FAMILIES = {f: f"csa_{f}" for f in ("sparse_attn", "indexer", "compress_kv")}
COLUMNS = ("op", "case", "time_us", "tflops", "pct_flops", "gbps", "pct_bw", "floor_us",
           "ref_time_us", "speedup", "note")


def main(argv=None) -> int:
    return run_bench("bench_csa", __doc__, FAMILIES, COLUMNS, "small cases only", argv)


if __name__ == "__main__":
    sys.exit(main())
