"""The overlapped loop (Engine(overlap=True)) on CPU: the tokens, finish reasons and per-step
outputs of the synchronous loop, one call later; requests joining and leaving, chunked prefill
mixed with decode, greedy and seeded sampling, EOS / stop tokens / max_new_tokens, preemption,
abort and failures; the rows it feeds (none after a request's last token, one discarded row
after an EOS the host reads late); a slot reused after such a row.

On CPU nothing runs asynchronously, but every piece of the overlapped loop runs as on the GPU:
the step is launched before the previous one's tokens are read, its decode rows take those
tokens from the device tensor of sampled ids (never from the host lists), and the host applies
them one call later."""

from __future__ import annotations

import pytest
import torch

import dsv4
import dsv4.layers.attention as attention
from dsv4.runtime import Engine, EngineStepError, SamplingParams

from _runtime_common import drive, random_prompts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()


@pytest.fixture(params=["reference", "kernels"])
def path(request, monkeypatch):
    """The per-sequence reference path, or the batched kernel path's glue on the CPU refs."""
    if request.param == "kernels":
        monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    return request.param


def _engine(model, overlap, **kw):
    args = dict(max_batch=2, max_model_len=96, block_tokens=16, max_num_batched_tokens=23)
    args.update(kw)
    return Engine(model, overlap=overlap, **args)


class _Fed:
    """Counts the tokens each request is fed (wraps the runner's ``run``)."""

    def __init__(self, engine):
        self.tokens: dict[str, int] = {}
        self.steps = 0
        run = engine.runner.run

        def counted(rows, *a, **kw):
            self.steps += 1
            for r in rows:
                rid = r.request.request_id
                self.tokens[rid] = self.tokens.get(rid, 0) + r.n
            return run(rows, *a, **kw)
        engine.runner.run = counted


def _drive(engine, prompts, params):
    """Add every request, step until done; per request the list of its outputs
    (new tokens, finished, reason), the number of step() calls, and the token counts fed."""
    fed = _Fed(engine)
    outs, ids, calls = drive(engine, prompts, params)
    return outs, calls, [fed.tokens[rid] for rid in ids]


def _mixed_params(greedy_tokens):
    """Greedy and seeded requests; stops on EOS, on a stop token, at max_new_tokens."""
    a, b = greedy_tokens
    return [SamplingParams(max_new_tokens=6, eos_token_id=a[3]),            # EOS at step 4
            SamplingParams(max_new_tokens=5, temperature=0.8, top_k=50, top_p=0.9, seed=11,
                           eos_token_id=-1),
            SamplingParams(max_new_tokens=6, eos_token_id=-1, stop_token_ids=(b[1],)),
            SamplingParams(max_new_tokens=4, eos_token_id=-1),
            SamplingParams(max_new_tokens=3, temperature=1.0, seed=5, eos_token_id=-1)]


@pytest.mark.filterwarnings("ignore:dsv4. this build's CUDA")
def test_overlap_gives_the_synchronous_loops_outputs(model, path):
    """Five requests through two slots (joins and leaves), a 41-token prompt chunked under a
    23-token budget beside decode rows: each request's outputs, step by step, are those of the
    synchronous loop. The overlapped loop feeds exactly the same tokens, plus one row for each
    request that stopped on a token read late (EOS, a stop token); none after max_new_tokens."""
    prompts = random_prompts([29, 3, 41, 17, 9], seed=1)
    greedy = _engine(model, False).generate(
        [prompts[0], prompts[2]], SamplingParams(max_new_tokens=6, eos_token_id=-1))
    params = _mixed_params(greedy)
    sync, sync_calls, sync_fed = _drive(_engine(model, False), prompts, params)
    over, over_calls, over_fed = _drive(_engine(model, True), prompts, params)
    assert [o[-1][2] for o in sync] == ["eos", "length", "stop", "length", "length"]
    assert sync[0][-1][3] == tuple(greedy[0][:3]) and sync[2][-1][3] == tuple(greedy[1][:2])
    assert over == sync
    late_stop = [1 if o[-1][2] in ("eos", "stop") else 0 for o in sync]
    assert over_fed == [n + extra for n, extra in zip(sync_fed, late_stop)]
    assert sync_calls < over_calls <= sync_calls + 1 + sum(late_stop)


def test_outputs_come_one_call_late(model):
    """The first call launches the prompt and returns nothing; each later call returns the
    step before it; the last call launches nothing and returns the last token."""
    p = random_prompts([12], seed=2)[0]
    sp = SamplingParams(max_new_tokens=3, eos_token_id=-1)
    want = _engine(model, False).generate([p], sp)[0]
    e = _engine(model, True)
    assert e.overlap is True                # an explicit True on CPU is honoured
    fed = _Fed(e)
    rid = e.add_request(p, sp)
    assert e.step() == [] and e.has_unfinished() and fed.steps == 1
    got = []
    for n in range(3):
        outs = e.step()
        assert [o.request_id for o in outs] == [rid] and fed.steps == min(n + 2, 3)
        got += outs[0].new_token_ids
        assert outs[0].finished == (n == 2)
    assert got == want and not e.has_unfinished() and e.step() == []


def test_default_overlap_is_for_cuda_only(model):
    assert _engine(model, None).overlap is False       # this model is on the CPU
    with pytest.raises(ValueError, match="overlap must be None"):
        _engine(model, "yes")


