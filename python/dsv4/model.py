"""The DeepSeek-V4 transformer in pure PyTorch: the reference every kernel is checked against.

Data flow (architecture.md §2): embed → hc_mult identical residual streams → n_layers blocks
(each: mHC collapse → attn_norm → attention → mHC expand; mHC collapse → ffn_norm → MoE → mHC
expand) → hc_head collapse → norm → head (fp32 logits). MTP blocks (§10.3) draft the token after
next from the last residual streams and the next token's embedding.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from .cache import Cache, LayerCache
from .config import ModelConfig
from .layers.attention import Attention
from .layers.linear import Linear
from .layers.mhc import hc_head, hc_post, hc_pre
from .layers.moe import MoE
from .layers.norm import RMSNorm

__all__ = ["Block", "MTPBlock", "Model"]


def _fp32_param(*shape: int, std: float = 0.0) -> nn.Parameter:
    p = nn.Parameter(torch.randn(*shape) * std if std else torch.zeros(*shape))
    p._dsv4_keep_fp32 = True
    return p


class Block(nn.Module):
    """One transformer block: two mHC sites (attention, MoE) with official parameter names."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config
        self.config = c
        self.layer_id = layer_id
        self.attn = Attention(c, layer_id)
        self.ffn = MoE(c, layer_id)
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        mix = (2 + c.hc_mult) * c.hc_mult
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", _fp32_param(mix, c.hc_mult * c.dim, std=0.02))
            setattr(self, f"hc_{site}_base", _fp32_param(mix, std=0.1))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.ones(3)))
            getattr(self, f"hc_{site}_scale")._dsv4_keep_fp32 = True

    def _hc_pre(self, x: torch.Tensor, site: str):
        c = self.config
        return hc_pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                      getattr(self, f"hc_{site}_base"), c.norm_eps, c.hc_sinkhorn_iters, c.hc_eps)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, cache: LayerCache,
                starts: list[int], lens: list[int]) -> torch.Tensor:
        """x [batch, seq, hc_mult, dim] residual streams → the same shape."""
        u, post, comb = self._hc_pre(x, "attn")
        x = hc_post(self.attn(self.attn_norm(u), cache, starts, lens), x, post, comb)
        u, post, comb = self._hc_pre(x, "ffn")
        return hc_post(self.ffn(self.ffn_norm(u), input_ids), x, post, comb)


