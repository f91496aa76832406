"""The runtime with the layers' side branches (dsv4.layers.branch) on the side stream gives the
tokens and logits it gives with every branch inline, bit for bit: the branches change where
the work is queued, never what it computes (runs on the H200). Sync-freedom and capture with
the side stream (the default) are tests/runtime/test_engine_cuda.py's."""

from __future__ import annotations

import pytest
import torch

from dsv4.layers.branch import Branch
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


@pytest.mark.parametrize("graphs", [False, True])
def test_same_logits_with_and_without_the_side_stream(graphs, monkeypatch):
    """Tiny model (CSA, HCA and MoE layers on their kernels, paged caches), three requests:
    bit-identical logits at every sampled position, eager steps and CUDA-graph replays; with
    the side stream on, branches did run on it."""
    m = tiny_cuda_model()
    prompts = random_prompts([23, 9, 40])
    active = []
    enter = Branch.__enter__

    def recording_enter(self):
        active.append(self.active)
        return enter(self)

    monkeypatch.setattr(Branch, "__enter__", recording_enter)
    runs = []
    for side in ("0", "1"):
        monkeypatch.setenv("DSV4_SIDE_STREAM", side)
        active.clear()
        runs.append(_decode(m, prompts, graphs))
        assert any(active) == (side == "1"), active
    for a, b in zip(*runs):
        assert a.shape == b.shape and torch.equal(a, b)
