"""Where a decode step's time goes: ``dsv4 bench``'s decode setup (2 layers at V4-Flash width,
64 experts, bf16, the pool holding ``--context`` random tokens per sequence), per-step wall
times for each batch with and without CUDA graphs, then a torch.profiler table of a few steps
at ``--profile-batch`` (by CUDA time and by CPU time).

    python bench/profile_decode.py [--batch 1,8,64] [--context 4096] [--profile-batch 8]
                                   [--rows 0]

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B._add_arguments(p)
    p.add_argument("--profile-batch", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=22,
                   help="rows of each profiler table (0: every kernel / op)")
    a = p.parse_args(argv)
    a.steps = min(a.steps, 8)
    cfg = B.build_config(a.model, a.layers, a.experts)
    model = B.build_model(cfg, a.weights, a.device, a.seed)
    cuda = a.device != "cpu"
    ctx = a.context[0]
    with torch.no_grad():
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
            del eng
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
