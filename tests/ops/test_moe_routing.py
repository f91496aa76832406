"""torch.ops.dsv4.moe_gate / moe_dispatch / moe_combine: the references against independent
formulas (training.md §7.4, float64 softplus, per-pair loops), the CUDA kernels against the
references (bit-exact where the arithmetic allows it), corner cases of kernels.md §5 (#12-14:
skewed routing, experts with no tokens, T = 1, sizes that are no multiple of a tile), and
torch.library.opcheck."""

from __future__ import annotations

import math

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers the ops)
from dsv4.ops.moe import moe_combine_reference, moe_dispatch_reference, moe_gate_reference

ops = torch.ops.dsv4
cuda = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# independent formulas
# ---------------------------------------------------------------------------------------------
def _gate_naive(x, w, bias, tid2eid, ids, topk, route_scale):
    """Per token, in float64: sqrt(log(1 + e^l)) scores, sorted selection (lowest index first
    among equal keys), normalised weights."""
    logits = x.double() @ w.double().T
    s = torch.log1p(torch.exp(logits)).sqrt()
    T, E = s.shape
    out_w = torch.zeros(T, topk, dtype=torch.float64)
    out_i = torch.zeros(T, topk, dtype=torch.int64)
    for t in range(T):
        if tid2eid is None:
            key = s[t] + (bias.double() if bias is not None else 0)
            order = sorted(range(E), key=lambda e: (-float(key[e]), e))[:topk]
        else:
            order = [int(e) for e in tid2eid[int(ids[t])]]
        sel = s[t, order]
        out_w[t] = sel / sel.sum() * route_scale
        out_i[t] = torch.tensor(order)
    return out_w, out_i


def _dispatch_naive(indices, weights, E):
    T, k = indices.shape
    pairs = [(int(indices[t, j]), t, j) for t in range(T) for j in range(k)]
    valid = [p for p in pairs if 0 <= p[0] < E]
    invalid = [p for p in pairs if not 0 <= p[0] < E]
    order = sorted(valid, key=lambda p: (p[0], p[1], p[2])) + invalid
    row_ids = [t for _, t, _ in order]
    rw = [float(weights[t, j]) if 0 <= e < E else 0.0 for e, t, j in order]
    pos = torch.full((T, k), -1, dtype=torch.int32)
    for i, (e, t, j) in enumerate(order):
        if 0 <= e < E:
            pos[t, j] = i
    offsets = [0]
    for e in range(E):
        offsets.append(offsets[-1] + sum(1 for p in valid if p[0] == e))
    return (torch.tensor(row_ids, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32),
            torch.tensor(rw, dtype=torch.float32), pos)


# ---------------------------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------------------------
def test_gate_router_vector():
    """training.md §7.4: 2 tokens x 8 experts, top-2, bias, route_scale 1.5."""
    logits = torch.tensor([[1.0, -0.5, 2.0, 0.3, -1.2, 0.8, 1.9, -2.0],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
    bias = torch.tensor([0, 0, -0.2, 0, 0, 0.15, 0, 0])
    w, idx = ops.moe_gate(logits, torch.eye(8), bias, None, None, 2, 1.5)
    assert idx.dtype == torch.int32 and idx.tolist() == [[6, 2], [5, 7]]
    torch.testing.assert_close(w, torch.tensor([[0.742120, 0.757880], [0.727293, 0.772707]]),
                               atol=2e-6, rtol=0)


@pytest.mark.parametrize("hash_layer", [False, True])
def test_gate_reference_matches_float64_formula(hash_layer):
    g = _gen(0)
    T, D, E, k = 37, 64, 24, 6
    x, w = torch.randn(T, D, generator=g), torch.randn(E, D, generator=g) * 0.3
    bias = None if hash_layer else torch.randn(E, generator=g) * 0.1
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(50)]) if hash_layer else None
    ids = torch.randint(0, 50, (T,), generator=g) if hash_layer else None
    got_w, got_i = moe_gate_reference(x, w, bias, tid2eid, ids, k, 2.5)
    ref_w, ref_i = _gate_naive(x, w, bias, tid2eid, ids, k, 2.5)
    assert torch.equal(got_i.long(), ref_i)
    torch.testing.assert_close(got_w.double(), ref_w, atol=0, rtol=2e-6)


