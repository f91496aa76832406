"""Attention-side kernels of issue 9 on the GPU: HCA dense path, FP8-cache decode, paged /
FP8 indexer keys, fused q / kv paths (one process, one table).

Usage: python bench/bench_attn.py [--quick] [--only hca,fp8_decode,indexer_paged,qkv_rope]
                                  [--json results.json] [--markdown table.md]

Each family has its module beside this file (``attn_<family>.py`` with ``run(quick)``
returning one dict per case; helpers in ``attn_common.py``). Columns: time (median of
CUDA-event timings, L2 flushed before each run), TFLOP/s and GB/s with their share of the H200
ceilings measured on the project's machine (767 TFLOP/s bf16, 4.22 TB/s), the floor and the
share of it reached, the baseline timed in the same process and the speedup over it.
JSON / Markdown default to ``$OUT/bench_attn.json`` / ``.md`` when ``$OUT`` is set. The
FlashMLA comparison (same process, identical inputs) is ``bench/side_by_side_flashmla.py``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import run_bench  # noqa: E402  (one command line and table format for all benches)

FAMILIES = {f: f"attn_{f}" for f in ("hca", "fp8_decode", "indexer_paged", "qkv_rope")}
COLUMNS = ("op", "case", "time_us", "tflops", "pct_flops", "gbps", "pct_bw", "floor_us",
           "pct_floor", "ref_time_us", "speedup", "note")


def main(argv=None) -> int:
    return run_bench("bench_attn", __doc__, FAMILIES, COLUMNS, "small cases only", argv)


if __name__ == "__main__":
    sys.exit(main())
