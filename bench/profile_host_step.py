"""The host side of an overlapped decode step, on the CPU: what ``Engine.step`` does around the
graph replay, operation by operation, with its cost, and the torch ops it runs outside the
captured graph.

    python bench/profile_host_step.py [--batch 1 8 64] [--steps 200] [--vocab 512]

The engine runs the tiny config's scheduling, packing, sampling and bookkeeping exactly as on
the GPU, decode through the graph path (``ModelRunner.emulate_graphs``: the captured step body is
run eagerly on the static buffers instead of replayed), with the model's forward replaced by a
stub that returns fixed logits (``--vocab`` columns) so that no model time is counted. The body
(what a CUDA graph replays on the GPU: the token gather, the model, the greedy draw, the
metadata advance) is timed apart and left out of the host total. Per batch: microseconds per
step of each host operation (mean over ``--steps`` steady-state decode steps), the step's host
total, and the top-level torch ops per step outside the body (torch.profiler). The GPU adds to
each torch op its launch (~3-6 us each through the CUDA driver) and to the replay its
``cudaGraphLaunch``; bench/README.md ("Host side of a decode step") reads the table.
JSON to ``$OUT/profile_host_step.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import dsv4  # noqa: E402
from dsv4.runtime import Engine, SamplingParams  # noqa: E402
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


def measure(batch: int, steps: int, vocab: int, context: int, seeded: bool = False) -> dict:
    eng = build(batch, vocab, context, seeded)
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
        obj = eng
        *parents, name = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        if name == "sample_seeded":
            wrap(R, name, label)
        else:
            wrap(obj, name, label)
    for g in eng.runner.graphs.values():
        body = g.graph.body

        def marked(body=body):
            t = time.perf_counter()
            with record_function(BODY):
                out = body()
            acc["body"] += time.perf_counter() - t
            return out
        g.graph.body = marked
    uploads = eng.runner.stats["uploads"]
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    total = time.perf_counter() - t
    acc["replay call (ModelRunner._run_graph minus the body)"] -= acc["body"]
    us = {k: 1e6 * v / steps for k, v in acc.items()}
    host = 1e6 * (total - acc["body"]) / steps
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
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--context", type=int, default=4000)
    p.add_argument("--seeded", action="store_true", help="every request samples (T=0.8)")
    a = p.parse_args(argv)
    rows = []
    with torch.no_grad():
        for b in a.batch:
            r = measure(b, a.steps, a.vocab, a.context, a.seeded)
            rows.append(r)
            print(f"batch {b}{' seeded' if a.seeded else ''}: host {r['host_us_step']:.0f} us/step, "
                  f"{r['uploads_per_step']:.2f} uploads/step, {r['ops_total']:.0f} torch ops "
                  "outside the graph per step", flush=True)
            for k, v in r["phases_us"].items():
                if k != "body":
                    print(f"  {v:8.1f} us  {k}")
            print(f"  {'':8}     (the graph body, run eagerly here: {r['phases_us'].get('body', 0):.1f} us, "
                  "not counted)")
            print("  ops:", ", ".join(f"{k} {v:g}" for k, v in r["ops_per_step"].items()))
    out = os.environ.get("OUT", "/tmp/dsv4_out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "profile_host_step.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
