"""The decode step as one graph replay (ModelRunner's graph path, replayed eagerly on the CPU by
``emulate_graphs``): the gather of the step before's tokens, the greedy draw and the advance of
the metadata inside the captured body; an upload only when the rows change; the seeded draws
outside it. Same outputs as the eager synchronous loop, step by step, for both loops; greedy and
seeded requests joining and leaving (the official temperature-only sampler drawn inside the
sampling graph with per-row generators set to the requests' states, top-k / top-p rows outside),
EOS / stop tokens / max_new_tokens, a block boundary crossed mid-decode; and the sampler split
(sample_greedy, sample_temperature, sample_seeded) equal to ``dsv4.generate.sample`` row by
row."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import dsv4
import dsv4.layers.attention as attention
from dsv4.generate import sample
from dsv4.layers.varlen import StepBatch
from dsv4.runtime import Engine, SamplingParams
from dsv4.runtime.request import Request
from dsv4.runtime.sampler import (draws_in_graph, sample_greedy, sample_rows, sample_seeded,
                                  sample_temperature)

from _runtime_common import drive, random_prompts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()


@pytest.fixture(autouse=True)
def kernel_glue(monkeypatch):
    """The batched (kernel) path's glue on the CPU reference ops: a graph step has no host
    lists, so the per-sequence reference path cannot run it."""
    monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)


def _engine(model, overlap, graphs, **kw):
    args = dict(max_batch=2, max_model_len=96, block_tokens=16, max_num_batched_tokens=23)
    args.update(kw)
    e = Engine(model, overlap=overlap, **args)
    if graphs:
        e.runner.emulate_graphs()
    return e


@pytest.mark.parametrize("overlap", [False, True])
def test_graph_step_gives_the_eager_loops_outputs(model, overlap):
    """Four requests through two slots (joins and leaves), greedy and seeded (top-k / top-p),
    stopping on EOS, on a stop token and at max_new_tokens, one of them decoding across a
    16-token block boundary: the outputs of the graph path (either loop) are those of the
    eager synchronous loop; most decode steps upload nothing (their metadata advanced on the
    device), and an upload follows each change of the rows."""
    prompts = random_prompts([12, 5, 9, 7], seed=1)
    greedy = _engine(model, False, False).generate(
        [prompts[0], prompts[2]], SamplingParams(max_new_tokens=8, eos_token_id=-1))
    params = [SamplingParams(max_new_tokens=10, eos_token_id=greedy[0][6]),   # EOS at 7
              SamplingParams(max_new_tokens=6, temperature=0.8, top_k=50, top_p=0.9, seed=11,
                             eos_token_id=-1),
              SamplingParams(max_new_tokens=8, eos_token_id=-1, stop_token_ids=(greedy[1][4],)),
              SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, eos_token_id=-1)]
    want = drive(_engine(model, False, False), prompts, params)[0]
    assert [o[-1][2] for o in want] == ["eos", "length", "stop", "length"]
    e = _engine(model, overlap, True)
    got = drive(e, prompts, params)[0]
    assert got == want
    st = e.runner.stats
    assert st["graph_steps"] >= 12 and 2 <= st["uploads"] < st["graph_steps"] // 2, st
    # the temperature-only request (the official sampler) drew inside the sampling graph
    assert st["sampling_steps"] >= 5 and e.runner.sampling_off_reason is None, st


def test_steady_decode_is_one_replay_without_packing(model, monkeypatch):
    """Two requests decoding side by side: after the first graph step, a step packs and uploads
    nothing until a request crosses into a new block (then exactly one upload), and each step
    runs the captured body once."""
    e = _engine(model, True, True, max_model_len=64)
    for p in random_prompts([10, 11], seed=2):
        e.add_request(p, SamplingParams(max_new_tokens=30, eos_token_id=-1))
    for _ in range(3):
        e.step()                            # the prefills, the first (uploading) graph step
    packs = {"n": 0}
    pack = e.runner._pack

    def counted(*a, **kw):
        packs["n"] += 1
        return pack(*a, **kw)
    monkeypatch.setattr(e.runner, "_pack", counted)
    g = e.runner.graphs[2]
    body, runs = g.graph.body, {"n": 0}

    def counted_body():
        runs["n"] += 1
        return body()
    g.graph.body = counted_body
    reqs = list(e.requests.values())
    crossings = 0
    for _ in range(12):
        widths = [len(r.block_table) for r in reqs]
        up = e.runner.stats["uploads"]
        e.step()
        grew = [len(r.block_table) for r in reqs] != widths
        crossings += grew
        assert e.runner.stats["uploads"] - up == int(grew)
    assert runs["n"] == 12 and packs["n"] == crossings and 1 <= crossings <= 2


def _two_rows_decoding(m, overlap):
    """An emulated-graph engine on ``m`` with two greedy requests, past their prefills and
    first graph step: (engine, the 2-row bucket's graph)."""
    e = _engine(m, overlap, True, max_model_len=64)
    for p in random_prompts([10, 11], seed=4):
        e.add_request(p, SamplingParams(max_new_tokens=12, eos_token_id=-1))
    for _ in range(3):
        e.step()
    return e, e.runner.graphs[2]


def test_graphs_are_captured_again_after_the_model_moves_its_weights(model):
    """A fuse (or unfuse, .to, load_state_dict: Model.storage_version) after the decode graphs
    were captured: the next graph step says so once and captures again (a replay would read
    the storage it captured); steps without such a change keep their graph."""
    import copy

    m = copy.deepcopy(model)
    e, g = _two_rows_decoding(m, False)
    e.step()
    assert e.runner.graphs[2] is g
    v = m.storage_version
    m.fuse_projections()
    assert m.storage_version > v
    with pytest.warns(RuntimeWarning, match="captured again"):
        e.step()
    g2 = e.runner.graphs[2]
    assert g2 is not g
    e.step()
    assert e.runner.graphs[2] is g2
    m.load_state_dict(m.state_dict())
    with pytest.warns(RuntimeWarning, match="captured again"):
        e.step()
    assert e.runner.graphs[2] is not g2
    while e.has_unfinished():
        e.step()


@pytest.mark.parametrize("overlap", [False, True])
def test_calls_that_move_no_weight_keep_the_graphs(overlap):
    """``.to`` the model's own device or dtype, a second fuse, an unfuse of an unfused model, a
    refused cast: nothing moved, so the next steps replay the graph captured before, without a
    warning."""
    import warnings

    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()
    e, g = _two_rows_decoding(m, overlap)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for call in (lambda: m.to("cpu"), m.float, lambda: m.to("cpu", torch.float32),
                     m.unfuse_projections, m.expand_head, m.eval):
            call()
            e.step()
        with pytest.raises(ValueError):
            m.half()
        e.step()
        assert e.runner.graphs[2] is g
        m.fuse_projections()
        with pytest.warns(RuntimeWarning, match="captured again") as rec:
            e.step()
        assert rec[0].filename == __file__         # points at the caller of Engine.step
        g = e.runner.graphs[2]
        m.fuse_projections()
        m.float()
        e.step()
    assert e.runner.graphs[2] is g
    while e.has_unfinished():
        e.step()


def test_host_ops_outside_the_graph(model):
    """A steady greedy decode step runs at most a handful of torch ops outside the captured
    body (the copy of the sampled ids to the host and the views of it; the emulation's own
    copy of the logits), whatever the batch: no packing, no gather, no sampling launches."""
    e = _engine(model, True, True, max_batch=4, max_model_len=64)
    for p in random_prompts([6, 7, 8, 9], seed=3):
        e.add_request(p, SamplingParams(max_new_tokens=20, eos_token_id=-1))
    for _ in range(4):
        e.step()
    g = e.runner.graphs[4]
    body = g.graph.body

    def marked():
        with record_function("graph-body"):
            return body()
    g.graph.body = marked
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            e.step()
    ops = collections.Counter()
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        p, top, inside = ev.cpu_parent, True, False
        while p is not None:
            inside |= p.name == "graph-body"
            top &= not p.name.startswith("aten::")
            p = p.cpu_parent
        if top and not inside:
            ops[ev.name] += 1
    assert sum(ops.values()) <= 4 * 8, ops
    for name in ("aten::index_select", "aten::argmax", "aten::where", "aten::empty"):
        assert ops[name] == 0, ops


def _req(params):
    gen = None
    if not params.greedy:
        gen = torch.Generator().manual_seed(params.seed)
    return Request(prompt_ids=[1], params=params, eos_token_id=None, generator=gen)


def test_sampler_split_is_generate_sample_row_by_row():
    """sample_greedy + sample_seeded (= sample_rows) give each row what dsv4.generate.sample
    gives it alone with a generator of the same seed; a row with a NaN gets flag 0; columns
    beyond the rows are left alone."""
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    logits[2, 17] = float("nan")
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=20, seed=3),
              SamplingParams(), SamplingParams(temperature=1.2, top_p=0.8, seed=9)]
    out = torch.full((2, 6), -7, dtype=torch.long)
    got = sample_rows(logits, [_req(p) for p in params], out)
    assert got.shape == (2, 4) and out[:, 4:].eq(-7).all()
    for i, p in enumerate(params):
        g = None if p.greedy else torch.Generator().manual_seed(p.seed)
        want = sample(logits[i:i + 1], p.temperature, p.top_p, p.top_k, g, check_finite=False)
        assert int(got[0, i]) == int(want), i
    assert got[1].tolist() == [1, 1, 0, 1]
    again = torch.zeros(2, 4, dtype=torch.long)
    sample_greedy(logits, again)
    assert again[0].tolist() == logits.argmax(-1).tolist()
    reqs = [_req(p) for p in params]
    sample_seeded(logits, reqs, again)
    assert again.tolist() == got.tolist()


