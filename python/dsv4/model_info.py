"""Model arithmetic for ``dsv4 info``: parameter counts, layer schedule, KV-cache bytes.

* :func:`param_counts` counts the parameters of :class:`~dsv4.model.Model` built on the meta
  device (no memory, no weights) and derives the active count from the routing config
  (``n_activated_experts`` of ``n_routed_experts`` routed experts plus the shared expert per
  token; architecture.md §1.4).
* :func:`layer_schedule` lists which layers are SWA / CSA / HCA / hash-routed (§1.2).
* :func:`kv_cache_bytes` is the KV cache of one sequence in the production layout of §11.2
  (kernels.md §3): 584-byte FP8 entries (448 e4m3 nope + 64 bf16 rope + 7 ue8m0 scales + 1 pad)
  and 132-byte FP8 or 68-byte FP4 indexer keys; :func:`gqa_baseline_bytes` the same for a
  grouped-query-attention baseline of the same depth (8 KV heads of 128, K and V in bf16).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .config import ModelConfig

__all__ = [
    "ParamCounts", "param_counts", "meta_model", "layer_schedule", "kv_entry_bytes",
    "indexer_key_bytes", "kv_bytes_per_token", "kv_cache_bytes", "gqa_baseline_bytes",
    "format_model_info", "ONE_M",
]

ONE_M = 1 << 20  #: "1M context" = 1,048,576 tokens (the released max_position_embeddings)

_ROUTED = re.compile(r"^(layers|mtp)\.(\d+)\.ffn\.experts\.(\d+)\.")


# ------------------------------------------------------------------------------ parameters


def meta_model(config: ModelConfig) -> nn.Module:
    """``Model(config)`` on the meta device: every parameter with its shape and no storage.

    Takes a few seconds for V4-Flash/Pro (module construction); allocates no tensor memory.
    """
    from .model import Model

    with torch.device("meta"):     # Linear draws no values on meta (layers/linear.py)
        return Model(config)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a DeepSeek-V4 model (numbers of scalars; architecture.md §1.4).

    ``total`` and ``active`` cover the main model: embedding, head, every block (attention,
    compressors, indexer, all routed experts, shared expert, gate, mHC, norms), final norm and
    ``hc_head``; the MTP block(s) are counted separately in ``mtp`` / ``mtp_active`` (the
    official §1.4 figures exclude MTP). ``active`` keeps ``n_activated_experts`` routed experts
    per MoE layer (hash-routed layers too: ``tid2eid`` picks as many). Weight storage format
    does not matter: an FP4 expert [out, in/2] int8 counts as out x in parameters. The int64
    ``tid2eid`` routing tables are buffers, not parameters, and are not counted.
    """

    total: int
    active: int
    embed_head: int        #: embed.weight + head.weight
    routed_experts: int    #: all routed-expert parameters of the main layers
    mtp: int
    mtp_active: int

    @property
    def total_without_embed(self) -> int:
        """``total`` minus the embedding and head matrices."""
        return self.total - self.embed_head

    @property
    def active_without_embed(self) -> int:
        """``active`` minus the embedding and head matrices."""
        return self.active - self.embed_head


