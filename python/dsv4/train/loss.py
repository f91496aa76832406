"""Training losses: the vocabulary projection fused with cross-entropy, and the model's training
forward (main next-token loss + MTP loss, architecture.md §10.3, training.md §4.1).

With the real 129,280-token vocabulary the fp32 logits of a step are the largest tensors of a
small model (0.5 GB per 1,000 tokens, plus as much again for their gradient). The loss therefore
never materialises them: :class:`LinearCrossEntropy` computes ``logits = h·Wᵀ`` chunk by chunk,
keeps only the log-sum-exp per token, and recomputes each chunk in the backward pass. The
maths is exactly that of ``Model``'s head (``head(norm(hc_head(x)).float())``, fp32 logits)
followed by ``F.cross_entropy``; a test checks that equality.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import check_count

__all__ = ["LinearCrossEntropy", "linear_cross_entropy", "head_features", "reference_backend",
           "model_losses"]

# Rows of the [chunk, vocab] fp32 logits block computed at once (64 rows × 129,280 = 33 MB).
CHUNK_ROWS = 64


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(h @ weight.T, target)``, chunked, fp32 (see module doc)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                chunk: int) -> torch.Tensor:
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        w = weight.float()
        for i in range(0, h.shape[0], chunk):
            z = h[i:i + chunk].float() @ w.T
            lse[i:i + chunk] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, target[i:i + chunk, None])[:, 0]
            total += (lse[i:i + chunk] - picked).sum(dtype=torch.float64)
        ctx.save_for_backward(h, weight, target, lse)
        ctx.chunk = chunk
        return total.float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, target, lse = ctx.saved_tensors
        w = weight.float()
        gh = torch.empty(h.shape, dtype=torch.float32, device=h.device) \
            if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        g = grad_out.float()
        for i in range(0, h.shape[0], ctx.chunk):
            hc = h[i:i + ctx.chunk].float()
            p = torch.exp_((hc @ w.T).sub_(lse[i:i + ctx.chunk, None]))      # softmax
            p[torch.arange(hc.shape[0], device=h.device), target[i:i + ctx.chunk]] -= 1
            p.mul_(g)
            if gh is not None:
                gh[i:i + ctx.chunk] = p @ w
            if gw is not None:
                gw.addmm_(p.T, hc)
        return (None if gh is None else gh.to(h.dtype),
                None if gw is None else gw.to(weight.dtype), None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy (nats) of the fp32 logits ``h @ weight.T`` against ``target``.

    Args:
        h: [..., dim] features (any float dtype; promoted to fp32 as the model's head does).
        weight: [vocab, dim] output projection (the model's ``head.weight``).
        target: integer [...] token ids in [0, vocab).
        chunk: rows of logits materialised at once (an integer >= 1).

    Returns:
        0-d fp32 tensor, differentiable w.r.t. h and weight.

    Raises:
        ValueError: a chunk that is not an integer >= 1, a target that is not an integer
            tensor (float, bool, complex), mismatched shapes or targets outside [0, vocab).
    """
    chunk = check_count(chunk, "linear_cross_entropy: chunk", 1)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: target must be an integer tensor of token ids, "
                         f"got {target.dtype}")
    if h.shape[:-1] != target.shape or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, weight "
                         f"{tuple(weight.shape)} and target {tuple(target.shape)} do not fit "
                         "(h [..., dim], weight [vocab, dim], target [...])")
    flat_t = target.reshape(-1).long()
    if flat_t.numel() == 0:
        raise ValueError("linear_cross_entropy: no target tokens")
    if int(flat_t.min()) < 0 or int(flat_t.max()) >= weight.shape[0]:
        raise ValueError(f"linear_cross_entropy: targets must lie in [0, {weight.shape[0]})")
    total = LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, flat_t, chunk)
    return total / flat_t.numel()


class _Features(nn.Module):
    """Stands in for ``Model.head``: returns the head's fp32 input unchanged."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y


@contextlib.contextmanager
def head_features(model: nn.Module) -> Iterator[torch.Tensor]:
    """Inside, ``model(...)`` and ``model.forward_mtp(...)`` return the fp32 input of the
    vocabulary projection ``norm(hc_head(x))`` [..., dim] instead of logits; yields the head
    weight [vocab, dim] to pass to :func:`linear_cross_entropy`.

    ``Model`` ends both paths with ``self.head(y.float())``; this swaps ``model.head`` for an
    identity module for the duration (restored on exit, also on error), so that the training
    forward is the model's own forward up to the projection. ``tests/train`` checks that
    ``linear_cross_entropy`` of these features equals ``cross_entropy`` of the model's logits.
    """
    head = model.head
    model.head = _Features()
    try:
        yield head.weight
    finally:
        model.head = head


@contextlib.contextmanager
def reference_backend() -> Iterator[None]:
    """Run the layers' pure-PyTorch reference path inside (``dsv4.set_backend("reference")``).

    The CUDA ops (``sparse_attn``, ``compress_kv``, ``indexer_topk``, ...) have no autograd
    formulas (``compress_kv`` writes its results in place), so training always runs the
    reference layers, which autograd differentiates end to end (on CPU and on CUDA).
    """
    from ..ops.backend import get_backend, set_backend
    old = get_backend()
    set_backend("reference")
    try:
        yield
    finally:
        set_backend(old)


def model_losses(model: nn.Module, tokens: torch.Tensor, mtp: bool = True
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Main and MTP cross-entropy (mean nats) of one block of token sequences.

    ``tokens`` int64 [batch, seq + 2]: the model reads ``tokens[:, :seq]`` and predicts
    ``tokens[:, 1:seq+1]``; the MTP block (depth 1, §10.3) reads the main model's last residual
    streams at position p with the embedding of token p+1 and predicts token p+2. A fresh
    cache per call: training sees each sequence from position 0 and keeps no state.

    Returns:
        (main loss, MTP loss or None when ``mtp`` is False or the model has no MTP block).
    """
    seq = tokens.shape[1] - 2
    if seq < 1:
        raise ValueError(f"tokens must be [batch, seq + 2] with seq >= 1, got {tuple(tokens.shape)}")
    inp, nxt, nxt2 = tokens[:, :seq], tokens[:, 1:seq + 1], tokens[:, 2:seq + 2]
    cache = model.make_cache(tokens.shape[0])
    with head_features(model) as w:
        y, hidden = model(inp, cache=cache, return_hidden=True)
        main = linear_cross_entropy(y, w, nxt)
        extra = None
        if mtp and len(getattr(model, "mtp", ())):
            y2 = model.forward_mtp(hidden, nxt, cache)
            extra = linear_cross_entropy(y2, w, nxt2)
    return main, extra