def test_host_pack_into_a_given_buffer():
    args = ([0, 5], [3, 1], [0, 1], [[2], [4, 5]], [2, 3], 3)
    fresh, sizes = StepBatch.host_pack(*args, prefix=[9, 8])
    out = torch.full((fresh.numel(),), -5, dtype=torch.int32)
    buf, sizes2 = StepBatch.host_pack(*args, prefix=[9, 8], out=out)
    assert buf is out and torch.equal(out, fresh) and sizes2 == sizes
    with pytest.raises(ValueError, match="out must be a host int32 tensor"):
        StepBatch.host_pack(*args, prefix=[9, 8], out=torch.empty(fresh.numel() + 1,
                                                                  dtype=torch.int32))


def test_sample_temperature_is_generate_sample_row_by_row():
    """The sampling graph's draw: per-row temperatures as tensors and one generator per row
    give, for the flagged rows, what dsv4.generate.sample gives each row alone with its
    temperature and a generator of the same state (several draws in a row: the generators
    advance as sample's do); unflagged rows keep what was there."""
    torch.manual_seed(1)
    temps = [0.7, 1.0, 1e-7, 2.5]
    flags = torch.tensor([1, 1, 1, 0], dtype=torch.int32)
    t = torch.tensor([max(x, 1e-5) for x in temps], dtype=torch.float32)
    inv = 1.0 / t
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    refs = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    for _ in range(3):
        logits = torch.randn(4, 500) * 4
        out = torch.full((2, 5), -3, dtype=torch.long)
        sample_temperature(logits, t, inv, flags, gens, out)
        for i in range(3):
            want = sample(logits[i:i + 1], temps[i], 1.0, 0, refs[i], check_finite=False)
            assert int(out[0, i]) == int(want), i
        assert out[0, 3:].eq(-3).all() and out[1].eq(-3).all()
    assert draws_in_graph(SamplingParams(temperature=0.5))
    assert not draws_in_graph(SamplingParams())
    assert not draws_in_graph(SamplingParams(temperature=0.5, top_k=3))
    assert not draws_in_graph(SamplingParams(temperature=0.5, top_p=0.9))
