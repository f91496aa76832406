"""V4 attention: shared K=V MQA over a sliding window plus compressed entries (§3, §6, §7)."""

from __future__ import annotations

import torch
from torch import nn

from ..cache import LayerCache
from ..ops.attention import sparse_attn_reference
from ..ops.quant import fp8_e4m3_sim
from .compressor import Compressor
from .indexer import Indexer
from .linear import Linear
from ..ops.norm import rms_norm_reference
from .norm import RMSNorm
from .rope import apply_rope, rope_frequencies

__all__ = ["Attention", "window_indices"]


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


class Attention(nn.Module):
    """One V4 attention layer (SWA, CSA or HCA by ``compress_ratios[layer_id]``).

    Query: ``wq_a`` → ``q_norm`` (= qr) → ``wq_b`` → weight-free per-head RMS → RoPE on the last
    ``rope_head_dim`` dims. Key = value: ``wkv`` → ``kv_norm`` → RoPE (→ FP8 simulation of the
    non-RoPE dims with quant_sim). Each query attends, with the per-head ``attn_sink``, to its
    window and (CSA) the indexer's top-k or (HCA) all complete compressed entries. Output:
    inverse RoPE, grouped ``wo_a`` (o_groups × [o_lora_rank, heads·head_dim/o_groups]), ``wo_b``.
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

    def freqs(self, device: torch.device) -> torch.Tensor:
        """This layer's RoPE frequency table [rope_head_dim // 2] fp32 on ``device``."""
        if device not in self._freqs:
            self._freqs[device] = next(iter(self._freqs.values())).to(device)
        return self._freqs[device]

    def forward(self, x: torch.Tensor, cache: LayerCache, starts: list[int], lens: list[int]
                ) -> torch.Tensor:
        """x [batch, seq, dim] (right-padded; row b has ``lens[b]`` valid tokens at positions
        ``starts[b]`` …). Advances ``cache``; returns [batch, seq, dim] (0 rows at padding)."""
        B, S, _ = x.shape
        c = self.config
        freqs = self.freqs(x.device)
        rd = self.rope_dim
        pos = torch.tensor(starts, device=x.device)[:, None] + torch.arange(S, device=x.device)
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = rms_norm_reference(q, None, c.norm_eps)
        q = apply_rope(q, pos[..., None], freqs)
        kv = apply_rope(self.kv_norm(self.wkv(x)), pos, freqs)
        if c.quant_sim:
            kv = torch.cat([fp8_e4m3_sim(kv[..., :-rd], 64), kv[..., -rd:]], dim=-1)
        o = torch.zeros_like(q)
        W = self.window_size
        for b in range(B):
            s, n = starts[b], lens[b]
            if n == 0:
                continue
            kv_new = kv[b, :n]
            idx = window_indices(s, n, W, x.device)
            parts = [cache.window[b], kv_new]
            if self.compress_ratio:
                if self.indexer is not None:
                    comp = self.indexer(x[b, :n], qr[b, :n], cache.indexer, b, s, freqs)
                n_entries = self.compressor(x[b, :n], cache.compressor, b, s, freqs)
                if self.indexer is None:   # HCA: every complete entry, causal per query
                    t = torch.arange(s, s + n, device=x.device)[:, None]
                    j = torch.arange(n_entries, device=x.device)[None, :]
                    comp = torch.where(j < (t + 1) // self.compress_ratio, j, -1)
                parts.append(cache.compressor.entries[b, :n_entries])
                idx = torch.cat([idx, torch.where(comp >= 0, comp + W + n, -1)], dim=-1)
            o[b, :n], _ = sparse_attn_reference(q[b, :n], torch.cat(parts, 0), idx,
                                                self.attn_sink, self.softmax_scale)
            keep = min(n, W)
            slots = torch.arange(s + n - keep, s + n, device=x.device) % W
            cache.window[b, slots] = kv_new[n - keep:]
        o = apply_rope(o, pos[..., None], freqs, inverse=True)
        o = o.view(B, S, self.o_groups, -1)
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        z = torch.einsum("bsgd,grd->bsgr", o, wo_a.to(o.dtype))
        return self.wo_b(z.flatten(2))
