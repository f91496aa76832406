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

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import traceback

import torch

FAMILIES = ("sparse_attn", "indexer", "compress_kv")
COLUMNS = ("op", "case", "time_us", "tflops", "pct_flops", "gbps", "pct_bw", "floor_us",
           "ref_time_us", "speedup", "note")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def _commit() -> str:
    """$DSV4_COMMIT if set (a copied tree may carry a stale .git), else git's HEAD."""
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
        print("bench_csa: no CUDA device; nothing to measure")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dsv4  # noqa: F401  (registers the ops)

    rows: list[dict] = []
    failed = []
    for fam in a.only.split(","):
        try:
            mod = importlib.import_module(f"csa_{fam}")
            rows += mod.run(quick=a.quick)
        except Exception:  # one family failing must not hide the others
            traceback.print_exc()
            failed.append(fam)
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch "
              f"{torch.__version__} · commit {_commit()}")
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    json_path = a.json or (os.path.join(out, "bench_csa.json") if out else None)
    md_path = a.markdown or (os.path.join(out, "bench_csa.md") if out else None)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1, default=str)
    if md_path:
        with open(md_path, "w") as f:
            f.write(table + "\n")
    if failed:
        print(f"bench_csa: FAILED families: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
