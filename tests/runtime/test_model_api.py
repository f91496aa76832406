"""dsv4.Model / Cache as a caller meets them (issue 13 items 1, 4, 6, 8): every argument error
names the argument and changes nothing; an exception inside forward never leaves a row that
later silently gives wrong logits; logits for the last position only."""

from __future__ import annotations

import math

import pytest
import torch

import dsv4
from dsv4.cache import CacheRowError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 129280, (2, 24), generator=torch.Generator().manual_seed(3))


def _snapshot(cache):
    tensors = []
    for lc in cache.layers:
        tensors.append(lc.window.clone())
        for st in (lc.compressor, lc.indexer):
            if st is not None:
                tensors += [st.kv.clone(), st.score.clone(), st.entries.clone()]
    return list(cache.lengths), list(cache.mtp_lengths), tensors


def _same(a, b):
    return a[0] == b[0] and a[1] == b[1] and all(
        x.shape == y.shape and torch.equal(x.nan_to_num(), y.nan_to_num())
        for x, y in zip(a[2], b[2]))


# ------------------------------------------------------------------ arguments (item 4, 6)
@pytest.mark.parametrize("bad", [2.5, "2", True, 0, -1, None, 2.0])
def test_make_cache_rejects_non_integers(model, bad):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        model.make_cache(bad)


@pytest.mark.parametrize("bad", ["10", "1", [1.5], [True], 1, 1.0, [[0]], torch.zeros(1),
                                 torch.zeros(1, 1, dtype=torch.long), [0, "1"]])
def test_reset_rejects_bad_rows_and_changes_nothing(model, ids, bad):
    cache = model.make_cache(2)
    with torch.no_grad():
        model(ids[:, :9], cache=cache)
    before = _snapshot(cache)
    with pytest.raises(TypeError, match="rows must be a sequence of row indices"):
        cache.reset(bad)
    assert _same(before, _snapshot(cache))


def test_reset_validates_every_row_before_changing_any(model, ids):
    cache = model.make_cache(2)
    with torch.no_grad():
        model(ids[:, :9], cache=cache)
    before = _snapshot(cache)
    with pytest.raises(IndexError, match="row 2 out of range"):
        cache.reset([0, 2])
    assert _same(before, _snapshot(cache))      # row 0 was not reset either
    cache.reset(torch.tensor([1]))              # integer tensors are fine
    assert cache.lengths == [9, 0]


def test_an_interrupted_reset_leaves_the_rows_refused_not_half_reset(model, ids, monkeypatch):
    """Ctrl-C between two layers of cache.reset: the rows are refused (CacheRowError) until a
    reset finishes, and then give the logits of a fresh cache."""
    cache = model.make_cache(2)
    with torch.no_grad():
        model(ids[:, :9], cache=cache)
        layer = cache.layers[2]
        real = layer.reset_rows

        def interrupted(rows):
            raise KeyboardInterrupt

        monkeypatch.setattr(layer, "reset_rows", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cache.reset([1])
        with pytest.raises(CacheRowError, match="reset did not finish"):
            model(ids[:, 9:14], cache=cache, seq_lens=torch.tensor([0, 5]))
        monkeypatch.setattr(layer, "reset_rows", real)
        cache.reset([1])
        fresh = model.make_cache(2)
        feed = ids[:, 9:14].clone()
        got = model(feed, cache=cache, seq_lens=torch.tensor([0, 5]))[1]
        want = model(feed, cache=fresh, seq_lens=torch.tensor([0, 5]))[1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [[None, 3], [float("nan"), 3], [math.inf, 3], [1.5, 3],
                                 [True, 3], torch.tensor([[3, 3]]), torch.tensor([3.0, 3.0]),
                                 "33", 3, [3], [3, 30], [-1, 3], {3, 5}, {3: 0, 5: 1}])
def test_seq_lens_errors_name_the_argument(model, ids, bad):
    cache = model.make_cache(2)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="seq_lens must be None or 2 integers in"):
        model(ids[:, :5], cache=cache, seq_lens=bad)
    assert _same(before, _snapshot(cache))


def test_python_list_input_ids_is_a_clear_error(model):
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        model([[1, 2, 3]])


