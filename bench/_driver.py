"""The command line, table, output files and kernel timer shared by the kernel benchmarks
(``bench_csa``, ``bench_attn``, ``bench_gemm``, ``bench_moe``, ``bench_mhc``).

A benchmark is a set of families; each family is a module beside this file whose
``run(quick: bool) -> list[dict]`` returns one dict per case (keys: the column names). The
driver runs the families in one process (one failing family is reported and does not hide the
others), prints a Markdown table headed by the date, GPU, torch version and commit, and writes
the rows as JSON and the table as Markdown (``--json`` / ``--markdown``; by default
``$OUT/<name>.json`` / ``.md`` when ``$OUT`` is set).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import subprocess
import sys
import traceback
from typing import Callable, Mapping, Sequence, Union

import torch

Columns = Union[Sequence[str], Mapping[str, Sequence[str]]]


_L2_FLUSH_BYTES = 256 << 20     # > the L2 of an H100 (50 MB) / H200 (60 MB)
_l2_flush_buf: "torch.Tensor | None" = None


def l2_flush() -> None:
    """Evict the GPU's L2 cache (a write of 256 MB), so the next kernel reads from HBM."""
    global _l2_flush_buf
    if _l2_flush_buf is None:
        _l2_flush_buf = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    _l2_flush_buf.zero_()


def cuda_time_us(fn: Callable, reps: int = 10, warmup: int = 2, *, calls: int = 1,
                 flush: bool = False, indexed: bool = False) -> float:
    """The kernel benchmarks' timer: microseconds per call of ``fn``, the median over ``reps``
    samples, each sample CUDA events around ``calls`` back-to-back calls (their mean), after
    ``warmup`` calls.

    Args:
        flush: evict the L2 (:func:`l2_flush`) before each sample, outside the timed region.
        indexed: call ``fn(k)`` with the running call index k = 0, 1, ... (warm-up included),
            e.g. to rotate through copies of the inputs (``x[k % n]``) larger than the L2 in
            total; else ``fn()``.
    """
    k = 0

    def call() -> None:
        nonlocal k
        fn(k) if indexed else fn()
        k += 1

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        if flush:
            l2_flush()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def graph_time_us(fn: Callable, iters: int, replays: int = 5) -> float:
    """Microseconds per call of ``fn(k)`` replayed from one CUDA graph: two eager warm-up calls
    on a side stream, ``iters`` calls (k = 0 .. iters - 1) captured in one graph, one untimed
    replay, then the median over ``replays`` timed replays of the graph's time / ``iters``.
    What a call costs inside the engine's captured decode step (no host launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(2):
            fn(k)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(iters):
            fn(k)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e3 / iters)
    return statistics.median(samples)


def fmt(v) -> str:
    """One table cell: '–' for a missing value, floats to 3 significant digits below 10."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def commit() -> str:
    """$DSV4_COMMIT if set (a copied tree may carry a stale .git), else git's HEAD."""
    if os.environ.get("DSV4_COMMIT"):
        return os.environ["DSV4_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip() or "?"
    except OSError:
        return "?"


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    """The lines of a Markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]


def write_out_json(name: str, obj) -> str:
    """Write ``obj`` as JSON to ``$OUT/<name>.json`` (``$OUT`` defaults to /tmp/dsv4_out,
    created if missing): the output file of a standalone bench script (the families run by
    ``run_bench`` write theirs there only when ``$OUT`` is set). Returns the path."""
    out = os.environ.get("OUT", "/tmp/dsv4_out")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def run_bench(name: str, doc: str, families: Mapping[str, Union[str, Callable]],
              columns: Columns,
              quick_help: str = "small cases only", argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the families, print and write the results.

    Args:
        name: the benchmark's name (messages, default output file names).
        doc: the benchmark module's docstring (its first line is the --help description).
        families: family name (``--only``) -> module name (beside this file) or the
            family's ``run`` function itself.
        columns: one column tuple (one table of every family's rows; JSON ``rows`` is a list)
            or a tuple per family (one table per family; JSON ``rows`` maps family -> rows).
        quick_help: what ``--quick`` selects.
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 1 when a family raised or no family returned a row.
    """
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    if len(families) > 1:
        ap.add_argument("--only", default=",".join(families),
                        help=f"comma-separated families out of {', '.join(families)}")
    ap.add_argument("--json", default=None, help=f"default: $OUT/{name}.json")
    ap.add_argument("--markdown", default=None, help=f"default: $OUT/{name}.md")
    a = ap.parse_args(argv)
    chosen = a.only.split(",") if len(families) > 1 else list(families)
    unknown = [f for f in chosen if f not in families]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {', '.join(families)}")
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device; nothing to measure")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dsv4  # noqa: F401  (registers the ops)

    per_family = not isinstance(columns, (list, tuple))
    rows: dict[str, list[dict]] = {}
    failed = []
    for fam in chosen:
        try:
            run = families[fam]
            if isinstance(run, str):
                run = importlib.import_module(run).run
            rows[fam] = run(quick=a.quick)
        except Exception:  # one family failing must not hide the others
            traceback.print_exc()
            failed.append(fam)
        torch.cuda.empty_cache()
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch "
              f"{torch.__version__} · commit {commit()}")
    lines = [header]
    if per_family:
        for fam, fam_rows in rows.items():
            lines += ["", f"### {fam}", ""] + markdown_table(fam_rows, columns[fam])
        payload = rows
    else:
        payload = [r for fam_rows in rows.values() for r in fam_rows]
        lines += [""] + markdown_table(payload, columns)
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    json_path = a.json or (os.path.join(out, f"{name}.json") if out else None)
    md_path = a.markdown or (os.path.join(out, f"{name}.md") if out else None)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "rows": payload}, f, indent=1, default=str)
    if md_path:
        with open(md_path, "w") as f:
            f.write(table + "\n")
    if failed:
        print(f"{name}: FAILED families: {', '.join(failed)}")
        return 1
    if not any(rows.values()):
        print(f"{name}: no case ran")
        return 1
    return 0