def test_slot_reused_after_a_late_eos_row(model):
    """One slot: A stops on EOS, which the overlapped loop reads one step late, so A is fed one
    more token (written to A's window ring, compressor state and blocks); B then takes the
    slot and the blocks: B's tokens are those of B alone in a fresh engine."""
    pa, pb = random_prompts([19, 26], seed=3)
    greedy = _engine(model, False).generate([pa], SamplingParams(max_new_tokens=5,
                                                                 eos_token_id=-1))[0]
    pa_params = SamplingParams(max_new_tokens=8, eos_token_id=greedy[2])
    pb_params = SamplingParams(max_new_tokens=6, eos_token_id=-1)
    alone = _engine(model, False, max_batch=1).generate([pb], pb_params)[0]
    outs, _, fed = _drive(_engine(model, True, max_batch=1), [pa, pb], [pa_params, pb_params])
    assert outs[0][-1][2] == "eos" and outs[0][-1][3] == tuple(greedy[:2])
    assert fed[0] == len(pa) + 3            # prompt, 2 decode tokens, and the EOS fed late
    assert outs[1][-1][3] == tuple(alone)


def test_preemption_under_overlap(model, monkeypatch):
    """A pool too small for both requests: the younger is preempted (possibly with a token
    still on the device) and recomputed; both get the synchronous loop's tokens."""
    prompts = random_prompts([30, 28], seed=4)
    sp = [SamplingParams(max_new_tokens=8, eos_token_id=-1),
          SamplingParams(max_new_tokens=8, temperature=0.9, seed=3, eos_token_id=-1)]
    res = {}
    for overlap in (False, True):
        e = _engine(model, overlap, num_blocks=4, max_num_batched_tokens=64)
        n = {"preempted": 0}
        orig = e.scheduler._preempt

        def counting(req, orig=orig, n=n):
            n["preempted"] += 1
            orig(req)
        monkeypatch.setattr(e.scheduler, "_preempt", counting)
        outs, _, _ = _drive(e, prompts, sp)
        assert n["preempted"] > 0
        res[overlap] = [o[-1][3] for o in outs]
    assert res[True] == res[False]


def test_abort_with_a_step_in_flight(model):
    """Aborting a request whose token is still on the device frees its slot and blocks at
    once; the step in flight completes without an output for it; the engine is reusable."""
    p, q = random_prompts([14, 11], seed=5)
    sp = SamplingParams(max_new_tokens=6, eos_token_id=-1)
    e = _engine(model, True)
    a = e.add_request(p, sp)
    e.step()
    e.step()                                # a's first token read, its second in flight
    e.abort(a)
    assert e.cache.num_free_slots == 2 and e.cache.blocks.num_free == e.cache.num_blocks
    assert e.has_unfinished() and e.step() == [] and not e.has_unfinished()
    assert e.generate([q], sp) == _engine(model, False).generate([q], sp)


def test_logits_request_completes_the_step_in_flight_first(model):
    """step(logits="sampled") with a step in flight: that step's outputs (no logits) come
    first, then this step's with its logits, which equal the synchronous loop's."""
    p = random_prompts([15], seed=7)[0]
    sp = SamplingParams(max_new_tokens=5, eos_token_id=-1)
    ref = _engine(model, False)
    ref.add_request(p, sp)
    ref.step()
    ref_out = ref.step(logits="sampled")
    e = _engine(model, True)
    e.add_request(p, sp)
    e.step()                                # prefill in flight
    first, second = e.step(logits="sampled")
    assert first.logits is None and first.new_token_ids == ref.requests[
        ref_out[0].request_id].output_ids[:1]
    assert second.new_token_ids == ref_out[0].new_token_ids
    torch.testing.assert_close(second.logits, ref_out[0].logits, rtol=0, atol=0)


def test_a_device_token_without_a_step_in_flight_is_refused(model):
    e = _engine(model, True)
    rid = e.add_request(random_prompts([6], seed=8)[0], SamplingParams(max_new_tokens=4,
                                                            eos_token_id=-1))
    e.step()
    rows = e.scheduler.schedule()
    assert rows and rows[0].request.num_pending == 1
    with pytest.raises(RuntimeError, match="no step is in flight"):
        e.runner.run(rows, False, None)
    assert e.requests[rid].num_pending == 1


class Boom(Exception):
    pass


def test_held_outputs_survive_a_second_failed_step(model, monkeypatch):
    """The outputs a failed step holds over (those of the step before it) are returned by a
    later call even when the next call fails too: c's last token (max_new_tokens=1), read
    while a's decode step failed, is not lost when d's prefill then fails."""
    e = _engine(model, True)
    p = random_prompts([10, 12, 8], seed=9)
    one = SamplingParams(max_new_tokens=1, eos_token_id=-1)
    a = e.add_request(p[0], SamplingParams(max_new_tokens=4, eos_token_id=-1))
    c = e.add_request(p[1], one)
    assert e.step() == []                   # the prefill of a and c, in flight
    run = e.runner.run

    def boom(*args, **kw):
        raise Boom("injected")
    monkeypatch.setattr(e.runner, "run", boom)
    with pytest.raises(EngineStepError, match="injected") as err:
        e.step()                            # a's decode fails; c's token is held over
    assert err.value.request_ids == [a]
    d = e.add_request(p[2], one)
    with pytest.raises(EngineStepError, match="injected") as err:
        e.step()                            # d's prefill fails too
    assert err.value.request_ids == [d]
    monkeypatch.setattr(e.runner, "run", run)
    outs = list(e.stream())
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [(c, True, "length")]
    assert outs[0].token_ids == _engine(model, False).generate([p[1]], one)[0]
    assert not e.has_unfinished() and e.cache.num_free_slots == 2
