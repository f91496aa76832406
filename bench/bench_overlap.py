"""Decode with the overlapped engine loop against the synchronous one, in the same process.

Usage: python bench/bench_overlap.py [--quick] [dsv4 bench arguments]

``dsv4 bench``'s decode rows (2 layers at V4-Flash width, 64 experts, bf16, bf16 head, the pool
holding 4096 random tokens per sequence; batch 1/8/64 by default) twice per batch: the
synchronous loop (``Engine(overlap=False)``: the host schedules, packs, launches, then waits
for the step's tokens) and the overlapped loop (the default on CUDA: step n + 1 is prepared
and queued while step n runs). Per row: ms/step (median interval between back-to-back
``step()`` returns), the host's share (the interval minus the time step() waited for the GPU),
the metadata uploads per overlapped step (a graph step at steady state uploads nothing: its
positions advance inside the graph), the byte floor and the speed-up of the overlapped loop.
JSON to ``$OUT/bench_overlap.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_driver.py

from _driver import write_out_json  # noqa: E402
from dsv4.runtime import bench as B  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B._add_arguments(p)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_overlap: needs a CUDA GPU", file=sys.stderr)
        return 1
    if a.quick:
        a.batch, a.steps = [1, 8], min(a.steps, 8)
    cfg = B.build_config(a.model, a.layers, a.experts)
    model = B.build_model(cfg, a.weights, "cuda", a.seed)
    print(f"bench_overlap: {a.model} x {cfg.n_layers} layers, {cfg.n_routed_experts} experts, "
          f"{a.weights}, {a.head} head, {torch.cuda.get_device_name()}, commit {B._commit()}, "
          f"{a.steps} steps", flush=True)
    print(f"{'batch':>5} {'ctx':>6} | {'sync ms':>8} {'host ms':>8} | {'overlap ms':>10} "
          f"{'host ms':>8} {'uploads':>7} | {'floor ms':>8} {'% floor':>7} | {'speed-up':>8}",
          flush=True)
    rows = []
    with torch.no_grad():
        for ctx in a.context:
            for b in a.batch:
                pair = {}
                for overlap in (False, True):
                    a.no_overlap = not overlap
                    r = B.bench_decode(model, a, b, ctx)
                    assert r["overlap"] == overlap
                    pair[overlap] = r
                    rows.append(r)
                    torch.cuda.empty_cache()
                s, o = pair[False], pair[True]
                print(f"{b:>5} {ctx:>6} | {s['ms_step']:>8.3f} {s['host_ms_step']:>8.3f} | "
                      f"{o['ms_step']:>10.3f} {o['host_ms_step']:>8.3f} "
                      f"{o['uploads_per_step']:>7.2f} | {o['floor_ms']:>8.3f} "
                      f"{o['pct_of_floor']:>6.1f}% | {s['ms_step'] / o['ms_step']:>7.2f}x"
                      + ("" if o["graphs"] else "  [eager]"), flush=True)
    write_out_json("bench_overlap", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
