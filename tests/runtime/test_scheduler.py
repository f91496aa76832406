"""Continuous batching (dsv4.runtime.scheduler) on the host: admission, chunked prefill mixed
with decode under a token budget, preemption, retirement."""

from __future__ import annotations

import torch

import dsv4
from dsv4.runtime.pool import PagedCache
from dsv4.runtime.request import Request, SamplingParams, Status
from dsv4.runtime.scheduler import Scheduler


def _sched(slots=2, blocks=8, budget=10, block_tokens=16):
    cache = PagedCache(dsv4.ModelConfig.tiny(), slots, blocks, block_tokens, torch.float32, "cpu")
    return Scheduler(cache, budget), cache


def _req(n, name):
    return Request(prompt_ids=list(range(1, n + 1)), params=SamplingParams(), eos_token_id=None,
                   request_id=name)


def _done(rows, token=7):
    """What the engine does after a step: count fed tokens, append a sampled token."""
    for r in rows:
        r.request.num_computed += r.n
        if r.sample:
            r.request.output_ids.append(token)


def _plan(rows):
    return [(r.request.request_id, r.start, r.n, r.sample) for r in rows]


def test_chunked_prefill_then_decode_mixed_in_one_step():
    s, cache = _sched(budget=10)
    a, b = _req(23, "a"), _req(4, "b")
    s.add(a)
    rows = s.schedule()
    assert _plan(rows) == [("a", 0, 10, False)]           # first chunk only: budget 10
    _done(rows)
    s.add(b)                                              # b joins between steps
    rows = s.schedule()
    assert _plan(rows) == [("a", 10, 10, False)]          # a's chunk takes the whole budget
    _done(rows)
    rows = s.schedule()
    assert _plan(rows) == [("a", 20, 3, True), ("b", 0, 4, True)]
    _done(rows)
    rows = s.schedule()
    # both decode: one token each, the last sampled one
    assert _plan(rows) == [("a", 23, 1, True), ("b", 4, 1, True)]
    assert a.block_table == [0, 1] and b.block_table == [2]
    # a third request's prefill chunk runs in the same step as the two decode tokens
    _done(rows)
    c = _req(30, "c")
    s.add(c)
    s.finish(b, "length")                                 # b leaves: slot and block freed
    assert cache.blocks.num_free == 6 and cache.num_free_slots == 1
    rows = s.schedule()
    assert _plan(rows) == [("a", 24, 1, True), ("c", 0, 9, False)]
    assert c.slot is not None and c.block_table == [2]


def test_waiting_until_a_slot_frees():
    s, cache = _sched(slots=1, budget=64)
    a, b = _req(5, "a"), _req(5, "b")
    s.add(a)
    s.add(b)
    rows = s.schedule()
    assert _plan(rows) == [("a", 0, 5, True)] and b.status == Status.WAITING
    _done(rows)
    s.finish(a, "eos")
    assert a.status == Status.FINISHED and a.slot is None and a.block_table == []
    assert _plan(s.schedule()) == [("b", 0, 5, True)]


def test_preemption_frees_the_youngest_and_recomputes_it():
    s, cache = _sched(slots=2, blocks=3, budget=64, block_tokens=16)
    a, b = _req(16, "a"), _req(30, "b")
    s.add(a)
    s.add(b)
    rows = s.schedule()
    assert _plan(rows) == [("a", 0, 16, True), ("b", 0, 30, True)]
    assert cache.blocks.num_free == 0
    _done(rows)
    # a's 17th token needs a second block: b (younger) is preempted and queued first
    rows = s.schedule()
    assert _plan(rows) == [("a", 16, 1, True)]
    assert b.status == Status.WAITING and b.num_computed == 0 and b.slot is None
    assert s.waiting[0] is b and len(a.block_table) == 2
    _done(rows)
    s.finish(a, "length")
    rows = s.schedule()     # b is recomputed from its prompt and its sampled token
    assert _plan(rows) == [("b", 0, 31, True)]


def test_admission_chunk_shrinks_to_the_free_blocks():
    s, cache = _sched(slots=2, blocks=2, budget=64, block_tokens=16)
    a = _req(40, "a")
    s.add(a)
    rows = s.schedule()
    assert _plan(rows) == [("a", 0, 32, False)]            # 2 blocks = 32 tokens


def test_decode_tokens_go_before_an_older_requests_prompt_chunks():
    """A long prompt of an older request does not starve the younger ones' decode steps."""
    s, cache = _sched(slots=2, blocks=8, budget=8, block_tokens=16)
    a, b = _req(40, "a"), _req(3, "b")
    s.add(b)
    rows = s.schedule()
    _done(rows)                                  # b prefilled, sampled its first token
    a.arrival = -1                               # a is older than b
    s.add(a)
    rows = s.schedule()
    assert _plan(rows) == [("b", 3, 1, True), ("a", 0, 7, False)]
    _done(rows)
    assert _plan(s.schedule()) == [("b", 4, 1, True), ("a", 7, 7, False)]


def test_a_short_pool_shrinks_a_prompt_chunk_before_evicting():
    s, cache = _sched(slots=2, blocks=3, budget=64, block_tokens=16)
    a, b = _req(20, "a"), _req(40, "b")
    s.add(a)
    _done(s.schedule())                          # a: 20 tokens in 2 blocks
    s.add(b)
    rows = s.schedule()                          # b gets the one free block: 16 tokens
    assert _plan(rows) == [("a", 20, 1, True), ("b", 0, 16, False)]
    assert a.status == b.status == Status.RUNNING


def test_a_short_pool_shrinks_a_running_requests_chunk_before_evicting():
    """The same for a request already running (its next prompt chunk): with 2 free blocks left
    after a finishes, b's next chunk is cut to 32 tokens and b keeps running. Without the cut
    the chunk did not fit, b was preempted and recomputed later: the same tokens, work thrown
    away, so no output-level test saw it."""
    s, cache = _sched(slots=3, blocks=4, budget=64, block_tokens=16)
    a, b = _req(20, "a"), _req(70, "b")
    s.add(a)
    _done(s.schedule())
    s.add(b)
    rows = s.schedule()
    assert _plan(rows) == [("a", 20, 1, True), ("b", 0, 32, False)]
    _done(rows)
    s.finish(a, "eos")
    assert _plan(s.schedule()) == [("b", 32, 32, False)] and b.status == Status.RUNNING