def _extreme_logit_case():
    """Hash routing of 2 tokens whose selected logits are very negative / very large; x = the
    logits and W = I, so the logits are exact. dim 8 (the CUDA kernel takes multiples of 8): x's
    last 4 columns are 0."""
    neg = [-20.0, -40.0, -60.0, -87.0]
    pos = [90.0, 100.0, 300.0, 1000.0]
    x = torch.cat([torch.tensor([neg, pos]), torch.zeros(2, 4)], dim=1)
    tid2eid = torch.tensor([[0, 1, 2, 3]])
    ids = torch.zeros(2, dtype=torch.long)
    return x, torch.eye(4, 8), tid2eid, ids


def _extreme_expected(x):
    x = x[:, :4]
    s = torch.log1p(torch.exp(x.double()))
    s = torch.where(x.double() > 50, x.double(), s).sqrt()  # log1p(e^x) == x to fp64 precision
    return s / s.sum(-1, keepdim=True) * 1.5


@pytest.mark.parametrize("device", DEVICES)
def test_gate_softplus_extremes_against_float64(device):
    """Neither collapses to 0 for x <= -20 (log(1 + e^x) would) nor overflows for x >= 90."""
    x, w, tid2eid, ids = _extreme_logit_case()
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    got_w, got_i = ops.moe_gate(x.to(device, dt), w.to(device, dt), None, tid2eid.to(device),
                                ids.to(device), 4, 1.5)
    assert got_i.cpu().tolist() == [[0, 1, 2, 3]] * 2
    assert torch.isfinite(got_w).all() and (got_w[0] > 0).all()
    torch.testing.assert_close(got_w.cpu().double(), _extreme_expected(x), atol=0, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_all_zero_scores_give_zero_weights_not_nan(device):
    """Logits below ~-104 underflow softplus in fp32; the weights are then 0, not 0/0."""
    x = torch.full((1, 8), -200.0)
    w, idx = ops.moe_gate(x.to(device, torch.bfloat16 if device == "cuda" else torch.float32),
                          torch.eye(8, device=device, dtype=torch.bfloat16 if device == "cuda"
                                    else torch.float32), None, None, None, 3, 1.5)
    assert idx.cpu().tolist() == [[0, 1, 2]]  # all keys equal: lowest indices
    assert torch.equal(w.cpu(), torch.zeros(1, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_gate_ties_pick_lowest_expert(device):
    """Equal scores + bias: the lower expert index wins (deterministic, kernels.md §5 #2)."""
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    E, D = 40, 16
    w = torch.zeros(E, D)
    w[[3, 7, 20, 33]] = 1.0          # four experts with the same (largest) logit
    w[[1, 30]] = 0.5
    x = torch.ones(3, D)
    got_w, got_i = ops.moe_gate(x.to(device, dt), w.to(device, dt), torch.zeros(E, device=device),
                                None, None, 6, 1.0)
    assert got_i.cpu().tolist() == [[3, 7, 20, 33, 1, 30]] * 3
    # a bias moves expert 33 ahead of the tied group; the group keeps its index order
    bias = torch.zeros(E)
    bias[33] = 1.0
    _, got_i = ops.moe_gate(x.to(device, dt), w.to(device, dt), bias.to(device), None, None, 2, 1.0)
    assert got_i.cpu().tolist() == [[33, 3]] * 3


def test_gate_rejects_bad_inputs():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"topk must be in \[1, min\(experts=4"):
        ops.moe_gate(x, w, None, None, None, 5, 1.0)
    with pytest.raises(ValueError, match="needs input_ids"):
        ops.moe_gate(x, w, None, torch.zeros(10, 2, dtype=torch.long), None, 2, 1.0)
    with pytest.raises(ValueError, match="takes no bias"):
        ops.moe_gate(x, w, torch.zeros(4), torch.zeros(10, 2, dtype=torch.long),
                     torch.zeros(3, dtype=torch.long), 2, 1.0)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        ops.moe_gate(x, w, None, torch.zeros(10, 2, dtype=torch.long),
                     torch.tensor([0, 10, 1]), 2, 1.0)
    with pytest.raises(ValueError, match=r"expert ids outside \[0, 4\)"):
        ops.moe_gate(x, w, None, torch.full((10, 2), 4, dtype=torch.long),
                     torch.tensor([0, 1, 1]), 2, 1.0)
    # a bool table / bool ids (read as ids 0 and 1) are refused, as on CUDA (int32 / int64)
    with pytest.raises(ValueError, match=r"tid2eid must be an int32/int64 \[vocab, 2\]"):
        ops.moe_gate(x, w, None, torch.ones(10, 2, dtype=torch.bool), torch.tensor([0, 1, 1]),
                     2, 1.0)
    with pytest.raises(ValueError, match=r"input_ids must be an int32/int64 \[3\]"):
        ops.moe_gate(x, w, None, torch.zeros(10, 2, dtype=torch.long),
                     torch.tensor([True, False, True]), 2, 1.0)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def _routing(T, k, E, g, kind="random"):
    if kind == "random":
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.long)
    elif kind == "skewed":      # every token to expert E-1 (slot 0) and a handful of others
        idx = torch.randint(0, min(E, 3), (T, k), generator=g)
        idx[:, 0] = E - 1
    elif kind == "invalid":     # some -1 and >= E entries (marked invalid, never dispatched)
        idx = torch.randint(-1, E + 2, (T, k), generator=g)
    else:
        raise ValueError(kind)
    return idx.to(torch.int32), torch.rand(T, k, generator=g)


@pytest.mark.parametrize("kind", ["random", "skewed", "invalid"])
@pytest.mark.parametrize("T,k,E", [(0, 6, 8), (1, 6, 8), (5, 2, 3), (33, 6, 16), (9, 1, 1)])
def test_dispatch_reference_matches_naive(T, k, E, kind):
    if kind == "random" and k > E:
        pytest.skip("random distinct experts need k <= E")
    idx, w = _routing(T, k, E, _gen(T * 100 + k), kind)
    got = moe_dispatch_reference(idx, w, E)
    ref = _dispatch_naive(idx, w, E)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------
def test_combine_reference_equals_expert_order_accumulation():
    """The reference MoE accumulates y += expert_e(...) for e = 0, 1, ... then + shared; the
    combine reference reproduces those fp32 sums bit for bit."""
    g = _gen(3)
    T, k, E, D = 11, 3, 6, 24
    idx, w = _routing(T, k, E, g)
    row_ids, offsets, _, pos = moe_dispatch_reference(idx, w, E)
    y_pair = (torch.randn(T * k, D, generator=g) * 100).to(torch.bfloat16)
    shared = torch.randn(T, D, generator=g).to(torch.bfloat16)
    acc = torch.zeros(T, D)
    for e in range(E):
        for p in range(int(offsets[e]), int(offsets[e + 1])):
            acc[int(row_ids[p])] += y_pair[p].float()
    ref = (acc + shared.float()).to(torch.bfloat16)
    assert torch.equal(moe_combine_reference(y_pair, pos, shared), ref)


def test_combine_skips_invalid_positions():
    y_pair = torch.arange(12.0).view(4, 3)
    pos = torch.tensor([[-1, 2], [3, 7], [-1, -1]], dtype=torch.int32)
    y = ops.moe_combine(y_pair, pos, None)
    assert torch.equal(y, torch.stack([y_pair[2], y_pair[3], torch.zeros(3)]))


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------
def _opcheck_cases(device):
    g = _gen(7)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    T, D, E, k = 9, 32, 16, 4
    x = torch.randn(T, D, generator=g).to(device, dt)
    w = torch.randn(E, D, generator=g).to(device, dt)
    bias = torch.randn(E, generator=g).to(device)
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(20)]).to(device)
    ids = torch.randint(0, 20, (T,), generator=g).to(device)
    idx, rw = _routing(T, k, E, g)
    idx, rw = idx.to(device), rw.to(device)
    pos = moe_dispatch_reference(idx.cpu(), rw.cpu(), E)[3].to(device)
    y_pair = torch.randn(T * k, D, generator=g).to(device, torch.bfloat16)
    shared = torch.randn(T, D, generator=g).to(device, torch.bfloat16)
    P = T * k
    i32 = dict(dtype=torch.int32, device=device)
    return [
        (ops.moe_gate.default, (x, w, bias, None, None, k, 1.5), {}),
        (ops.moe_gate.default, (x, w, None, tid2eid, ids, k, 2.5), {}),
        (ops.moe_gate_out.default, (x, w, bias, None, None, k, 1.5),
         dict(weights=torch.empty(T, k, device=device), indices=torch.empty(T, k, **i32))),
        (ops.moe_dispatch.default, (idx, rw, E), {}),
        (ops.moe_dispatch_out.default, (idx, rw, E),
         dict(row_ids=torch.empty(P, **i32), expert_offsets=torch.empty(E + 1, **i32),
              route_weight=torch.empty(P, device=device), pair_pos=torch.empty(T, k, **i32))),
        (ops.moe_combine.default, (y_pair, pos, shared), {}),
        (ops.moe_combine.default, (y_pair, pos, None), {}),
        (ops.moe_combine_out.default, (y_pair, pos, shared),
         dict(y=torch.empty(T, D, dtype=torch.bfloat16, device=device))),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args, kwargs in _opcheck_cases(device):
        torch.library.opcheck(op, args, kwargs)


# ---------------------------------------------------------------------------------------------
# CUDA kernels against the references
# ---------------------------------------------------------------------------------------------
def _exact_gate_inputs(T, D, E, g):
    """x, W with values in {-1, -.5, 0, .5, 1} · 2^-2: every logit is exact in fp32 whatever
    the summation order, so kernel and reference see identical scores (ties included)."""
    x = (torch.randint(-2, 3, (T, D), generator=g) / 8).to(torch.bfloat16)
    w = (torch.randint(-2, 3, (E, D), generator=g) / 8).to(torch.bfloat16)
    return x, w


@cuda
@pytest.mark.parametrize("T,D,E,k", [(1, 64, 8, 2), (3, 128, 256, 6), (64, 4096, 256, 6),
                                     (65, 136, 72, 8), (200, 1024, 384, 6), (517, 256, 512, 16),
                                     (4096, 4096, 256, 6)])
@pytest.mark.parametrize("routing", ["learned", "hash"])
def test_gate_kernel_matches_reference_exact_logits(T, D, E, k, routing):
    g = _gen(T + D + E)
    x, w = _exact_gate_inputs(T, D, E, g)
    bias = (torch.randint(-4, 5, (E,), generator=g) / 16).float() if routing == "learned" else None
    tid2eid = ids = None
    if routing == "hash":
        tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(300)])
        ids = torch.randint(0, 300, (T,), generator=g)
    ref_w, ref_i = moe_gate_reference(x, w, bias, tid2eid, ids, k, 1.5)
    dev = [t.cuda() if t is not None else None for t in (x, w, bias, tid2eid, ids)]
    out_w = torch.full((T, k), float("nan"), device="cuda")
    out_i = torch.full((T, k), -7, dtype=torch.int32, device="cuda")
    ops.moe_gate_out(*dev, k, 1.5, weights=out_w, indices=out_i)
    got_i, got_w = out_i.cpu(), out_w.cpu()
    same = (got_i == ref_i).all(1)
    if routing == "hash":
        assert same.all()
    else:
        # The logits are exact; scores may still differ by an ulp (exp/log1p of CPU vs GPU), so
        # a selection may differ only between keys within 1e-5 of each other.
        key = torch.nn.functional.softplus(x.float() @ w.float().T).sqrt() + bias
        assert same.float().mean() >= 0.99
        bad = ~same
        assert ((key[bad].gather(1, got_i[bad].long().clamp_min(0)) -
                 key[bad].gather(1, ref_i[bad].long())).abs() <= 1e-5).all()
    torch.testing.assert_close(got_w[same], ref_w[same], atol=0, rtol=2e-6)
    # bit-identical run to run
    w2, i2 = ops.moe_gate(*dev, k, 1.5)
    assert torch.equal(w2, out_w) and torch.equal(i2, out_i)


