"""The decode step as one graph replay on the GPU (runs on the H200): the captured step (token
gather, model, greedy draw, metadata advance) gives the tokens of the same body run eagerly;
a steady-state step launches one graph, one copy and at most a few tiny kernels outside it; the
steps that upload (rows joining and leaving) and the seeded draws outside the graph are
sync-free."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dsv4.generate import sample
from dsv4.layers.varlen import StepBatch
from dsv4.runtime import Engine, SamplingParams
from dsv4.runtime.runner import _copy_generator
from dsv4.runtime.sampler import sample_temperature

from _runtime_common import V, no_host_sync, random_prompts, tiny_cuda_model

pytestmark = pytest.mark.cuda


def _params():
    return [SamplingParams(max_new_tokens=14, eos_token_id=-1),
            SamplingParams(max_new_tokens=9, temperature=0.8, top_k=40, top_p=0.9, seed=3,
                           eos_token_id=-1),
            SamplingParams(max_new_tokens=16, eos_token_id=-1),
            SamplingParams(max_new_tokens=7, temperature=1.0, seed=8, eos_token_id=-1)]


def _generate(m, prompts, emulate, overlap):
    e = Engine(m, max_batch=2, max_model_len=256, max_num_batched_tokens=64, overlap=overlap)
    if emulate:
        e.runner.emulate_graphs()
    out = e.generate(prompts, _params())
    assert e.runner.stats["graph_steps"] > 0 and e.runner.graph_off_reason is None
    assert e.runner.stats["uploads"] < e.runner.stats["graph_steps"]
    # the temperature-only request drew inside the sampling graph
    assert e.runner.stats["sampling_steps"] > 0, e.runner.sampling_off_reason
    return out


@pytest.mark.parametrize("overlap", [True, False])
def test_captured_step_gives_the_eager_bodys_tokens(overlap):
    """Four requests through two slots, greedy and seeded: the CUDA graph (its metadata
    advanced inside the graph between uploads) gives the tokens of the same step body run
    eagerly on the same buffers (emulate_graphs), for either loop."""
    m = tiny_cuda_model()
    prompts = random_prompts([40, 7, 23, 12])
    ref = _generate(m, prompts, True, False)
    if ref != _generate(m, prompts, True, False):
        pytest.skip("the GPU path is not run-to-run deterministic here")
    assert _generate(m, prompts, False, overlap) == ref


def test_refusing_projections_mid_decode_gives_the_same_tokens():
    """An Engine on a fused model captures its graphs, then the model is unfused and fused
    again mid-decode (the same values in new storage, the old one returned to the driver): the
    graphs are captured again (Model.storage_version) and the tokens are those of a run
    without the round trip, where a replay of the old graphs would read freed storage."""
    m = tiny_cuda_model().fuse_projections()
    prompts = random_prompts([30, 9], seed=6)
    params = [SamplingParams(max_new_tokens=16, eos_token_id=-1)] * 2

    def run(round_trip_at):
        e = Engine(m, max_batch=2, max_model_len=256, max_num_batched_tokens=64)
        ids = [e.add_request(p, sp) for p, sp in zip(prompts, params)]
        toks = {i: [] for i in ids}
        steps = 0
        while e.has_unfinished():
            if steps == round_trip_at:
                m.unfuse_projections().fuse_projections()
            for o in e.step():
                toks[o.request_id] += o.new_token_ids
            steps += 1
        assert e.runner.stats["graph_steps"] > 0 and e.runner.graph_off_reason is None
        return [toks[i] for i in ids]

    want = run(-1)
    with pytest.warns(RuntimeWarning, match="captured again"):
        got = run(6)
    assert got == want


def test_steady_step_is_one_graph_launch_and_one_copy():
    """Four greedy rows decoding: per steady-state step (nothing joins, no new block) one
    cudaGraphLaunch, one memcpy (the sampled ids to the host; no metadata upload) and at most
    3 kernel launches outside the graph (torch's RNG bookkeeping at replay), where the step
    before this branch launched ~15 (gather, sampler, casts) plus two copies."""
    m = tiny_cuda_model()
    e = Engine(m, max_batch=4, max_model_len=256, max_num_batched_tokens=256)
    for p in random_prompts([20, 21, 22, 23], seed=5):
        e.add_request(p, SamplingParams(max_new_tokens=60, eos_token_id=-1))
    for _ in range(6):
        e.step()
    torch.cuda.synchronize()
    n = 5
    up = e.runner.stats["uploads"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            e.step()
        torch.cuda.synchronize()
    assert e.runner.stats["uploads"] == up, "a steady step uploaded its metadata"
    calls = collections.Counter()
    for ev in prof.events():
        for key in ("GraphLaunch", "LaunchKernel", "Memcpy"):
            if key in ev.name and ev.name.startswith("cu"):
                calls[key] += 1
    assert calls["GraphLaunch"] == n, calls
    assert calls["Memcpy"] <= n, calls
    assert calls["LaunchKernel"] <= 3 * n, calls


def test_joins_and_leaves_are_sync_free():
    """Whole engine steps under set_sync_debug_mode("error") while a request leaves (an
    upload), with seeded rows drawn outside the graph: no host sync; then a request joins
    and every request completes."""
    m = tiny_cuda_model()
    e = Engine(m, max_batch=4, max_model_len=256, max_num_batched_tokens=256)
    ps = random_prompts([9, 10, 11, 12, 13], seed=7)
    for i, p in enumerate(ps[:4]):
        e.add_request(p, SamplingParams(max_new_tokens=6 + 10 * i, eos_token_id=-1,
                                        temperature=0.9 if i % 2 else 0.0, seed=i))
    for _ in range(4):
        e.step()                            # prefill, capture
    up = e.runner.stats["uploads"]
    with no_host_sync():
        for _ in range(5):
            e.step()
    # the first request leaves at max_new_tokens (the others stay in bucket 4): an upload
    assert e.runner.stats["uploads"] > up and len(e.scheduler.running) == 3
    e.add_request(ps[4], SamplingParams(max_new_tokens=5, eos_token_id=-1))
    out = []
    while e.has_unfinished():
        out += e.step()
    assert not e.has_unfinished() and e.cache.num_free_slots == 4


def test_reciprocal_scaling_is_torchs_scalar_division():
    """sample() divides the logits by a Python float, which CUDA computes as a product with
    the float32 reciprocal: the sampling graph's per-row tensor product gives the same bits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(3, V, device="cuda", generator=g) * 7
    for T in (0.7, 1.3, 1e-5, 1 / 3, 2.0, 0.05):
        t = torch.tensor([max(T, 1e-5)] * 3, dtype=torch.float32)
        inv = (1.0 / t).cuda()
        assert torch.equal(logits * inv[:, None], logits / max(T, 1e-5)), T


def test_generator_copy_and_registered_draws_match_eager():
    """A row generator set to a request's state (seed, offset) draws what the request's own
    generator draws, eagerly and from a CUDA graph it is registered with (torch reads its
    seed / offset at each replay), draw after draw; copying back leaves the request's
    generator where an eager draw would."""
    logits = torch.randn(2, V, device="cuda") * 3
    t = torch.tensor([0.8, 1.0], dtype=torch.float32, device="cuda")
    inv = 1.0 / t
    flags = torch.tensor([1, 1], dtype=torch.int32, device="cuda")
    rows = [torch.Generator(device="cuda") for _ in range(2)]
    out = torch.zeros(2, 2, dtype=torch.long, device="cuda")
    sample_temperature(logits, t, inv, flags, rows, out)        # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    for r in rows:
        graph.register_generator_state(r)
    with torch.cuda.graph(graph):
        sample_temperature(logits, t, inv, flags, rows, out)
    reqs = [torch.Generator(device="cuda").manual_seed(s) for s in (123, 2 ** 63 + 7)]
    refs = [torch.Generator(device="cuda").manual_seed(s) for s in (123, 2 ** 63 + 7)]
    for _ in range(4):
        for r, q in zip(rows, reqs):
            _copy_generator(r, q)
        graph.replay()
        for r, q in zip(rows, reqs):
            _copy_generator(q, r)
        want = [int(sample(logits[i:i + 1], [0.8, 1.0][i], 1.0, 0, refs[i],
                           check_finite=False)) for i in range(2)]
        assert out[0].tolist() == want
        assert [q.get_offset() for q in reqs] == [f.get_offset() for f in refs]


def _decode_batch(starts, slots, device):
    """A decode step on a static buffer, as the runner builds it (max_end a fixed bound)."""
    n = len(starts)
    buf = StepBatch.pack(starts, [1] * n, slots, [[s] for s in slots], list(range(n)), 1)
    return StepBatch.from_buffer(buf.to(device), n, n, 1, n, 1, 96, True)


def test_replay_recomputes_the_steps_shared_metadata():
    """The per-step metadata the layers share (StepBatch.shared: token slots, ring rows,
    window index lists, complete-entry counts, block-table starts) is computed inside the
    captured graph: forward_step runs eagerly on a batch (the warm-up, which used to leave a
    memo behind), is captured on the same batch, and the batch's buffer is then rewritten in
    place with the next positions and the two rows' slots swapped. The replay gives the
    logits of an eager step on a fresh batch of those positions and slots from the same cache
    state, not the warm-up step's (which are far from them)."""
    m = tiny_cuda_model()
    cache = m.make_cache(2)
    prompt = torch.tensor(random_prompts([21, 21], seed=4), device="cuda")
    with torch.no_grad():
        m(prompt, cache=cache, seq_lens=[21, 14])     # slot 0: 21 tokens, slot 1: 14
        b = _decode_batch([21, 14], [0, 1], "cuda")
        ids = torch.tensor([5, 9], device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = m.forward_step(ids, cache.layers, b).clone()   # step A, eagerly
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m.forward_step(ids, cache.layers, b)
        # step B in place: row 0 continues slot 1 at 15, row 1 slot 0 at 22
        b.buffer.copy_(StepBatch.pack([15, 22], [1, 1], [1, 0], [[1], [0]], [0, 1], 1))
        ids.copy_(torch.tensor([7, 3]))
        before = copy.deepcopy(cache)
        graph.replay()
        got = out.clone()
        want = m.forward_step(ids.clone(), before.layers, _decode_batch([15, 22], [1, 0], "cuda"))
    torch.cuda.synchronize()
    err = (got - want).abs().max().item()
    gap = (warm - want).abs().max().item()
    assert err <= 1e-2 * want.abs().max().item() and err <= 0.05 * gap, (err, gap)
