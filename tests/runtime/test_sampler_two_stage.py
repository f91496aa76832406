"""The sampler's two-stage argmax / finiteness of long rows (dsv4.runtime.sampler.argmax_rows,
rows_finite) against torch.argmax / torch.isfinite(...).all(-1), on rows built to break a
wrong tie or NaN rule: the maximum repeated inside one chunk and across chunks (at chunk
edges), +inf ties, NaN before / after / among the maximum and in several chunks, all -inf,
all NaN, signed zeros; the V4 vocabulary (129,280 = 160 chunks of 808) and other lengths.
CPU always; the same on CUDA (torch's CUDA reductions are what the engine runs)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dsv4.runtime import sampler
from dsv4.runtime.sampler import argmax_rows, rows_finite, sample_greedy, two_stage_chunk

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _two_stage_on(monkeypatch):
    """The two-stage path is the default (DSV4_SAMPLER_TWO_STAGE=0 turns it off): every test here
    sets it on explicitly."""
    monkeypatch.setenv("DSV4_SAMPLER_TWO_STAGE", "1")
    two_stage_chunk.cache_clear()
    yield
    two_stage_chunk.cache_clear()


def _rows(n: int, seed: int) -> torch.Tensor:
    """[R, n] fp32 rows, each a corner case of the tie / NaN rule (chunk c = two_stage_chunk)."""
    g = torch.Generator().manual_seed(seed)
    c = two_stage_chunk(n) or n // 10
    base = torch.randn(20, n, generator=g) * 4
    r = base.clone()
    top = 50.0
    r[0, [c + 3, c + 7]] = top                        # tie inside one chunk
    r[1, [c - 1, c]] = top                            # tie across a chunk edge
    r[2, [5, n - 1]] = top                            # first and last chunk
    r[3, [2 * c + 1, 9]] = INF                        # +inf tie, the later chunk listed first
    r[4, [3 * c + 2]] = NAN                           # NaN beside a larger value
    r[4, [3 * c + 1]] = top
    r[5, [n - 1, 4 * c]] = NAN                        # NaNs in two chunks
    r[5, [1]] = INF
    r[6, [c + 2, c + 1]] = NAN                        # two NaNs in one chunk
    r[7] = -INF                                       # nothing finite
    r[8] = NAN
    r[9] = 0.0
    r[9, [c + 4, 3]] = -0.0                           # signed zeros compare equal
    r[10] = top                                       # every element the maximum
    r[11, :: max(c // 3, 1)] = top                    # many ties, several per chunk
    r[12, [n - 1]] = top                              # only the last element
    r[13, [0]] = NAN                                  # NaN first
    r[14, [c]] = -INF                                 # -inf (row not finite, argmax elsewhere)
    r[15, [7 * c + 5]] = INF
    r[15, [7 * c + 4]] = -INF
    r[16] = r[16].to(torch.bfloat16).float()          # many exact ties of rounded values
    r[17, [c - 1]] = top                              # the last element of the first chunk
    r[17, [c - 2]] = top - 1e-5
    return r


def _check(x: torch.Tensor) -> None:
    want = torch.argmax(x, dim=-1)
    assert torch.equal(argmax_rows(x), want)
    out = torch.full((2, x.shape[0] + 3), -7, dtype=torch.long, device=x.device)
    argmax_rows(x, out=out[0, :x.shape[0]])
    assert torch.equal(out[0, :x.shape[0]], want) and bool((out[0, x.shape[0]:] == -7).all())
    assert torch.equal(rows_finite(x), torch.isfinite(x).all(dim=-1))
    out.fill_(-7)
    sample_greedy(x, out)
    assert torch.equal(out[0, :x.shape[0]], want)
    assert torch.equal(out[1, :x.shape[0]], torch.isfinite(x).all(dim=-1).long())
    assert bool((out[:, x.shape[0]:] == -7).all())


def test_chunk_choice():
    assert two_stage_chunk(129280) == 808 and 129280 % 808 == 0
    assert two_stage_chunk(102400) == 1024
    assert two_stage_chunk(50257) == 0                # no divisor: torch.argmax
    assert two_stage_chunk(4096) == 0                 # short row: torch.argmax


@pytest.mark.parametrize("n", [129280, 102400, 50257, 4096])
def test_two_stage_equals_torch_argmax_cpu(n):
    x = _rows(n, seed=n)
    assert two_stage_chunk(n) == 0 or x.is_contiguous()
    _check(x)
    for L in (1, 3):                                  # one row and a few rows at a time
        for i in range(0, x.shape[0], L):
            _check(x[i:i + L].contiguous())
    _check(x[:, ::2].contiguous()[:, : n // 2])        # another length (a copy)
    _check(x.t().contiguous().t())                    # non-contiguous: torch.argmax


@pytest.mark.parametrize("value,chunk", [(None, 808), ("1", 808), ("0", 0)])
def test_env_switch(monkeypatch, value, chunk):
    """Unset (the default) or 1: two stages for the vocabulary's rows; 0: torch.argmax for every
    row. The same results either way."""
    if value is None:
        monkeypatch.delenv("DSV4_SAMPLER_TWO_STAGE")
    else:
        monkeypatch.setenv("DSV4_SAMPLER_TWO_STAGE", value)
    two_stage_chunk.cache_clear()
    assert two_stage_chunk(129280) == chunk
    _check(_rows(129280, seed=1))
    two_stage_chunk.cache_clear()


@pytest.mark.cuda
@pytest.mark.parametrize("n", [129280, 102400])
def test_two_stage_equals_torch_argmax_cuda(n):
    x = _rows(n, seed=n).cuda()
    _check(x)
    for i in range(x.shape[0]):
        _check(x[i:i + 1].contiguous())
    big = torch.randn(64, n, generator=torch.Generator().manual_seed(3)).cuda()
    big[::3, 17] = big[::3].amax(-1) + 1
    big[1::3, n // 2] = big[1::3, 17] = big[1::3].amax(-1) + 2      # ties across the row
    _check(big)
    # CUDA-graph capture: no host sync, the same result on replay
    out = torch.zeros(2, x.shape[0], dtype=torch.long, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sample_greedy(x, out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample_greedy(x, out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], torch.argmax(x, dim=-1))


def test_an_unrecognised_value_warns_and_keeps_the_default(monkeypatch):
    """DSV4_SAMPLER_TWO_STAGE=yes is neither '0' nor '1': the default (on), with a warning naming
    what is accepted, instead of a silently misread switch."""
    monkeypatch.setenv("DSV4_SAMPLER_TWO_STAGE", "yes")
    two_stage_chunk.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"DSV4_SAMPLER_TWO_STAGE='yes' is not one of '0'"):
        assert two_stage_chunk(129280) == 808
    monkeypatch.setenv("DSV4_SAMPLER_TWO_STAGE", "0")
    two_stage_chunk.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert two_stage_chunk(129280) == 0
    two_stage_chunk.cache_clear()


def test_seeded_rows_apply_the_requests_top_p_and_top_k():
    """The engine's per-request draw passes each request's top_p / top_k to the sampler (the
    engine tests' near-flat logits let a dropped filter pass): logits 10 and 9.9 on two tokens
    draw both without a filter, only the first with top_p 0.5 or top_k 1."""
    from types import SimpleNamespace

    from dsv4.runtime import SamplingParams
    from dsv4.runtime.sampler import sample_seeded

    logits = torch.full((1, 16), -float("inf"))
    logits[0, 0], logits[0, 1] = 10.0, 9.9

    def draws(**kw):
        got = set()
        for seed in range(40):
            req = SimpleNamespace(params=SamplingParams(temperature=1.0, **kw),
                                  generator=torch.Generator().manual_seed(seed))
            out = torch.full((2, 1), -1, dtype=torch.long)
            sample_seeded(logits, [req], out)
            got.add(int(out[0, 0]))
        return got

    assert draws() == {0, 1}
    assert draws(top_p=0.5) == {0}
    assert draws(top_k=1) == {0}