@cuda
@pytest.mark.parametrize("T,D,E,k", [(1, 4096, 256, 6), (100, 4096, 256, 6), (4096, 4096, 256, 6),
                                     (33, 7168, 384, 6)])
def test_gate_kernel_random_inputs_tolerance(T, D, E, k):
    """Random bf16 x/W: logits differ from the fp32 reference by summation order only; the
    selection may differ only at near-ties of the reference keys, and the weights of tokens
    with the same selection agree to fp32 rounding."""
    g = _gen(11)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, D, generator=g) * D ** -0.5).to(torch.bfloat16)
    bias = torch.randn(E, generator=g) * 0.05
    ref_w, ref_i = moe_gate_reference(x, w, bias, None, None, k, 1.5)
    got_w, got_i = ops.moe_gate(x.cuda(), w.cuda(), bias.cuda(), None, None, k, 1.5)
    got_w, got_i = got_w.cpu(), got_i.cpu()
    key = torch.nn.functional.softplus(x.double() @ w.double().T).sqrt() + bias.double()
    kth = key.gather(1, ref_i.long())[:, -1]
    chosen = key.gather(1, got_i.long())
    assert (chosen >= kth[:, None] - 1e-5).all()          # never a clearly worse expert
    same = (got_i == ref_i).all(1)
    assert same.float().mean() > 0.99
    torch.testing.assert_close(got_w[same], ref_w[same], atol=0, rtol=1e-5)


