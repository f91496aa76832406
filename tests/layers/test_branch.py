"""dsv4.layers.branch: a layer's independent work on a second CUDA stream.

CPU: a branch runs inline (the CPU has one stream), the switch's accepted values, and
StepBatch.shared keeping a side branch's tensors apart from the layer stream's. CUDA: the body
runs on the side stream after the work queued before the fork, and join orders what follows
after it. The model-level check (the same logits with and without the side stream) is
tests/runtime/test_side_stream_cuda.py."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from dsv4.layers import varlen
from dsv4.layers.branch import MAX_TOKENS, Branch, on_side_stream
from dsv4.layers.varlen import StepBatch


def test_branch_runs_inline_on_the_cpu():
    x = torch.randn(4, 8)
    b = Branch(x)
    assert not b.active
    with b:
        assert not on_side_stream()
        y = x * 2
    b.join()
    assert torch.equal(y, x * 2)


def test_switch_values(monkeypatch):
    monkeypatch.setenv("DSV4_SIDE_STREAM", "sometimes")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        Branch(torch.randn(2, 2))
    assert any("DSV4_SIDE_STREAM" in str(m.message) and "'0'" in str(m.message) for m in w)


def test_shared_metadata_kept_apart_on_the_side(monkeypatch):
    """Inside a side branch StepBatch.shared memoises under a key of its own: the branch never
    reads a tensor the layer stream computed after the fork, nor the reverse."""
    buf = StepBatch.pack([0, 3], [1, 1], [0, 1], [[0], [1]], [0, 1], 1)
    batch = StepBatch.from_buffer(buf, num_tokens=2, num_rows=2, max_blocks=1, num_logits=2,
                                  max_seqlen=1, max_end=4, decode=True)
    calls = []

    def compute():
        calls.append(on_side_stream())
        return batch.pos + 1

    with batch.step_scope():
        main = batch.shared(("k",), compute)
        assert batch.shared(("k",), compute) is main
        monkeypatch.setattr(varlen, "on_side_stream", lambda: True)
        side = batch.shared(("k",), compute)
        assert side is not main and batch.shared(("k",), compute) is side
        monkeypatch.setattr(varlen, "on_side_stream", lambda: False)
        assert batch.shared(("k",), compute) is main
    assert len(calls) == 2


@pytest.mark.cuda
def test_branch_on_the_side_stream_is_ordered_by_join():
    """The body runs on the side stream after the work queued before the fork (it reads a
    value written just before it), and what the current stream queues after join() sees the
    body's writes, although the body starts with a long spin."""
    x = torch.zeros(MAX_TOKENS, 16, device="cuda")
    main = torch.cuda.current_stream()
    x.fill_(3.0)                          # queued on the current stream before the fork
    b = Branch(x)
    assert b.active
    with b:
        assert on_side_stream() and torch.cuda.current_stream() == b.stream
        torch.cuda._sleep(20_000_000)     # ~10 ms of spinning on the side stream
        y = x * 2
    assert not on_side_stream() and torch.cuda.current_stream() == main
    b.join()
    z = y + 1                             # on the current stream, after the join
    assert torch.equal(z.cpu(), torch.full((MAX_TOKENS, 16), 7.0))
    # too many tokens, or switched off: inline
    assert not Branch(torch.zeros(MAX_TOKENS + 1, 1, device="cuda")).active
    assert not Branch(x, enabled=False).active


@pytest.mark.cuda
def test_switch_off_runs_inline(monkeypatch):
    monkeypatch.setenv("DSV4_SIDE_STREAM", "0")
    assert not Branch(torch.zeros(1, 1, device="cuda")).active


def test_mark_and_wait_inline_are_no_ops():
    b = Branch(torch.randn(2, 2))
    with b:
        assert b.mark() is None
    b.wait(None)
    b.join()


def test_layout_switches(monkeypatch):
    """The two scheduling switches of the layers' branches: unset = the default, every value,
    and a bad value (a warning naming the accepted ones, then the default)."""
    from dsv4.layers.attention import _csa_compressor_on_main
    from dsv4.layers.moe import SHARED_FORKS, _shared_expert_fork
    from dsv4.ops import backend
    monkeypatch.setattr(backend, "_warned_env", set())   # (the warning is said once per value)
    for name, fn, cases, default in (
            ("DSV4_CSA_COMPRESSOR_STREAM", _csa_compressor_on_main,
             {"main": True, "side": False}, True),
            ("DSV4_MOE_SHARED_FORK", _shared_expert_fork,
             {v: v for v in SHARED_FORKS}, "before-gate")):
        monkeypatch.delenv(name, raising=False)
        assert fn() == default
        for value, want in cases.items():
            monkeypatch.setenv(name, value)
            assert fn() == want
        monkeypatch.setenv(name, "sideways")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert fn() == default
        first = next(iter(cases))
        assert any(name in str(m.message) and repr(first) in str(m.message) for m in w)


@pytest.mark.cuda
def test_wait_orders_the_work_before_the_mark():
    """After wait(mark) the current stream sees what the body wrote before the mark (behind a
    spin, so that only the wait makes it ready in time); join orders the rest. (Whether the
    current stream then runs beside the body's later work is the GPU's choice: two streams may
    share a hardware queue, or the context may be time-sliced; the next test checks that wait
    orders the mark only.)"""
    x = torch.zeros(MAX_TOKENS, 16, device="cuda")
    x.fill_(3.0)
    b = Branch(x)
    with b:
        torch.cuda._sleep(20_000_000)     # ~10 ms on the side stream before the mark
        y = x * 2
        ready = b.mark()
        assert ready is not None
        torch.cuda._sleep(20_000_000)
        z = y + 1
    b.wait(ready)
    w = y * 10                            # current stream: after the mark
    b.join()
    assert torch.equal(w.cpu(), torch.full((MAX_TOKENS, 16), 60.0))
    assert torch.equal((z + 0).cpu(), torch.full((MAX_TOKENS, 16), 7.0))


@pytest.mark.cuda
def test_wait_waits_for_the_mark_not_the_branch(monkeypatch):
    """wait(event) makes the current stream wait for that event only; the whole branch is
    waited for at join."""
    x = torch.zeros(MAX_TOKENS, 16, device="cuda")
    b = Branch(x)
    with b:
        ready = b.mark()
    calls = []
    main = b._main
    monkeypatch.setattr(main, "wait_event", lambda e: calls.append(("event", e)), raising=False)
    monkeypatch.setattr(main, "wait_stream", lambda s: calls.append(("stream", s)), raising=False)
    b.wait(ready)
    assert calls == [("event", ready)]
    b.join()
    assert calls == [("event", ready), ("stream", b.stream)]


@pytest.mark.cuda
@pytest.mark.parametrize("prio", ["", "0", "1"])
def test_stream_priorities(prio, monkeypatch):
    """DSV4_STREAM_PRIORITY=1: the runtime's step stream and urgent branches high priority,
    other branches default; else no step stream and one default-priority side stream."""
    from dsv4.layers.branch import step_stream
    monkeypatch.setenv("DSV4_STREAM_PRIORITY", prio)
    x = torch.zeros(4, 8, device="cuda")
    default = torch.cuda.Stream().priority
    urgent, calm = Branch(x).stream, Branch(x, urgent=False).stream
    assert calm.priority == default
    if prio == "1":
        assert step_stream(x.device).priority < default
        assert urgent.priority == step_stream(x.device).priority
    else:
        assert step_stream(x.device) is None
        assert urgent is calm
