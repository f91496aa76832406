"""The overlapped loop on the GPU (runs on the H200): the default on CUDA; the tokens of the
synchronous loop for greedy and seeded requests joining and leaving through CUDA-graph decode;
a slot reused after a discarded row; the host really runs ahead of the GPU.

The synchronous-loop comparisons are built so that both loops run the same batches step by
step (requests finish at max_new_tokens, which the overlapped loop knows without reading the
token; an EOS seen one step late adds a row to the next step, which may change a bf16 batch's
rounding, so EOS is tested with one slot, where no other request shares the step)."""

from __future__ import annotations

import time

import pytest
import torch

from dsv4.runtime import Engine, SamplingParams

from _runtime_common import random_prompts, tiny_cuda_model

pytestmark = pytest.mark.cuda


def _deterministic(first, again):
    """Skip (saying so) when two runs of the same synchronous loop differ: then the GPU path
    is not run-to-run deterministic (an atomic-order-dependent sum in some kernel), and no
    comparison of two loops can be exact."""
    if first != again:
        pytest.skip(f"the synchronous loop gave different tokens in two identical runs "
                    f"({first} vs {again}): the GPU path is not deterministic, so the loops "
                    "cannot be compared token for token")


def _run(model, prompts, params, **kw):
    args = dict(max_batch=2, max_model_len=256, max_num_batched_tokens=64)
    args.update(kw)
    e = Engine(model, **args)
    out = e.generate(prompts, params)
    assert e.cache.num_free_slots == e.max_batch
    assert e.cache.blocks.num_free == e.cache.num_blocks
    return out, e


def test_overlap_is_the_cuda_default_and_gives_the_synchronous_tokens():
    """Four requests through two slots (joins and leaves; a 100-token prompt chunked beside
    decode rows), greedy and seeded (top-k / top-p): the same tokens with and without the
    overlapped loop, decode from CUDA graphs in both."""
    m = tiny_cuda_model()
    prompts = random_prompts([100, 7, 33, 18])
    params = [SamplingParams(max_new_tokens=12, eos_token_id=-1),
              SamplingParams(max_new_tokens=9, temperature=0.8, top_k=40, top_p=0.9, seed=3,
                             eos_token_id=-1),
              SamplingParams(max_new_tokens=15, eos_token_id=-1),
              SamplingParams(max_new_tokens=6, temperature=1.0, seed=8, eos_token_id=-1)]
    sync, es = _run(m, prompts, params, overlap=False)
    _deterministic(sync, _run(m, prompts, params, overlap=False)[0])
    over, eo = _run(m, prompts, params)
    assert eo.overlap and not es.overlap
    assert over == sync
    assert [len(t) for t in over] == [12, 9, 15, 6]
    for e in (es, eo):
        assert e.runner.graph_off_reason is None and e.runner.stats["graph_steps"] > 0


def test_slot_reused_after_a_late_eos_row_on_cuda():
    """One slot: A stops on EOS, read one step late, so A's cache got one more token; B then
    takes the slot and blocks and gets the tokens it gets alone."""
    m = tiny_cuda_model()
    pa, pb = random_prompts([40, 25], seed=2)
    greedy, _ = _run(m, [pa], [SamplingParams(max_new_tokens=6, eos_token_id=-1)],
                     max_batch=1, overlap=False)
    pa_params = SamplingParams(max_new_tokens=10, eos_token_id=greedy[0][3])
    pb_params = SamplingParams(max_new_tokens=12, eos_token_id=-1)
    alone, _ = _run(m, [pb], [pb_params], max_batch=1, overlap=False)
    _deterministic(alone, _run(m, [pb], [pb_params], max_batch=1, overlap=False)[0])
    both, _ = _run(m, [pa, pb], [pa_params, pb_params], max_batch=1)
    assert both[0] == greedy[0][:3]
    assert both[1] == alone[0]


@pytest.mark.parametrize("overlap", [True, False])
def test_the_host_runs_ahead_of_the_gpu(overlap):
    """~0.1 s of GPU work (a sleep kernel) is queued before a decode step: with the overlapped
    loop, step() launches its step behind it and returns the previous step's outputs at once
    (its tokens were on the host already), the launched step still pending; the synchronous
    loop waits for its own step, so the call takes the sleep."""
    m = tiny_cuda_model()
    e = Engine(m, max_batch=8, max_model_len=256, max_num_batched_tokens=512, overlap=overlap)
    for p in random_prompts([64] * 8, seed=3):
        e.add_request(p, SamplingParams(max_new_tokens=40, eos_token_id=-1))
    for _ in range(6):
        e.step()                            # prefill, graph capture, steady decode
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))             # ~0.1 s at ~2 GHz, ahead of the next step
    t = time.perf_counter()
    outs = e.step()
    host = time.perf_counter() - t
    assert len(outs) == 8 and all(len(o.new_token_ids) == 1 for o in outs)
    if overlap:
        assert host < 0.04, host
        assert e._inflight is not None and not e._inflight.event.query()
    else:
        assert host > 0.04, host
    torch.cuda.synchronize()


def test_steps_on_alternating_streams_give_the_synchronous_tokens():
    """step() called on a different CUDA stream each time (a serving loop that hops streams):
    each step waits on the GPU for the step in flight (its sampled ids, the slots it writes),
    so the overlapped loop still gives the synchronous loop's tokens."""
    m = tiny_cuda_model()
    prompts = random_prompts([40, 9, 21])
    params = [SamplingParams(max_new_tokens=10, eos_token_id=-1),
              SamplingParams(max_new_tokens=7, temperature=0.9, top_k=50, seed=5,
                             eos_token_id=-1),
              SamplingParams(max_new_tokens=12, eos_token_id=-1)]
    sync, _ = _run(m, prompts, params, overlap=False)
    _deterministic(sync, _run(m, prompts, params, overlap=False)[0])
    e = Engine(m, max_batch=2, max_model_len=256, max_num_batched_tokens=64)
    assert e.overlap
    ids = [e.add_request(p, sp) for p, sp in zip(prompts, params)]
    got = {i: [] for i in ids}
    streams = [torch.cuda.Stream() for _ in range(3)]
    k = 0
    while e.has_unfinished():
        with torch.cuda.stream(streams[k % 3]):
            torch.cuda._sleep(2_000_000)    # the new stream lags: a missing wait would show
            for o in e.step():
                got[o.request_id].extend(o.new_token_ids)
        k += 1
    torch.cuda.synchronize()
    assert [got[i] for i in ids] == sync
    assert e.cache.num_free_slots == e.max_batch