class MTPBlock(Block):
    """Multi-token-prediction block (§10.3): ``e_proj(enorm(embed(next_ids))) + h_proj(hnorm(X))``
    through a full (SWA, learned-routing) block, then its own hc_head collapse and ``norm``; the
    embedding and head are the main model's."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        c = config
        self.e_proj = Linear(c.dim, c.dim)
        self.h_proj = Linear(c.dim, c.dim)
        self.enorm = RMSNorm(c.dim, c.norm_eps)
        self.hnorm = RMSNorm(c.dim, c.norm_eps)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.hc_head_fn = _fp32_param(c.hc_mult, c.hc_mult * c.dim, std=0.02)
        self.hc_head_base = _fp32_param(c.hc_mult, std=0.1)
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.hc_head_scale._dsv4_keep_fp32 = True


class Model(nn.Module):
    """DeepSeek-V4 (Flash, Pro or any :class:`ModelConfig`) with official tensor names (§12).

    ``Model(config)`` draws weights from the current torch RNG (seed it for reproducibility);
    the module is created in fp32 on the CPU; ``.to(device, dtype)`` casts the compute weights
    while parameters the official code keeps in fp32 (norm weights, mHC, ``attn_sink``,
    compressor ``wkv``/``wgate``/``ape``, gate bias, head) stay fp32.

    Call ``model(input_ids, cache=None, seq_lens=None)``: input_ids int64 [batch, seq];
    ``seq_lens`` int [batch] (each row's valid tokens, right padding; default all ``seq``);
    ``cache`` from :meth:`make_cache` is advanced in place (None = a fresh one, discarded).
    Returns logits float32 [batch, seq, vocab_size] (rows beyond ``seq_lens`` are unspecified).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = Linear(c.dim, c.vocab_size, keep_fp32=True)
        self.hc_head_fn = _fp32_param(c.hc_mult, c.hc_mult * c.dim, std=0.02)
        self.hc_head_base = _fp32_param(c.hc_mult, std=0.1)
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.hc_head_scale._dsv4_keep_fp32 = True
        self.mtp = nn.ModuleList(MTPBlock(c, c.n_layers + k) for k in range(c.n_mtp_layers))
        # Names of the parameters the official code keeps in fp32 (survives to_empty/load).
        self._fp32_names = frozenset(n for n, p in self.named_parameters()
                                     if getattr(p, "_dsv4_keep_fp32", False))

    # ------------------------------------------------------------------ dtype / device
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def to(self, *args, **kwargs) -> "Model":
        """Like ``nn.Module.to``, but a dtype applies to compute weights only (see class doc)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            super().to(device=device, non_blocking=non_blocking)
        if dtype is not None:
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"Model dtype must be float32, bfloat16 or float16, got {dtype}")
            for name, p in self.named_parameters():
                want = torch.float32 if name in self._fp32_names else dtype
                if p.is_floating_point() and p.dtype != want:
                    p.data = p.data.to(want)
        return self

    def bfloat16(self) -> "Model":
        return self.to(dtype=torch.bfloat16)

    def half(self) -> "Model":
        return self.to(dtype=torch.float16)

    def float(self) -> "Model":
        return self.to(dtype=torch.float32)

    def make_cache(self, batch_size: int) -> Cache:
        """An empty :class:`Cache` for ``batch_size`` sequences on the model's device/dtype."""
        return Cache(self.config, batch_size, self.dtype, self.device)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, input_ids: torch.Tensor, cache: Cache,
                      seq_lens: Optional[Sequence[int] | torch.Tensor]
                      ) -> tuple[list[int], torch.Tensor]:
        """Validate a call; return (valid tokens per row, int64 ids with padding set to 0)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("input_ids must be an int64/int32 tensor [batch, seq], got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if not isinstance(cache, Cache) or cache.config != self.config:
            raise ValueError("cache was not made by this model's make_cache (config differs)")
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences but input_ids has batch {B}")
        if cache.dtype != self.dtype or cache.device != self.device:
            raise ValueError(f"cache holds {cache.dtype} on {cache.device} but the model runs "
                             f"{self.dtype} on {self.device}: make the cache after .to(...)")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device}, the model on {self.device}")
        if seq_lens is None:
            lens = [S] * B
        else:
            raw = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
            if any(isinstance(v, bool) or int(v) != v for v in raw):
                raise ValueError(f"seq_lens must hold integers, got {raw}")
            lens = [int(v) for v in raw]
        if len(lens) != B or any(not 0 <= v <= S for v in lens):
            raise ValueError(f"seq_lens must have {B} entries in [0, {S}], got {lens}")
        valid = torch.arange(S, device=input_ids.device)[None, :] < torch.tensor(
            lens, device=input_ids.device)[:, None]
        ids = input_ids[valid]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        # Padded positions get token 0 so that embedding and hash routing stay in range.
        return lens, input_ids.long().masked_fill(~valid, 0)

    def _head(self, x: torch.Tensor, fn, scale, base, norm: RMSNorm) -> torch.Tensor:
        c = self.config
        y = norm(hc_head(x, fn, scale, base, c.norm_eps, c.hc_eps))
        return self.head(y.float())

    def forward(self, input_ids: torch.Tensor, cache: Optional[Cache] = None,
                seq_lens: Optional[Sequence[int] | torch.Tensor] = None,
                return_hidden: bool = False):
        """Logits float32 [batch, seq, vocab]; with ``return_hidden`` also the last residual
        streams [batch, seq, hc_mult, dim] (the MTP input).

        Raises ValueError for input_ids that are not int64/int32 [batch, seq] on the model's
        device, token ids outside [0, vocab_size), seq_lens that are not ``batch`` integers in
        [0, seq], or a cache of another batch size, config, dtype or device.
        """
        cache = self.make_cache(input_ids.shape[0]) if cache is None else cache
        lens, ids = self._check_inputs(input_ids, cache, seq_lens)
        if input_ids.shape[1] == 0:
            B, c = input_ids.shape[0], self.config
            logits = torch.empty(B, 0, c.vocab_size, device=self.device)
            hidden = torch.empty(B, 0, c.hc_mult, c.dim, dtype=self.dtype, device=self.device)
            return (logits, hidden) if return_hidden else logits
        starts = list(cache.lengths)
        h = self.embed(ids)
        x = h.unsqueeze(2).repeat(1, 1, self.config.hc_mult, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x, ids, cache.layers[i], starts, lens)
        for b in range(len(lens)):
            cache.lengths[b] += lens[b]
        logits = self._head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm)
        return (logits, x) if return_hidden else logits

    def forward_mtp(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: Cache,
                    seq_lens: Optional[Sequence[int] | torch.Tensor] = None,
                    depth: int = 0) -> torch.Tensor:
        """MTP draft logits float32 [batch, seq, vocab] (§10.3).

        hidden: [batch, seq, hc_mult, dim] last residual streams of the main model at positions
        p … (from ``forward(..., return_hidden=True)``); next_ids: int64 [batch, seq], the token
        at p+1 for each. Uses and advances the MTP layer's state in ``cache``
        (``cache.mtp_lengths``); positions are those of ``hidden``.

        Raises ValueError for a ``depth`` outside [0, n_mtp_layers), a ``hidden`` whose shape is
        not [batch, seq, hc_mult, dim] of ``next_ids``, and the input errors of :meth:`forward`.
        """
        if not 0 <= depth < len(self.mtp):
            raise ValueError(f"depth must be in [0, {len(self.mtp)}) (n_mtp_layers)")
        lens, ids = self._check_inputs(next_ids, cache, seq_lens)
        c = self.config
        want = (*next_ids.shape, c.hc_mult, c.dim)
        if tuple(hidden.shape) != want:
            raise ValueError(f"hidden must be [batch, seq, hc_mult, dim] = {want}, got "
                             f"{tuple(hidden.shape)}")
        if next_ids.shape[1] == 0:
            return torch.empty(next_ids.shape[0], 0, c.vocab_size, device=self.device)
        starts = list(cache.mtp_lengths)
        blk = self.mtp[depth]
        e = blk.enorm(self.embed(ids))
        x = blk.e_proj(e).unsqueeze(2) + blk.h_proj(blk.hnorm(hidden.to(self.dtype)))
        x = blk(x, ids, cache.layers[self.config.n_layers + depth], starts, lens)
        for b in range(len(lens)):
            cache.mtp_lengths[b] += lens[b]
        return self._head(x, blk.hc_head_fn, blk.hc_head_scale, blk.hc_head_base, blk.norm)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike,
                        device: Optional[str | torch.device] = None,
                        dtype: torch.dtype = torch.bfloat16, weights: str = "dequant",
                        num_layers: Optional[int] = None, progress: bool = True,
                        **config_overrides) -> "Model":
        """Load ``config.json`` and the safetensors weights (official names and formats, §12)
        of the checkpoint directory ``path``: the FP8/FP4 release (shards + index) or bf16/fp32.

        ``device`` (None: ``torch.get_default_device()``); ``dtype`` the compute dtype;
        ``weights="dequant"`` dequantises FP8/FP4 linears to ``dtype`` at load,
        ``weights="native"`` keeps them FP8/FP4 (1/2 or 1/4 of the bf16 bytes) and dequantises
        at use; ``num_layers=N`` loads only the first N layers (no MTP unless
        ``n_mtp_layers=k``); ``progress`` shows a tqdm bar; ``config_overrides`` replace config
        fields (e.g. ``quant_sim=False``). See :func:`dsv4.checkpoint.load_checkpoint` for the
        details and the errors raised (ConfigError, CheckpointError, ValueError).
        """
        from .checkpoint import load_checkpoint
        return load_checkpoint(cls, path, device=device, dtype=dtype, weights=weights,
                               num_layers=num_layers, progress=progress, **config_overrides)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` with the official tensor names."""
        from .checkpoint import save_checkpoint
        save_checkpoint(self, path)
