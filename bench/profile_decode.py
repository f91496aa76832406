"""Where a decode step's time goes: ``dsv4 bench``'s decode setup (2 layers at V4-Flash width,
64 experts, bf16, the pool holding ``--context`` random tokens per sequence), per-step wall
times for each batch with and without CUDA graphs, then a torch.profiler table of a few steps
at ``--profile-batch`` (by CUDA time and by CPU time).

    python bench/profile_decode.py [--batch 1,8,64] [--context 4096] [--profile-batch 8]
                                   [--rows 0] [--timeline FILE] [--compare-env NAME=V1,V2]

What bench/README.md's "Decode step: where the GPU time goes" table was read from (H100,
2026-12-05). The model arguments are ``dsv4 bench``'s (``--model``, ``--layers``, ``--experts``,
``--kv-cache``, ...); ``--device cpu`` runs the same on the reference path (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dsv4.runtime import bench as B  # noqa: E402
from dsv4.runtime.request import SamplingParams  # noqa: E402


def engine(model, args, batch: int, context: int, graphs: bool, warm: int = 3):
    """An engine whose ``batch`` sequences hold ``context`` cached tokens, after ``warm``
    decode steps (the first captures the graph)."""
    args.no_graphs = not graphs
    eng = B._engine(model, args, batch, context + warm + args.steps + 8)
    B._fill_pool(eng, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    sp = SamplingParams(max_new_tokens=warm + args.steps + 4, eos_token_id=-1)
    vocab = model.config.vocab_size
    for _ in range(batch):
        rid = eng.add_request(torch.randint(0, vocab, (context,), generator=g).tolist(), sp)
        eng.scheduler.admit_prefilled(eng.requests[rid], context - 1)
    for _ in range(warm):
        eng.step()
    return eng


def write_timeline(prof, path: str) -> None:
    """The profiled kernels, memsets and copies in start order with their durations and the
    idle time before each (µs), then per step: their count, summed time and the summed gaps.
    With the layers' side stream (dsv4.layers.branch) kernels overlap: a gap is then negative
    (the kernel started before the one listed above it ended) and the summed time can exceed
    the span. A step starts at the
    first kernel after an idle stretch of over ``STEP_GAP_US`` (the host's work between replays)."""
    import json
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as fh:
            trace = json.load(fh)
    ks = sorted((e["ts"], e["dur"], e["name"]) for e in trace.get("traceEvents", [])
                if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e)
    steps, end = [], None
    with open(path, "w") as out:
        for ts, dur, name in ks:
            gap = 0.0 if end is None else ts - end
            if end is None or gap > STEP_GAP_US:
                steps.append({"kernels": 0, "busy": 0.0, "gaps": 0.0, "start": ts})
            else:
                steps[-1]["gaps"] += max(gap, 0.0)
            st = steps[-1]
            st["kernels"] += 1
            st["busy"] += dur
            end = max(end or 0.0, ts + dur)
            st["end"] = end
            out.write(f"{ts:14.1f} {dur:9.2f} {gap:9.2f}  {name[:110]}\n")
        lines = [f"step {i}: {st['kernels']} kernels / memsets / copies, {st['busy']:.1f} µs in them, "
                 f"{st['gaps']:.1f} µs of gaps between them, span {st['end'] - st['start']:.1f} µs"
                 for i, st in enumerate(steps)]
        out.writelines(f"# {line}\n" for line in lines)
    for line in lines:
        print("timeline", line)


def compare_env(model, a, ctx: int, cuda: bool) -> None:
    """``--compare-env NAME=V1,V2``: per batch, the median decode step (graph-replayed on
    CUDA) under each value, the values alternating over ``--rounds`` rounds."""
    name, _, values = a.compare_env.partition("=")
    values = values.split(",")
    before = os.environ.get(name)
    try:
        for b in a.batch:
            times = {v: [] for v in values}
            for _ in range(a.rounds):
                for v in values:
                    os.environ[name] = v
                    eng = engine(model, a, b, ctx, cuda)
                    times[v] += [1e3 * t for t in B._step_times(eng.step, a.steps)]
                    del eng
                    if cuda:
                        torch.cuda.empty_cache()
            print(f"b={b} @ {ctx}: " + ", ".join(
                f"{name}={v} median {statistics.median(t):.3f} ms/step ({len(t)} steps)"
                for v, t in times.items()), flush=True)
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


#: Idle time (µs) that separates two steps in ``write_timeline``.
STEP_GAP_US = 40.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B._add_arguments(p)
    p.add_argument("--profile-batch", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=22,
                   help="rows of each profiler table (0: every kernel / op)")
    p.add_argument("--timeline", default=None,
                   help="write the graph-replayed steps' kernels in launch order (start, "
                        "duration, gap before each) to this file")
    p.add_argument("--compare-env", default=None, metavar="NAME=V1,V2",
                   help="first time each batch's graph-replayed steps under each value of "
                        "environment variable NAME, the values alternating over --rounds "
                        "rounds in this process (the rest runs with the environment as given)")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    a.steps = min(a.steps, 8)
    cfg = B.build_config(a.model, a.layers, a.experts)
    model = B.build_model(cfg, a.weights, a.device, a.seed)
    cuda = a.device != "cpu"
    ctx = a.context[0]
    with torch.no_grad():
        if a.compare_env:
            compare_env(model, a, ctx, cuda)
        for b in a.batch:
            for graphs in ((True, False) if cuda else (False,)):
                eng = engine(model, a, b, ctx, graphs)
                ms = [1e3 * t for t in B._step_times(eng.step, a.steps)]
                print(f"b={b} @ {ctx} graphs={graphs}: median {statistics.median(ms):.3f} ms/step "
                      f"(steps: {' '.join(f'{t:.2f}' for t in ms)}; graph steps "
                      f"{eng.runner.stats['graph_steps']}, off: {eng.runner.graph_off_reason})",
                      flush=True)
                del eng
                if cuda:
                    torch.cuda.empty_cache()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for graphs in ((False, True) if cuda else (False,)):
            eng = engine(model, a, a.profile_batch, ctx, graphs)
            with profile(activities=acts) as prof:
                for _ in range(3):
                    eng.step()
                if cuda:
                    torch.cuda.synchronize()
            for sort, what in ([("cuda_time_total", "CUDA")] if cuda else []) + \
                    [("cpu_time_total", "CPU")]:
                print(f"=== b={a.profile_batch} graphs={graphs}: 3 steps by {what} time")
                print(prof.key_averages().table(sort_by=sort, row_limit=a.rows or -1,
                                                max_name_column_width=70))
                if cuda and what == "CUDA":
                    # kernel rows: device time of their own, no CPU time (ops have both)
                    kernels = [e for e in prof.key_averages()
                               if e.self_device_time_total > 0 and e.cpu_time_total == 0]
                    print(f"kernels: {len(kernels)} kinds, "
                          f"{sum(e.count for e in kernels) / 3:.0f} launches per step")
            if cuda and graphs and a.timeline:
                write_timeline(prof, a.timeline)
            del eng
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
