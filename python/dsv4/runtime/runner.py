"""Runs one scheduled step of the model: the step batch on the device, eager or a CUDA graph.

A step's metadata (token ids, positions, ``cu_seqlens``, slots, block tables, the tokens that
need logits) is packed on the host into one pinned int32 buffer and copied to the device in one
non-blocking copy (:class:`~dsv4.layers.varlen.StepBatch`); the model runs
:meth:`dsv4.Model.forward_step` on it.

Tokens the host does not have yet (the overlapped loop: the step before this one sampled them
and is still running) are taken on the device: the buffer carries, beside the token ids, one
source index per token (-1: the id is in the buffer; j >= 0: row j of the previous step's
sampled ids), and a few tiny kernels (a gather and a select over the step's T ids) copy them
in before the model (or the graph) runs.
Everything runs on the current stream, so the step reads them after the step before wrote them.

Decode steps (every row feeds one token and samples) on CUDA replay a CUDA graph captured once
per batch-size bucket (1, 2, 4, 8, ..., max_batch): the batch is padded to its bucket with rows
that write only the cache's scratch slot, the metadata is copied into the graph's static buffer
and the graph is replayed. Before capturing, the step is run eagerly under
``torch.cuda.set_sync_debug_mode("error")``: if anything in it synchronises with the host (a
layer whose ops are not capturable), the runner keeps running decode eagerly and says why once.
Prefill and mixed steps run eagerly (they are compute-bound).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..layers.varlen import StepBatch
from ..ops.backend import get_backend
from .pool import PagedCache
from .scheduler import ScheduledRow

__all__ = ["ModelRunner", "graph_buckets"]


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a decode graph: powers of two below ``max_batch``, then ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    static: torch.Tensor        # int32 [2 bucket + meta]: ids, their sources, the StepBatch
    logits: torch.Tensor        # float32 [bucket, vocab], the graph's output


def _take_device_tokens(ids: torch.Tensor, src: torch.Tensor, prev: torch.Tensor) -> None:
    """``ids[i] = prev[src[i]]`` where ``src[i] >= 0``, in place, on the device without a host
    sync (ids, src: int32 [T] views of the step's buffer; prev: int64 [S] sampled ids)."""
    got = prev.index_select(0, src.clamp(min=0)).to(torch.int32)
    ids.copy_(torch.where(src >= 0, got, ids))


class ModelRunner:
    """Executes scheduled rows on ``model`` over a :class:`PagedCache`.

    Args:
        model: a :class:`dsv4.Model`.
        cache: its runtime cache.
        max_model_len: longest sequence (sizes the block-table width and, in graphs, the HCA
            scope).
        head_dtype: None (the official fp32 head) or torch.bfloat16 (see ``Model._head``).
        cuda_graphs: capture decode graphs (CUDA only).
        max_batch: largest decode batch (the last bucket).
    """

    def __init__(self, model, cache: PagedCache, max_model_len: int,
                 head_dtype: Optional[torch.dtype], cuda_graphs: bool, max_batch: int):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.max_model_len = max_model_len
        self.max_blocks = max(1, cache.blocks_for(max_model_len))
        self.head_dtype = head_dtype
        self.buckets = graph_buckets(max_batch)
        self.graphs: dict[int, _Graph] = {}
        self.graph_off_reason: Optional[str] = None
        if not cuda_graphs:
            self.graph_off_reason = "disabled (cuda_graphs=False)"
        elif self.device.type != "cuda":
            self.graph_off_reason = f"CUDA graphs need a CUDA device, the model is on {self.device}"
        self._pool = None
        self.stats = {"graph_steps": 0, "eager_steps": 0}

    # ------------------------------------------------------------------ packing
    def _pack(self, rows: Sequence[ScheduledRow], pad_to: int = 0, all_logits: bool = False,
              host: bool = True) -> tuple[torch.Tensor, dict, int]:
        """Host buffer [ids | sources | StepBatch] (pinned on CUDA), the sizes to view it with
        (with the host lists when ``host``: an eager step's reference path may need them) and
        how many ids the device fills in (a row's last token, when the step in flight sampled
        it: its source is ``request.pending_index``; -1 elsewhere)."""
        starts, lens, slots, tables, ids, index = [], [], [], [], [], []
        pending: list[tuple[int, int]] = []     # (token, row of the previous step's ids)
        t = 0
        for r in rows:
            req = r.request
            starts.append(r.start)
            lens.append(r.n)
            slots.append(req.slot)
            tables.append(req.block_table)
            got = req.token_slice(r.start, r.n)
            ids.extend(got)
            if len(got) == r.n - 1 and req.num_pending and req.pending_index is not None:
                pending.append((t + r.n - 1, req.pending_index))
                ids.append(0)                   # filled in on the device
            if all_logits:
                index.extend(range(t, t + r.n))
            elif r.sample:
                index.append(t + r.n - 1)
            t += r.n
        for _ in range(pad_to - len(rows)):   # graph padding: one token in the scratch slot
            starts.append(0)
            lens.append(1)
            slots.append(self.cache.scratch_slot)
            tables.append([])
            ids.append(0)
            index.append(t)
            t += 1
        if len(ids) != t:   # the ids and the metadata are split at T = Σ lens
            raise RuntimeError(f"the step's rows feed {t} tokens but their requests hold "
                               f"{len(ids)} of them (a request's tokens changed under it)")
        prefix = np.full(2 * t, -1, dtype=np.int64)
        prefix[:t] = ids
        for i, j in pending:
            prefix[t + i] = j
        buf, sizes = StepBatch.host_pack(starts, lens, slots, tables, index, self.max_blocks,
                                         prefix=prefix, pin=self.device.type == "cuda",
                                         host=host)
        return buf, sizes, len(pending)

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def run(self, rows: Sequence[ScheduledRow], all_logits: bool = False,
            prev_tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[int]]:
        """Feed ``rows``; return (float32 logits [L, vocab] on the device, how many of those
        rows belong to each scheduled row, in order). A row gets one logit row when it
        samples (the logits of its last token), none otherwise; with ``all_logits`` every
        fed token gets one.

        ``prev_tokens``: int64 [S] on the device, the ids the step in flight sampled (the
        overlapped loop); a row whose request has a token pending there is fed that token
        (``Request.pending_index``) without the host reading it. Raises RuntimeError when a
        row needs such a token and ``prev_tokens`` is None."""
        counts = [r.n if all_logits else int(r.sample) for r in rows]
        decode = not all_logits and all(r.n == 1 and r.sample for r in rows)
        if decode and self.graph_off_reason is None and len(rows) <= self.buckets[-1]:
            logits = self._run_graph(rows, prev_tokens)
            if logits is not None:
                self.stats["graph_steps"] += 1
                return logits, counts
        self.stats["eager_steps"] += 1
        buf, sizes, k = self._pack(rows, all_logits=all_logits)
        dev = buf.to(self.device, non_blocking=True)
        T = sizes.pop("num_tokens")
        if k:
            _take_device_tokens(dev[:T], dev[T:2 * T], _need(prev_tokens))
        batch = StepBatch.from_buffer(dev[2 * T:], T, **sizes)
        logits = self.model.forward_step(dev[:T].long(), self.cache.layers, batch,
                                         self.head_dtype)
        return logits, counts

    def _run_graph(self, rows: Sequence[ScheduledRow],
                   prev_tokens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        bucket = next(b for b in self.buckets if b >= len(rows))
        g = self.graphs.get(bucket)
        if g is None:
            g = self._capture(bucket)
            if g is None:
                return None
        buf, _, k = self._pack(rows, pad_to=bucket, host=False)
        g.static.copy_(buf, non_blocking=True)
        if k:       # outside the graph: the previous step's ids live in a tensor of its own
            _take_device_tokens(g.static[:bucket], g.static[bucket:2 * bucket],
                                _need(prev_tokens))
        g.graph.replay()
        return g.logits[:len(rows)]

    def _graph_batch(self, static: torch.Tensor, bucket: int) -> StepBatch:
        return StepBatch.from_buffer(static[2 * bucket:], bucket, bucket, self.max_blocks,
                                     bucket, 1, self.max_model_len, True, host=None)

    def _capture(self, bucket: int) -> Optional[_Graph]:
        """Capture the decode step of ``bucket`` rows; None (and graphs off, with the reason
        said once) if the step synchronises with the host or capture fails."""
        model, layers, head = self.model, self.cache.layers, self.head_dtype
        if get_backend() != "cuda" or model.dtype != torch.bfloat16:
            self.graph_off_reason = (
                "decode runs eagerly: the layers run their per-sequence reference path (backend "
                f"{get_backend()!r}, {model.dtype} model), which a CUDA graph cannot capture")
            return None
        buf, _, _ = self._pack([], pad_to=bucket, host=False)   # padding rows: scratch slot
        static = buf.to(self.device)
        batch = self._graph_batch(static, bucket)
        torch.cuda.synchronize(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                model.forward_step(static[:bucket].long(), layers, batch, head)   # warm caches
                prev = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    model.forward_step(static[:bucket].long(), layers, batch, head)
                finally:
                    torch.cuda.set_sync_debug_mode(prev)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = model.forward_step(static[:bucket].long(), layers, batch, head)
        except Exception as e:      # a host sync or anything else capture cannot take
            torch.cuda.synchronize(self.device)
            self.graph_off_reason = (f"decode runs eagerly: the step could not be captured as "
                                     f"a CUDA graph ({type(e).__name__}: {str(e)[:300]})")
            warnings.warn(f"dsv4.runtime: {self.graph_off_reason}", RuntimeWarning,
                          stacklevel=4)
            return None
        g = _Graph(graph, static, logits)
        self.graphs[bucket] = g
        return g


def _need(prev_tokens: Optional[torch.Tensor]) -> torch.Tensor:
    if prev_tokens is None:
        raise RuntimeError("a row feeds a token sampled by the step in flight, but no step is "
                           "in flight (the engine's pending-token bookkeeping is broken)")
    return prev_tokens
