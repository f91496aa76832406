"""Runs one scheduled step of the model: the step batch on the device, eager or a CUDA graph,
and the sampling of the rows that sample, into one device buffer of sampled ids.

A step's metadata (token ids, positions, ``cu_seqlens``, slots, block tables, the tokens that
need logits) is packed on the host into one pinned int32 buffer and copied to the device in one
non-blocking copy (:class:`~dsv4.layers.varlen.StepBatch`); the model runs
:meth:`dsv4.Model.forward_step` on it. The rows that sample are drawn by
:func:`~dsv4.runtime.sampler.sample_rows` into :attr:`ModelRunner.sampled` (int64 [2,
max_batch]: ids, finiteness flags), which one non-blocking copy per step brings to a pinned host
buffer (a ring of two, one event each: the engine reads a step's buffer before the step after
next reuses it).

Tokens the host does not have yet (the overlapped loop: the step before this one sampled them
and is still running) are taken on the device: the buffer carries, beside the token ids, one
source index per token (-1: the id is in the buffer; j >= 0: row j of :attr:`sampled`, which
the step before wrote), and a few tiny kernels (a gather and a select over the step's T ids)
copy them in before the model runs. Everything runs on the current stream, so the step reads
them after the step before wrote them.

Decode steps (every row feeds one token and samples) on CUDA replay a CUDA graph captured once
per batch-size bucket (1, 2, 4, 8, ..., max_batch): the batch is padded to its bucket with rows
that write only the cache's scratch slot. The graph holds the whole step (docs runtime.md §4):
the gather of the tokens sampled by the step before, the model, the greedy draw and the
finiteness flags of every row (:func:`~dsv4.runtime.sampler.sample_greedy`, into
:attr:`sampled`), and the advance of its own metadata to the next decode step of the same rows
(positions + 1, every token taken from the row of :attr:`sampled` it just wrote). So at steady
state (the same requests in the same order as the replay before, no new block) a decode step is
one graph replay, the draws of the rows with a temperature (:func:`~dsv4.runtime.sampler.
sample_seeded`: the request's own ``torch.Generator``, outside the graph), the copy of the
sampled ids to the host and one event: no packing and no upload. When anything changed (a row
joined, left or got a block; the step before was not this graph's), the host packs the bucket's
metadata into a pinned staging buffer (a ring of two per bucket, one event each) and uploads it
in one copy before the replay.

Before capturing, the step is run eagerly under ``torch.cuda.set_sync_debug_mode("error")``: if
anything in it synchronises with the host (a layer whose ops are not capturable), the runner
keeps running decode eagerly and says why once. Prefill and mixed steps run eagerly (they are
compute-bound). :meth:`ModelRunner.emulate_graphs` replays the same captured step body eagerly
(CPU tests and the host-side profile, ``bench/profile_host_step.py``).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..layers.branch import step_stream
from ..layers.varlen import StepBatch
from ..ops import split_gemm
from ..ops.backend import get_backend
from .pool import PagedCache
from .sampler import (draws_in_graph, sample_greedy, sample_rows, sample_seeded,
                      sample_temperature)
from .scheduler import ScheduledRow

__all__ = ["ModelRunner", "StepOutput", "graph_buckets"]


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a decode graph: powers of two below ``max_batch``, then ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


@dataclass
class StepOutput:
    """What :meth:`ModelRunner.run` queued on the device for one step.

    logits: float32 [L, vocab] on the device (a CUDA graph's static output: valid until the
        next replay of that graph); counts: logit rows per scheduled row;
    host: int64 [2, S] sampled ids and finiteness flags of the S rows that sample, in row
        order, in a (pinned, on CUDA) host buffer that the copy queued by the step fills;
    event: recorded after that copy (CUDA only; None on the CPU, where it is done).
    """

    logits: torch.Tensor
    counts: list[int]
    host: torch.Tensor
    event: Optional[torch.cuda.Event]


#: int32 columns of a graph bucket's static buffer before its StepBatch: ids, their sources,
#: the sources of the next replay, and per row its temperature max(T, 1e-5) and reciprocal
#: (float32 bits) and whether the sampling graph draws it (sampler.draws_in_graph)
_PREFIX = 6


@dataclass
class _Graph:
    graph: Any                  # torch.cuda.CUDAGraph, or _EagerReplay (emulate_graphs)
    static: torch.Tensor        # int32 [_PREFIX bucket + meta] on the device
    logits: torch.Tensor        # float32 [bucket, vocab], the graph's output
    batch: StepBatch            # views of ``static``
    staging: list[torch.Tensor] = field(default_factory=list)   # pinned uploads, a ring of 2
    events: list[Optional[torch.cuda.Event]] = field(default_factory=list)
    turn: int = 0
    # the sampling graph (same static buffer, + the temperature rows' draws), its output and
    # its per-row generators; captured when a row first needs it
    sampling: Any = None
    sampling_logits: Optional[torch.Tensor] = None
    generators: list = field(default_factory=list)


def _storage_version(model) -> int:
    """``model.storage_version`` (0 for a model without one)."""
    return getattr(model, "storage_version", 0)


class _EagerReplay:
    """A stand-in for a captured graph: ``replay()`` runs the step body eagerly on the same
    static buffers (:meth:`ModelRunner.emulate_graphs`)."""

    def __init__(self, body: Callable[[], torch.Tensor], out: torch.Tensor):
        self.body, self.out = body, out

    def replay(self) -> None:
        self.out.copy_(self.body())


def _take_device_tokens(ids: torch.Tensor, src: torch.Tensor, prev: torch.Tensor
                        ) -> torch.Tensor:
    """``ids[i] = prev[src[i]]`` where ``src[i] >= 0``, in place, on the device without a host
    sync (ids, src: int32 [T] views of the step's buffer; prev: int64 [S] sampled ids).
    Returns the step's ids as int64, the model's input (5 small kernels: each one is ~2 us
    of a captured decode step)."""
    took = torch.where(src >= 0, prev.index_select(0, src.clamp(min=0)), ids)
    ids.copy_(took)
    return took


class ModelRunner:
    """Executes scheduled rows on ``model`` over a :class:`PagedCache`.

    Args:
        model: a :class:`dsv4.Model`.
        cache: its runtime cache.
        max_model_len: longest sequence (sizes the block-table width and, in graphs, the HCA
            scope).
        head_dtype: None (the official fp32 head) or torch.bfloat16 (see ``Model._head``).
        cuda_graphs: capture decode graphs (CUDA only).
        max_batch: largest decode batch (the last bucket), and the rows of :attr:`sampled`.

    Attributes:
        sampled: int64 [2, max_batch] on the device: the ids (row 0) and finiteness flags
            (row 1) drawn by the last step, in the order of its sampling rows; the next step
            takes its device-sourced tokens from row 0.
        stats: ``graph_steps`` / ``eager_steps`` run, ``uploads`` (graph steps that copied
            new metadata; the others advanced on the device).
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
        # the model's storage_version when self.graphs were captured (they read that storage)
        self._graphs_version = _storage_version(model)
        # the bf16 weight copies the graphs read (dsv4.ops.split_gemm.recording_copies): held,
        # and the graphs captured again once a weight behind one changed
        self._copies: dict = {}
        self.graph_off_reason: Optional[str] = None
        if not cuda_graphs:
            self.graph_off_reason = "disabled (cuda_graphs=False)"
        elif self.device.type != "cuda":
            self.graph_off_reason = f"CUDA graphs need a CUDA device, the model is on {self.device}"
        self._pool = None
        self._emulate = False
        self._cuda = self.device.type == "cuda"
        self.sampled = torch.zeros(2, max_batch, dtype=torch.long, device=self.device)
        self._host = [torch.zeros(2, max_batch, dtype=torch.long, pin_memory=self._cuda)
                      for _ in range(2)]
        self._host_events = [torch.cuda.Event() if self._cuda else None for _ in range(2)]
        self._turn = 0
        # after a graph replay: (its graph, requests, starts, block-table widths), what the
        # graph's static buffer holds for the next decode step of the same rows; else None
        self._last: Optional[tuple] = None
        #: why rows with a temperature draw outside the decode graph (None: they draw in a
        #: bucket's sampling graph, see :func:`~dsv4.runtime.sampler.draws_in_graph`)
        self.sampling_off_reason: Optional[str] = None
        self.stats = {"graph_steps": 0, "eager_steps": 0, "uploads": 0, "sampling_steps": 0}

    def emulate_graphs(self) -> None:
        """Run decode steps through the graph path with the captured step body replayed
        eagerly (no CUDA graph): the static buffers, the upload-when-changed logic and the
        device-side advance run as on the GPU, on any device. The layers must take their
        batched (kernel-path) glue, as a captured step does: a graph step has no host lists,
        so on the reference backend the per-sequence attention path raises RuntimeError (the
        CPU tests patch ``dsv4.layers.attention.use_kernels``). For CPU tests and the
        host-side profile."""
        self._emulate = True
        self.graph_off_reason = None

    # ------------------------------------------------------------------ packing
    def _pack(self, rows: Sequence[ScheduledRow], pad_to: int = 0, all_logits: bool = False,
              host: bool = True, out: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, dict, int]:
        """Host buffer [ids | sources | (next sources) | StepBatch] (pinned on CUDA; into
        ``out`` when given), the sizes to view it with (with the host lists when ``host``: an
        eager step's reference path may need them) and how many ids the device fills in (a
        row's last token, when the step in flight sampled it: its source is
        ``request.pending_index``; -1 elsewhere). A graph bucket (``pad_to``) also gets the
        sources of the next replay: row i of :attr:`sampled` for real row i, -1 for padding."""
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
        parts = _PREFIX if pad_to else 2
        prefix = np.full(parts * t, -1, dtype=np.int64)
        prefix[:t] = ids
        for i, j in pending:
            prefix[t + i] = j
        if pad_to:
            prefix[2 * t:2 * t + len(rows)] = np.arange(len(rows))
            temp = np.ones(t, dtype=np.float32)
            flag = np.zeros(t, dtype=np.int64)
            for i, r in enumerate(rows):
                if draws_in_graph(r.request.params):
                    temp[i] = max(r.request.params.temperature, 1e-5)
                    flag[i] = 1
            inv = np.float32(1.0) / temp            # as CUDA divides by a Python float
            prefix[3 * t:4 * t] = temp.view(np.int32)
            prefix[4 * t:5 * t] = inv.view(np.int32)
            prefix[5 * t:6 * t] = flag
        buf, sizes = StepBatch.host_pack(starts, lens, slots, tables, index, self.max_blocks,
                                         prefix=prefix, pin=self._cuda, host=host, out=out)
        return buf, sizes, len(pending)

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def run(self, rows: Sequence[ScheduledRow], all_logits: bool = False,
            prev_in_flight: Any = None) -> StepOutput:
        """Feed ``rows``, sample the rows that sample (``row.sample``: greedy, or the
        request's seeded sampler) into :attr:`sampled`, and queue the copy of the sampled ids
        to the host. A row gets one logit row when it samples (the logits of its last token),
        none otherwise; with ``all_logits`` every fed token gets one (and the sampled row
        draws from its last).

        ``prev_in_flight``: truthy when the step before this one was launched and its
        sampled ids are in :attr:`sampled` (the overlapped loop); a row whose request has a
        token pending there is fed that token (``Request.pending_index``) without the host
        reading it. Raises RuntimeError when a row needs such a token and nothing is in
        flight (nothing is run then)."""
        last, self._last = self._last, None     # kept only by a graph replay that succeeds
        counts = [r.n if all_logits else int(r.sample) for r in rows]
        sampling = [r.request for r in rows if r.sample]
        decode = not all_logits and all(r.n == 1 and r.sample for r in rows)
        logits = None
        if decode and self.graph_off_reason is None and len(rows) <= self.buckets[-1]:
            ran = self._run_graph(rows, prev_in_flight, last)
            if ran is not None:
                logits, in_graph = ran
                self.stats["graph_steps"] += 1
                sample_seeded(logits, sampling, self.sampled, skip_in_graph=in_graph)
        if logits is None:
            logits = self._run_eager(rows, all_logits, prev_in_flight)
            self.stats["eager_steps"] += 1
            chosen = logits
            if all_logits:
                ends = list(itertools.accumulate(counts))
                pick = [e - 1 for e, r in zip(ends, rows) if r.sample]
                chosen = logits.index_select(0, torch.tensor(pick, dtype=torch.long,
                                                             device=logits.device))
            sample_rows(chosen, sampling, self.sampled)
        host, event = self._read_back(len(sampling))
        return StepOutput(logits, counts, host, event)

    def _read_back(self, n: int) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        """Queue the copy of :attr:`sampled` to the next host buffer of the ring; its first
        ``n`` columns and the event recorded after it."""
        self._turn ^= 1
        host, event = self._host[self._turn], self._host_events[self._turn]
        if event is not None:
            event.synchronize()     # the step that used it two steps ago was read: no wait
        host.copy_(self.sampled, non_blocking=self._cuda)
        if event is not None:
            event.record()
        return host[:, :n], event

    def _run_eager(self, rows, all_logits: bool, prev_in_flight) -> torch.Tensor:
        buf, sizes, k = self._pack(rows, all_logits=all_logits)
        if k and not prev_in_flight:
            _need(None)
        dev = buf.to(self.device, non_blocking=True)
        T = sizes.pop("num_tokens")
        ids = _take_device_tokens(dev[:T], dev[T:2 * T], self.sampled[0]) if k else None
        batch = StepBatch.from_buffer(dev[2 * T:], T, **sizes)
        return self.model.forward_step(dev[:T].long() if ids is None else ids,
                                       self.cache.layers, batch, self.head_dtype)

    def _run_graph(self, rows: Sequence[ScheduledRow], prev_in_flight,
                   last: Optional[tuple]) -> Optional[tuple[torch.Tensor, bool]]:
        """Replay the bucket's graph (the sampling graph when a row :func:`draws_in_graph`);
        (its logits, whether those rows were drawn in it), or None when decode must run
        eagerly (capture failed)."""
        bucket = next(b for b in self.buckets if b >= len(rows))
        self._drop_stale_graphs()
        g = self.graphs.get(bucket)
        if g is None:
            g = self._capture(bucket)
            if g is None:
                return None
        reqs = [r.request for r in rows]
        starts = [r.start for r in rows]
        widths = [len(q.block_table) for q in reqs]
        # the static buffer already holds this step when the replay before was this graph's
        # on the same requests (identity), one position earlier, with the same blocks
        same = (last is not None and last[0] is g and last[1] == reqs and last[3] == widths
                and all(s == p + 1 for s, p in zip(starts, last[2])))
        if not same:
            k = g.turn
            g.turn ^= 1
            if g.events[k] is not None:
                g.events[k].synchronize()   # its upload (two uploads ago) is done: no wait
            _, _, n_dev = self._pack(rows, pad_to=bucket, host=False, out=g.staging[k])
            if n_dev and not prev_in_flight:
                _need(None)
            g.static.copy_(g.staging[k], non_blocking=self._cuda)
            if g.events[k] is not None:
                g.events[k].record()
            self.stats["uploads"] += 1
        drawn = [i for i, q in enumerate(reqs) if draws_in_graph(q.params)]
        if drawn and g.sampling is None and self.sampling_off_reason is None:
            self._capture_sampling(g, bucket)
        if drawn and g.sampling is not None:
            for i in drawn:     # row i's generator at its request's state, and back after
                _copy_generator(g.generators[i], reqs[i].generator)
            g.sampling.replay()
            for i in drawn:
                _copy_generator(reqs[i].generator, g.generators[i])
            self.stats["sampling_steps"] += 1
            self._last = (g, reqs, starts, widths)
            return g.sampling_logits[:len(rows)], True
        g.graph.replay()
        self._last = (g, reqs, starts, widths)
        return g.logits[:len(rows)], False

    def _drop_stale_graphs(self) -> None:
        """Forget the graphs (captured again when next needed) when the model has moved its
        weights since their capture (``Model.storage_version``: fuse / unfuse, ``.to``,
        ``load_state_dict``, ...), or a weight the graphs read through a bf16 copy changed
        (:func:`dsv4.ops.split_gemm.copies_current`): a replay would read the old storage or
        the old copy."""
        version = _storage_version(self.model)
        if version == self._graphs_version and split_gemm.copies_current(self._copies.values()):
            return
        if self.graphs:
            warnings.warn("dsv4.runtime: the model moved or changed its weights (fuse_projections, "
                          ".to, load_state_dict, an in-place update of a weight the graphs read "
                          "through a bf16 copy, ...) after its decode graphs were captured; they "
                          "are captured again", RuntimeWarning,
                          stacklevel=8)    # Engine.step's caller (run is no_grad-wrapped)
            self.graphs.clear()
            self._last = None
        self._copies = {}
        self._graphs_version = version

    def _graph_batch(self, static: torch.Tensor, bucket: int) -> StepBatch:
        return StepBatch.from_buffer(static[_PREFIX * bucket:], bucket, bucket, self.max_blocks,
                                     bucket, 1, self.max_model_len, True, host=None)

    def _decode_body(self, static: torch.Tensor, bucket: int, batch: StepBatch,
                     generators: Optional[list] = None) -> torch.Tensor:
        """The captured decode step of ``bucket`` rows on the static buffer ``static``: take
        the device-sourced tokens from :attr:`sampled`, run the model, draw every row greedily
        (and its finiteness flag) into :attr:`sampled` and, with ``generators`` (the sampling
        graph), the rows flagged in the buffer with their temperatures
        (:func:`sample_temperature`), then advance the buffer to the next decode step of the
        same rows (positions + 1, each real row's token from its row of :attr:`sampled`;
        padding rows unchanged). Returns the logits [bucket, vocab]."""
        b = bucket
        ids, src, nxt = static[:b], static[b:2 * b], static[2 * b:3 * b]
        took = _take_device_tokens(ids, src, self.sampled[0])
        logits = self.model.forward_step(took, self.cache.layers, batch, self.head_dtype)
        sample_greedy(logits, self.sampled)
        if generators is not None:
            sample_temperature(logits, static[3 * b:4 * b].view(torch.float32),
                               static[4 * b:5 * b].view(torch.float32), static[5 * b:6 * b],
                               generators, self.sampled)
        step = nxt >= 0     # bool: added to the int32 counters as 0 / 1
        batch.pos.add_(step)
        batch.starts.add_(step)
        src.copy_(nxt)
        return logits

    def _capture(self, bucket: int) -> Optional[_Graph]:
        """Capture the decode step of ``bucket`` rows; None (and graphs off, with the reason
        said once) if the step synchronises with the host or capture fails."""
        model = self.model
        if not self._emulate and (get_backend() != "cuda" or model.dtype != torch.bfloat16):
            self.graph_off_reason = (
                "decode runs eagerly: the layers run their per-sequence reference path (backend "
                f"{get_backend()!r}, {model.dtype} model), which a CUDA graph cannot capture")
            return None
        buf, _, _ = self._pack([], pad_to=bucket, host=False)   # padding rows: scratch slot
        static = buf.to(self.device)
        staging = [buf, torch.empty(buf.shape, dtype=buf.dtype, pin_memory=self._cuda)]
        events = [torch.cuda.Event() if self._cuda else None for _ in staging]
        batch = self._graph_batch(static, bucket)
        try:
            graph, logits = self._record(static, bucket, batch, None)
        except Exception as e:      # a host sync or anything else capture cannot take
            self.graph_off_reason = (f"decode runs eagerly: the step could not be captured as "
                                     f"a CUDA graph ({type(e).__name__}: {str(e)[:300]})")
            warnings.warn(f"dsv4.runtime: {self.graph_off_reason}", RuntimeWarning,
                          stacklevel=4)
            return None
        g = _Graph(graph, static, logits, batch, staging, events)
        self.graphs[bucket] = g
        return g

    def _capture_sampling(self, g: _Graph, bucket: int) -> None:
        """Capture the bucket's sampling graph (the decode step + the temperature rows'
        draws, one registered generator per row) on ``g``'s static buffer, whose contents (the
        step about to replay) are kept aside while padding rows serve the warm-up runs; on
        failure those rows keep drawing outside the graph and :attr:`sampling_off_reason`
        says why (once)."""
        gens = [torch.Generator(device=self.device) for _ in range(bucket)]
        if self._cuda:
            torch.cuda.synchronize(self.device)     # this step's upload has landed
        kept = g.static.clone()     # this step's rows: the warm-up runs would advance them
        pad, _, _ = self._pack([], pad_to=bucket, host=False)
        g.static.copy_(pad)         # the warm-up runs write only the scratch slot
        try:
            g.sampling, g.sampling_logits = self._record(g.static, bucket, g.batch, gens)
            g.generators = gens
        except Exception as e:
            self.sampling_off_reason = (
                f"seeded rows draw outside the decode graph: the sampling graph could not be "
                f"captured ({type(e).__name__}: {str(e)[:300]})")
            warnings.warn(f"dsv4.runtime: {self.sampling_off_reason}", RuntimeWarning,
                          stacklevel=5)
        finally:
            g.static.copy_(kept)
            if self._cuda:
                torch.cuda.synchronize(self.device)

    def _record(self, static: torch.Tensor, bucket: int, batch: StepBatch,
                generators: Optional[list]) -> tuple[Any, torch.Tensor]:
        """(graph, its logits) of :meth:`_decode_body` on ``static``: a CUDA graph (the body
        run twice first, the second time under ``set_sync_debug_mode("error")``), or with
        :meth:`emulate_graphs` an eager stand-in. Raises what the capture raised (the
        device synchronised, :attr:`sampled` as it was)."""
        def body() -> torch.Tensor:
            return self._decode_body(static, bucket, batch, generators)

        if self._emulate:
            logits = torch.empty(bucket, self.model.config.vocab_size, dtype=torch.float32,
                                 device=self.device)
            return _EagerReplay(body, logits), logits
        torch.cuda.synchronize(self.device)
        kept = self.sampled.clone()     # the warm-up runs draw into it: the step reads it after
        # The warm-up and capture stream: a high-priority one with DSV4_STREAM_PRIORITY=1 (the
        # graph keeps each kernel's priority; dsv4.layers.branch), else a fresh one.
        prio = step_stream(self.device)
        side = prio or torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                body()                                   # warm caches
                prev = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    body()
                finally:
                    torch.cuda.set_sync_debug_mode(prev)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            for gen in generators or ():    # their seed / offset: read at each replay
                graph.register_generator_state(gen)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with split_gemm.recording_copies() as copies, \
                    torch.cuda.graph(graph, pool=self._pool, stream=prio):
                logits = body()
            for rec in copies:          # the bf16 weight copies the graph reads (one each)
                self._copies.setdefault((id(rec[3]), rec[2]), rec)
        finally:
            torch.cuda.synchronize(self.device)
            self.sampled.copy_(kept)
            torch.cuda.synchronize(self.device)
        return graph, logits


def _copy_generator(dst: torch.Generator, src: torch.Generator) -> None:
    """Set ``dst`` to ``src``'s state without allocating on CUDA (seed and Philox offset; a
    CPU generator has no offset: its whole state)."""
    if dst.device.type == "cuda":
        dst.manual_seed(src.initial_seed())
        dst.set_offset(src.get_offset())
    else:
        dst.set_state(src.get_state())


def _need(prev_tokens) -> None:
    if not prev_tokens:
        raise RuntimeError("a row feeds a token sampled by the step in flight, but no step is "
                           "in flight (the engine's pending-token bookkeeping is broken)")
