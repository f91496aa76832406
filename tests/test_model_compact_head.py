"""Model.compact_head: the LM head held once, in bf16, with the official fp32 head's logits
(issue 8: peak memory). The reference of every value here is the model before compaction (the
fp32 parameter, ``head(y.float())``) or the golden logits of the official forward."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import dsv4
from dsv4.layers import head as head_mod

TESTDATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "testdata")
needs_golden = pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="golden cases not found")


def _model(vocab: int = 4096, seed: int = 0, dtype=torch.float32) -> dsv4.Model:
    """A tiny model whose head holds bf16 values (as the release's), eval mode."""
    torch.manual_seed(seed)
    m = dsv4.Model(dsv4.ModelConfig.tiny(vocab_size=vocab)).eval()
    with torch.no_grad():
        m.head.weight.copy_(m.head.weight.to(torch.bfloat16))
    return m.to(dtype=dtype)


def _ids(m, batch=2, seq=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.config.vocab_size, (batch, seq), generator=g)


def _close(a, b, rel=1e-6):
    """Equal up to fp32 summation order: max |diff| <= rel * max |ref|, same argmax."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= rel, err
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def _held_head_bytes(m) -> list[int]:
    """Bytes of every distinct storage of the model's size-of-a-head tensors (parameters,
    buffers, the cached low-precision copy), the embedding's excepted."""
    n = m.config.vocab_size * m.config.dim
    ts = [t for name, t in list(m.named_parameters()) + list(m.named_buffers())
          if t.numel() == n and name != "embed.weight"]
    cached = m.__dict__.get("_head_copy")
    if cached is not None:
        ts.append(cached[1])
    seen = {}
    for t in ts:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sorted(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_unchanged_by_compaction(dtype):
    """fp32 logits (forward, logits="last", MTP) of the fp32 and the bf16 model before and
    after compaction: the same up to summation order, the same argmax."""
    m = _model(dtype=dtype)
    ids = _ids(m)
    with torch.no_grad():
        ref, hidden = m(ids, return_hidden=True)
        ref_last = m(ids, logits="last")
        ref_mtp = m.forward_mtp(hidden, ids, m.make_cache(2))
        m.compact_head()
        out, _ = m(ids, return_hidden=True)
        out_last = m(ids, logits="last")
        out_mtp = m.forward_mtp(hidden, ids, m.make_cache(2))
    assert m.head_compact and m.head.weight.dtype == torch.bfloat16
    _close(out, ref)
    _close(out_last, ref_last)
    _close(out_mtp, ref_mtp)


def test_logits_unchanged_full_vocab_in_slices(monkeypatch):
    """The released vocabulary (129,280 rows), the weight upcast in many slices."""
    monkeypatch.setattr(head_mod, "SLICE_BYTES", 1 << 20)       # 2,048 rows of dim 128
    m = _model(vocab=129280)
    ids = _ids(m, 1, 9)
    with torch.no_grad():
        ref = m(ids)
        m.compact_head()
        out = m(ids)
    _close(out, ref)


@needs_golden
@pytest.mark.parametrize("name", ["golden_tiny", "golden_quant", "golden_fp8"])
def test_golden_logits_with_a_compact_head(name):
    """A release-layout checkpoint (bf16 head): compacts, and its logits still match the
    official forward's (testdata README: 1e-5) and the fp32 head's (summation order)."""
    from safetensors.torch import load_file
    g = load_file(os.path.join(TESTDATA, name, "golden.safetensors"))
    m = dsv4.Model.from_pretrained(os.path.join(TESTDATA, name), dtype=torch.float32,
                                   quant_sim=False, progress=False)
    ids = g["input_ids"]
    with torch.no_grad():
        ref = m(ids)
        m.compact_head()
        out = m(ids)
    _close(out, ref)
    gold = g["logits_exact"]
    assert ((out - gold).abs().amax(-1) / gold.abs().max()).max() < 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_one_copy_of_the_head():
    """Compaction frees the fp32 storage; the bf16 head path then reads the weight itself
    (same data_ptr), and a bf16 copy made before compaction becomes the weight."""
    m = _model(dtype=torch.bfloat16)
    V, D = m.config.vocab_size, m.config.dim
    ids = _ids(m)
    from dsv4.layers.varlen import StepBatch
    cache = m.make_cache(1)
    batch = StepBatch.build([0], [7], [0], [[0]], [6], "cpu", max_blocks=1)
    with torch.no_grad():
        ref = m.forward_step(ids[0, :7], cache.layers, batch, torch.bfloat16)
    assert _held_head_bytes(m) == [2 * V * D, 4 * V * D]       # fp32 + its bf16 copy
    copy_ptr = m._low_precision_head(torch.bfloat16).data_ptr()
    m.compact_head()
    assert _held_head_bytes(m) == [2 * V * D]
    assert m.head.weight.data_ptr() == copy_ptr                 # the copy became the weight
    assert m._low_precision_head(torch.bfloat16).data_ptr() == m.head.weight.data_ptr()
    cache = m.make_cache(1)
    with torch.no_grad():
        out = m.forward_step(ids[0, :7], cache.layers, batch, torch.bfloat16)
        m(ids)
    assert "_head_copy" not in m.__dict__ and _held_head_bytes(m) == [2 * V * D]
    assert torch.equal(out, ref)          # the bf16 head path: the same bf16 weight values


def test_refusal_leaves_the_model_untouched():
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(vocab_size=512))     # random fp32 head
    p = m.head.weight
    before, ptr = p.detach().clone(), p.data_ptr()
    with pytest.raises(ValueError, match="bf16 cannot represent exactly"):
        m.compact_head()
    assert m.head.weight is p and p.data_ptr() == ptr and p.dtype == torch.float32
    assert p.requires_grad and torch.equal(p.detach(), before) and not m.head_compact
    # one inexact value: counted and named
    with torch.no_grad():
        p.copy_(p.to(torch.bfloat16))
        p[3, 5] += 2.0 ** -20 * p[3, 5].abs() + 1e-30
    with pytest.raises(ValueError, match=r"holds 1 of 65536 values .*first at \[3, 5\]"):
        m.compact_head()
    assert p.dtype == torch.float32 and p.data_ptr() == ptr
    with torch.no_grad():
        p[3, 5] = 0.5
    m.compact_head()          # now every value is a bf16 value
    assert m.head_compact
    m.head = torch.nn.Identity()
    with pytest.raises(ValueError, match="a dsv4 Linear"):
        m.compact_head()


