"""Sampling on the device for a step's rows, each with its own parameters and generator.

One formula: a sampled row (temperature > 0) is drawn by :func:`dsv4.generate.sample` (the
official Gumbel-max sampler with temperature, then top-k / top-p filtering; architecture.md
§13.1) with the request's own ``torch.Generator`` (seeded per request), so its tokens do not
depend on the other rows of the batch. Greedy rows are ``sample``'s temperature-0 case, the
argmax, taken for all rows at once. No host synchronisation, greedy or sampled (``sample``'s
finiteness check, a host sync, is skipped: the flags returned here carry it to the engine, which
fails a request whose logits are not finite): the tokens stay on the device until the engine
reads them (with the flags, in one copy), and the next step can take them from there.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..generate import sample
from .request import Request

__all__ = ["sample_rows"]


def sample_rows(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Token ids and finiteness flags for ``logits`` [L, vocab] float32 (row i belongs to
    ``requests[i]``).

    Returns int64 [2, L] on the device: row 0 the sampled ids, row 1 ``1`` where the row's
    logits are all finite (the engine fails a request whose logits are not, instead of
    sampling from NaN).
    """
    ids = logits.argmax(dim=-1)      # sample()'s temperature-0 case, every row at once
    for i, r in enumerate(requests):
        if not r.params.greedy:
            p = r.params
            ids[i:i + 1] = sample(logits[i:i + 1], p.temperature, p.top_p, p.top_k,
                                  r.generator, check_finite=False)
    finite = torch.isfinite(logits).all(dim=-1).long()
    return torch.stack([ids, finite])