def test_empty_batch_names_input_ids(model, ids):
    """input_ids [0, seq] without a cache said "batch_size must be an integer >= 1, got 0", an
    argument the caller never passed; with a cache or in forward_mtp it names input_ids too."""
    msg = (r"input_ids must hold at least one sequence \(\[batch >= 1, seq\]\), got shape "
           r"\(0, 3\)")
    with pytest.raises(ValueError, match=msg):
        model(ids[:0, :3])
    cache = model.make_cache(2)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match=msg):
        model(ids[:0, :3], cache=cache)
    hidden = torch.zeros(0, 3, model.config.hc_mult, model.config.dim)
    with pytest.raises(ValueError, match=msg.replace("input_ids", "next_ids")):
        model.forward_mtp(hidden, ids[:0, :3], cache)
    assert _same(before, _snapshot(cache))


def test_unknown_logits_mode(model, ids):
    with pytest.raises(ValueError, match="logits must be 'all' or 'last'"):
        model(ids, logits="first")


# ------------------------------------------------------------------ logits="last" (item 8)
def test_last_position_logits_equal_the_full_ones(model, ids):
    lens = [24, 7]
    with torch.no_grad():
        full = model(ids, seq_lens=lens)
        c = model.make_cache(2)
        last = model(ids, cache=c, seq_lens=lens, logits="last")
        assert last.shape == (2, 1, 129280)
        assert c.lengths == lens
        for b, n in enumerate(lens):
            torch.testing.assert_close(last[b, 0], full[b, n - 1], rtol=1e-5, atol=1e-5)
        # a row with nothing to feed gets zeros and is not advanced
        nothing = model(ids[:, :3], cache=c, seq_lens=[0, 3], logits="last")
        assert c.lengths == [24, 10] and not nothing[0].any()


# ------------------------------------------------------------------ failures inside forward (item 1)
class Boom(Exception):
    pass


@pytest.mark.parametrize("layer", range(4))
def test_exception_inside_a_layer_never_gives_silently_wrong_logits(model, ids, layer,
                                                                     monkeypatch):
    """Layers 0 … layer−1 have advanced the fed rows when ``layer`` raises. The next call that
    feeds those rows must refuse (naming reset); after reset the rows give exactly the logits
    of a fresh cache; a row that was not fed by the failed call is still correct."""
    with torch.no_grad():
        ref = model(ids[:, :14])
    cache = model.make_cache(2)
    with torch.no_grad():
        model(ids[:, :8], cache=cache)
        blk = model.layers[layer]
        real = blk.forward

        def boom(*a, **k):
            raise Boom(f"injected in layer {layer}")
        monkeypatch.setattr(blk, "forward", boom)
        with pytest.raises(Boom):
            model(ids[:, 8:11], cache=cache, seq_lens=[3, 0])   # feeds row 0 only
        monkeypatch.setattr(blk, "forward", real)
        with pytest.raises(CacheRowError, match=r"cache.reset\(\[0\]\)"):
            model(ids[:, 8:11], cache=cache, seq_lens=[3, 0])
        # row 1 was not fed: it continues correctly
        out1 = model(ids[:, 8:14], cache=cache, seq_lens=[0, 6])
        torch.testing.assert_close(out1[1], ref[1, 8:14], rtol=2e-5, atol=2e-5)
        cache.reset([0])
        out0 = model(ids[:, :14], cache=cache, seq_lens=[14, 0])
        torch.testing.assert_close(out0[0], ref[0], rtol=2e-5, atol=2e-5)


def test_keyboard_interrupt_in_mtp_marks_rows(model, ids, monkeypatch):
    cache = model.make_cache(2)
    with torch.no_grad():
        _, hidden = model(ids[:, :6], cache=cache, return_hidden=True)

        def stop(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(model.mtp[0], "forward", stop)
        with pytest.raises(KeyboardInterrupt):
            model.forward_mtp(hidden, ids[:, 1:7], cache)
        monkeypatch.undo()
        with pytest.raises(CacheRowError, match="reset"):
            model(ids[:, 6:7], cache=cache)


def test_generate_computes_logits_for_the_last_position_only(model):
    """A prompt of P tokens: the head sees one row per call, not P (issue 13 item 8: a
    3,000-token prompt materialised 1.5 GB of fp32 logits nobody used)."""
    from dsv4.generate import generate
    rows = []
    hook = model.head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape))
    try:
        res = generate(model, list(range(5, 35)), 3, eos_id=None)
    finally:
        hook.remove()
    assert len(res.token_ids) == 3
    assert [r[0] for r in rows] == [1, 1, 1], rows      # prefill, then two decode calls
