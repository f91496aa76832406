"""The compressor's maths against hand-computed vectors and a direct formula (issue 13 item 7).

``dsv4.ops.compressor.compress_kv_reference`` is the one copy of the compressor algorithm; the
other tests compare the CUDA kernel and the model layer with it. Here it meets expected values
that come from architecture.md §4 alone, written out below (no dsv4 code computes them):

* hand-computed entries (non-overlapping m = 2; overlapping m = 4, whose second entry pools the
  A halves of the previous block): values in the comments;
* a direct per-entry, per-channel formula in float64 (:func:`_direct`), fed in one call and in
  odd chunks, with ``ape``, for m = 4, 16 and 128 and several rows at different positions;
* the quantisation modes: which dims, which blocks, which transform, with an independent FP8
  e4m3 / Hadamard / FP4 e2m1 written here.
"""

from __future__ import annotations

import math

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
from dsv4.ops.compressor import (QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE,
                                 compress_kv_reference)

LN3 = math.log(3.0)


def _state(B, m, w, capacity, d, dtype=torch.float32):
    coff = 2 if m == 4 else 1
    return (torch.zeros(B, coff * m, w), torch.full((B, coff * m, w), float("-inf")),
            torch.zeros(B, capacity, d, dtype=dtype))


def _run(kv, score, ape, freqs, m, d, calls, norm_weight=None, eps=0.0, quant=QUANT_NONE,
         B=1, capacity=8, starts0=None):
    """Feed row b the tokens of ``calls`` (a list of per-call [n_b]) and return the entries."""
    w = kv[0].shape[-1]
    state_kv, state_score, entries = _state(B, m, w, capacity, d)
    nw = torch.ones(d) if norm_weight is None else norm_weight
    done = list(starts0 or [0] * B)
    taken = [0] * B
    for call in calls:
        cu, parts_kv, parts_sc = [0], [], []
        for b, n in enumerate(call):
            parts_kv.append(kv[b][taken[b]:taken[b] + n])
            parts_sc.append(score[b][taken[b]:taken[b] + n])
            cu.append(cu[-1] + n)
        compress_kv_reference(torch.cat(parts_kv), torch.cat(parts_sc), ape, nw, freqs,
                              torch.tensor(cu, dtype=torch.int32),
                              torch.tensor(done, dtype=torch.int32), state_kv, state_score,
                              entries, m, max(call), eps, quant)
        done = [s + n for s, n in zip(done, call)]
        taken = [t + n for t, n in zip(taken, call)]
    return entries


# ------------------------------------------------------------------------------ by hand
def test_hand_computed_non_overlapping_entries():
    """m = 2, d = 4, RoPE on the last 2 dims with f = pi/4, norm weight 1, eps 0.

    Tokens 0, 1 (and again 2, 3): kv = [1, 2, 3, 4] and [3, 0, 1, 0]; scores 0 except
    score[0, 1] = ln 3 and score[1, 2] = ln 3; ape[0, 3] = ln 3 (slot 0 of every block).
    Per-channel softmax over the 2 slots: channel 0 (1/2, 1/2) -> 2; channel 1 (3/4, 1/4) ->
    1.5; channel 2 (1/4, 3/4) -> 1.5; channel 3, through ape, (3/4, 1/4) -> 3.
    pooled = [2, 1.5, 1.5, 3], rms = sqrt(17.5 / 4); entry 0 at position 0 (no rotation):
    [0.956183, 0.717137, 0.717137, 1.434274]. Entry 1 is rotated at its block's first position
    2: angle pi/2 maps the pair (1.5, 3)/rms to (-3, 1.5)/rms.
    """
    kv_blk = torch.tensor([[1.0, 2, 3, 4], [3, 0, 1, 0]])
    sc_blk = torch.tensor([[0.0, LN3, 0, 0], [0, 0, LN3, 0]])
    ape = torch.zeros(2, 4)
    ape[0, 3] = LN3
    freqs = torch.tensor([math.pi / 4])
    kv, score = kv_blk.repeat(2, 1), sc_blk.repeat(2, 1)
    want = torch.tensor([[0.9561828874675149, 0.7171371656006361, 0.7171371656006361,
                          1.4342743312012722],
                         [0.9561828874675149, 0.7171371656006361, -1.4342743312012722,
                          0.7171371656006361]])
    for calls in ([[4]], [[1]] * 4, [[3], [1]]):
        e = _run([kv], [score], ape, freqs, m=2, d=4, calls=calls)
        torch.testing.assert_close(e[0, :2], want, atol=1e-6, rtol=0)
        assert not e[0, 2:].any()                       # no third block yet