def param_counts(config: ModelConfig, model: nn.Module | None = None) -> ParamCounts:
    """Count the parameters of ``Model(config)`` (built on the meta device) and the active ones.

    Args:
        config: any valid :class:`~dsv4.config.ModelConfig`.
        model: an already built model of this config (any device) to count instead of
            building one on the meta device.

    Returns:
        :class:`ParamCounts`. V4-Flash: total 284.33B, active ~13.8B (~12.7B without
        embed/head); V4-Pro: total ~1573B, active ~49.8B (architecture.md §1.4).

    Raises:
        ValueError: the model's routed experts are not ``n_routed_experts`` equal-sized
            experts per MoE layer (the active count would be wrong).
    """
    model = meta_model(config) if model is None else model
    total = mtp = embed_head = 0
    routed: dict[tuple[str, int], list] = {}   # (prefix, layer) -> [numel, set(expert ids)]
    per_expert: dict[tuple[str, int, int], int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
        else:
            total += n
        if name in ("embed.weight", "head.weight"):
            embed_head += n
        m = _ROUTED.match(name)
        if m:
            key = (m.group(1), int(m.group(2)))
            acc = routed.setdefault(key, [0, set()])
            acc[0] += n
            acc[1].add(int(m.group(3)))
            e_key = (*key, int(m.group(3)))
            per_expert[e_key] = per_expert.get(e_key, 0) + n
    E, k = config.n_routed_experts, config.n_activated_experts
    inactive = {"layers": 0, "mtp": 0}
    for (prefix, layer), (numel, experts) in routed.items():
        sizes = {per_expert[(prefix, layer, e)] for e in experts}
        if len(experts) != E or len(sizes) != 1:
            raise ValueError(f"{prefix}.{layer}.ffn.experts: expected {E} equal-sized routed "
                             f"experts, found {len(experts)} of sizes {sorted(sizes)}")
        inactive[prefix] += (E - k) * sizes.pop()
    routed_main = sum(v[0] for (p, _), v in routed.items() if p == "layers")
    return ParamCounts(total=total, active=total - inactive["layers"], embed_head=embed_head,
                       routed_experts=routed_main, mtp=mtp, mtp_active=mtp - inactive["mtp"])


# ------------------------------------------------------------------------------ schedule


def layer_schedule(config: ModelConfig) -> dict[str, list[int]]:
    """Layer ids by kind (architecture.md §1.2).

    Returns a dict with keys ``"swa"``, ``"csa"``, ``"hca"`` (main layers by
    ``compress_ratios``: 0 = SWA, 4 = CSA, other = HCA), ``"hash"`` (hash-routed MoE layers
    ``0 .. n_hash_layers-1``) and ``"mtp"`` (the MTP layers' ids ``n_layers ..``; their kind is
    ``config.layer_kind(id)``). Flash: SWA [0, 1], CSA [2, 4, ..., 42], HCA [3, 5, ..., 41],
    hash [0, 1, 2], MTP [43].
    """
    out: dict[str, list[int]] = {"swa": [], "csa": [], "hca": []}
    for i in range(config.n_layers):
        out[config.layer_kind(i)].append(i)
    out["hash"] = list(range(config.n_hash_layers))
    out["mtp"] = list(range(config.n_layers, config.n_layers + config.n_mtp_layers))
    return out


# ------------------------------------------------------------------------------ KV cache

_KV_DTYPES = ("fp8", "bf16")
_INDEXER_DTYPES = ("fp8", "fp4", "bf16")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def kv_entry_bytes(config: ModelConfig, kv_dtype: str = "fp8") -> int:
    """Bytes of one attention KV entry (a window token or a compressed entry; §11.2).

    ``kv_dtype="fp8"`` (FlashMLA's V4 layout, kernels.md §3): ``nope`` e4m3 bytes + ``2·rope``
    bf16 bytes + one ue8m0 scale per 64 nope dims, the scale bytes padded to a multiple of 8:
    448 + 128 + 7 + 1 = **584** for the released dims (head_dim 512, rope 64).
    ``kv_dtype="bf16"``: ``2·head_dim`` (the reference's buffers, §11.1) = 1024.

    Raises ValueError for another ``kv_dtype``.
    """
    if kv_dtype == "bf16":
        return 2 * config.head_dim
    if kv_dtype != "fp8":
        raise ValueError(f"kv_dtype must be one of {_KV_DTYPES}, got {kv_dtype!r}")
    nope = config.head_dim - config.rope_head_dim
    return nope + 2 * config.rope_head_dim + _round_up(-(-nope // 64), 8)


def indexer_key_bytes(config: ModelConfig, indexer: str = "fp8") -> int:
    """Bytes of one Lightning-Indexer key (CSA layers; §11.2, kernels.md §3).

    ``"fp8"``: ``index_head_dim`` e4m3 bytes + a 4-byte fp32 scale = **132** (DeepGEMM paged
    layout); ``"fp4"``: ``index_head_dim/2`` packed e2m1 bytes + one ue8m0 scale per 32 dims,
    stored in whole int32 words = 64 + 4 = **68**; ``"bf16"``: ``2·index_head_dim`` (the
    reference's buffer) = 256.

    Raises ValueError for another ``indexer``.
    """
    d = config.index_head_dim
    if indexer == "fp8":
        return d + 4
    if indexer == "fp4":
        return -(-d // 2) + _round_up(-(-d // 32), 4)
    if indexer == "bf16":
        return 2 * d
    raise ValueError(f"indexer must be one of {_INDEXER_DTYPES}, got {indexer!r}")


def _check_kv_args(config, indexer, kv_dtype):
    if kv_dtype not in _KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {_KV_DTYPES}, got {kv_dtype!r}")
    if indexer not in _INDEXER_DTYPES:
        raise ValueError(f"indexer must be one of {_INDEXER_DTYPES}, got {indexer!r}")


def kv_bytes_per_token(config: ModelConfig, indexer: str = "fp8", kv_dtype: str = "fp8",
                       include_mtp: bool = False) -> float:
    """Asymptotic KV-cache bytes per context token of one sequence (§11.3), window excluded.

    Per CSA layer (ratio 4) ``(entry + indexer_key) / 4``; per HCA layer (ratio m)
    ``entry / m``; SWA layers 0 (their window is a fixed per-sequence cost, see
    :func:`kv_cache_bytes`). Flash: 3,850.25 (FP8 indexer) / 3,514.25 (FP4) / 6,880 (bf16
    reference buffers); Pro: 5,511.4 / 5,031.4 / 9,848.

    ``include_mtp`` adds the MTP layers (SWA in the releases, so nothing per token).
    Raises ValueError for an unknown ``indexer`` / ``kv_dtype``.
    """
    _check_kv_args(config, indexer, kv_dtype)
    entry, ikey = kv_entry_bytes(config, kv_dtype), indexer_key_bytes(config, indexer)
    n = config.n_layers + (config.n_mtp_layers if include_mtp else 0)
    total = 0.0
    for i in range(n):
        kind, r = config.layer_kind(i), config.compress_ratios[i]
        if kind == "csa":
            total += (entry + ikey) / r
        elif kind == "hca":
            total += entry / r
    return total


def kv_cache_bytes(config: ModelConfig, context: int, indexer: str = "fp8",
                   kv_dtype: str = "fp8", include_mtp: bool = False) -> int:
    """KV-cache bytes of one sequence of ``context`` tokens (architecture.md §11.2-11.3).

    Every layer keeps its last ``min(context, window_size)`` tokens (``entry`` bytes each);
    a CSA layer (ratio 4) also keeps ``context // 4`` compressed entries and as many indexer
    keys; an HCA layer (ratio m) ``context // m`` compressed entries. Entry and key sizes:
    :func:`kv_entry_bytes`, :func:`indexer_key_bytes` (584 B and 132 B / 68 B for the
    releases). Compressor partial state (fp32, < ratio tokens per layer) is not counted.

    Flash at 1M (2^20) tokens, FP8 indexer: 4,037,279,744 + 3,214,336 (window) bytes ≈ 4.04 GB.

    Args:
        config: the model config; ``n_layers`` main layers (plus MTP with ``include_mtp``).
        context: tokens in the sequence, >= 0.
        indexer: ``"fp8"`` (132 B keys), ``"fp4"`` (68 B) or ``"bf16"``.
        kv_dtype: ``"fp8"`` (584 B entries) or ``"bf16"`` (the reference's 1024 B).

    Raises:
        ValueError: negative or non-integer ``context``, unknown ``indexer`` / ``kv_dtype``.
    """
    if isinstance(context, bool) or int(context) != context or context < 0:
        raise ValueError(f"context must be an integer >= 0, got {context!r}")
    context = int(context)
    _check_kv_args(config, indexer, kv_dtype)
    entry, ikey = kv_entry_bytes(config, kv_dtype), indexer_key_bytes(config, indexer)
    n = config.n_layers + (config.n_mtp_layers if include_mtp else 0)
    total = 0
    for i in range(n):
        kind, r = config.layer_kind(i), config.compress_ratios[i]
        total += min(context, config.window_size) * entry
        if kind == "csa":
            total += (context // r) * (entry + ikey)
        elif kind == "hca":
            total += (context // r) * entry
    return total


def gqa_baseline_bytes(n_layers: int | ModelConfig, context: int, n_kv_heads: int = 8,
                       head_dim: int = 128, bytes_per_value: int = 2) -> int:
    """KV-cache bytes of one sequence for a grouped-query-attention baseline ("BF16 GQA-8").

    ``n_layers · context · 2 (K and V) · n_kv_heads · head_dim · bytes_per_value``: with the
    defaults 4,096 B per token per layer (Flash depth 43: 176,128 B/token, 184.7 GB at 1M).
    ``n_layers`` may be a :class:`~dsv4.config.ModelConfig` (its ``n_layers``, same depth as
    the model). V4's FP8 cache is ~2 % of it at 1M context.

    Raises ValueError for a negative ``context`` or non-positive sizes.
    """
    if isinstance(n_layers, ModelConfig):
        n_layers = n_layers.n_layers
    if isinstance(context, bool) or int(context) != context or context < 0:
        raise ValueError(f"context must be an integer >= 0, got {context!r}")
    for name, v in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                    ("bytes_per_value", bytes_per_value)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(n_layers) * int(context) * 2 * n_kv_heads * head_dim * bytes_per_value


# ------------------------------------------------------------------------------ report


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_ids(ids: Sequence[int]) -> str:
    """Compact list: runs of >= 4 equally spaced ids print as ``a,b,...,z``."""
    if not ids:
        return "-"
    parts, i = [], 0
    while i < len(ids):
        j = i + 1
        if j < len(ids):
            step = ids[j] - ids[i]
            while j + 1 < len(ids) and ids[j + 1] - ids[j] == step:
                j += 1
        if j - i + 1 >= 4:
            parts.append(f"{ids[i]},{ids[i + 1]},...,{ids[j]}")
            i = j + 1
        else:
            parts.append(str(ids[i]))
            i += 1
    return ",".join(parts) + f" ({len(ids)})"


def format_model_info(config: ModelConfig, context: int = ONE_M,
                      counts: ParamCounts | None = None) -> str:
    """The parameter, layer-schedule and KV-cache lines of ``dsv4 info`` for ``config``.

    ``counts`` defaults to :func:`param_counts` (builds the model on the meta device).
    Raises ValueError for a ``context`` outside [1, ``max_position_embeddings``].
    """
    c = config
    if not 1 <= context <= c.max_position_embeddings:
        raise ValueError(f"context must be in [1, {c.max_position_embeddings:,}] (the model's "
                         f"max_position_embeddings), got {context:,}")
    pc = param_counts(c) if counts is None else counts
    k, E = c.n_activated_experts, c.n_routed_experts
    lines = ["parameters (Model on the meta device; routing: "
             f"{k} of {E} routed experts + {c.n_shared_experts} shared per token):"]
    lines.append(f"  {'total:':<25}{_fmt_count(pc.total):>10}   without embed/head "
                 f"{_fmt_count(pc.total_without_embed)}")
    lines.append(f"  {'active per token:':<25}{_fmt_count(pc.active):>10}   without embed/head "
                 f"{_fmt_count(pc.active_without_embed)}")
    if c.n_mtp_layers:
        lines.append(f"  {'MTP (not in the above):':<25}{_fmt_count(pc.mtp):>10}   active "
                     f"{_fmt_count(pc.mtp_active)}")
    sch = layer_schedule(c)
    hca_ratios = sorted({c.compress_ratios[i] for i in sch["hca"]})
    lines.append(f"layers ({c.n_layers} + {c.n_mtp_layers} MTP):")
    lines.append(f"  {'SWA (window only):':<25}{_fmt_ids(sch['swa'])}")
    lines.append(f"  {'CSA (ratio 4 + indexer):':<25}{_fmt_ids(sch['csa'])}")
    ratio = "/".join(map(str, hca_ratios)) or "-"
    lines.append(f"  {f'HCA (ratio {ratio}):':<25}{_fmt_ids(sch['hca'])}")
    lines.append(f"  {'hash-routed MoE:':<25}{_fmt_ids(sch['hash'])}")
    if sch["mtp"]:
        kinds = ",".join(c.layer_kind(i).upper() for i in sch["mtp"])
        lines.append(f"  {'MTP:':<25}{_fmt_ids(sch['mtp'])} [{kinds}]")
    entry, ctx_name = kv_entry_bytes(c), ("1M" if context == ONE_M else f"{context:,}")
    gqa_tok = gqa_baseline_bytes(c, 1)
    gqa_ctx = gqa_baseline_bytes(c, context)
    lines.append(f"KV cache, one sequence, {c.n_layers} main layers (architecture.md §11; "
                 f"{entry} B entries):")
    at = f"at {ctx_name} tokens"
    lines.append(f"  {'':<34}{'B/token':>10}{at:>24}{'vs BF16 GQA-8':>15}")
    rows = [
        (f"FP8 KV + FP8 indexer ({indexer_key_bytes(c, 'fp8')} B)", "fp8", "fp8"),
        (f"FP8 KV + FP4 indexer ({indexer_key_bytes(c, 'fp4')} B)", "fp8", "fp4"),
        ("reference bf16 buffers", "bf16", "bf16"),
    ]
    for label, kvd, idx in rows:
        per_tok = kv_bytes_per_token(c, idx, kvd)
        total = kv_cache_bytes(c, context, idx, kvd)
        pct = 100.0 * total / gqa_ctx if gqa_ctx else float("nan")
        lines.append(f"  {label:<34}{per_tok:>10,.1f}{_fmt_bytes(total):>24}{pct:>14.2f}%")
    lines.append(f"  {'BF16 GQA-8 (8 KV heads x 128)':<34}{gqa_tok:>10,.1f}"
                 f"{_fmt_bytes(gqa_ctx):>24}{100.0:>14.2f}%")
    win = c.n_layers * c.window_size * entry
    lines.append(f"  window (fixed per sequence, in the totals): {c.n_layers} x {c.window_size} x "
                 f"{entry} B = {_fmt_bytes(win)}")
    return "\n".join(lines)
