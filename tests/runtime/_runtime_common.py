"""Helpers shared by the runtime tests (tests/runtime): random prompts, the tiny model on the
GPU, a guard against host synchronisation, and a driver that steps an engine to the end."""

from __future__ import annotations

import contextlib

import torch

import dsv4

V = 129280  # vocab_size of dsv4.ModelConfig.tiny()


def random_prompts(lens, seed=1):
    """One prompt (list of token ids in [0, V)) per length in ``lens``, from a generator seeded
    with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]


def tiny_cuda_model(seed=0):
    """dsv4.Model(ModelConfig.tiny()) initialised from torch seed ``seed``, bf16, on the GPU."""
    torch.manual_seed(seed)
    return dsv4.Model(dsv4.ModelConfig.tiny()).eval().to("cuda", torch.bfloat16)


@contextlib.contextmanager
def no_host_sync():
    """Inside: any host synchronisation with the GPU raises (torch.cuda sync debug mode
    "error"); the previous mode is restored on exit."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def drive(engine, prompts, params):
    """Add one request per prompt (``params``: one SamplingParams per prompt) and step the
    engine until done. Asserts that nothing is left afterwards (no request, nothing in flight,
    every slot and block free). Returns (per request the list of its outputs as (new tokens,
    finished, reason, all tokens so far), the request ids, the number of step() calls)."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    seen = {rid: [] for rid in ids}
    calls = 0
    while engine.has_unfinished():
        calls += 1
        for o in engine.step():
            seen[o.request_id].append((tuple(o.new_token_ids), o.finished, o.finish_reason,
                                       tuple(o.token_ids)))
    assert not engine.requests and engine._inflight is None
    assert engine.cache.num_free_slots == engine.max_batch
    assert engine.cache.blocks.num_free == engine.cache.num_blocks
    return [seen[rid] for rid in ids], ids, calls
