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

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import traceback

import torch

FAMILIES = ("hca", "fp8_decode", "indexer_paged", "qkv_rope")
COLUMNS = ("op", "case", "time_us", "tflops", "pct_flops", "gbps", "pct_bw", "floor_us",
           "pct_floor", "ref_time_us", "speedup", "note")


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
    ap.add_argument("--quick", action="store_true", help="small cases only")
    ap.add_argument("--only", default=",".join(FAMILIES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attn: no CUDA device; nothing to measure")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dsv4  # noqa: F401  (registers the ops)

    rows: list[dict] = []
    failed = []
    for fam in a.only.split(","):
        try:
            rows += importlib.import_module(f"attn_{fam}").run(quick=a.quick)
        except Exception:  # one family failing must not hide the others
            traceback.print_exc()
            failed.append(fam)
        torch.cuda.empty_cache()
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch "
              f"{torch.__version__} · commit {_commit()}")
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    json_path = a.json or (os.path.join(out, "bench_attn.json") if out else None)
    md_path = a.markdown or (os.path.join(out, "bench_attn.md") if out else None)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1, default=str)
    if md_path:
        with open(md_path, "w") as f:
            f.write(table + "\n")
    if failed:
        print(f"bench_attn: FAILED families: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
