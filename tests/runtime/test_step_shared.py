"""Per-step metadata shared by the layers (``StepBatch.shared`` inside the ``step_scope`` that
``Model.forward_step`` opens): each derived tensor (token rows and slots, ring rows, window
index lists, complete-entry counts, block-table starts) is computed once per step and handed
to every layer, and never outlives its step. The CUDA-graph trap this guards against (a
value kept from an eager warm-up and left out of the captured graph) is tested on the GPU in
test_graph_step_cuda.py; here, on the CPU: the scope's rules, and a second step on the same
batch object with other positions and slots written in place (as the graph runner does)
giving the logits of a fresh batch, where a memo kept across steps gives other logits."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import dsv4
import dsv4.layers.attention as attention
from dsv4.layers.varlen import StepBatch


def test_shared_values_live_for_one_scope():
    b = StepBatch.build([3, 7], [1, 1], [0, 1], [[0], [1]], [0, 1], "cpu")
    calls = []

    def pos_plus_one():
        calls.append(1)
        return b.pos + 1

    b.shared(("k",), pos_plus_one)
    b.shared(("k",), pos_plus_one)
    assert len(calls) == 2                      # outside a scope: computed at every call
    with b.step_scope():
        first = b.shared(("k",), pos_plus_one)
        assert b.shared(("k",), pos_plus_one) is first and len(calls) == 3
        assert b.shared(("k", 2), pos_plus_one) is not first and len(calls) == 4
        with b.step_scope():                     # a nested step computes its own
            assert b.shared(("k",), pos_plus_one) is not first and len(calls) == 5
        assert b.shared(("k",), pos_plus_one) is first    # and the outer one is back
    assert b._shared is None
    b.pos.add_(1)                                # the next step, written in place
    with b.step_scope():
        assert b.shared(("k",), pos_plus_one).tolist() == [5, 9] and len(calls) == 6


class _WindowSpy:
    """torch.ops.dsv4 for layers/attention.py, recording the window index list each attention
    op receives."""

    def __init__(self, ops):
        self.ops, self.windows = ops, []

    def __getattr__(self, name):
        f = getattr(self.ops, name)
        if name not in ("sparse_attn", "hca_attn"):
            return f

        def op(*args, **kwargs):
            self.windows.append(args[2])
            return f(*args, **kwargs)
        return op


def _decode_batch(starts, slots, max_end=96):
    """A decode step's batch on a static buffer, as the graph runner builds it (max_end a
    fixed bound, no host lists)."""
    n = len(starts)
    buf = StepBatch.pack(starts, [1] * n, slots, [[s] for s in slots], list(range(n)), 1)
    return StepBatch.from_buffer(buf, n, n, 1, n, 1, max_end, True)


@pytest.fixture
def setup(monkeypatch):
    """A tiny model on its kernel path's glue (CPU reference ops), a dense cache whose slot 0
    holds 21 tokens and slot 1 14, and the window spy."""
    monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    spy = _WindowSpy(attention._dsv4)
    monkeypatch.setattr(attention, "_dsv4", spy)
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()
    cache = m.make_cache(2)
    ids = torch.randint(0, m.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m(ids, cache=cache, seq_lens=[21, 14])
    spy.windows.clear()
    return m, cache, spy


def test_layers_share_a_step_and_the_next_step_recomputes(setup):
    """Step A (rows at 21 and 14 in slots 0 and 1): every layer gets the same window index
    tensor (views of one). Step B on the same batch object, rewritten in place (positions advanced, the rows'
    slots swapped): the logits of a fresh batch of step B, from new index tensors."""
    m, cache, spy = setup
    b = _decode_batch([21, 14], [0, 1])
    with torch.no_grad():
        m.forward_step(torch.tensor([5, 9]), cache.layers, b)
        step_a = spy.windows[:]
        ptr = step_a[0].data_ptr()       # (each layer gets a view of the one tensor)
        assert len(step_a) == m.config.n_layers and all(w.data_ptr() == ptr for w in step_a)
        spy.windows.clear()
        StepBatch.pack([15, 22], [1, 1], [1, 0], [[1], [0]], [0, 1], 1, out=b.buffer)
        before = copy.deepcopy(cache)
        ids = torch.tensor([7, 3])
        got = m.forward_step(ids, cache.layers, b)
        new = spy.windows[0].data_ptr()  # (step A's tensor is alive: no address reuse)
        assert new != ptr and all(w.data_ptr() == new for w in spy.windows)
        want = m.forward_step(ids, before.layers, _decode_batch([15, 22], [1, 0]))
    assert torch.equal(got, want)


def test_a_memo_kept_across_steps_would_be_caught(setup, monkeypatch):
    """The check above can fail: with the scope kept from step A (the trap: a memo that
    outlives its step), step B attends through step A's window and ring rows and its logits
    differ from the fresh batch's."""
    m, cache, spy = setup
    kept: dict = {}

    @contextlib.contextmanager
    def sticky(self):
        self._shared = kept
        yield self

    monkeypatch.setattr(StepBatch, "step_scope", sticky)
    b = _decode_batch([21, 14], [0, 1])
    with torch.no_grad():
        m.forward_step(torch.tensor([5, 9]), cache.layers, b)
        StepBatch.pack([15, 22], [1, 1], [1, 0], [[1], [0]], [0, 1], 1, out=b.buffer)
        before = copy.deepcopy(cache)
        ids = torch.tensor([7, 3])
        stale = m.forward_step(ids, cache.layers, b)
        kept.clear()
        want = m.forward_step(ids, before.layers, _decode_batch([15, 22], [1, 0]))
    assert not torch.allclose(stale, want, rtol=1e-3, atol=1e-3)