@cuda
def test_gate_kernel_out_of_range_ids_are_not_read():
    """The model checks ids before the step; the kernel itself never reads tid2eid out of
    bounds: such a token (and a table entry outside [0, E)) gets index -1, weight 0."""
    E, k, D = 16, 4, 32
    tid2eid = torch.stack([torch.arange(k), torch.tensor([1, 99, 2, -3])]).cuda()
    x = torch.randn(4, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([0, 2, -1, 1], device="cuda")
    out_w, out_i = ops.moe_gate(x, w, None, tid2eid, ids, k, 1.0)
    out_i = out_i.cpu()
    assert out_i[0].tolist() == [0, 1, 2, 3] and out_i[1].tolist() == [-1] * 4
    assert out_i[2].tolist() == [-1] * 4 and out_i[3].tolist() == [1, -1, 2, -1]
    assert torch.equal(out_w[1:3].cpu(), torch.zeros(2, k))
    assert out_w[3, 1] == 0 and out_w[3, 3] == 0
    torch.testing.assert_close(out_w[3, 0] + out_w[3, 2], torch.tensor(1.0, device="cuda"))


@cuda
@pytest.mark.parametrize("kind", ["random", "skewed", "invalid"])
@pytest.mark.parametrize("T,k,E", [(0, 6, 8), (1, 6, 256), (170, 6, 256), (171, 6, 256),
                                   (4096, 6, 256), (20000, 6, 384), (3000, 16, 1023),
                                   (700, 1, 1), (1025, 1, 64)])
def test_dispatch_kernel_equals_reference(T, k, E, kind):
    if kind == "random" and k > E:
        pytest.skip("random distinct experts need k <= E")
    idx, w = _routing(T, k, E, _gen(T + k + E), kind)
    ref = moe_dispatch_reference(idx, w, E)
    P = T * k
    i32 = dict(dtype=torch.int32, device="cuda")
    outs = (torch.full((P,), -5, **i32), torch.full((E + 1,), -5, **i32),
            torch.full((P,), float("nan"), device="cuda"), torch.full((T, k), -5, **i32))
    ops.moe_dispatch_out(idx.cuda(), w.cuda(), E, row_ids=outs[0], expert_offsets=outs[1],
                         route_weight=outs[2], pair_pos=outs[3])
    for a, b in zip(outs, ref):
        assert torch.equal(a.cpu(), b)
    again = ops.moe_dispatch(idx.cuda(), w.cuda(), E)
    for a, b in zip(again, outs):
        assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("T,k,D", [(1, 6, 4096), (5, 2, 40), (300, 6, 4096), (64, 16, 136),
                                   (7, 3, 13)])
@pytest.mark.parametrize("with_shared", [True, False])
def test_combine_kernel_bit_identical_to_reference(T, k, D, with_shared):
    g = _gen(T * k + D)
    E = 32
    idx, w = _routing(T, k, E, g, "invalid")
    pos = moe_dispatch_reference(idx, w, E)[3]
    y_pair = (torch.randn(T * k, D, generator=g) * 10).to(torch.bfloat16)
    shared = torch.randn(T, D, generator=g).to(torch.bfloat16) if with_shared else None
    ref = moe_combine_reference(y_pair, pos, shared)
    y = torch.full((T, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.moe_combine_out(y_pair.cuda(), pos.cuda(), shared.cuda() if with_shared else None, y=y)
    assert torch.equal(y.cpu(), ref)
    y2 = ops.moe_combine(y_pair.cuda(), pos.cuda(), shared.cuda() if with_shared else None)
    assert torch.equal(y2, y)


@cuda
def test_combine_kernel_strided_inputs():
    g = _gen(5)
    T, k, D = 9, 4, 64
    pos = moe_dispatch_reference(*_routing(T, k, 8, g), 8)[3]
    big = torch.randn(T * k, 2 * D, generator=g).to(torch.bfloat16)
    y_pair = big[:, D:]                                  # row stride 2D
    shared = torch.randn(T, 3 * D, generator=g).to(torch.bfloat16)[:, 8:8 + D]
    ref = moe_combine_reference(y_pair, pos, shared)
    got = ops.moe_combine(big.cuda()[:, D:], pos.cuda(), shared.cuda())
    assert torch.equal(got.cpu(), ref)
