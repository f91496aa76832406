"""Sampling on the device for a step's rows, each with its own parameters and generator.

One formula: a sampled row (temperature > 0) is drawn by :func:`dsv4.generate.sample` (the
official Gumbel-max sampler with temperature, then top-k / top-p filtering; architecture.md
§13.1) with the request's own ``torch.Generator`` (seeded per request), so its tokens do not
depend on the other rows of the batch. Greedy rows are ``sample``'s temperature-0 case, the
argmax, taken for all rows at once. No host synchronisation, greedy or sampled (``sample``'s
finiteness check, a host sync, is skipped: the flags returned here carry it to the engine, which
fails a request whose logits are not finite): the tokens stay on the device until the engine
reads them (with the flags, in one copy), and the next step can take them from there.

The draw is split so that a CUDA graph can hold it (:class:`~dsv4.runtime.runner.ModelRunner`):
:func:`sample_greedy` (argmax and finiteness of every row, fixed shapes, no generator) is
captured in every decode graph; :func:`sample_temperature` (the official sampler: temperature
only, no top-k / top-p, :func:`draws_in_graph`) is captured in a bucket's sampling graph, each
row drawing with a generator of its own that the runner sets to the request's state before the
replay and copies back after it, the temperature a graph input; :func:`sample_seeded` draws the
other sampled rows (top-k / top-p) outside the graph with their requests' generators.
:func:`sample_rows` is greedy + seeded (eager steps). Every draw is :func:`dsv4.generate.sample`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from ..generate import sample
from ..ops.backend import env_choice, use_kernels
from ..ops.sampling import argmax_finite
from .request import Request

__all__ = ["argmax_rows", "rows_finite", "draws_in_graph", "sample_greedy", "sample_rows",
           "sample_seeded", "sample_temperature"]

#: Rows at least this long take the two-stage reductions (:func:`argmax_rows`).
TWO_STAGE_MIN_LEN = 16384


def _two_stage_enabled() -> bool:
    """Whether the two-stage reductions are on: unset, empty or ``DSV4_SAMPLER_TWO_STAGE=1`` is
    on (the default since its GPU run: 2.2-2.4x torch's one-pass argmax of one or 8 rows of
    129,280 logits, 1.2x at 64 rows; H100, bench/README.md), ``0`` is off (every row takes
    ``torch.argmax``); any other value (``yes``, ``off``, ...) keeps the default, with a
    warning naming the accepted values (:func:`dsv4.ops.backend.env_choice`, the parser of
    every Python-side switch), so that a mistyped switch does not pass unnoticed."""
    return env_choice("DSV4_SAMPLER_TWO_STAGE", ("", "0", "1")) != "0"


@functools.lru_cache(maxsize=None)
def two_stage_chunk(n: int) -> int:
    """Chunk length of the two-stage row reductions for rows of ``n`` elements: the divisor of
    ``n`` that is a multiple of 8 (32-byte aligned fp32 chunks) in [256, 8192] closest to
    1024 (129,280 -> 808, 160 chunks), or 0 when there is none, when ``n`` is below
    :data:`TWO_STAGE_MIN_LEN`, or when ``DSV4_SAMPLER_TWO_STAGE=0`` (read once per ``n``; see
    :func:`_two_stage_enabled`): then every row takes ``torch.argmax``."""
    if n < TWO_STAGE_MIN_LEN or not _two_stage_enabled():
        return 0
    divisors = [c for c in range(256, min(n, 8192) + 1, 8) if n % c == 0]
    return min(divisors, key=lambda c: (abs(c - 1024), c)) if divisors else 0


def argmax_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)`` for x [L, n], exactly (the first index of the row's maximum;
    a row holding NaN gives its first NaN, as torch's NaN-propagating max), into ``out`` int64
    [L] when given.

    A long row (the 129,280 logits) is reduced in two stages, because torch's reduction of one
    long row runs on few CTAs (37 µs for [1, 129280] on an H100): the max and its first index
    in each chunk of :func:`two_stage_chunk` elements (L · n / chunk outputs), then the first
    chunk holding the row's maximum (its first NaN) and that chunk's index. The first maximum
    of the row lies in the first chunk that holds the maximum, at that chunk's first
    maximum, so both stages keeping the first index reproduce torch's tie rule; torch.max(dim)
    and torch.argmax break ties and order NaN the same way (ATen's GreaterOrNan comparator).
    Plain torch ops, no host synchronisation (CUDA-graph safe). Shorter rows, rows of no
    suitable length and non-contiguous x take ``torch.argmax``.
    """
    L, n = x.shape
    c = two_stage_chunk(n) if x.is_contiguous() else 0
    if c == 0:
        return torch.argmax(x, dim=-1, out=out) if out is not None else torch.argmax(x, dim=-1)
    vals, idx = x.view(L, n // c, c).max(dim=-1)        # [L, chunks]: first max per chunk
    j = vals.argmax(dim=-1, keepdim=True)               # [L, 1]: first chunk with the max
    first = idx.gather(-1, j)                           # index inside that chunk
    if out is None:
        return torch.add(first, j, alpha=c).squeeze(-1)
    return torch.add(first.squeeze(-1), j.squeeze(-1), alpha=c, out=out)


def rows_finite(x: torch.Tensor) -> torch.Tensor:
    """bool [L]: ``torch.isfinite(x).all(dim=-1)`` for float x [L, n], exactly, with the
    all-reduction of a long row in the two stages of :func:`argmax_rows` (per chunk, then over
    the chunks). Finiteness as ``|x| < inf`` (False for NaN and +-inf): two elementwise
    launches, where ``torch.isfinite`` of a float tensor runs four (``(x == x) * (|x| !=
    inf)``)."""
    L, n = x.shape
    c = two_stage_chunk(n) if x.is_contiguous() else 0
    fin = x.abs() < float("inf")
    if c == 0:
        return fin.all(dim=-1)
    return fin.view(L, n // c, c).all(dim=-1).all(dim=-1)


def sample_greedy(logits: torch.Tensor, out: torch.Tensor) -> None:
    """Every row's greedy id and finiteness flag, into ``out``: on the cuda backend (float32
    logits) ``torch.ops.dsv4.argmax_finite`` (one kernel, then a copy into ``out``), else
    :func:`argmax_rows` and :func:`rows_finite` (the same values).

    Args:
        logits: float32 [L, vocab].
        out: int64 [2, >= L] on ``logits.device``; column i gets row i's argmax (row 0) and
            ``1`` when row i's logits are all finite, else ``0`` (row 1). Columns from L on
            are left as they are.
    """
    L = logits.shape[0]
    if L and logits.dtype == torch.float32 and use_kernels(logits, ("argmax_finite",),
                                                            dtypes=(torch.float32,)):
        # the op's kernel and a copy into out: the same values (torch.argmax's order,
        # torch.isfinite(...).all)
        out[:, :L].copy_(argmax_finite(logits))
        return
    argmax_rows(logits, out=out[0, :L])   # sample()'s temperature-0 case, torch.argmax exactly
    out[1, :L].copy_(rows_finite(logits))


def draws_in_graph(params) -> bool:
    """A request whose draw a sampling graph holds: a temperature and neither top-k nor top-p
    (the official sampler, architecture.md §13.1)."""
    return not params.greedy and params.top_k == 0 and params.top_p >= 1.0


def sample_temperature(logits: torch.Tensor, temperature: torch.Tensor, inverse: torch.Tensor,
                       rows: torch.Tensor, generators: Sequence[torch.Generator],
                       out: torch.Tensor) -> None:
    """The official sampler for the rows flagged in ``rows``, into ``out[0, i]``, with
    per-row temperatures as tensors (a CUDA graph's inputs): row i is
    ``sample(logits[i] / T_i, 1.0, generator=generators[i])``, which is exactly
    ``sample(logits[i], T_i, generator=...)``: ``sample`` divides by a Python float, which
    CUDA computes as a multiplication by its float32 reciprocal and the CPU as a division, so
    the logits are scaled here the same way (then ``sample``'s own division by 1.0 is exact).

    Args:
        logits: float32 [L, vocab].
        temperature, inverse: float32 [>= L]: ``max(T, 1e-5)`` rounded to float32, and
            ``1 / that`` in float32 (padding / other rows: any finite value).
        rows: int32 [>= L], non-zero where the row draws here; other columns keep ``out``.
        generators: at least L generators on ``logits.device`` (row i draws with the i-th).
        out: int64 [2, >= L].
    """
    L = logits.shape[0]
    if logits.is_cuda:
        z = logits * inverse[:L, None]
    else:
        z = logits / temperature[:L, None]
    drawn = torch.cat([sample(z[i:i + 1], 1.0, 1.0, 0, generators[i], check_finite=False)
                       for i in range(L)])
    out[0, :L].copy_(torch.where(rows[:L] != 0, drawn, out[0, :L]))


def sample_seeded(logits: torch.Tensor, requests: Sequence[Request], out: torch.Tensor,
                  skip_in_graph: bool = False) -> None:
    """Redraw the rows whose request has a temperature (``requests[i]`` owns row i) with
    :func:`dsv4.generate.sample` and the request's generator, into ``out[0, i]``; greedy
    rows are left as :func:`sample_greedy` wrote them, and with ``skip_in_graph`` the rows
    :func:`draws_in_graph` (a sampling graph drew them). One ``sample`` call per such row,
    none for a greedy batch."""
    for i, r in enumerate(requests):
        if not r.params.greedy and not (skip_in_graph and draws_in_graph(r.params)):
            p = r.params
            out[0, i:i + 1] = sample(logits[i:i + 1], p.temperature, p.top_p, p.top_k,
                                     r.generator, check_finite=False)


def sample_rows(logits: torch.Tensor, requests: Sequence[Request],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids and finiteness flags for ``logits`` [L, vocab] float32 (row i belongs to
    ``requests[i]``): :func:`sample_greedy`, then :func:`sample_seeded`.

    Returns int64 [2, L] on the device (a view of ``out`` [2, >= L] when given): row 0 the
    sampled ids, row 1 ``1`` where the row's logits are all finite (the engine fails a
    request whose logits are not, instead of sampling from NaN).
    """
    L = logits.shape[0]
    if out is None:
        out = torch.empty(2, L, dtype=torch.long, device=logits.device)
    sample_greedy(logits, out)
    sample_seeded(logits, requests, out)
    return out[:, :L]
