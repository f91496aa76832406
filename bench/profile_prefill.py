"""Where a prefill's time goes: ``dsv4 bench``'s prefill rows (2 layers at V4-Flash width, 64
experts, bf16 by default), one warm-up prefill, then a torch.profiler table of one timed prefill
of each ``--prefill BxP`` case (default: ``dsv4 bench``'s three), the kernels by CUDA time and
the same time summed per op family.

    python bench/profile_prefill.py [--prefill 64x512] [--rows 30]

The model and engine arguments are ``dsv4 bench``'s (``--model``, ``--layers``, ``--experts``,
``--weights``, ``--chunk``, ...); the engine and the timed call are those of
``dsv4.runtime.bench.bench_prefill``. ``--device cpu`` runs the reference path (a smoke test).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dsv4.runtime import bench as B  # noqa: E402
from dsv4.runtime.request import SamplingParams  # noqa: E402

# Kernel-name fragments -> the family a row is summed into (first match wins).
FAMILIES = (
    ("grouped_gemm", "grouped GEMM (moe_up / moe_down / grouped_oproj / fp8_linear)"),
    ("sparse_attn", "sparse_attn / hca_attn"),
    ("indexer_topk", "indexer_topk"),
    ("compress", "compress_kv"),
    ("mhc", "mHC"),
    ("moe_", "MoE routing / dispatch / combine"),
    ("qkv_rope", "q / kv paths"),
    ("rms_norm", "rms_norm"),
    ("nvjet", "cuBLAS GEMM"),
    ("gemm", "cuBLAS GEMM"),
    ("elementwise", "elementwise (aten)"),
    ("reduce", "reductions (aten)"),
)


def family(name: str) -> str:
    low = name.lower()
    for frag, fam in FAMILIES:
        if frag in low:
            return fam
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B._add_arguments(p)
    p.add_argument("--rows", type=int, default=30, help="rows of the per-kernel table")
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    cases = a.prefill
    cfg = B.build_config(a.model, a.layers, a.experts)
    model = B.build_model(cfg, a.weights, a.device, a.seed)
    cuda = a.device != "cpu"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        for batch, prompt in cases:
            budget = min(batch * prompt, max(a.chunk, prompt))
            eng = B._engine(model, a, batch, prompt + 1, budget)
            g = torch.Generator().manual_seed(a.seed)
            prompts = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g).tolist()
            sp = SamplingParams(max_new_tokens=1, eos_token_id=-1)

            def once():
                for q in prompts:
                    eng.add_request(q, sp)
                for _ in eng.stream():
                    pass
                if cuda:
                    torch.cuda.synchronize()

            once()                                    # warm-up
            t = time.perf_counter()
            once()
            sec = time.perf_counter() - t
            print(f"prefill {batch} x {prompt}: {sec * 1e3:.2f} ms, "
                  f"{batch * prompt / sec:,.0f} tok/s (unprofiled)", flush=True)
            with profile(activities=acts) as prof:
                once()
            if not cuda:
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=a.rows))
                continue
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"
                       and e.self_device_time_total > 0]
            total = sum(e.self_device_time_total for e in kernels)
            by_family = collections.Counter()
            for e in kernels:
                by_family[family(e.key)] += e.self_device_time_total
            print(f"=== {batch} x {prompt}: kernel time {total / 1e3:.2f} ms over "
                  f"{sum(e.count for e in kernels)} launches")
            print("| family | ms | share |\n|---|---|---|")
            for fam, us in by_family.most_common():
                print(f"| {fam} | {us / 1e3:.3f} | {100 * us / total:.1f}% |")
            print("| kernel | calls | ms | share |\n|---|---|---|---|")
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:a.rows]:
                print(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.3f} | "
                      f"{100 * e.self_device_time_total / total:.1f}% |")
            del eng
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
