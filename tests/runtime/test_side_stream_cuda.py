"""The runtime with the layers' side branches (dsv4.layers.branch) on the side stream gives the
tokens and logits it gives with every branch inline, bit for bit: the branches change where
the work is queued, never what it computes (runs on the H200). Sync-freedom and capture with
the side stream (the default) are tests/runtime/test_engine_cuda.py's."""

from __future__ import annotations

import pytest
import torch

from dsv4.layers.branch import Branch, on_side_stream
from dsv4.layers import moe
from dsv4.layers.moe import Gate
from dsv4.runtime import Engine, SamplingParams

from _runtime_common import random_prompts, tiny_cuda_model

pytestmark = pytest.mark.cuda


def _decode(m, prompts, graphs: bool):
    """Per request, the logits of every sampled position (greedy, 6 new tokens each)."""
    e = Engine(m, max_batch=4, max_model_len=128, max_num_batched_tokens=64, cuda_graphs=graphs)
    ids = [e.add_request(p, SamplingParams(max_new_tokens=6, eos_token_id=-1)) for p in prompts]
    got = {rid: [] for rid in ids}
    while e.has_unfinished():
        for o in e.step(logits="sampled"):
            if o.logits is not None:
                got[o.request_id].append(o.logits.float().cpu())
    if graphs:
        assert e.runner.stats["graph_steps"] > 0, e.runner.graph_off_reason
    return [torch.cat(got[rid]) for rid in ids]


#: (DSV4_SIDE_STREAM, DSV4_CSA_COMPRESSOR_STREAM, DSV4_MOE_SHARED_FORK, DSV4_STREAM_PRIORITY):
#: inline, the default layout (the CSA main compressor handed to the layer stream, the shared
#: expert forked before the gate), the CSA compressor in the branch, the two later MoE forks,
#: and the default layout with stream priorities.
LAYOUTS = [("0", "", "", ""), ("1", "", "", ""), ("1", "side", "before-gate", ""),
           ("1", "", "after-gate", ""), ("1", "", "after-dispatch", ""), ("1", "", "", "1")]


class _RecordingOps:
    """torch.ops.dsv4 with moe_dispatch recorded in ``order``."""

    def __init__(self, order):
        self.order = order

    def __getattr__(self, name):
        op = getattr(torch.ops.dsv4, name)
        if name != "moe_dispatch":
            return op

        def recorded(*args, **kwargs):
            self.order.append("dispatch")
            return op(*args, **kwargs)
        return recorded


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("graphs", [False, True])
def test_same_logits_with_and_without_the_side_stream(graphs, fused, monkeypatch):
    """Tiny model (CSA, HCA and MoE layers on their kernels, paged caches; its same-input
    projections fused or not: fused, the CSA hand-off carries the branch's compressor
    projections to the layer stream), three requests: bit-identical logits at every sampled
    position, eager steps and CUDA-graph replays, for each layout of the branches. With the
    side stream on, branches did run on it; the hand-off of the CSA main compressor happened
    exactly in the side-stream layouts that leave its switch unset; each MoE ran its shared
    expert on the side stream where the layout says (right before its gate by default, right
    after it, or right after its dispatch); with priorities on, the attention branches ran on
    a high-priority stream and the shared expert on a default-priority one (else all at the
    default)."""
    m = tiny_cuda_model()
    if fused:
        m.fuse_projections()
    prompts = random_prompts([23, 9, 40])
    active, marks, order, prios = [], [], [], []
    enter, mark, gate, shared = (Branch.__enter__, Branch.mark, Gate.forward,
                                 moe.MoE.shared_expert)

    def recording_enter(self):
        active.append(self.active)
        if self.active:
            prios.append((on_moe[0], self.stream.priority))
        return enter(self)

    def recording_mark(self):
        event = mark(self)
        marks.append(event is not None)
        return event

    def recording_gate(self, *args, **kwargs):
        order.append("gate")
        return gate(self, *args, **kwargs)

    on_moe = [False]
    moe_forward = moe.MoE.forward

    def recording_moe(self, *args, **kwargs):
        on_moe[0] = True
        try:
            return moe_forward(self, *args, **kwargs)
        finally:
            on_moe[0] = False

    def recording_shared(self, *args, **kwargs):
        order.append("shared" if on_side_stream() else "shared inline")
        return shared(self, *args, **kwargs)

    monkeypatch.setattr(Branch, "__enter__", recording_enter)
    monkeypatch.setattr(Branch, "mark", recording_mark)
    monkeypatch.setattr(Gate, "forward", recording_gate)
    monkeypatch.setattr(moe.MoE, "shared_expert", recording_shared)
    monkeypatch.setattr(moe.MoE, "forward", recording_moe)
    monkeypatch.setattr(moe, "_dsv4", _RecordingOps(order))
    runs = []
    default = torch.cuda.Stream().priority
    for side, comp, fork, prio in LAYOUTS:
        monkeypatch.setenv("DSV4_SIDE_STREAM", side)
        monkeypatch.setenv("DSV4_CSA_COMPRESSOR_STREAM", comp)
        monkeypatch.setenv("DSV4_MOE_SHARED_FORK", fork)
        monkeypatch.setenv("DSV4_STREAM_PRIORITY", prio)
        active.clear()
        prios.clear()
        marks.clear()
        order.clear()
        runs.append(_decode(m, prompts, graphs))
        assert any(active) == (side == "1"), active
        assert any(marks) == (side == "1" and comp == ""), marks
        if side == "1":
            assert {in_moe for in_moe, _ in prios} == {False, True}, prios
            for in_moe, p in prios:
                assert (p < default) == (prio == "1" and not in_moe), prios
        if side == "1":     # each MoE's gate, dispatch and shared expert in the layout's order
            gates = [i for i, what in enumerate(order) if what == "gate"]
            assert gates
            assert "dispatch" in order, "the MoE did not take its kernel path (moe_dispatch)"
            want = {"after-dispatch": ["gate", "dispatch", "shared"],
                    "after-gate": ["gate", "shared", "dispatch"],
                    "before-gate": ["shared", "gate", "dispatch"]}[fork or "before-gate"]
            first = want.index("gate")
            for i in gates:
                assert order[i - first:i - first + 3] == want, order
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert a.shape == b.shape and torch.equal(a, b)