def test_bf16_inexact_by_hand(monkeypatch):
    monkeypatch.setattr(head_mod, "SLICE_BYTES", 64)              # 4 rows of 4 per slice
    t = torch.zeros(10, 4)
    t[0] = torch.tensor([1.0, -0.0, float("inf"), float("nan")])   # all bf16 values
    t[1, 0] = 2.0 ** -130                                          # a bf16 subnormal
    t[6, 2] = 1.0 + 2.0 ** -10                                     # needs 10 mantissa bits
    t[9, 3] = 3.1
    assert head_mod.bf16_inexact(t) == (2, (6, 2))
    assert head_mod.bf16_inexact(t.to(torch.bfloat16)) == (0, None)
    assert head_mod.bf16_inexact(t.to(torch.float16)) == (2, (6, 2))
    assert head_mod.bf16_inexact(torch.empty(4, 4, device="meta")) == (0, None)


def test_fp32_logits_matches_the_fp32_product(monkeypatch):
    """fp32_logits against F.linear of the upcast operands, in one slice and in many, for
    fp32 / bf16 inputs of any leading shape, and its gradient with respect to y."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    for slice_bytes in (64 << 20, 64 * 4 * 7):                      # 1 slice; 43 of 7 rows
        monkeypatch.setattr(head_mod, "SLICE_BYTES", slice_bytes)
        for y in (torch.randn(5, 64, generator=g), torch.randn(2, 3, 64, generator=g),
                  torch.randn(4, 64, generator=g).to(torch.bfloat16)):
            ref = F.linear(y.float(), w.float())
            out = head_mod.fp32_logits(y, w)
            assert out.dtype == torch.float32 and out.shape == ref.shape
            assert torch.allclose(out, ref, rtol=1e-6, atol=1e-5)
        y = torch.randn(5, 64, generator=g, requires_grad=True)
        head_mod.fp32_logits(y, w).square().sum().backward()
        y2 = y.detach().clone().requires_grad_()
        F.linear(y2, w.float()).square().sum().backward()
        assert torch.allclose(y.grad, y2.grad, rtol=1e-5, atol=1e-4)
    out = head_mod.fp32_logits(torch.empty(3, 64, device="meta", dtype=torch.bfloat16),
                               w.to("meta"))
    assert out.shape == (3, 300) and out.dtype == torch.float32


def test_to_keeps_the_head_compact():
    """.to(dtype) / .float() / .to(device) leave a compact head in bf16 (the rest casts as
    usual); the logits stay those of the same casts on an fp32 head."""
    m, ref_model = _model(), _model()
    ids = _ids(m)
    m.compact_head()
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        m.to(dtype)
        ref_model.to(dtype)
        assert m.head.weight.dtype == torch.bfloat16 and m.embed.weight.dtype == dtype
        assert m.norm.weight.dtype == torch.float32                 # other fp32-kept params
    m.float()
    m.to("cpu")
    assert m.head_compact and ref_model.head.weight.dtype == torch.float32
    with torch.no_grad():
        _close(m(ids), ref_model(ids))
    assert m.compact_head() is m and m.head_compact                 # idempotent


def test_state_dict_round_trip(tmp_path):
    """A compact model's state dict holds the release's bf16 head: save_pretrained /
    from_pretrained and load_state_dict into an fp32 or a compact model give the same head
    values and logits."""
    m = _model()
    ids = _ids(m)
    m.compact_head()
    with torch.no_grad():
        ref = m(ids)
    sd = m.state_dict()
    assert sd["head.weight"].dtype == torch.bfloat16
    m.save_pretrained(tmp_path)
    back = dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    assert back.head.weight.dtype == torch.float32 and not back.head_compact
    assert torch.equal(back.head.weight.detach(), m.head.weight.detach().float())
    with torch.no_grad():
        _close(back(ids), ref)
    fresh = dsv4.Model(m.config).eval()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.head.weight.detach(), m.head.weight.detach().float())
    # into a compact model: an fp32 state dict with bf16 values is taken, held in bf16
    other = _model(seed=5)
    other.compact_head()
    other.load_state_dict(back.state_dict())
    assert other.head.weight.dtype == torch.bfloat16
    assert torch.equal(other.head.weight.detach(), m.head.weight.detach())
    assign = _model(seed=6)
    assign.compact_head()
    assign.load_state_dict(back.state_dict(), assign=True)
    assert assign.head_compact and not assign.head.weight.requires_grad
    with torch.no_grad():
        _close(other(ids), ref)
        _close(assign(ids), ref)


def test_load_state_dict_refuses_inexact_head_before_loading_anything():
    m = _model()
    m.compact_head()
    src = dsv4.Model(m.config)                     # random fp32 head, other embedding
    embed, head = m.embed.weight.detach().clone(), m.head.weight.detach().clone()
    with pytest.raises(ValueError, match="compact head: head.weight holds"):
        m.load_state_dict(src.state_dict())
    assert torch.equal(m.embed.weight.detach(), embed)
    assert torch.equal(m.head.weight.detach(), head) and m.head_compact


def test_training_with_a_compact_head():
    """The compact weight is frozen: backward reaches every other parameter with the same
    gradient as the fp32 head gives them, the head none; expand_head restores the fp32
    trainable parameter with the same values."""
    m = _model().train()
    ids = _ids(m, 1, 12)

    def grads(model):
        model.zero_grad(set_to_none=True)
        out = model(ids)
        F.cross_entropy(out[0, :-1], ids[0, 1:]).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(m)
    assert "head.weight" in ref
    m.compact_head()
    assert not m.head.weight.requires_grad and m.head.weight.grad is None
    got = grads(m)
    assert "head.weight" not in got and set(got) == set(ref) - {"head.weight"}
    for n, gr in got.items():
        assert torch.allclose(gr, ref[n], rtol=1e-4, atol=1e-6), n
    w16 = m.head.weight.detach().clone()
    m.expand_head()
    assert m.head.weight.dtype == torch.float32 and m.head.weight.requires_grad
    assert torch.equal(m.head.weight.detach(), w16.float()) and not m.head_compact
    assert "head.weight" in grads(m)


def test_unfrozen_compact_head_warns_once():
    """Unfreezing the compact weight trains the head in bf16: the first forward with grad
    enabled says so (once per model), with expand_head as the way out; a frozen compact
    head, or a forward under no_grad, says nothing."""
    import warnings
    m = _model().train().compact_head()
    ids = _ids(m, 1, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(ids)                           # frozen: silent
        m.head.weight.requires_grad_(True)
        with torch.no_grad():
            m(ids)                       # no gradient: silent
    with pytest.warns(RuntimeWarning, match="expand_head"):
        out = m(ids)
    out.sum().backward()
    assert m.head.weight.grad is not None and m.head.weight.grad.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(ids)                           # said once


def test_meta_model_compacts():
    from dsv4.model_info import meta_model
    m = meta_model(dsv4.ModelConfig.tiny())
    m.compact_head()
    assert m.head.weight.is_meta and m.head.weight.dtype == torch.bfloat16


def test_compact_head_if_exact_for_generate():
    """dsv4 generate on a GPU: a checkpoint-like (bf16-valued) head is compacted, a random
    fp32 head (--model tiny) is left in fp32."""
    from dsv4.runtime.generate import compact_head_if_exact
    m = _model()
    assert compact_head_if_exact(m) and m.head_compact
    torch.manual_seed(0)
    r = dsv4.Model(dsv4.ModelConfig.tiny(vocab_size=512))
    assert not compact_head_if_exact(r) and r.head.weight.dtype == torch.float32
    assert not compact_head_if_exact(object())


def test_refused_dtype_leaves_the_model_where_it_was():
    """A dtype the model does not run in (float64) is refused before anything moves: with a
    device in the same call (the model stays on its device), and through ``.double()`` /
    ``.type()``, which nn.Module would apply to every parameter (the compact head and the
    fp32-kept ones included). (A model without a compact head keeps nn.Module.double: the
    float64 mode of tests/train.)"""
    m = _model()
    m.compact_head()
    ids = _ids(m)
    with torch.no_grad():
        ref = m(ids)
    head = m.head.weight.detach().clone()
    for call in (lambda: m.to("meta", torch.float64), lambda: m.to(torch.float64),
                 lambda: m.double(), lambda: m.type(torch.float64),
                 lambda: m.type("torch.DoubleTensor")):
        with pytest.raises(ValueError, match="float32 or bfloat16"):
            call()
        assert m.device == torch.device("cpu") and m.dtype == torch.float32
        assert m.head_compact and torch.equal(m.head.weight.detach(), head)
    with torch.no_grad():
        assert torch.equal(m(ids), ref)
    # .type(dtype) is .to(dtype): compute weights cast, fp32-kept parameters and the compact
    # head keep their dtype
    assert m.type(torch.bfloat16) is m and m.embed.weight.dtype == torch.bfloat16
    assert m.norm.weight.dtype == torch.float32 and m.head.weight.dtype == torch.bfloat16
    f = _model().double()
    assert f.head.weight.dtype == f.norm.weight.dtype == f.embed.weight.dtype == torch.float64


def test_expand_head_restores_a_frozen_head_after_deepcopy_and_assign():
    """expand_head gives back the requires_grad the head had before compact_head, also on a
    copy.deepcopy of the model and after load_state_dict(assign=True) replaced the
    parameter (both drop a Parameter's own attributes)."""
    import copy
    m = _model()
    sd = m.state_dict()
    m.head.weight.requires_grad_(False)
    m.compact_head()
    d = copy.deepcopy(m)
    assert d.head_compact and d.head.weight.data_ptr() != m.head.weight.data_ptr()
    d.expand_head()
    assert d.head.weight.dtype == torch.float32 and not d.head.weight.requires_grad
    m.load_state_dict(sd, assign=True)
    assert m.head_compact
    m.expand_head()
    assert m.head.weight.dtype == torch.float32 and not m.head.weight.requires_grad
    assert torch.equal(m.head.weight.detach(), sd["head.weight"])
    t = _model()                                   # trainable before: trainable after
    t.compact_head()
    copy.deepcopy(t).expand_head()
    assert copy.deepcopy(t).expand_head().head.weight.requires_grad


def test_compact_head_does_not_adopt_a_stale_bf16_copy(monkeypatch):
    """A head_dtype=bf16 step caches a bf16 copy keyed on the weight's version counter; a
    write through ``head.weight.data`` does not advance it. compact_head must then hold the
    weight's current values (the fp32 logits unchanged by compaction), not the stale copy's."""
    from dsv4.layers.varlen import StepBatch
    monkeypatch.setattr(head_mod, "SLICE_BYTES", 64 << 10)     # several slices compared
    m = _model(dtype=torch.bfloat16)
    ids = _ids(m)[0, :7]

    def step(head_dtype):
        batch = StepBatch.build([0], [7], [0], [[0]], [6], "cpu", max_blocks=1)
        with torch.no_grad():
            return m.forward_step(ids, m.make_cache(1).layers, batch, head_dtype)

    step(torch.bfloat16)                              # caches the bf16 copy
    new = torch.randn(m.head.weight.shape, generator=torch.Generator().manual_seed(3))
    new = new.to(torch.bfloat16).float()
    m.head.weight.data.copy_(new)
    ref = step(None)
    m.compact_head()
    assert torch.equal(m.head.weight.detach().float(), new)
    _close(step(None), ref)
    # a fresh copy (no write since) is still adopted: no second bf16 head
    m.expand_head()
    step(torch.bfloat16)
    ptr = m._low_precision_head(torch.bfloat16).data_ptr()
    m.compact_head()
    assert m.head.weight.data_ptr() == ptr


def test_same_bits_by_hand():
    w = torch.tensor([[1.0, float("nan")], [-0.0, 2.5]])
    assert head_mod.same_bits(w.to(torch.bfloat16), w)
    assert not head_mod.same_bits(w.to(torch.bfloat16), w.abs())       # -0 vs +0
    assert not head_mod.same_bits(w.to(torch.bfloat16)[:1], w)         # shape
    assert not head_mod.same_bits(w, w)                                 # not bf16
    w2 = w.clone()
    w2[1, 1] = 3.0
    assert not head_mod.same_bits(w.to(torch.bfloat16), w2)


def test_unfrozen_compact_head_warns_again_after_recompaction_and_in_a_copy():
    """The once-per-model warning is per compaction: expand_head + compact_head and an
    unfrozen head warns again; a deep copy (a model of its own) warns on its first gradient
    forward even when the original had warned."""
    import copy
    m = _model().train().compact_head()
    ids = _ids(m, 1, 6)
    m.head.weight.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="expand_head"):
        m(ids)
    d = copy.deepcopy(m)
    with pytest.warns(RuntimeWarning, match="expand_head"):
        d(ids)
    m.expand_head().compact_head()
    m.head.weight.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="expand_head"):
        m(ids)


def test_float16_is_refused_before_anything_moves():
    """The caches take bfloat16 / float32 only, so an fp16 model could not run a forward:
    .half() / .to(float16) / .type(float16) raise ValueError naming the accepted dtypes and
    leave the model as it was (it still runs)."""
    m = _model()
    ids = _ids(m, 1, 6)
    before = m(ids)
    for cast in (m.half, lambda: m.to(torch.float16), lambda: m.type(torch.float16)):
        with pytest.raises(ValueError, match="float32 or bfloat16"):
            cast()
        assert m.dtype == torch.float32
    torch.testing.assert_close(m(ids), before, rtol=0, atol=0)
