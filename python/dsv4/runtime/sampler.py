"""Sampling on the device for a step's rows, each with its own parameters and generator.

One formula: a sampled row (temperature > 0) is drawn by :func:`dsv4.generate.sample` (the
official Gumbel-max sampler with temperature, then top-k / top-p filtering; architecture.md
§13.1) with the request's own ``torch.Generator`` (seeded per request), so its tokens do not
depend on the other rows of the batch. Greedy rows are ``sample``'s temperature-0 case, the
argmax, taken for all rows at once. No host synchronisation, greedy or sampled (``sample``'s
finiteness check, a host sync, is skipped: the flags returned here carry it to the engine, which
fails a request whose logits are not finite): the tokens stay on the device until the engine
reads them (with the flags, in one copy), and the next step can take them from there.

The draw is split in two so that a CUDA graph can hold its first part:
:func:`sample_greedy` (argmax and finiteness of every row, fixed shapes, no generator) is
captured in the decode graph (:class:`~dsv4.runtime.runner.ModelRunner`);
:func:`sample_seeded` then redraws the rows with a temperature, outside the graph, with their
requests' generators. :func:`sample_rows` is the two in a row (eager steps).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..generate import sample
from .request import Request

__all__ = ["sample_greedy", "sample_rows", "sample_seeded"]


def sample_greedy(logits: torch.Tensor, out: torch.Tensor) -> None:
    """Every row's greedy id and finiteness flag, into ``out``.

    Args:
        logits: float32 [L, vocab].
        out: int64 [2, >= L] on ``logits.device``; column i gets row i's argmax (row 0) and
            ``1`` when row i's logits are all finite, else ``0`` (row 1). Columns from L on
            are left as they are.
    """
    L = logits.shape[0]
    torch.argmax(logits, dim=-1, out=out[0, :L])   # sample()'s temperature-0 case
    out[1, :L].copy_(torch.isfinite(logits).all(dim=-1))


def sample_seeded(logits: torch.Tensor, requests: Sequence[Request], out: torch.Tensor) -> None:
    """Redraw the rows whose request has a temperature (``requests[i]`` owns row i) with
    :func:`dsv4.generate.sample` and the request's generator, into ``out[0, i]``; greedy
    rows are left as :func:`sample_greedy` wrote them. One ``sample`` call per such row, none
    for a greedy batch."""
    for i, r in enumerate(requests):
        if not r.params.greedy:
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
