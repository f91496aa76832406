"""V4 attention: shared K=V MQA over a sliding window plus compressed entries (§3, §6, §7)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..cache import LayerCache
from ..ops import kv_cache
from ..ops.attention import sparse_attn_reference
from ..ops.backend import env_choice, use_kernels
from ..ops.grouped_oproj import grouped_oproj_reference, output_projection
from ..ops.qkv_rope import QUANT_FP8, QUANT_NONE
from ..ops.quant import fp8_e4m3_sim
from .branch import Branch
from .compressor import Compressor, complete_entries
from .indexer import Indexer
from ..ops.norm import rms_norm_reference
from .linear import Linear, ProjectionGroups, fp32_input, project
from .norm import RMSNorm
from .rope import apply_rope, rope_frequencies
from .varlen import StepBatch

__all__ = ["Attention", "window_indices"]

# Index entries (window + compressed scope) the kernel path builds at once; beyond this, the
# queries of one forward step are attended in blocks.
_INDEX_ELEMENTS = 1 << 26

# The torch.ops.dsv4 namespace (CUDA kernels, references on CPU); one name to patch in tests.
_dsv4 = torch.ops.dsv4


def window_indices(start: int, n: int, window_size: int, device=None) -> torch.Tensor:
    """Window part of the index lists for queries at positions start … start+n−1.

    Keys are addressed in the concatenation ``[ring buffer (window_size slots) ; the n new
    tokens]``: position p < start lives at ring slot ``p % window_size``, p ≥ start at
    ``window_size + p − start``. Query t sees positions max(0, t−W+1) … t (§3.5).
    Returns int64 [n, window_size], −1 for positions before 0.
    """
    t = torch.arange(start, start + n, device=device)[:, None]
    p = t - (window_size - 1) + torch.arange(window_size, device=device)[None, :]
    idx = torch.where(p >= start, window_size + p - start, p % window_size)
    return torch.where(p >= 0, idx, -1)


class Attention(ProjectionGroups, nn.Module):
    """One V4 attention layer (SWA, CSA or HCA by ``compress_ratios[layer_id]``).

    Query: ``wq_a`` → ``q_norm`` (= qr) → ``wq_b`` → weight-free per-head RMS → RoPE on the last
    ``rope_head_dim`` dims. Key = value: ``wkv`` → ``kv_norm`` → RoPE (→ FP8 simulation of the
    non-RoPE dims with quant_sim). Each query attends, with the per-head ``attn_sink``, to its
    window and (CSA) the indexer's top-k or (HCA) all complete compressed entries. Output:
    inverse RoPE, grouped ``wo_a`` (o_groups × [o_lora_rank, heads·head_dim/o_groups]), ``wo_b``.

    Same-input projections (:meth:`projection_groups`; one GEMM each after
    ``Model.fuse_projections``): ``"input"`` = ``wq_a``, ``wkv`` (and on CSA layers the
    indexer's ``weights_proj``) on the layer input x; ``"compressor"`` = the compressor's
    ``wkv``, ``wgate`` (and on CSA layers the indexer compressor's ``wkv``, ``wgate``) on
    ``x.float()``. When fused the layer computes them here, on both paths, and hands the
    outputs to its compressor and indexer; unfused, each module projects its own input where
    it always did (the same ops and lifetimes as without groups). Not grouped:
    ``wq_b`` and the indexer's ``wq_b``, which both read qr: one output would keep the
    indexer's queries [T, 8192] alive as long as ``wq_b``'s, through the attention's peak
    (+268 MB at a 16K-token prefill chunk of V4-Flash) to save one launch.
    """

    def __init__(self, config, layer_id: int):
        super().__init__()
        c = config
        self.config = c
        self.layer_id = layer_id
        self.n_heads, self.head_dim, self.rope_dim = c.n_heads, c.head_dim, c.rope_head_dim
        self.window_size = c.window_size
        self.compress_ratio = c.compress_ratios[layer_id]
        self.o_groups, self.o_lora_rank = c.o_groups, c.o_lora_rank
        self.softmax_scale = c.head_dim ** -0.5
        self.wq_a = Linear(c.dim, c.q_lora_rank)
        self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
        self.wq_b = Linear(c.q_lora_rank, c.n_heads * c.head_dim)
        self.wkv = Linear(c.dim, c.head_dim)
        self.kv_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.wo_a = Linear(c.n_heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank)
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, c.dim)
        self.attn_sink = nn.Parameter(torch.zeros(c.n_heads))
        self.attn_sink._dsv4_keep_fp32 = True
        self.compressor = None
        self.indexer = None
        if self.compress_ratio:
            self.compressor = Compressor(c, self.compress_ratio, c.head_dim)
            if self.compress_ratio == 4:
                self.indexer = Indexer(c, self.compress_ratio)
            freqs = rope_frequencies(c.rope_head_dim, c.compress_rope_theta, c.original_seq_len,
                                     c.rope_factor, c.beta_fast, c.beta_slow)
        else:
            freqs = rope_frequencies(c.rope_head_dim, c.rope_theta)
        self._freqs = {freqs.device: freqs}

    def projection_groups(self) -> dict:
        """The linears this layer applies to one input (see the class doc): {"input": on x,
        "compressor": on x.float() (compressed layers)}."""
        groups = {"input": self._input_linears()}
        if self.compressor is not None:
            groups["compressor"] = self._compressor_linears()
        return groups

    def _input_linears(self) -> tuple:
        ix = self.indexer
        return (self.wq_a, self.wkv) + (() if ix is None else (ix.weights_proj,))

    def _compressor_linears(self) -> tuple:
        c, ix = self.compressor, self.indexer
        return (c.wkv, c.wgate) + (() if ix is None else (ix.compressor.wkv,
                                                           ix.compressor.wgate))

    def _input_projections(self, x: torch.Tensor) -> tuple:
        """(wq_a(x), wkv(x), the indexer's weights_proj(x) or None) for x [T, dim]: one GEMM
        when the "input" group is fused; unfused, the indexer projects x itself (None)."""
        group = self.projection_group("input")
        linears = self._input_linears() if group is not None else (self.wq_a, self.wkv)
        qa, kv, *w = project(x, linears, group)
        return qa, kv, (w[0] if w else None)

    def _compressor_projections(self, xf: torch.Tensor) -> tuple:
        """On ``xf`` [n, dim] (x as :func:`fp32_input` prepares it for the compressors'
        linears) when the "compressor" group is fused: (the compressor's (wkv, wgate) outputs,
        the indexer compressor's or None), from one GEMM when it serves; (None, None) unfused
        (each compressor projects its input itself)."""
        group = self.projection_group("compressor")
        if group is None:
            return None, None
        ys = project(xf, self._compressor_linears(), group)
        return tuple(ys[:2]), (tuple(ys[2:]) if self.indexer is not None else None)

    def freqs(self, device: torch.device) -> torch.Tensor:
        """This layer's RoPE frequency table [rope_head_dim // 2] fp32 on ``device``."""
        if device not in self._freqs:
            self._freqs[device] = next(iter(self._freqs.values())).to(device)
        return self._freqs[device]

    def forward(self, x: torch.Tensor, cache: LayerCache, batch: StepBatch) -> torch.Tensor:
        """x [T, dim]: the new tokens of every row of ``batch`` back to back (see
        :class:`~dsv4.layers.varlen.StepBatch`). Advances ``cache`` (the rows' slots);
        returns [T, dim]."""
        c = self.config
        freqs = self.freqs(x.device)
        pos = batch.pos
        kernels = use_kernels(x, self._kernel_ops, self._kernel_unsupported)
        # wq_a, wkv (CSA: and the indexer's weights_proj) on x: one GEMM when fused
        qa, kv, index_w = self._input_projections(x)
        qr = self.q_norm(qa, kernel=kernels)   # one rms_norm launch on the kernel path
        del qa                                 # (its storage: freed unless fused with kv's)
        if kernels:
            o = self._attend_kernels(x, qr, kv, cache, batch, freqs, index_w)
        else:
            q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
            # §3.2: weight-free per-head RMSNorm, RoPE; §3.3: kv_norm, RoPE, FP8 simulation.
            q = apply_rope(rms_norm_reference(q, None, c.norm_eps), pos[:, None], freqs)
            kv = apply_rope(self.kv_norm(kv), pos, freqs)
            if c.quant_sim:
                rd = self.rope_dim
                kv = torch.cat([fp8_e4m3_sim(kv[..., :-rd], 64), kv[..., -rd:]], dim=-1)
            o = self._attend_reference(x, qr, q, kv, cache, batch, freqs, index_w)
        return self.wo_b(self._project(o, pos, freqs).flatten(1))

    def _project(self, o: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """§3.7: inverse RoPE and the grouped ``wo_a`` on o [T, heads, head_dim] → z [T, G, R]
        (the formula of ``dsv4.ops.grouped_oproj``; its CUDA kernel when the layer's kernels
        run and no gradient is needed, since the kernel has no backward)."""
        grad = torch.is_grad_enabled() and (o.requires_grad or any(
            p.requires_grad for p in self.wo_a.parameters()))
        if not grad and use_kernels(o, ("grouped_oproj",), self._oproj_unsupported):
            return output_projection(o, pos, freqs, self.wo_a, self.o_groups)
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        return grouped_oproj_reference(o, pos, freqs, wo_a.to(o.dtype), None)

    @property
    def _oproj_unsupported(self) -> str | None:
        if self.rope_dim != 64 or self.head_dim % 64:
            return (f"grouped_oproj takes rope_head_dim 64 and head_dim % 64 == 0, not "
                    f"{self.rope_dim} and {self.head_dim}")
        return None

    @property
    def _kernel_unsupported(self) -> str | None:
        """Why this layer's shapes are outside the CUDA kernels' range, or None."""
        c = self.config
        if self.head_dim not in (64, 128, 256, 512):
            return f"sparse_attn kernels take head_dim 64/128/256/512, not {self.head_dim}"
        if self.indexer is not None:
            if c.index_head_dim not in (64, 128):
                return f"indexer_topk takes index_head_dim 64 or 128, not {c.index_head_dim}"
            if not 1 <= c.index_topk <= 2048:
                return f"indexer_topk takes index_topk 1..2048, not {c.index_topk}"
        return None

    @property
    def _kernel_ops(self) -> tuple[str, ...]:
        ops = ("sparse_attn", "q_norm_rope", "kv_norm_rope", "rms_norm")
        if self.indexer is not None:
            return ops + ("compress_kv", "indexer_topk", "paged_rows")
        return ops + ("compress_kv", "hca_attn") if self.compress_ratio else ops

    def _attend_reference(self, x, qr, q, kv, cache: LayerCache, batch: StepBatch,
                          freqs, index_w=None) -> torch.Tensor:
        """The reference core: one sequence at a time from the host lists of ``batch``, keys
        concatenated, then :func:`sparse_attn_reference`. ``index_w`` (CSA, fused): the
        indexer's ``weights_proj(x)`` of the T tokens, or None. Returns o [T, heads,
        head_dim]."""
        h = batch.require_host()
        o = torch.zeros_like(q)
        W = self.window_size
        t0 = 0
        for s, n, slot, table in zip(h.starts, h.lens, h.slots, h.block_tables):
            t1 = t0 + n
            if n == 0:
                continue
            # (an FP8 cache: the step's new keys are attended as the cache will store them)
            kv_new = cache.stored_keys(kv[t0:t1])
            idx = window_indices(s, n, W, x.device)
            parts = [cache.ring_keys(slot), kv_new]
            if self.compress_ratio:
                proj, index_proj = self._compressor_projections(
                    fp32_input(x[t0:t1], self._compressor_linears()))
                if self.indexer is not None:
                    comp = self.indexer(x[t0:t1], qr[t0:t1], cache.indexer, slot, s, freqs,
                                        table, None if index_w is None else index_w[t0:t1],
                                        index_proj)
                n_entries = self.compressor(x[t0:t1], cache.compressor, slot, s, freqs, table,
                                            proj)
                if self.indexer is None:   # HCA: every complete entry, causal per query
                    t = torch.arange(s, s + n, device=x.device)[:, None]
                    j = torch.arange(n_entries, device=x.device)[None, :]
                    comp = torch.where(j < (t + 1) // self.compress_ratio, j, -1)
                parts.append(cache.compressor.row_entries(slot, table, n_entries))
                idx = torch.cat([idx, torch.where(comp >= 0, comp + W + n, -1)], dim=-1)
            o[t0:t1], _ = sparse_attn_reference(q[t0:t1], torch.cat(parts, 0), idx,
                                                self.attn_sink, self.softmax_scale)
            keep = min(n, W)
            ring = torch.arange(s + n - keep, s + n, device=x.device) % W
            cache.write_ring(slot, ring, kv_new[n - keep:])
            t0 = t1
        return o

    def _attend_kernels(self, x, qr, kv_raw, cache: LayerCache, batch: StepBatch,
                        freqs, index_w=None) -> torch.Tensor:
        """The kernel core for the whole step in one launch per op, from device tensors only
        (no host synchronisation; shapes depend on host-side sizes of ``batch`` alone).

        ``qr`` [T, q_lora_rank] is the normed q latent, ``kv_raw`` [T, head_dim] the ``wkv``
        output: ``wq_b`` + ``q_norm_rope`` and ``kv_norm_rope`` finish the q and kv paths in
        one pass each (§3.2, §3.3). A compressed layer at decode size runs its compressors
        and (CSA) indexer beside them, on a side branch (:mod:`dsv4.layers.branch`) joined
        before the attention; a CSA layer's main compressor is handed back to this stream
        after the q / kv paths, beside the indexer (:func:`_csa_compressor_on_main`). Keys
        live in two scopes. Main scope: in a decode step (every row at
        most one new token) ``kv_norm_rope`` writes the new keys into the window rings and the
        rings of all slots are the scope, in place; otherwise the rings of the step's rows
        followed by the step's new keys (``[B·window_size + T, head_dim]``, a copy), and the
        rings are updated after attention. Compressed scope: the entry store viewed as a pool
        ``[num_blocks, block_size, head_dim]`` addressed through each row's block table: the
        indexer's picks (CSA, ``sparse_attn`` with physical indices) or every complete entry
        (HCA, ``hca_attn`` with per-query entry counts, no index list). With an FP8 cache
        (``cache.kv_fp8``: MODEL1 rings and entry pools) both scopes are FP8 pools with the
        same flat rows (see :func:`_fp8_main_scope`). ``index_w`` (CSA, fused): the indexer's
        ``weights_proj(x)``, or None. Returns o [T, heads, head_dim].
        """
        c = self.config
        T, W = batch.num_tokens, self.window_size
        if T == 0:
            return x.new_zeros(0, self.n_heads, self.head_dim)
        sel = entries = extra_len = handoff = None
        branch = Branch(x, enabled=bool(self.compress_ratio) and cache.compressor.paged)
        try:   # (joined on an error too: no side-stream work left unjoined)
            if branch.active:
                with branch:
                    sel, handoff = self._compress(x, qr, cache, batch, freqs, index_w, branch)
            rows, pos, slot_t = _token_meta(batch)
            q_raw = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
            q = _dsv4.q_norm_rope(q_raw, batch.pos, freqs, c.norm_eps, True, QUANT_NONE)
            main_kv, ring, kv = self._main_scope(kv_raw, cache, batch, freqs, pos, slot_t)
            if handoff is not None:   # CSA: the main compressor here, beside the indexer
                xf, proj, ready = handoff
                branch.wait(ready)
                self.compressor.forward_batch(xf, cache.compressor, batch, freqs, proj)
            if self.compress_ratio and not branch.active:
                sel, _ = self._compress(x, qr, cache, batch, freqs, index_w)
            # A decode step's window indices are the same in every layer: built once per step.
            if batch.decode:
                win_all = batch.shared(("window_indices", W), lambda: _window_indices(
                    batch, slice(0, T), W, rows, pos, slot_t))
            if self.indexer is None and self.compress_ratio:   # HCA: every complete entry,
                extra_len = complete_entries(batch, self.compress_ratio)   # causal per query
        finally:
            branch.join()
        if self.compress_ratio and cache.compressor.entries.shape[1]:
            entries = cache.compressor.entries    # (a dense store may still be empty)
        # The index lists are built for blocks of queries so that their size stays bounded;
        # a decode step or an ordinary prefill is a single block.
        step = max(1, _INDEX_ELEMENTS // (W + (sel.shape[1] if sel is not None else 0)))
        outs = []
        for t0 in range(0, T, step):
            blk = slice(t0, min(T, t0 + step))
            win_idx = (win_all[blk] if batch.decode else
                       _window_indices(batch, blk, W, rows, pos, slot_t))
            if entries is None:
                o, _ = _dsv4.sparse_attn(q[blk], main_kv, win_idx, self.attn_sink,
                                         self.softmax_scale)
            elif sel is None:          # HCA
                o, _ = _dsv4.hca_attn(q[blk], main_kv, win_idx, self.attn_sink,
                                      self.softmax_scale, None, entries, batch.block_table,
                                      batch.rows[blk], extra_len[blk])
            else:                      # CSA: the indexer's picks (logical entry indices)
                # their flat rows in the entry pool through the rows' block tables (int32)
                extra_idx = _dsv4.paged_rows(batch.block_table, batch.rows[blk], sel[blk],
                                             entries.shape[1])
                # (an FP8 MODEL1 pool is passed as the pool; its flat row is the same)
                extra = entries if entries.dtype == torch.uint8 else \
                    entries.view(-1, entries.shape[-1])
                o, _ = _dsv4.sparse_attn(q[blk], main_kv, win_idx, self.attn_sink,
                                         self.softmax_scale, None, extra, extra_idx)
            outs.append(o)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        if not batch.decode and ring is not None:     # (an FP8 ring was written before)
            # Ring update: every token writes ring slot (slot, p % W) with the value of the
            # last token of its row at a position ≡ p (mod W), so that the tokens that share
            # a ring slot write the same value (deterministic without a host-side list).
            end = (batch.starts + batch.lens).long()[rows]
            final = pos + W * torch.div(end - 1 - pos, W, rounding_mode="floor")
            src = torch.arange(T, device=x.device) + (final - pos)
            ring.index_copy_(0, _ring_rows(batch, slot_t, pos, W).long(),
                             kv.index_select(0, src))
        return out

    def _main_scope(self, kv_raw, cache: LayerCache, batch: StepBatch, freqs, pos, slot_t
                    ) -> tuple:
        """The kv path (``kv_norm_rope``, §3.3) and the main key scope of
        :meth:`_attend_kernels`: (the scope, the bf16 ring viewed as rows or None for an FP8
        ring, the step's new keys or None). A decode step writes the new keys into the rings
        first and attends the rings in place; otherwise the scope is a copy of the rows' rings
        followed by the new keys, and the caller updates the rings after attention."""
        c, W, B = self.config, self.window_size, batch.num_rows
        quant = QUANT_FP8 if c.quant_sim else QUANT_NONE
        weight, eps = self.kv_norm.weight, c.norm_eps
        if cache.kv_fp8:
            scope = _fp8_main_scope(kv_raw, weight, batch, freqs, eps, quant, cache.window,
                                    _ring_rows(batch, slot_t, pos, W), pos, W)
            return scope, None, None
        ring = cache.window.view(-1, cache.window.shape[-1])
        if batch.decode and cache.window.dtype == torch.bfloat16:   # the op's cache dtype
            kv = _dsv4.kv_norm_rope(kv_raw, weight, batch.pos, freqs, eps, quant, ring,
                                    _ring_rows(batch, slot_t, pos, W))
            return ring, ring, kv
        kv = _dsv4.kv_norm_rope(kv_raw, weight, batch.pos, freqs, eps, quant)
        if batch.decode:
            ring.index_copy_(0, _ring_rows(batch, slot_t, pos, W).long(), kv)
            return ring, ring, kv
        return torch.cat([cache.window.index_select(0, batch.slots.long()).view(B * W, -1), kv],
                         dim=0), ring, kv

    def _compress(self, x, qr, cache: LayerCache, batch: StepBatch, freqs,
                  index_w=None, branch: Optional[Branch] = None) -> tuple:
        """The compressed layer's work on the step's tokens (kernel path): both compressors'
        fp32 input (one cast, or x itself for the split bf16 GEMMs of a prefill) and their
        projections (one GEMM when fused), the indexer's top-k (CSA) and the compressed stores'
        updates. Returns (the indexer's picks: int32 [T, index_topk] logical entries, None on
        HCA layers; the hand-off or None).

        Inside a side ``branch`` of a CSA layer (:func:`_csa_compressor_on_main`) the main
        compressor is not run here: the hand-off (xf, its fused projections or None when
        unfused, an event after them)
        lets the caller run it on the current stream beside the indexer, whose store it does
        not share (the indexer's top-k is the branch's long latency-bound chain at decode)."""
        xf = fp32_input(x, self._compressor_linears())
        proj, index_proj = self._compressor_projections(xf)
        ready = None
        if branch is not None and self.indexer is not None and _csa_compressor_on_main():
            ready = branch.mark()
        sel = None
        if self.indexer is not None:
            sel = self.indexer.forward_batch(x, qr, cache.indexer, batch, freqs, xf, index_w,
                                             index_proj)
        if ready is not None:
            return sel, (xf, proj, ready)
        self.compressor.forward_batch(xf, cache.compressor, batch, freqs, proj)
        return sel, None


def _csa_compressor_on_main() -> bool:
    """``DSV4_CSA_COMPRESSOR_STREAM`` (read per call): where a CSA layer's main compressor runs
    when the layer has a side branch (:mod:`dsv4.layers.branch`): ``main`` (the default) on
    the current stream after the layer's q / kv paths, once the branch's compressor
    projections are done, beside the indexer;
    ``side`` in the branch after the indexer (the order before 2026-12-06, kept for A/B runs).
    Scheduling only: the same kernels on the same inputs."""
    return env_choice("DSV4_CSA_COMPRESSOR_STREAM", ("", "main", "side")) != "side"


def _token_meta(batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows int64 [T]: each token's step row; pos [T], slot_t [T]: its position and cache
    slot), computed once per step (:meth:`StepBatch.shared`). A decode step keeps pos and
    slot_t in the batch's int32 (the ring rows and window indices, which the kernels take as
    int32, are then computed without int64 round trips); otherwise int64."""
    rows = batch.shared(("rows",), lambda: batch.rows.long())
    if batch.decode:
        return rows, batch.pos, batch.shared(("token_slots",), lambda: batch.slots[rows])
    return (rows, batch.shared(("pos",), lambda: batch.pos.long()),
            batch.shared(("token_slots",), lambda: batch.slots.long()[rows]))


def _ring_rows(batch: StepBatch, slot_t: torch.Tensor, pos: torch.Tensor,
               W: int) -> torch.Tensor:
    """int32 [T]: the window-ring row of each token, ``slot·W + p % W`` of the rings viewed
    as [slots·W, head_dim] (§3.5), computed once per step (:meth:`StepBatch.shared`)."""
    return batch.shared(("ring_rows", W), lambda: (slot_t * W + pos % W).to(torch.int32))


def _window_indices(batch: StepBatch, blk: slice, W: int, rows: torch.Tensor,
                    pos: torch.Tensor, slot_t: torch.Tensor) -> torch.Tensor:
    """int32 [t, W]: the window part of the index lists of queries ``blk`` in the main key
    scope of :meth:`Attention._attend_kernels` (query at p sees positions p−W+1 … p, §3.5;
    −1 before position 0). ``rows``, ``pos``, ``slot_t`` from :func:`_token_meta`."""
    B = batch.num_rows
    p = pos[blk, None] + torch.arange(1 - W, 1, device=pos.device, dtype=pos.dtype)[None, :]
    if batch.decode:
        # Window scope = the rings: position p of slot s at s·W + p % W.
        idx = slot_t[blk, None] * W + p % W
    else:
        # Position p of row b (chunk start s_b, token offset o_b) is at ring slot
        # b·W + p % W if p < s_b, else at B·W + o_b + (p − s_b).
        r = rows[blk, None]
        chunk_start = batch.starts.long()[r]
        offset = batch.cu_seqlens.long()[r]
        idx = torch.where(p >= chunk_start, B * W + offset + (p - chunk_start), r * W + p % W)
    return torch.where(p >= 0, idx, -1).to(torch.int32)


def _fp8_main_scope(kv_raw, weight, batch: StepBatch, freqs, eps: float, quant: int,
                    ring: torch.Tensor, ring_rows: torch.Tensor, pos: torch.Tensor,
                    W: int) -> torch.Tensor:
    """The main key scope of a step over an FP8 MODEL1 window ring ``ring``
    (uint8 [slots, W, 584], :mod:`dsv4.ops.kv_cache`), with the step's new keys packed by
    ``kv_norm_rope`` (the quantiser of every FP8 cache write). Same flat rows as the bf16
    scopes of :meth:`Attention._attend_kernels`, so the index arithmetic is shared:

    * decode: ``kv_norm_rope`` writes each new key into its ring slot first; the scope is the
      ring itself (row ``slot·W + p % W``), in place.
    * otherwise: a MODEL1 pool of blocks of W entries, the rings of the step's B rows
      (copied, blocks 0 … B−1) followed by the T new keys (row ``B·W + t``), since the kernels
      take both scopes in FP8 or both in bf16. ``kv_norm_rope`` packs the new keys into it
      and, in the same launch, writes into the ring the tokens that are the last of their
      row at their ring slot (``p ≥ end − W``; the scope holds the copy, so writing the ring
      before attention is safe). Distinct tokens write distinct ring rows.

    ``ring_rows``: int32 [T] ring row of each token (:func:`_ring_rows`). Returns the scope
    (a uint8 pool [nb, W, 584])."""
    T, B = batch.num_tokens, batch.num_rows
    if batch.decode:
        _dsv4.kv_norm_rope(kv_raw, weight, batch.pos, freqs, eps, quant, ring, ring_rows)
        return ring
    D = kv_cache.MODEL1_HEAD_DIM
    scope = kv_cache.allocate(kv_cache.MODEL1, B + -(-T // W), W, D, kv_raw.device)
    blocks = kv_cache.block_view(ring).index_select(0, batch.slots.long())
    kv_cache.block_view(scope)[:B] = blocks     # whole blocks: values and scales
    end = (batch.starts + batch.lens).long()[batch.rows.long()]
    last = torch.where(pos >= end - W, ring_rows, -1).to(torch.int32)
    new_rows = torch.arange(B * W, B * W + T, dtype=torch.int32, device=kv_raw.device)
    _dsv4.kv_norm_rope(kv_raw, weight, batch.pos, freqs, eps, quant, scope, new_rows, ring,
                       last)
    return scope
