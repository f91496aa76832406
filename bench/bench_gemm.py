"""GEMM kernels on the GPU: routed-expert GEMMs (moe_up + moe_down, bf16 / FP8 / FP4 experts),
the FP8 block-scaled linear and the grouped output projection, at V4-Flash shapes, beside
torch._grouped_mm / a per-expert cuBLAS loop / dequantise+cuBLAS / the einsum in the same process.

Usage: python bench/bench_gemm.py [--quick] [--only moe,linear,oproj]
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

import argparse
import datetime
import importlib
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_csa import COLUMNS, _commit, _fmt  # noqa: E402  (one table format for all benches)

FAMILIES = ("moe", "linear", "oproj")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases, the automatic tile only")
    ap.add_argument("--only", default=",".join(FAMILIES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemm: no CUDA device; nothing to measure")
        return 0
    import dsv4  # noqa: F401  (registers the ops)

    rows: list[dict] = []
    failed = []
    for fam in a.only.split(","):
        try:
            rows += importlib.import_module(f"gemm_{fam}").run(quick=a.quick)
        except Exception:  # one family failing must not hide the others
            traceback.print_exc()
            failed.append(fam)
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch "
              f"{torch.__version__} · commit {_commit()}")
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    json_path = a.json or (os.path.join(out, "bench_gemm.json") if out else None)
    md_path = a.markdown or (os.path.join(out, "bench_gemm.md") if out else None)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1, default=str)
    if md_path:
        with open(md_path, "w") as f:
            f.write(table + "\n")
    if failed:
        print(f"bench_gemm: FAILED families: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
