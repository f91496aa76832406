"""The small PyTorch ops a decode step launches, counted per step: every aten op the engine's
eager decode step calls outside the dsv4 ops (on the GPU each is at least one kernel launch;
inside a ``torch.ops.dsv4.*`` op there is one CUDA kernel), by name, outermost calls only
(``aten::to`` → ``aten::_to_copy`` → ``aten::copy_`` counts once, as ``aten::to``).

Runs on the CPU with every layer forced onto its kernel path (the dsv4 ops then dispatch to
their CPU references, whose inner aten ops are not counted), so that the counts are those of
the CUDA decode step without a GPU; ``--device cuda`` counts the real thing. Model: ``dsv4
bench``'s decode setup (``--model flash --layers 2``: V4-Flash width, CSA + HCA layer), small
``--experts`` and ``--context`` (counts do not depend on them).

    python bench/count_step_ops.py [--batch 1] [--steps 3] [--experts 2] [--context 256]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsv4.runtime import bench as B  # noqa: E402


#: Ops that make views or metadata only (no kernel): left out of the launch count.
VIEW_OPS = frozenset(f"aten::{n}" for n in (
    "view", "reshape", "select", "slice", "unsqueeze", "squeeze", "unflatten", "flatten",
    "resolve_conj", "resolve_neg", "alias", "detach", "t", "transpose", "permute", "expand",
    "as_strided", "empty", "to (no-op)"))


def outermost_aten_counts(events) -> collections.Counter:
    """Per aten op name, the calls that are not nested in another aten op or a dsv4 op
    (``aten::to`` split into ``to (copy)``, which runs ``_to_copy``, and ``to (no-op)``)."""
    counts: collections.Counter = collections.Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        nested = False
        while p is not None:
            if p.name.startswith(("aten::", "dsv4::")):
                nested = True
                break
            p = p.cpu_parent
        if nested:
            continue
        name = e.name
        if name == "aten::to":
            copies = any(c.name == "aten::_to_copy" for c in e.cpu_children)
            name = "aten::to (copy)" if copies else "aten::to (no-op)"
        counts[name] += 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B._add_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=40, help="rows of the table")
    p.set_defaults(batch=[1], context=[256], experts=2, steps=3)
    a = p.parse_args(argv)
    from profile_decode import engine
    cfg = B.build_config(a.model, a.layers, a.experts)
    model = B.build_model(cfg, a.weights, a.device, a.seed)
    cpu = a.device == "cpu"
    forced = contextlib.nullcontext()
    if cpu:
        from dsv4.runtime.long_context import _kernel_path_everywhere
        forced = _kernel_path_everywhere()
    b, steps = a.batch[0], a.steps
    with torch.no_grad(), forced:
        eng = engine(model, a, b, a.context[0], graphs=False)
        acts = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                eng.step()
            if not cpu:
                torch.cuda.synchronize()
    counts = outermost_aten_counts(prof.events())
    total = sum(counts.values())
    launching = sum(n for name, n in counts.items() if name not in VIEW_OPS)
    print(f"b={b}, {a.model} x {a.layers} layers, {steps} eager decode steps on {a.device}; "
          f"aten ops outside the dsv4 ops, per step ({total / steps:.1f} in all, "
          f"{launching / steps:.1f} that are not views):")
    for name, n in counts.most_common(a.top):
        print(f"  {n / steps:7.2f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
