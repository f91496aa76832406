"""MoE routing kernels and the whole MoE layer on the GPU, at V4-Flash shapes.

Usage: python bench/bench_moe.py [--quick] [--only routing,layer] [--json F] [--markdown F]

Families (modules beside this file, each with ``run(quick)``): ``moe_routing`` (moe_gate,
moe_dispatch, moe_combine and their sum, beside their PyTorch references) and ``moe_layer``
(the layer's kernel path, eager and CUDA-graph, beside torch._grouped_mm and the official
per-expert loop). Prints one table per family; JSON / Markdown go to ``$OUT/bench_moe.json`` /
``.md`` when ``$OUT`` is set. Percentages are of the H200 ceilings measured on the project's
machine (767 TFLOP/s bf16, 4.22 TB/s).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import run_bench  # noqa: E402  (one command line and table format for all benches)

FAMILIES = {"routing": "moe_routing", "layer": "moe_layer"}
COLUMNS = {
    "routing": ("op", "case", "time_us", "tflops", "pct_flops", "gbps", "pct_bw", "floor_us",
                "ref_time_us", "speedup", "note"),
    "layer": ("op", "case", "time_us", "graph_us", "tflops", "pct_flops", "gbps", "pct_bw",
              "floor_us", "grouped_mm_us", "vs_grouped_mm", "loop_us", "vs_loop", "routing_pct",
              "note"),
}


def main(argv=None) -> int:
    return run_bench("bench_moe", __doc__, FAMILIES, COLUMNS, "T = 1 and 4096 only", argv)


if __name__ == "__main__":
    sys.exit(main())
