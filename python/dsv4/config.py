"""Model configuration: every field of the official DeepSeek-V4 configs.

Field names are the official ``inference/model.py`` ``ModelArgs`` names (architecture.md §1.3);
:meth:`ModelConfig.from_json` also reads the Hugging Face ``config.json`` names (§1.1).
A key that the architecture needs and the file lacks is an error: the reference dataclass
defaults for missing keys are traps (``compress_rope_theta=40000``, ``original_seq_len=0``,
``route_scale=1``, ``swiglu_limit=0``, ...; §1.3), so dsv4 never falls back to them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["ModelConfig", "ConfigError"]


class ConfigError(ValueError):
    """A configuration that dsv4 cannot run (missing keys, inconsistent shapes)."""


# HF config.json name -> ModelArgs name (architecture.md §1.3).
_HF_TO_ARGS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "num_hash_layers": "n_hash_layers",
    "num_nextn_predict_layers": "n_mtp_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "swiglu_limit": "swiglu_limit",
    "q_lora_rank": "q_lora_rank",
    "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_head_dim",
    "rms_norm_eps": "norm_eps",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "window_size",
    "compress_ratios": "compress_ratios",
    "compress_rope_theta": "compress_rope_theta",
    "rope_theta": "rope_theta",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "max_position_embeddings": "max_position_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "num_key_value_heads": "num_key_value_heads",
    "topk_method": "topk_method",
    "norm_topk_prob": "norm_topk_prob",
    "hidden_act": "hidden_act",
    "tie_word_embeddings": "tie_word_embeddings",
    "expert_dtype": "expert_dtype",
}

# ModelArgs name -> HF config.json name, for error messages.
_ARGS_TO_HF = {v: k for k, v in _HF_TO_ARGS.items() if k != v}
_ARGS_TO_HF.update(original_seq_len="rope_scaling.original_max_position_embeddings",
                   rope_factor="rope_scaling.factor", beta_fast="rope_scaling.beta_fast",
                   beta_slow="rope_scaling.beta_slow")

#: The largest size or count a config may hold: the kernels index with int32.
INT_MAX = 2 ** 31 - 1

# Limits of the ops the model runs on every backend (their references refuse more at the
# first forward): the experts of moe_gate (dsv4.ops.moe.GATE_MAX_EXPERTS / MAX_TOPK) and
# the entry head dim of compress_kv (a multiple of 4 in [4, 1024]; dsv4.ops.compressor).
# Not imported from dsv4.ops: this module loads without torch.
GATE_MAX_EXPERTS = 512
GATE_MAX_TOPK = 16
COMPRESS_MAX_HEAD_DIM = 1024

_TYPES = {"int": "int", int: "int", "float": "float", float: "float", "bool": "bool",
          bool: "bool", "str": "str", str: "str", "Optional[str]": "optional str"}
_BAD = object()


def _hf_alias(name: str) -> str:
    return f" ({_ARGS_TO_HF[name]})" if name in _ARGS_TO_HF else ""


def _show(v: Any) -> str:
    """A value for an error message (long values shortened)."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(v: Any, kind: str) -> Any:
    """``v`` as ``kind`` ("int", "float", "bool", "str", "optional str"), or ``_BAD``."""
    if kind == "bool":
        return v if isinstance(v, bool) else _BAD
    if kind in ("str", "optional str"):
        return v if isinstance(v, str) or (v is None and kind == "optional str") else _BAD
    if isinstance(v, bool):          # True is an int to Python, never a size to us
        return _BAD
    if isinstance(v, str):
        try:
            v = float(v.strip()) if kind == "float" else int(v.strip())
        except ValueError:
            return _BAD
    if kind == "int":
        if isinstance(v, float):
            return int(v) if v.is_integer() else _BAD
        return int(v) if isinstance(v, int) else _BAD
    return float(v) if isinstance(v, (int, float)) else _BAD


