"""Floors of an end-to-end step on one H200: the time a step cannot beat (docs runtime.md).

* Decode is memory-bound: the bytes a step must read at 4.22 TB/s (the H200's measured copy
  bandwidth, kernels.md §2): every weight the step uses once (the routed experts that the
  batch's tokens select, in expectation under uniform routing; the head in the dtype that is
  read; the embedding rows of the step's tokens) plus each sequence's KV cache as the
  attention reads it (window keys, the CSA top-k entries and every indexer key, every HCA
  entry).
* Prefill is compute-bound: the FLOPs at 767 TFLOP/s (dense bf16, measured): 2 x the active
  parameters per token (linears and experts; the head only for the positions that get
  logits), plus attention (QK and PV over each query's keys) and the Lightning Indexer's
  scoring of every complete entry.

A row's floor is the larger of its byte time and its FLOP time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["HBM_BYTES_PER_S", "BF16_FLOPS", "WeightBytes", "weight_bytes", "decode_floor",
           "prefill_floor", "kv_read_bytes", "attention_flops"]

HBM_BYTES_PER_S = 4.22e12
BF16_FLOPS = 767e12


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size()
               for t in list(module.parameters()) + list(module.buffers()))


@dataclass
class WeightBytes:
    """Bytes of the model's weights by how a step reads them (device storage as it is)."""

    dense: int            # read once per step whatever the batch (attention, shared experts,
                          # gates, norms, mHC)
    expert: list[int]     # per layer: bytes of one routed expert
    n_experts: int
    topk: int
    head_fp32: int        # the official head (fp32)
    embed_row: int        # one embedding row
    active_params: int    # parameters a token multiplies by (experts: topk + shared; no head,
                          # no embedding)
    head_params: int


def weight_bytes(model) -> WeightBytes:
    """Classify ``model``'s weight bytes (as stored: bf16 / fp32 / native FP8-FP4)."""
    c = model.config
    expert, dense, active = [], 0, 0
    for blk in model.layers:
        ex = blk.ffn.experts
        per = _tensor_bytes(ex[0])
        expert.append(per)
        dense += _tensor_bytes(blk) - len(ex) * per
        n_ex = sum(_numel(e) for e in ex)
        active += _numel(blk) - n_ex + c.n_activated_experts * _numel(ex[0])
    dense += _tensor_bytes(model.norm) + sum(
        t.numel() * t.element_size() for t in (model.hc_head_fn, model.hc_head_base,
                                               model.hc_head_scale))
    return WeightBytes(dense=dense, expert=expert, n_experts=c.n_routed_experts,
                       topk=c.n_activated_experts, head_fp32=c.vocab_size * c.dim * 4,
                       embed_row=c.dim * model.embed.weight.element_size(),
                       active_params=active, head_params=c.vocab_size * c.dim)


def _numel(module: torch.nn.Module) -> int:
    n = 0
    for mod in module.modules():
        fmt = getattr(mod, "weight_format", None)
        if fmt is not None:        # native FP8 / FP4 Linear: count its logical weight
            n += mod.in_features * mod.out_features
        for name, p in mod.named_parameters(recurse=False):
            n += p.numel()
    return n


def kv_read_bytes(config, context: int, elem_bytes: int = 2,
                  key_bytes: float | None = None, entry_bytes: float | None = None) -> float:
    """KV bytes one decode token of a sequence at ``context`` reads, all main layers: the
    window (min(context, W) keys), CSA: min(index_topk, entries) entries + every indexer key,
    HCA: every entry (architecture.md §3.5, §5); ``entry_bytes`` per window key or compressed
    entry (default ``head_dim · elem_bytes``; 584 for the FP8 MODEL1 layout), ``key_bytes``
    per indexer key (default ``index_head_dim · elem_bytes``; 132 for FP8 keys)."""
    c = config
    key = c.index_head_dim * elem_bytes if key_bytes is None else key_bytes
    entry = c.head_dim * elem_bytes if entry_bytes is None else entry_bytes
    total = 0.0
    for i in range(c.n_layers):
        r = c.compress_ratios[i]
        total += min(context, c.window_size) * entry
        n = context // r if r else 0
        if r == 4:
            total += min(c.index_topk, n) * entry + n * key
        elif r:
            total += n * entry
    return total


def decode_floor(model, batch: int, context: int, head_bytes_per_param: int = 4,
                 key_bytes: float | None = None, entry_bytes: float | None = None) -> dict:
    """Floor of one decode step of ``batch`` sequences at ``context`` tokens.

    Returns {"bytes", "flops", "seconds"} (seconds = max of bytes / 4.22 TB/s and
    flops / 767 TFLOP/s). Distinct experts per layer: ``E (1 − (1 − k/E)^batch)`` (uniform
    routing, in expectation); ``key_bytes`` per indexer key, ``entry_bytes`` per attention KV
    entry (see :func:`kv_read_bytes`).
    """
    w = weight_bytes(model)
    c = model.config
    E, k = w.n_experts, w.topk
    distinct = E * (1 - (1 - k / E) ** batch)
    weights = w.dense + sum(distinct * b for b in w.expert) + \
        c.vocab_size * c.dim * head_bytes_per_param + batch * w.embed_row
    kv = batch * kv_read_bytes(c, context, model.embed.weight.element_size(), key_bytes,
                               entry_bytes)
    flops = batch * (2 * (w.active_params + w.head_params)
                     + attention_flops(c, context, 1))
    seconds = max((weights + kv) / HBM_BYTES_PER_S, flops / BF16_FLOPS)
    return {"bytes": weights + kv, "weight_bytes": weights, "kv_bytes": kv, "flops": flops,
            "seconds": seconds}


def attention_flops(c, start: int, n: int) -> float:
    """Attention + indexer FLOPs of the queries at positions ``start`` … ``start + n − 1``
    (0-based), all main layers: 4 · heads · head_dim per attended key (QK and PV; the window,
    plus the top-k picks on CSA layers or every complete entry on HCA layers) and
    2 · index heads · index dim per entry the indexer scores."""
    pos = torch.arange(start, start + n, dtype=torch.float64)
    f = 0.0
    for i in range(c.n_layers):
        r = c.compress_ratios[i]
        keys = torch.clamp(pos + 1, max=c.window_size)
        m = torch.div(pos + 1, r, rounding_mode="floor") if r else torch.zeros_like(pos)
        if r == 4:
            keys = keys + torch.clamp(m, max=c.index_topk)
            f += float((2 * c.index_n_heads * c.index_head_dim * m).sum())
        elif r:
            keys = keys + m
        f += float((4 * c.n_heads * c.head_dim * keys).sum())
    return f


def prefill_floor(model, batch: int, prompt: int, start: int = 0) -> dict:
    """Floor of prefilling ``batch`` prompts of ``prompt`` tokens (positions start …), logits
    for each prompt's last position only. Returns {"flops", "bytes", "seconds"}."""
    c = model.config
    w = weight_bytes(model)
    flops = batch * (2 * w.active_params * prompt + attention_flops(c, start, prompt)
                     + 2 * w.head_params)
    E, k = w.n_experts, w.topk
    distinct = E * (1 - (1 - k / E) ** (batch * prompt))
    weights = w.dense + sum(distinct * b for b in w.expert) + w.head_fp32
    seconds = max(flops / BF16_FLOPS, weights / HBM_BYTES_PER_S)
    return {"flops": flops, "bytes": weights, "seconds": seconds}
