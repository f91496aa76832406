"""The step batch: what one forward step processes, described once and handed to every layer.

A step feeds new tokens to ``B`` rows (sequences). The tokens of all rows lie back to back,
grouped by row (flash-attn's "varlen" layout): ``T = Σ lens`` tokens, row b owning tokens
``cu_seqlens[b] .. cu_seqlens[b+1]-1`` at absolute positions ``starts[b] ..``. Each row lives in
a cache *slot* (its window ring and compressor state) and reaches its compressed entries
through a *block table* (the paged pool of docs/contracts.md §A; a dense per-row store is the
special case of one block per row, ``block_table[b] = [slot]``).

Everything a layer reads on its batched (kernel) path is a device tensor, built on the host
from python lists and copied to the device in ONE host-to-device copy (all metadata packed into
one int32 buffer). Shapes depend only on host-side sizes (``T``, ``B``, the block-table width and
the bounds ``max_seqlen`` / ``max_end``), never on device values, so a decode step with fixed
sizes can be captured in a CUDA graph and replayed after copying new metadata into the same
buffer (:meth:`StepBatch.pack` + :meth:`StepBatch.from_buffer`). The per-sequence reference
path also gets the python lists (``host``): it is the oracle, not the engine.

Metadata that the layers derive from the batch (int64 row indices, window-ring rows, window
index lists, per-query entry counts) is the same for every layer of a step: :meth:`StepBatch.shared`
computes each once per forward step (``Model.forward_step`` opens the scope,
:meth:`StepBatch.step_scope`) and hands the same tensor to every layer.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .branch import on_side_stream

__all__ = ["StepBatch", "HostBatch"]


@dataclass
class HostBatch:
    """The python lists a step was built from (the per-sequence reference path reads them).

    starts[b], lens[b]: first position and token count of row b; slots[b]: its cache slot;
    block_tables[b]: the block ids of its compressed entries (logical block k = entries
    ``k·bs .. k·bs + bs - 1`` of every compressed store of the row).
    """

    starts: list[int]
    lens: list[int]
    slots: list[int]
    block_tables: list[list[int]]


@dataclass
class StepBatch:
    """Device description of one forward step (see the module docstring).

    Host-side sizes (python ints / bools; static for a CUDA graph):
        num_tokens (T), num_rows (B), max_blocks (block-table width), num_logits (L);
        max_seqlen: an upper bound on ``lens[b]`` (sizes kernel grids);
        max_end: an upper bound on ``starts[b] + lens[b]`` (sizes the HCA scope: a ratio-m
            layer gives each query ``max_end // m`` lanes of compressed entries);
        decode: every row has at most one new token (the layer may then write the window ring
            before attending, and attend from the ring in place).

    Device tensors (int32 views of one buffer):
        pos [T]: absolute position of each token; rows [T]: its step row;
        cu_seqlens [B+1]; starts [B]; lens [B]; slots [B]: cache slot of each row;
        block_table [B, max_blocks]: block ids (-1 = none) of each row;
        logits_index [L]: the tokens whose logits the step returns, in output order.

    host: the :class:`HostBatch` lists, or None (a replayed CUDA graph has no lists).

    Per-step derived metadata: :meth:`shared` (inside :meth:`step_scope`).
    """

    num_tokens: int
    num_rows: int
    max_blocks: int
    num_logits: int
    max_seqlen: int
    max_end: int
    decode: bool
    buffer: torch.Tensor
    pos: torch.Tensor
    rows: torch.Tensor
    cu_seqlens: torch.Tensor
    starts: torch.Tensor
    lens: torch.Tensor
    slots: torch.Tensor
    block_table: torch.Tensor
    logits_index: torch.Tensor
    host: Optional[HostBatch] = None
    # The derived tensors of the current forward step (None outside a step_scope).
    _shared: Optional[dict] = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ per-step metadata
    @contextlib.contextmanager
    def step_scope(self) -> Iterator["StepBatch"]:
        """The scope of one forward step over this batch: inside it, :meth:`shared` computes
        each derived tensor once and returns that tensor to every later caller; on exit (and
        at the next scope's start) they are dropped.

        Why a scope and not a cache on the batch: a CUDA-graph runner runs a step body on the
        same StepBatch eagerly (warm-up), then captures it, then replays it after writing new
        positions / slots into the batch's buffer in place. The derived tensors must be
        computed inside every run, the captured one included (so that the graph recomputes
        them from the buffer at each replay); a cache surviving from the warm-up run would
        leave them out of the graph and every replay would read the warm-up's values.
        ``Model.forward_step`` runs each step inside this scope."""
        prev, self._shared = self._shared, {}
        try:
            yield self
        finally:
            self._shared = prev

    def shared(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, computed once per :meth:`step_scope` for ``key`` (a hashable that
        names what is computed and every layer parameter it depends on, e.g.
        ``("window_indices", window_size)``) and shared by every layer of the step. Outside
        a scope (a layer called on its own) it is ``compute()`` each time.

        ``compute`` must depend only on this batch's tensors and on what ``key`` names.

        Inside a side branch (:mod:`dsv4.layers.branch`) the branch keeps copies of its own:
        a tensor computed there is written on the side stream, which the layer's stream may
        not read before the branch joins, and the branch does not read the layer stream's
        copies, which may be computed after the fork."""
        memo = self._shared
        if memo is None:
            return compute()
        if on_side_stream():
            key = ("side stream",) + key
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    # ------------------------------------------------------------------ layout of the buffer
    @staticmethod
    def buffer_size(num_tokens: int, num_rows: int, max_blocks: int, num_logits: int) -> int:
        """int32 elements of the packed metadata buffer for these sizes."""
        return 2 * num_tokens + 4 * num_rows + 1 + num_rows * max_blocks + num_logits

    @staticmethod
    def pack(starts: Sequence[int], lens: Sequence[int], slots: Sequence[int],
             block_tables: Sequence[Sequence[int]], logits_index: Sequence[int],
             max_blocks: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The packed int32 metadata of a step, on the CPU (into ``out`` when given).

        Layout: pos [T] | rows [T] | cu_seqlens [B+1] | starts [B] | lens [B] | slots [B] |
        block_table [B·max_blocks] | logits_index [L], with T = Σ lens; block tables are padded
        with -1 to ``max_blocks``. Filled with a few numpy operations whatever B is (this runs
        on the host before every step, a CUDA-graph replay included).

        Raises ValueError when the lists disagree in length, a length is negative or a block
        table is too wide.
        """
        B = len(lens)
        if not (len(starts) == len(slots) == len(block_tables) == B):
            raise ValueError(f"starts, lens, slots and block_tables must all have {B} entries, "
                             f"got {len(starts)}, {B}, {len(slots)}, {len(block_tables)}")
        lens_a = np.asarray(lens, dtype=np.int64).reshape(B)
        if B and lens_a.min() < 0:
            raise ValueError(f"lens must be >= 0, got {lens_a.tolist()}")
        widths = np.fromiter((len(t) for t in block_tables), dtype=np.int64, count=B)
        if B and widths.max() > max_blocks:
            b = int(np.argmax(widths > max_blocks))
            raise ValueError(f"row {b} has {int(widths[b])} blocks, more than max_blocks "
                             f"{max_blocks}")
        T, L = int(lens_a.sum()), len(logits_index)
        size = StepBatch.buffer_size(T, B, max_blocks, L)
        buf = torch.empty(size, dtype=torch.int32) if out is None else out
        if buf.numel() != size or buf.dtype != torch.int32 or buf.device.type != "cpu":
            raise ValueError(f"out must be int32 with {size} elements on the CPU, got "
                             f"{buf.dtype} {buf.numel()} on {buf.device}")
        a = buf.numpy()
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(lens_a, out=cu[1:])
        rows = np.repeat(np.arange(B), lens_a)
        starts_a = np.asarray(starts, dtype=np.int64).reshape(B)
        o = 0
        for part, n in ((starts_a[rows] + np.arange(T) - cu[:-1][rows], T), (rows, T),
                        (cu, B + 1), (starts_a, B), (lens_a, B),
                        (np.asarray(slots, dtype=np.int64).reshape(B), B)):
            a[o:o + n] = part
            o += n
        table = a[o:o + B * max_blocks].reshape(B, max_blocks)
        table.fill(-1)
        n_ids = int(widths.sum())
        if n_ids:
            first = np.repeat(np.cumsum(widths) - widths, widths)
            table[np.repeat(np.arange(B), widths), np.arange(n_ids) - first] = np.fromiter(
                itertools.chain.from_iterable(block_tables), dtype=np.int64, count=n_ids)
        o += B * max_blocks
        a[o:o + L] = np.asarray(logits_index, dtype=np.int64).reshape(L)
        return buf

    @classmethod
    def from_buffer(cls, buffer: torch.Tensor, num_tokens: int, num_rows: int, max_blocks: int,
                    num_logits: int, max_seqlen: int, max_end: int, decode: bool,
                    host: Optional[HostBatch] = None) -> "StepBatch":
        """Views of a packed buffer (:meth:`pack` layout) on any device; no copy."""
        T, B, MB, L = num_tokens, num_rows, max_blocks, num_logits
        o = [0]

        def take(n: int) -> torch.Tensor:
            v = buffer[o[0]:o[0] + n]
            o[0] += n
            return v

        pos, rows, cu = take(T), take(T), take(B + 1)
        starts, lens, slots = take(B), take(B), take(B)
        table = take(B * MB).view(B, MB)
        logits_index = take(L)
        return cls(num_tokens=T, num_rows=B, max_blocks=MB, num_logits=L,
                   max_seqlen=max_seqlen, max_end=max_end, decode=decode, buffer=buffer,
                   pos=pos, rows=rows, cu_seqlens=cu, starts=starts, lens=lens, slots=slots,
                   block_table=table, logits_index=logits_index, host=host)

    @classmethod
    def host_pack(cls, starts: Sequence[int], lens: Sequence[int], slots: Sequence[int],
                  block_tables: Sequence[Sequence[int]], logits_index: Sequence[int],
                  max_blocks: int, prefix: Sequence[int] = (), pin: bool = False,
                  host: bool = True, out: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, dict]:
        """One host int32 buffer ``[prefix | packed metadata]`` (pinned when ``pin``; ``out``
        when given, a host int32 tensor of exactly that size, e.g. a runner's reused staging
        buffer) and the keyword arguments of :meth:`from_buffer` for its metadata part (sizes
        and, when ``host``, the :class:`HostBatch` lists; a CUDA-graph replay needs none).
        ``prefix`` rides along in the same host-to-device copy (the runner puts the step's
        token ids there). Raises ValueError as :meth:`pack` does, and for an ``out`` of
        another size (nothing is returned then)."""
        lens_l, starts_l = [int(n) for n in lens], [int(s) for s in starts]
        P, T, B, L = len(prefix), sum(lens_l), len(lens_l), len(logits_index)
        size = P + cls.buffer_size(T, B, max_blocks, L)
        if out is None:
            buf = torch.empty(size, dtype=torch.int32, pin_memory=pin)
        elif out.numel() != size or out.dtype != torch.int32 or out.device.type != "cpu":
            raise ValueError(f"out must be a host int32 tensor of {size} elements, got "
                             f"{out.dtype} {out.numel()} on {out.device}")
        else:
            buf = out
        if P:
            buf.numpy()[:P] = np.asarray(prefix, dtype=np.int64).reshape(P)
        cls.pack(starts_l, lens_l, slots, block_tables, logits_index, max_blocks, out=buf[P:])
        lists = HostBatch(starts=starts_l, lens=lens_l, slots=[int(s) for s in slots],
                          block_tables=[[int(b) for b in t] for t in block_tables]
                          ) if host else None
        sizes = dict(num_tokens=T, num_rows=B, max_blocks=max_blocks, num_logits=L,
                     max_seqlen=max(lens_l, default=0),
                     max_end=max((s + n for s, n in zip(starts_l, lens_l)), default=0),
                     decode=all(n <= 1 for n in lens_l), host=lists)
        return buf, sizes

    @classmethod
    def build(cls, starts: Sequence[int], lens: Sequence[int], slots: Sequence[int],
              block_tables: Sequence[Sequence[int]], logits_index: Sequence[int],
              device: torch.device | str, max_blocks: Optional[int] = None) -> "StepBatch":
        """Pack the lists and copy them to ``device`` in one host-to-device copy (pinned and
        non-blocking on CUDA, so building a step never waits for the GPU).

        Args:
            starts, lens, slots: per row (python ints): cache length before the step, new
                tokens, cache slot.
            block_tables: per row, the block ids of its compressed entries.
            logits_index: the tokens (indices into the step's T tokens) that need logits.
            device: where the layers run.
            max_blocks: block-table width (default: the longest table, at least 1).
        """
        device = torch.device(device)
        mb = max([len(t) for t in block_tables] + [1]) if max_blocks is None else max_blocks
        buf, sizes = cls.host_pack(starts, lens, slots, block_tables, logits_index, mb,
                                   pin=device.type == "cuda")
        if device.type == "cuda":
            buf = buf.to(device, non_blocking=True)
        elif device != buf.device:
            buf = buf.to(device)
        return cls.from_buffer(buf, **sizes)

    def require_host(self) -> HostBatch:
        """The python lists, for the per-sequence reference path (raises when absent)."""
        if self.host is None:
            raise RuntimeError("this step batch has no host lists (a CUDA-graph step); the "
                               "per-sequence reference path cannot run on it")
        return self.host
