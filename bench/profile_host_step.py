"""The host side of an overlapped decode step, on the CPU: what ``Engine.step`` does around the
graph replay, operation by operation, with its cost, and the torch ops it runs outside the
captured graph.

    python bench/profile_host_step.py [--batch 1,8,64] [--steps 200] [--vocab 512]
    python bench/profile_host_step.py --device cuda [--batch 1,8,64] [--steps 32] [dsv4 bench args]

CPU (default): the engine runs the tiny config's scheduling, packing, sampling and bookkeeping exactly as on
the GPU, decode through the graph path (``ModelRunner.emulate_graphs``: the captured step body is
run eagerly on the static buffers instead of replayed), with the model's forward replaced by a
stub that returns fixed logits (``--vocab`` columns) so that no model time is counted. The body
(what a CUDA graph replays on the GPU: the token gather, the model, the greedy draw, the
metadata advance) is timed apart and left out of the host total. Per batch: microseconds per
step of each host operation (mean over ``--steps`` steady-state decode steps), the step's host
total, and the top-level torch ops per step outside the body (torch.profiler). The GPU adds to
each torch op its launch (~3-6 us each through the CUDA driver) and to the replay its
``cudaGraphLaunch``; bench/README.md ("Host side of a decode step") reads the table.

``--device cuda``: the same host operations of ``dsv4 bench``'s decode rows on the GPU (2 layers
at V4-Flash width, 64 experts, bf16, the pool holding ``--context`` random tokens per sequence,
overlapped loop, CUDA graphs): per batch the host microseconds of each operation (the wait for
the GPU taken out of ``_complete``), the host total and the ms per step, then, from one
torch.profiler run of 5 steps, the CUDA API calls per step (count and host µs: what the
driver costs on the host) and the GPU's kernel time per step. JSON to
``$OUT/profile_host_step.json``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_driver.py

import dsv4  # noqa: E402
from dsv4.runtime import Engine, SamplingParams  # noqa: E402
from _driver import write_out_json  # noqa: E402
from dsv4.runtime import bench as B  # noqa: E402
from dsv4.runtime import runner as R  # noqa: E402

BODY = "graph-body"

#: (object attribute path, label) of the host operations timed; the body is nested in the
#: replay and subtracted from it
PHASES = [("scheduler.schedule", "schedule (Scheduler.schedule)"),
          ("runner._pack", "pack + upload check (ModelRunner._pack, upload steps only)"),
          ("runner._run_graph", "replay call (ModelRunner._run_graph minus the body)"),
          ("sample_seeded", "seeded draws outside the graph (sample_seeded)"),
          ("runner._read_back", "D2H copy of the sampled ids + event (ModelRunner._read_back)"),
          ("_complete", "read + stop conditions + outputs (Engine._complete)")]


def build(batch: int, vocab: int, context: int, seeded: bool) -> Engine:
    torch.manual_seed(0)
    model = dsv4.Model(dsv4.ModelConfig.tiny(vocab_size=vocab)).eval()
    logits = torch.randn(batch, vocab)

    def stub(ids, layers, batch_, head_dtype=None, return_hidden=False):
        return logits[:batch_.num_logits]
    model.forward_step = stub
    eng = Engine(model, max_batch=batch, max_model_len=context + 4096, block_tokens=128,
                 overlap=True)
    eng.runner.emulate_graphs()
    sp = SamplingParams(max_new_tokens=4000, eos_token_id=-1,
                        temperature=0.8 if seeded else 0.0, seed=1 if seeded else None)
    for _ in range(batch):
        rid = eng.add_request([i % (vocab - 1) + 1 for i in range(context)], sp)
        eng.scheduler.admit_prefilled(eng.requests[rid], context - 1)
    for _ in range(3):
        eng.step()
    return eng


def build_cuda(model, args, batch: int, context: int, seeded: bool) -> Engine:
    """``dsv4 bench``'s decode engine: ``batch`` sequences holding ``context`` cached tokens
    (random cache contents), after 3 decode steps (the first captures the graph)."""
    eng = B._engine(model, args, batch, context + 2 * args.steps + 32)
    B._fill_pool(eng, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    sp = SamplingParams(max_new_tokens=2 * args.steps + 16, eos_token_id=-1,
                        temperature=0.8 if seeded else 0.0, seed=1 if seeded else None)
    for _ in range(batch):
        ids = torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist()
        rid = eng.add_request(ids, sp)
        eng.scheduler.admit_prefilled(eng.requests[rid], context - 1)
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    return eng


def cuda_calls(eng: Engine, n: int = 5) -> dict:
    """CUDA API calls per step on the host (count, µs) and GPU kernel µs per step, from one
    torch.profiler run of ``n`` steps."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            eng.step()
        torch.cuda.synchronize()
    calls: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.name.startswith("cu") and ev.device_type == torch.autograd.DeviceType.CPU:
            calls[ev.name][0] += 1
            calls[ev.name][1] += ev.cpu_time_total
    gpu = sum(getattr(k, "self_device_time_total", getattr(k, "self_cuda_time_total", 0))
              for k in prof.key_averages())
    return dict(api_per_step={k: [c / n, us / n] for k, (c, us) in
                              sorted(calls.items(), key=lambda kv: -kv[1][1])},
                gpu_kernel_us_step=gpu / n)


