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

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import traceback

import torch

FAMILIES = {"routing": "moe_routing", "layer": "moe_layer"}
COLUMNS = {
    "routing": ("op", "case", "time_us", "tflops", "pct_flops", "gbps", "pct_bw", "floor_us",
                "ref_time_us", "speedup", "note"),
    "layer": ("op", "case", "time_us", "graph_us", "tflops", "pct_flops", "gbps", "pct_bw",
              "floor_us", "grouped_mm_us", "vs_grouped_mm", "loop_us", "vs_loop", "routing_pct",
              "note"),
}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def _commit() -> str:
    if os.environ.get("DSV4_COMMIT"):
        return os.environ["DSV4_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip() or "?"
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 1 and 4096 only")
    ap.add_argument("--only", default=",".join(FAMILIES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_moe: no CUDA device; nothing to measure")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dsv4  # noqa: F401

    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch "
              f"{torch.__version__} · commit {_commit()}")
    out_rows: dict[str, list[dict]] = {}
    failed = []
    lines = [header]
    for fam in a.only.split(","):
        try:
            rows = importlib.import_module(FAMILIES[fam]).run(quick=a.quick)
        except Exception:
            traceback.print_exc()
            failed.append(fam)
            continue
        out_rows[fam] = rows
        cols = COLUMNS[fam]
        lines += ["", f"### {fam}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    json_path = a.json or (os.path.join(out, "bench_moe.json") if out else None)
    md_path = a.markdown or (os.path.join(out, "bench_moe.md") if out else None)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "rows": out_rows}, f, indent=1, default=str)
    if md_path:
        with open(md_path, "w") as f:
            f.write(table + "\n")
    if failed:
        print(f"bench_moe: FAILED families: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