def test_hand_computed_overlapping_entries_use_the_previous_block():
    """m = 4 (CSA / indexer), d = 4: each token has an A half (first 4 features, for the next
    entry) and a B half (last 4, for its own entry). Token t: A = [t, 0, 0, 1], B = [0, t, 1, 0];
    scores and ape 0, so every weight is uniform over the slots that exist.

    Entry 0: the previous block does not exist (weight 0): mean of B_0..B_3 = [0, 1.5, 1, 0];
    / rms sqrt(0.8125) = [0, 1.664101, 1.109400, 0]; position 0.
    Entry 1: 8 slots, A_0..A_3 of the previous block and B_4..B_7:
    ([6, 0, 0, 4] + [0, 22, 4, 0]) / 8 = [0.75, 2.75, 0.5, 0.5]; / rms sqrt(2.15625) =
    [0.510754, 1.872764, 0.340503, 0.340503]; rotated at position 4 with f = pi/8 (angle pi/2):
    the pair (0.340503, 0.340503) -> (-0.340503, 0.340503).
    """
    t = torch.arange(8.0)
    z, o = torch.zeros(8), torch.ones(8)
    kv = torch.stack([t, z, z, o, z, t, o, z], dim=1)            # [A | B] per token
    score = torch.zeros(8, 8)
    freqs = torch.tensor([math.pi / 8])
    want = torch.tensor([[0.0, 1.6641005886756874, 1.1094003924504583, 0.0],
                         [0.5107539184552492, 1.872764367669247, -0.34050261230349943,
                          0.34050261230349943]])
    for calls in ([[8]], [[1]] * 8, [[5], [2], [1]], [[3], [5]]):
        e = _run([kv], [score], torch.zeros(4, 8), freqs, m=4, d=4, calls=calls)
        torch.testing.assert_close(e[0, :2], want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ direct formula
def _rope(v: list[float], pos: int, freqs: list[float]) -> list[float]:
    """Rotate the last 2*len(freqs) dims in interleaved pairs by pos * f_i (§3.4)."""
    rd = 2 * len(freqs)
    out = list(v)
    base = len(v) - rd
    for i, f in enumerate(freqs):
        a, b = v[base + 2 * i], v[base + 2 * i + 1]
        c, s = math.cos(pos * f), math.sin(pos * f)
        out[base + 2 * i], out[base + 2 * i + 1] = a * c - b * s, a * s + b * c
    return out


def _direct(kv, score, ape, norm_weight, freqs, m, d, eps, start=0):
    """Every complete entry of a sequence whose tokens start at position ``start`` (§4.2-4.4):
    entry j pools tokens jm .. jm+m-1 (and, for m = 4, the A halves of block j-1); per
    channel c a softmax over the slots of score + ape[position % m]; RMSNorm with weight;
    RoPE at position jm. Positions before ``start`` are not given: only entries whose every
    slot is given are returned (as {j: vector})."""
    kv, score, ape = kv.double().tolist(), score.double().tolist(), ape.double().tolist()
    nw, fr = norm_weight.double().tolist(), freqs.double().tolist()
    overlap = m == 4
    n = len(kv)
    out = {}
    for j in range((start + n) // m):
        first = j * m - (m if overlap and j > 0 else 0)
        if first < start:
            continue
        pooled = []
        for c in range(d):
            slots = []            # (score, value) of channel c
            if overlap and j > 0:
                for p in range((j - 1) * m, j * m):
                    slots.append((score[p - start][c] + ape[p % m][c], kv[p - start][c]))
            for p in range(j * m, j * m + m):
                cc = c + d if overlap else c
                slots.append((score[p - start][cc] + ape[p % m][cc], kv[p - start][cc]))
            top = max(s for s, _ in slots)
            wts = [math.exp(s - top) for s, _ in slots]
            pooled.append(sum(wt * v for wt, (_, v) in zip(wts, slots)) / sum(wts))
        rms = math.sqrt(sum(x * x for x in pooled) / d + eps)
        normed = [x / rms * w for x, w in zip(pooled, nw)]
        out[j] = torch.tensor(_rope(normed, j * m, fr), dtype=torch.float64)
    return out


def _problem(m, d, n, seed, rd=4):
    g = torch.Generator().manual_seed(seed)
    w = (2 if m == 4 else 1) * d
    return dict(kv=torch.randn(n, w, generator=g), score=torch.randn(n, w, generator=g) * 2,
                ape=torch.randn(m, w, generator=g), norm_weight=torch.rand(d, generator=g) + 0.5,
                freqs=torch.rand(rd // 2, generator=g) * 0.7 + 0.05)


@pytest.mark.parametrize("m", [4, 16, 128])
def test_direct_formula_one_call_and_chunked(m):
    d, n, eps = 8, 2 * m + 7, 1e-6
    p = _problem(m, d, n, seed=m)
    want = _direct(p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], m, d, eps)
    assert len(want) == n // m
    chunks = [[1], [m + 1], [2], [m - 3], [6]] if m > 4 else [[1], [5], [2], [1], [6]]
    rest = n - sum(c[0] for c in chunks)
    assert rest >= 0
    if rest:
        chunks.append([rest])
    for calls in ([[n]], chunks):
        e = _run([p["kv"]], [p["score"]], p["ape"], p["freqs"], m, d, calls,
                 norm_weight=p["norm_weight"], eps=eps, capacity=4)
        for j, v in want.items():
            torch.testing.assert_close(e[0, j].double(), v, atol=2e-6, rtol=1e-5)
        assert not e[0, len(want):].any()


def test_direct_formula_several_rows_at_other_positions():
    """Rows continue sequences that started earlier (their state holds nothing yet, as after
    tokens that were never fed): only entries whose slots are all given are checked; each row
    follows its own positions (ape index p % m, RoPE at jm)."""
    m, d, eps = 4, 8, 1e-6
    starts = [0, 8, 12]
    lens = [21, 13, 9]
    ps = [_problem(m, d, n, seed=40 + b) for b, n in enumerate(lens)]
    shared = ps[0]
    calls = [[5, 3, 1], [7, 4, 8], [9, 6, 0]]
    e = _run([p["kv"] for p in ps], [p["score"] for p in ps], shared["ape"], shared["freqs"],
             m, d, calls, norm_weight=shared["norm_weight"], eps=eps, B=3, capacity=8,
             starts0=starts)
    for b in range(3):
        want = _direct(ps[b]["kv"], ps[b]["score"], shared["ape"], shared["norm_weight"],
                       shared["freqs"], m, d, eps, start=starts[b])
        assert want, b
        for j, v in want.items():
            torch.testing.assert_close(e[b, j].double(), v, atol=2e-6, rtol=1e-5)


def test_ape_and_rope_position_matter():
    """Guards of the formula test: dropping ape, or rotating at the block's last position
    instead of its first, changes the entries by far more than the tolerance."""
    m, d = 16, 8
    p = _problem(m, d, 40, seed=3)
    got = _run([p["kv"]], [p["score"]], p["ape"], p["freqs"], m, d, [[40]],
               norm_weight=p["norm_weight"], eps=1e-6)
    no_ape = _direct(p["kv"], p["score"], torch.zeros_like(p["ape"]), p["norm_weight"],
                     p["freqs"], m, d, 1e-6)
    assert (got[0, 1].double() - no_ape[1]).abs().max() > 1e-2
    right = _direct(p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], m, d, 1e-6)
    late = _rope(_rope(right[1].tolist(), -m, p["freqs"].double().tolist()), 2 * m - 1,
                 p["freqs"].double().tolist())
    assert (got[0, 1].double() - torch.tensor(late, dtype=torch.float64)).abs().max() > 1e-2


# ------------------------------------------------------------------------------ quant modes
def _e4m3(x: float) -> float:
    """Nearest e4m3 value (ties to even mantissa), |x| <= 448, written from the format: 4
    exponent bits (bias 7, subnormals below 2^-6 in steps of 2^-9), 3 mantissa bits."""
    a = abs(x)
    if a == 0:
        return 0.0
    e = max(math.floor(math.log2(a)), -6)
    step = 2.0 ** (e - 3)
    q = a / step
    r = math.floor(q)
    if q - r > 0.5 or (q - r == 0.5 and r % 2 == 1):
        r += 1
    return math.copysign(min(r * step, 448.0), x)


def _fp8_block(v: list[float]) -> list[float]:
    amax = max(max(abs(x) for x in v), 1e-4)
    s = 2.0 ** math.ceil(math.log2(amax / 448.0))
    return [_e4m3(x / s) * s for x in v]


_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e2m1(x: float) -> float:
    """Nearest e2m1 value, ties to the even code (codes 0..7 in the order of _E2M1)."""
    a = min(abs(x), 6.0)
    best = min(range(8), key=lambda k: (abs(_E2M1[k] - a), k % 2))
    return math.copysign(_E2M1[best], x)


def _fp4_block(v: list[float]) -> list[float]:
    amax = max(max(abs(x) for x in v), 6.0 * 2.0 ** -126)
    s = 2.0 ** math.ceil(math.log2(amax / 6.0))
    return [_e2m1(x / s) * s for x in v]


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def test_fp8_mode_quantises_the_non_rope_dims_per_block_of_64():
    """quant=1: e4m3 round trip of dims [0, d - rope_dim) in blocks of 64 with power-of-two
    scales (amax / 448); the rope dims are untouched. Block 0 is ~100x block 1 (its own scale)."""
    m, d, rd = 16, 192, 64
    p = _problem(m, d, 2 * m, seed=5, rd=rd)
    p["kv"][:, :32] *= 1e5
    args = ([p["kv"]], [p["score"]], p["ape"], p["freqs"], m, d, [[2 * m]])
    plain = _run(*args, norm_weight=p["norm_weight"], eps=1e-6)
    fp8 = _run(*args, norm_weight=p["norm_weight"], eps=1e-6, quant=QUANT_FP8)
    for j in range(2):
        v = plain[0, j].double().tolist()
        want = _fp8_block(v[:64]) + _fp8_block(v[64:128]) + v[128:]
        torch.testing.assert_close(fp8[0, j].double(), torch.tensor(want, dtype=torch.float64),
                                   atol=0, rtol=1e-6)
        assert not torch.equal(fp8[0, j], plain[0, j])


def test_fp4_mode_is_hadamard_then_e2m1_per_block_of_32():
    """quant=2 (indexer keys): normalised Sylvester Hadamard over all d dims, then e2m1 round
    trip in blocks of 32 with power-of-two scales (amax / 6)."""
    m, d = 4, 64
    p = _problem(m, d, 12, seed=9, rd=16)
    args = ([p["kv"]], [p["score"]], p["ape"], p["freqs"], m, d, [[12]])
    plain = _run(*args, norm_weight=p["norm_weight"], eps=1e-6)
    fp4 = _run(*args, norm_weight=p["norm_weight"], eps=1e-6, quant=QUANT_FP4_HADAMARD)
    h = _sylvester(d)
    for j in range(3):
        r = (h @ plain[0, j].double()).tolist()
        want = _fp4_block(r[:32]) + _fp4_block(r[32:])
        torch.testing.assert_close(fp4[0, j].double(), torch.tensor(want, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-5)


def test_independent_quantisers_are_the_formats():
    """The helpers above against torch's own float8 cast (e4m3) and the OCP e2m1 table."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2000, generator=g) * 100).clamp(-448, 448)
    mine = torch.tensor([_e4m3(v) for v in x.tolist()])
    torch.testing.assert_close(mine.float(), x.to(torch.float8_e4m3fn).float(), atol=0, rtol=0)
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 7.0]
    assert [_e2m1(v) for v in ties] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 6.0]