def measure(batch: int, steps: int, vocab: int, context: int, seeded: bool = False,
            eng: Engine | None = None) -> dict:
    cuda = eng is not None
    eng = build(batch, vocab, context, seeded) if eng is None else eng
    acc: dict[str, float] = collections.defaultdict(float)

    def wrap(obj, name, key):
        f = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t
        setattr(obj, name, timed)

    for path, label in PHASES:
        acc[label] = 0.0                        # listed even when not called (no upload)
        obj = eng
        *parents, name = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        if name == "sample_seeded":
            wrap(R, name, label)
        else:
            wrap(obj, name, label)
    replays = [r for g in eng.runner.graphs.values() for r in (g.graph, g.sampling)
               if r is not None]
    for r in ([] if cuda else replays):     # the emulated graphs (greedy and sampling)
        body = r.body

        def marked(body=body):
            t = time.perf_counter()
            with record_function(BODY):
                out = body()
            acc["body"] += time.perf_counter() - t
            return out
        r.body = marked
    uploads = eng.runner.stats["uploads"]
    waited = eng.wait_seconds
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    total = time.perf_counter() - t
    waited = eng.wait_seconds - waited          # step() waiting for the GPU (CUDA)
    if cuda:
        torch.cuda.synchronize()
    acc["replay call (ModelRunner._run_graph minus the body)"] -= acc["body"]
    acc["read + stop conditions + outputs (Engine._complete)"] -= waited
    us = {k: 1e6 * v / steps for k, v in acc.items()}
    host = 1e6 * (total - acc["body"] - waited) / steps
    extra = dict(ms_step=1e3 * total / steps, waited_us_step=1e6 * waited / steps) if cuda else {}
    if cuda:
        extra.update(cuda_calls(eng))
        return dict(batch=batch, seeded=seeded, host_us_step=host, phases_us=us,
                    uploads_per_step=(eng.runner.stats["uploads"] - uploads) / steps,
                    graphs=eng.runner.stats["graph_steps"] > 0, **extra)
    ops = collections.Counter()
    n_prof = 10
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_prof):
            eng.step()
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        p, inside = ev.cpu_parent, False
        top = True
        while p is not None:
            if p.name == BODY:
                inside = True
            if p.name.startswith("aten::"):
                top = False
            p = p.cpu_parent
        if top and not inside:
            ops[ev.name] += 1
    return dict(batch=batch, seeded=seeded, host_us_step=host, phases_us=us,
                uploads_per_step=(eng.runner.stats["uploads"] - uploads) / steps,
                ops_per_step={k: v / n_prof for k, v in ops.most_common()},
                ops_total=sum(ops.values()) / n_prof)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B._add_arguments(p)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--vocab", type=int, default=512, help="CPU: the stub's vocabulary")
    p.add_argument("--seeded", action="store_true", help="every request samples (T=0.8)")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("profile_host_step: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 1
    model = None
    if cuda:
        cfg = B.build_config(a.model, a.layers, a.experts)
        model = B.build_model(cfg, a.weights, "cuda", a.seed)
        print(f"profile_host_step: {a.model} x {cfg.n_layers} layers, {cfg.n_routed_experts} "
              f"experts, {a.weights}, {torch.cuda.get_device_name()}, commit {B._commit()}, "
              f"{a.steps} steps, context {a.context[0]}", flush=True)
    rows = []
    with torch.no_grad():
        for b in a.batch:
            eng = build_cuda(model, a, b, a.context[0], a.seeded) if cuda else None
            r = measure(b, a.steps, a.vocab, a.context[0] if cuda else 4000, a.seeded, eng)
            rows.append(r)
            del eng
            print(f"batch {b}{' seeded' if a.seeded else ''}: host {r['host_us_step']:.0f} us/step"
                  + (f" of {r['ms_step']:.3f} ms/step (GPU kernels {r['gpu_kernel_us_step']:.0f} "
                     f"us/step)" if cuda else "")
                  + f", {r['uploads_per_step']:.2f} uploads/step"
                  + ("" if cuda else f", {r['ops_total']:.0f} torch ops outside the graph per "
                     "step"), flush=True)
            for k, v in r["phases_us"].items():
                if k != "body":
                    print(f"  {v:8.1f} us  {k}")
            if cuda:
                print("  CUDA API calls per step (count, host us):")
                for k, (c, us) in list(r["api_per_step"].items())[:12]:
                    print(f"  {c:8.1f} x {us:8.1f} us  {k}")
            else:
                print(f"  {'':8}     (the graph body, run eagerly here: "
                      f"{r['phases_us'].get('body', 0):.1f} us, not counted)")
                print("  ops:", ", ".join(f"{k} {v:g}" for k, v in r["ops_per_step"].items()))
            if cuda:
                torch.cuda.empty_cache()
    write_out_json("profile_host_step", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