# Fields that must be present in a config file (no silent defaults, §1.3).
_REQUIRED = (
    "vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_heads",
    "n_routed_experts", "n_shared_experts", "n_activated_experts", "score_func", "route_scale",
    "swiglu_limit", "q_lora_rank", "head_dim", "rope_head_dim", "norm_eps", "o_groups",
    "o_lora_rank", "window_size", "compress_ratios", "compress_rope_theta", "rope_theta",
    "original_seq_len", "rope_factor", "beta_fast", "beta_slow", "index_n_heads",
    "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
)


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V4 hyper-parameters (official ``ModelArgs`` names; architecture.md §1).

    Immutable: :meth:`validate` runs when a config is made, and a model, its caches and
    engines share the one object, so a field assigned afterwards would bypass the checks or
    change a built model under it. Make a changed copy with ``dataclasses.replace(config,
    field=value)`` (validated like any new config).

    ``compress_ratios`` has ``n_layers + n_mtp_layers`` entries: 0 = sliding window only (SWA),
    4 = Compressed Sparse Attention (overlapping compressor + Lightning Indexer), any other
    positive ratio = Heavily Compressed Attention (non-overlapping compressor, dense over all
    complete entries). Layers ``0 .. n_hash_layers-1`` route experts by ``tid2eid[token_id]``.

    ``quant_sim`` switches the official quantisation simulation on (§3.3, §5): FP8 e4m3
    quant-dequant of the non-RoPE KV dims in blocks of 64, Hadamard + FP4 e2m1 quant-dequant of
    indexer q/k in blocks of 32. With ``quant_sim=False`` the arithmetic is exact.
    """

    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 2048
    n_layers: int = 43
    n_hash_layers: int = 3
    n_mtp_layers: int = 1
    n_heads: int = 64
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    norm_eps: float = 1e-6
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple = tuple([0, 0] + [4, 128] * 20 + [4] + [0])
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    original_seq_len: int = 65536
    rope_factor: float = 16.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # Storage / bookkeeping fields of the official configs (do not change the maths).
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    num_key_value_heads: int = 1
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    dtype: str = "fp8"
    scale_fmt: str = "ue8m0"
    expert_dtype: Optional[str] = "fp4"
    # dsv4 switch: the official quantisation simulation (architecture.md §3.3, §5).
    quant_sim: bool = True

    def __post_init__(self) -> None:
        # Coerce JSON values to the declared types (an integral float or a numeric string is
        # accepted for a number); anything else -- a bool for a number (`hidden_size: true`), a
        # list, a dict, a non-numeric string -- is a ConfigError naming the field.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = _TYPES.get(f.type)
            if kind is None:
                continue
            coerced = _coerce(v, kind)
            if coerced is _BAD:
                want = {"int": "int (an integer JSON number, an integral float or a string "
                                "holding an integer)",
                        "float": "float (a JSON number or a string holding one)",
                        "bool": "bool (JSON true/false)", "str": "str (a JSON string)",
                        "optional str": "str or null"}[kind]
                raise ConfigError(f"config field {f.name}{_hf_alias(f.name)} must be of type "
                                  f"{want}, got {_show(v)}")
            object.__setattr__(self, f.name, coerced)
        ratios = self.compress_ratios
        if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (list, tuple)):
            raise ConfigError(f"compress_ratios must be a list of ints, got {_show(ratios)}")
        coerced = tuple(_coerce(r, "int") for r in ratios)
        if any(r is _BAD for r in coerced):
            raise ConfigError(f"compress_ratios must be a list of ints, got {_show(ratios)}")
        object.__setattr__(self, "compress_ratios", coerced)
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def flash(cls, **overrides: Any) -> "ModelConfig":
        """DeepSeek-V4-Flash (284B total, 13B active; architecture.md §1.1)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def pro(cls, **overrides: Any) -> "ModelConfig":
        """DeepSeek-V4-Pro (1.6T total, 49B active; architecture.md §1.1, §1.3)."""
        base = cls(
            dim=7168, moe_inter_dim=3072, n_layers=61, n_heads=128, n_routed_experts=384,
            route_scale=2.5, q_lora_rank=1536, o_groups=16, index_topk=1024,
            compress_ratios=tuple([128, 128] + [4, 128] * 29 + [4] + [0]),
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """A CPU-sized config with every layer type and the real 129280-token vocabulary.

        Layers: 0 SWA (hash MoE), 1 CSA ratio 4 (hash MoE), 2 HCA ratio 16, 3 CSA, plus one MTP
        layer (SWA). Dims fit the quantisation simulation (non-RoPE KV dims 64, indexer head
        dim 64) and the FP8 release format (the input of every FP8-stored linear is a multiple
        of 128, as the 1x128 activation blocks and 2-way model parallelism need). Window 16 and ``index_topk`` 8 so that short prompts cross every boundary;
        pass overrides (e.g. ``window_size=128``) to change them.
        """
        base = cls(
            vocab_size=129280, dim=128, moe_inter_dim=128, n_layers=4, n_hash_layers=2,
            n_mtp_layers=1, n_heads=4, n_routed_experts=8, n_shared_experts=1,
            n_activated_experts=2, route_scale=1.5, q_lora_rank=128, head_dim=128,
            rope_head_dim=64, o_groups=2, o_lora_rank=128, window_size=16,
            compress_ratios=(0, 4, 16, 4, 0), index_n_heads=8, index_head_dim=64, index_topk=8,
            max_position_embeddings=1048576, dtype="bf16", expert_dtype=None,
        )
        return dataclasses.replace(base, **overrides)

    # ------------------------------------------------------------------ derived
    @property
    def nope_head_dim(self) -> int:
        """Non-RoPE part of each head: ``head_dim - rope_head_dim`` (448 for the real models)."""
        return self.head_dim - self.rope_head_dim

    def layer_kind(self, layer_id: int) -> str:
        """``"swa"``, ``"csa"`` or ``"hca"`` for layer ``layer_id`` (MTP layers follow n_layers)."""
        r = self.compress_ratios[layer_id]
        return "swa" if r == 0 else ("csa" if r == 4 else "hca")

    def validate(self) -> None:
        """Raise :class:`ConfigError` for configs the model cannot run.

        Every problem is listed in one error, each naming the field, its value and what is
        accepted: sizes and counts are ints in their range (at most :data:`INT_MAX`, the
        kernels' int32 indexing); ``rope_theta`` / ``compress_rope_theta`` finite and > 1 (YaRN
        divides by ``log(theta)``); ``norm_eps`` / ``hc_eps`` finite in (0, 1]; ``route_scale``
        finite > 0; ``swiglu_limit`` finite >= 0 (0 = no clamp); ``rope_factor`` finite >= 1;
        ``beta_fast`` >= ``beta_slow`` > 0, finite; ``index_topk`` at most the number of CSA
        entries at ``max_position_embeddings`` (a larger top-k can never fill and only sizes
        buffers); ``window_size`` at most ``max_position_embeddings``; the limits of the ops
        every backend runs: ``n_routed_experts`` <= 512 and ``n_activated_experts`` <= 16
        (``moe_gate``), ``head_dim`` (with compressed layers) and ``index_head_dim`` (with CSA
        layers) multiples of 4 in [4, 1024] (``compress_kv``); plus the architectural rules
        (divisibility, supported variants, the compress_ratios layout).
        """
        errs = []

        def bad(name: str, accepted: str) -> None:
            errs.append(f"{name}{_hf_alias(name)}={_show(getattr(self, name))}: expected "
                        f"{accepted}")

        for name in ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_heads", "head_dim",
                     "n_routed_experts", "n_activated_experts", "q_lora_rank", "o_groups",
                     "o_lora_rank", "index_n_heads", "index_head_dim", "hc_sinkhorn_iters",
                     "window_size", "index_topk", "hc_mult", "rope_head_dim",
                     "max_position_embeddings"):
            if not 1 <= getattr(self, name) <= INT_MAX:
                bad(name, f"an int in [1, {INT_MAX}]")
        for name in ("n_mtp_layers", "n_hash_layers", "original_seq_len", "n_shared_experts",
                     "num_key_value_heads", "bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) <= INT_MAX:
                bad(name, f"an int in [0, {INT_MAX}]")
        finite = math.isfinite
        for name in ("rope_theta", "compress_rope_theta"):
            v = getattr(self, name)
            if not (finite(v) and v > 1):
                bad(name, "a finite number > 1 (the RoPE base)")
        for name in ("norm_eps", "hc_eps"):
            v = getattr(self, name)
            if not (finite(v) and 0 < v <= 1):
                bad(name, "a finite number in (0, 1]")
        if not (finite(self.route_scale) and self.route_scale > 0):
            bad("route_scale", "a finite number > 0")
        if not (finite(self.swiglu_limit) and self.swiglu_limit >= 0):
            bad("swiglu_limit", "a finite number >= 0 (0 = no clamp)")
        if not (finite(self.rope_factor) and self.rope_factor >= 1):
            bad("rope_factor", "a finite number >= 1 (the YaRN factor)")
        for name in ("beta_fast", "beta_slow"):
            v = getattr(self, name)
            if not (finite(v) and v > 0):
                bad(name, "a finite number > 0")
        if finite(self.beta_fast) and finite(self.beta_slow) and self.beta_fast < self.beta_slow:
            errs.append(f"beta_fast={self.beta_fast} < beta_slow={self.beta_slow}: YaRN needs "
                        "beta_fast >= beta_slow")
        if errs:   # the rules below compare these fields: stop at the first wrong value
            raise ConfigError("invalid ModelConfig: " + "; ".join(errs))

        # Variants the V4 architecture does not have: refuse rather than silently ignore.
        for name, want in (("n_shared_experts", 1), ("num_key_value_heads", 1),
                           ("tie_word_embeddings", False), ("norm_topk_prob", True),
                           ("topk_method", "noaux_tc"), ("hidden_act", "silu")):
            if getattr(self, name) != want:
                errs.append(f"{name}={getattr(self, name)!r} is not supported (V4 uses {want!r})")
        if self.dtype not in ("fp8", "bf16"):
            errs.append(f"dtype={self.dtype!r}: expected 'fp8' (release storage) or 'bf16'")
        if self.scale_fmt != "ue8m0":
            errs.append(f"scale_fmt={self.scale_fmt!r} is not supported (V4 uses 'ue8m0': "
                        "dsv4 rounds FP8 scales to powers of two)")
        if self.expert_dtype not in (None, "fp4", "fp8"):
            errs.append(f"expert_dtype={self.expert_dtype!r}: expected 'fp4', 'fp8' or null")
        n_total = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != n_total:
            errs.append(
                f"compress_ratios has {len(self.compress_ratios)} entries but n_layers + "
                f"n_mtp_layers = {n_total}; dsv4 supports the April-2026 V4-Flash/V4-Pro layout "
                "(one entry per layer plus one per MTP layer), not later revisions such as "
                "Flash-0731 (DSpark), Pro-0813 or V4.1 (architecture.md §14)")
        wrong = sorted({r for r in self.compress_ratios if not 0 <= r <= INT_MAX})
        if wrong:
            errs.append(f"compress_ratios holds {wrong}: expected ints in [0, {INT_MAX}] "
                        "(0 = SWA, 4 = CSA, other = HCA)")
        if self.rope_head_dim % 2 or self.rope_head_dim > self.head_dim:
            errs.append("rope_head_dim must be even and <= head_dim")
        if self.index_head_dim < self.rope_head_dim or self.index_head_dim % 2:
            errs.append("index_head_dim must be even and >= rope_head_dim")
        if self.n_heads % self.o_groups:
            errs.append(f"n_heads ({self.n_heads}) must be divisible by o_groups ({self.o_groups})")
        if self.n_activated_experts > self.n_routed_experts:
            errs.append("n_activated_experts must be <= n_routed_experts")
        if self.n_routed_experts > GATE_MAX_EXPERTS:
            bad("n_routed_experts", f"an int in [1, {GATE_MAX_EXPERTS}] (the experts the "
                                    "router, moe_gate, takes)")
        if self.n_activated_experts > GATE_MAX_TOPK:
            bad("n_activated_experts", f"an int in [1, {GATE_MAX_TOPK}] (the experts per token "
                                       "the router, moe_gate, selects)")
        # compress_kv builds the entries of the compressed layers: head_dim for every layer
        # with compress_ratio > 0, index_head_dim for the CSA layers' indexer (ratio 4)
        for name, used in (("head_dim", any(r > 0 for r in self.compress_ratios)),
                           ("index_head_dim", 4 in self.compress_ratios)):
            d = getattr(self, name)
            if used and (d % 4 or d > COMPRESS_MAX_HEAD_DIM):
                bad(name, f"a multiple of 4 in [4, {COMPRESS_MAX_HEAD_DIM}] (the entries "
                          f"compress_kv builds for the compressed layers)")
        if self.n_hash_layers > self.n_layers:
            errs.append("n_hash_layers must be <= n_layers")
        if self.score_func != "sqrtsoftplus":
            errs.append(f"score_func {self.score_func!r} is not supported (V4 uses 'sqrtsoftplus')")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                errs.append(f"{name}={getattr(self, name)}: expected an int in [0, vocab_size="
                            f"{self.vocab_size})")
        if self.window_size > self.max_position_embeddings:
            errs.append(f"window_size={self.window_size}: expected an int in [1, "
                        f"max_position_embeddings={self.max_position_embeddings}]")
        topk_max = max(1, self.max_position_embeddings // 4)
        if self.index_topk > topk_max:
            errs.append(f"index_topk={self.index_topk}: expected an int in [1, {topk_max}] "
                        f"(max_position_embeddings={self.max_position_embeddings} tokens hold "
                        f"at most {topk_max} ratio-4 entries to select)")
        if self.quant_sim:
            if self.nope_head_dim % 64:
                errs.append(
                    f"quant_sim=True needs head_dim - rope_head_dim to be a multiple of 64 (FP8 "
                    f"blocks of 64, architecture.md §3.3); got {self.nope_head_dim}. "
                    "Use quant_sim=False for this config")
            d = self.index_head_dim
            if d % 32 or d & (d - 1):
                errs.append(
                    f"quant_sim=True needs index_head_dim to be a power of two and a multiple of "
                    f"32 (Hadamard + FP4 blocks of 32, §5); got {d}. Use quant_sim=False")
        if errs:
            raise ConfigError("invalid ModelConfig: " + "; ".join(errs))

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, d: dict, **overrides: Any) -> "ModelConfig":
        """Build a config from an official HF ``config.json`` dict or an inference ``config.json``.

        Raises :class:`ConfigError` listing every architectural key that is missing.
        """
        args: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k in _HF_TO_ARGS:
                args[_HF_TO_ARGS[k]] = v
            elif k in names:
                args[k] = v
        revision = sorted(k for k in d if k.startswith("dspark"))
        if revision:
            raise ConfigError(
                f"config has {', '.join(revision)}: a later DeepSeek-V4 revision (Flash-0731 "
                "with DSpark drafting); dsv4 supports the April-2026 V4-Flash/V4-Pro layout "
                "(architecture.md §14)")
        for key in ("n_group", "topk_group"):
            if d.get(key) not in (None, 1):
                raise ConfigError(f"{key}={d[key]!r}: group-limited routing is not part of V4 "
                                  "(architecture.md §1.1)")
        if "rope_scaling" in d:
            rs = d["rope_scaling"]
            if not isinstance(rs, dict):
                raise ConfigError(
                    f"rope_scaling must be the YaRN dict of the released configs, got {rs!r} "
                    "(without it the compressed layers would silently lose YaRN; §1.3)")
            else:
                kind = rs.get("type", rs.get("rope_type"))
                if kind != "yarn":
                    raise ConfigError(f"rope_scaling type {kind!r} is not supported (V4 uses 'yarn')")
                for src, dst in (("factor", "rope_factor"),
                                 ("original_max_position_embeddings", "original_seq_len"),
                                 ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
                    if src in rs:
                        args[dst] = rs[src]
        if "quantization_config" in d:
            q = d["quantization_config"] or {}
            if not isinstance(q, dict):
                raise ConfigError(f"quantization_config must be a JSON object, got {_show(q)}")
            if "scale_fmt" in q:   # null included: the release's code reads it as fp32 scales
                args["scale_fmt"] = q["scale_fmt"]
            # the FP8 storage dsv4 reads (dsv4.quant): e4m3 values in 128x128 blocks
            for key, want in (("fmt", "e4m3"), ("weight_block_size", [128, 128])):
                if key in q and q[key] != want:
                    raise ConfigError(f"quantization_config.{key}={_show(q[key])} is not "
                                      f"supported (V4 uses {want!r}: dsv4 reads FP8 weights "
                                      "as e4m3 in 128x128 blocks)")
            args.setdefault("dtype", "fp8" if q.get("quant_method") == "fp8" else "bf16")
        elif "dtype" not in d:
            args["dtype"] = "bf16"
            args.setdefault("expert_dtype", None)
        # n_mtp_layers: derive from compress_ratios when the file does not say.
        if "n_mtp_layers" not in args and "compress_ratios" in args and "n_layers" in args:
            n_layers = _coerce(args["n_layers"], "int")
            if (isinstance(args["compress_ratios"], (list, tuple)) and n_layers is not _BAD
                    and len(args["compress_ratios"]) >= n_layers):
                args["n_mtp_layers"] = len(args["compress_ratios"]) - n_layers
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:  # a typo (quantsim=False) must not be dropped silently
            raise ConfigError(f"unknown config override(s) {', '.join(unknown)}; overrides take "
                              "ModelConfig field names (e.g. quant_sim, window_size)")
        args.update(overrides)
        missing = [k for k in _REQUIRED if k not in args]
        if missing:
            raise ConfigError(
                "config is missing required keys " + ", ".join(missing) +
                " (dsv4 does not fall back to the reference ModelArgs defaults, which differ "
                "from the released models; architecture.md §1.3)")
        args = {k: v for k, v in args.items() if k in names}
        return cls(**args)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> "ModelConfig":
        """Read an official ``config.json`` (HF or inference names); ``path`` may be a directory.

        Raises :class:`ConfigError` when the file is missing, is not JSON, lacks a required key
        or holds values dsv4 cannot run.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path} as JSON: {e}") from None
        except RecursionError:
            raise ConfigError(f"cannot read {path} as JSON: nested too deeply (a config.json "
                              "is a flat object)") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(d, **overrides)

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict:
        """The HF ``config.json`` form (what :meth:`Model.save_pretrained` writes).

        ``original_seq_len`` 0 (YaRN off) is written as such in ``rope_scaling``;
        ``torch_dtype`` names the dtype the weights are stored in.
        """
        inv = {v: k for k, v in _HF_TO_ARGS.items()}
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("original_seq_len", "rope_factor", "beta_fast", "beta_slow", "dtype",
                          "scale_fmt"):
                continue
            out[inv.get(f.name, f.name)] = list(v) if isinstance(v, tuple) else v
        out["rope_scaling"] = {
            "type": "yarn", "factor": self.rope_factor,
            "original_max_position_embeddings": self.original_seq_len,
            "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
        }
        out["torch_dtype"] = torch_dtype
        return out

    def to_json(self, path: str | os.PathLike, torch_dtype: str = "bfloat16") -> None:
        """Write :meth:`to_hf_dict` as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(torch_dtype), f, indent=2)


def _refuse_change(self: ModelConfig, name: str, *value: Any) -> None:
    hint = (f"; make a changed copy with dataclasses.replace(config, {name}=...)"
            if name in {f.name for f in dataclasses.fields(self)} else "")
    raise dataclasses.FrozenInstanceError(
        f"ModelConfig is immutable (validated when made, shared by the model built from it): "
        f"cannot {'assign' if value else 'delete'} {name}{hint}")


# frozen=True's own __setattr__ / __delattr__, with a message that says what to do instead
ModelConfig.__setattr__ = _refuse_change  # type: ignore[method-assign,assignment]
ModelConfig.__delattr__ = _refuse_change  # type: ignore[method-assign,assignment]
