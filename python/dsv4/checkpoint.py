"""Checkpoint I/O with the official tensor names and formats (architecture.md §12).

Reads the release format (FP8 e4m3 linears with e8m0 128x128 block scales, packed FP4 e2m1
routed experts with e8m0 1x32 scales, bf16/fp32 tensors, int64 ``tid2eid``) and plain bf16/fp32
checkpoints, from one ``model.safetensors`` or the shards of ``model.safetensors.index.json``.
Every file the loader opens is confined to the checkpoint directory, and every header is
checked against the model before any data is read (one :class:`CheckpointError` lists every
missing, unexpected or mis-shaped tensor); tensors are then read one at a time
(:class:`dsv4.checkpoint_io.SafetensorsFile`, positioned reads: a shard may be larger than
memory) and moved straight to the target device, so host memory peaks near the largest tensor;
block scales are checked as they are read. :func:`tensor_specs` lists the tensors of the
release layout for a config (used by ``dsv4 make-checkpoint`` / ``convert`` / ``info``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from typing import Optional

import torch
from torch import nn

from .cache import as_int
from .checkpoint_io import SafetensorsFile, confined_path, read_json
from .config import ConfigError, ModelConfig
from .quant import (FP4_BLOCK, FP8_BLOCK, block_scale_shape, fp4_pack, fp4_unpack,
                    fp8_block_dequantize, fp8_block_quantize)

__all__ = ["CheckpointError", "checkpoint_files", "tensor_specs", "linear_formats",
           "act_quant_of", "official_name", "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model (names, shapes, dtypes) or cannot be read."""


# ----------------------------------------------------------------------------- release layout
def act_quant_of(linear_name: str) -> bool:
    """Whether the release quantises the input activations of the FP8/FP4-stored linear
    ``linear_name`` (a module path such as ``layers.0.attn.wq_a``) under ``quant_sim``: every
    one except the attention output projection's ``wo_a`` (architecture.md §12.3)."""
    return not linear_name.endswith(".wo_a")


def linear_formats(config: ModelConfig, fmt: str = "fp8") -> dict[str, str]:
    """Storage format of every linear weight of the release layout, by module name.

    Returns ``{"layers.0.attn.wq_a": "fp8", "layers.0.ffn.experts.0.w1": "fp4",
    "layers.1.attn.compressor.wkv": "bf16", ..., "head": "bf16"}``. With ``fmt="fp8"`` (the
    official release, architecture.md §12.2): attention ``wq_a``, ``wq_b``, ``wkv``, ``wo_a``,
    ``wo_b``, indexer ``wq_b``, shared experts and MTP ``e_proj``/``h_proj`` are FP8; routed
    experts are FP4 when ``config.expert_dtype == "fp4"`` and FP8 otherwise (the official
    ``ModelArgs`` rule); compressor ``wkv``/``wgate``, indexer ``weights_proj`` and ``head`` are
    bf16. With ``fmt="bf16"`` every linear is bf16 (the dequantised twin).
    Raises ValueError for another ``fmt``.
    """
    if fmt not in ("fp8", "bf16"):
        raise ValueError(f"fmt must be 'fp8' (release layout) or 'bf16', got {fmt!r}")
    q = "fp8" if fmt == "fp8" else "bf16"
    qe = ("fp4" if config.expert_dtype == "fp4" else "fp8") if fmt == "fp8" else "bf16"
    c = config
    out: dict[str, str] = {}
    for blk, layer_id in _blocks(c):
        ratio = c.compress_ratios[layer_id]
        for n in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b"):
            out[f"{blk}.attn.{n}"] = q
        if ratio:
            out[f"{blk}.attn.compressor.wkv"] = out[f"{blk}.attn.compressor.wgate"] = "bf16"
        if ratio == 4:
            out[f"{blk}.attn.indexer.wq_b"] = q
            out[f"{blk}.attn.indexer.weights_proj"] = "bf16"
            out[f"{blk}.attn.indexer.compressor.wkv"] = "bf16"
            out[f"{blk}.attn.indexer.compressor.wgate"] = "bf16"
        for e in range(c.n_routed_experts):
            for w in ("w1", "w2", "w3"):
                out[f"{blk}.ffn.experts.{e}.{w}"] = qe
        for w in ("w1", "w2", "w3"):
            out[f"{blk}.ffn.shared_experts.{w}"] = q
        if blk.startswith("mtp."):
            out[f"{blk}.e_proj"] = out[f"{blk}.h_proj"] = q
    out["head"] = "bf16"
    return out


def _blocks(c: ModelConfig):
    """(name prefix, layer id) of every block: main layers, then MTP layers."""
    for i in range(c.n_layers):
        yield f"layers.{i}", i
    for k in range(c.n_mtp_layers):
        yield f"mtp.{k}", c.n_layers + k


def _linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """Logical [out_features, in_features] of every linear (architecture.md §12.2)."""
    out: dict[str, tuple[int, int]] = {}
    for blk, layer_id in _blocks(c):
        ratio = c.compress_ratios[layer_id]
        a = f"{blk}.attn"
        out[f"{a}.wq_a"] = (c.q_lora_rank, c.dim)
        out[f"{a}.wq_b"] = (c.n_heads * c.head_dim, c.q_lora_rank)
        out[f"{a}.wkv"] = (c.head_dim, c.dim)
        out[f"{a}.wo_a"] = (c.o_groups * c.o_lora_rank, c.n_heads * c.head_dim // c.o_groups)
        out[f"{a}.wo_b"] = (c.dim, c.o_groups * c.o_lora_rank)
        if ratio:
            coff = 2 if ratio == 4 else 1
            out[f"{a}.compressor.wkv"] = out[f"{a}.compressor.wgate"] = (coff * c.head_dim, c.dim)
        if ratio == 4:
            out[f"{a}.indexer.wq_b"] = (c.index_n_heads * c.index_head_dim, c.q_lora_rank)
            out[f"{a}.indexer.weights_proj"] = (c.index_n_heads, c.dim)
            out[f"{a}.indexer.compressor.wkv"] = (2 * c.index_head_dim, c.dim)
            out[f"{a}.indexer.compressor.wgate"] = (2 * c.index_head_dim, c.dim)
        for e in [f"experts.{e}" for e in range(c.n_routed_experts)] + ["shared_experts"]:
            out[f"{blk}.ffn.{e}.w1"] = out[f"{blk}.ffn.{e}.w3"] = (c.moe_inter_dim, c.dim)
            out[f"{blk}.ffn.{e}.w2"] = (c.dim, c.moe_inter_dim)
        if blk.startswith("mtp."):
            out[f"{blk}.e_proj"] = out[f"{blk}.h_proj"] = (c.dim, c.dim)
    out["head"] = (c.vocab_size, c.dim)
    return out


def tensor_specs(config: ModelConfig, fmt: str = "fp8"
                 ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the official checkpoint layout for ``config``: name -> (shape, dtype).

    ``fmt="fp8"``: the release format (architecture.md §12.2/12.3). FP8 linears have
    ``<name>.weight`` float8_e4m3fn [N, K] and ``<name>.scale`` float8_e8m0fnu
    [ceil(N/128), ceil(K/128)]; FP4 routed experts (``config.expert_dtype == "fp4"``) have
    ``<name>.weight`` int8 [N, K/2] (two e2m1 codes per byte) and ``<name>.scale``
    float8_e8m0fnu [N, K/32]; which linear is which: :func:`linear_formats`. ``fmt="bf16"``:
    the same names without ``.scale``, every linear weight bf16 [N, K].
    In both: embed, head, norms, compressor ``wkv``/``wgate``, indexer ``weights_proj`` and
    the gate weight are bf16; ``attn_sink``, compressor ``ape``, the mHC ``hc_*`` tensors and
    ``gate.bias`` float32; ``gate.tid2eid`` int64 [vocab_size, n_activated_experts] in hash
    layers (``layer < n_hash_layers``; they have no ``gate.bias``). MTP blocks are ``mtp.{k}.*``
    (SWA attention, learned routing) plus ``e_proj``/``h_proj``/``enorm``/``hnorm``/``norm``
    and their own ``hc_head_*``.
    Raises ValueError for an unknown ``fmt`` or an FP4 expert whose in_features is not a
    multiple of 32.
    """
    c = config
    formats, shapes = linear_formats(c, fmt), _linear_shapes(c)
    bf16, f32 = torch.bfloat16, torch.float32
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    mix = (2 + c.hc_mult) * c.hc_mult
    specs["embed.weight"] = ((c.vocab_size, c.dim), bf16)

    def linear(name: str) -> None:
        (n, k), f = shapes[name], formats[name]
        if f == "fp8":
            specs[f"{name}.weight"] = ((n, k), torch.float8_e4m3fn)
            specs[f"{name}.scale"] = (block_scale_shape("fp8", n, k), torch.float8_e8m0fnu)
        elif f == "fp4":
            if k % FP4_BLOCK:
                raise ValueError(f"{name}: FP4 storage needs in_features % {FP4_BLOCK} == 0, "
                                 f"got {k}")
            specs[f"{name}.weight"] = ((n, k // 2), torch.int8)
            specs[f"{name}.scale"] = (block_scale_shape("fp4", n, k), torch.float8_e8m0fnu)
        else:
            specs[f"{name}.weight"] = ((n, k), bf16)

    for blk, layer_id in _blocks(c):
        ratio = c.compress_ratios[layer_id]
        specs[f"{blk}.attn_norm.weight"] = ((c.dim,), bf16)
        specs[f"{blk}.ffn_norm.weight"] = ((c.dim,), bf16)
        for site in ("attn", "ffn"):
            specs[f"{blk}.hc_{site}_fn"] = ((mix, c.hc_mult * c.dim), f32)
            specs[f"{blk}.hc_{site}_base"] = ((mix,), f32)
            specs[f"{blk}.hc_{site}_scale"] = ((3,), f32)
        a = f"{blk}.attn"
        linear(f"{a}.wq_a")
        specs[f"{a}.q_norm.weight"] = ((c.q_lora_rank,), bf16)
        linear(f"{a}.wq_b")
        linear(f"{a}.wkv")
        specs[f"{a}.kv_norm.weight"] = ((c.head_dim,), bf16)
        linear(f"{a}.wo_a")
        linear(f"{a}.wo_b")
        specs[f"{a}.attn_sink"] = ((c.n_heads,), f32)
        if ratio:
            coff = 2 if ratio == 4 else 1
            linear(f"{a}.compressor.wkv")
            linear(f"{a}.compressor.wgate")
            specs[f"{a}.compressor.ape"] = ((ratio, coff * c.head_dim), f32)
            specs[f"{a}.compressor.norm.weight"] = ((c.head_dim,), bf16)
        if ratio == 4:
            linear(f"{a}.indexer.wq_b")
            linear(f"{a}.indexer.weights_proj")
            linear(f"{a}.indexer.compressor.wkv")
            linear(f"{a}.indexer.compressor.wgate")
            specs[f"{a}.indexer.compressor.ape"] = ((ratio, 2 * c.index_head_dim), f32)
            specs[f"{a}.indexer.compressor.norm.weight"] = ((c.index_head_dim,), bf16)
        f = f"{blk}.ffn"
        specs[f"{f}.gate.weight"] = ((c.n_routed_experts, c.dim), bf16)
        if layer_id < c.n_hash_layers:
            specs[f"{f}.gate.tid2eid"] = ((c.vocab_size, c.n_activated_experts), torch.int64)
        else:
            specs[f"{f}.gate.bias"] = ((c.n_routed_experts,), f32)
        for e in range(c.n_routed_experts):
            for w in ("w1", "w2", "w3"):
                linear(f"{f}.experts.{e}.{w}")
        for w in ("w1", "w2", "w3"):
            linear(f"{f}.shared_experts.{w}")
        if blk.startswith("mtp."):
            linear(f"{blk}.e_proj")
            linear(f"{blk}.h_proj")
            for n in ("enorm", "hnorm", "norm"):
                specs[f"{blk}.{n}.weight"] = ((c.dim,), bf16)
            specs[f"{blk}.hc_head_fn"] = ((c.hc_mult, c.hc_mult * c.dim), f32)
            specs[f"{blk}.hc_head_base"] = ((c.hc_mult,), f32)
            specs[f"{blk}.hc_head_scale"] = ((1,), f32)
    specs["norm.weight"] = ((c.dim,), bf16)
    linear("head")
    specs["hc_head_fn"] = ((c.hc_mult, c.hc_mult * c.dim), f32)
    specs["hc_head_base"] = ((c.hc_mult,), f32)
    specs["hc_head_scale"] = ((1,), f32)
    return specs


# ----------------------------------------------------------------------------- names
# Segment renames of the official convert.py (architecture.md §12.4): HF-transformers-style
# names -> inference names. V3-only modules (q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) map
# to names V4 does not have and are then reported as unexpected.
_HF_SEGMENTS = {
    "self_attn": "attn", "mlp": "ffn", "weight_scale_inv": "scale",
    "e_score_correction_bias": "bias", "embed_tokens": "embed", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "q_proj": "wq", "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo", "gate_proj": "w1",
    "down_proj": "w2", "up_proj": "w3", "lm_head": "head",
}


def official_name(name: str) -> Optional[str]:
    """Map a checkpoint tensor name to the inference name, as the official convert.py does.

    Strips a ``model.`` prefix and renames segments (``self_attn``->``attn``, ``mlp``->``ffn``,
    ``weight_scale_inv``->``scale``, ``e_score_correction_bias``->``bias``,
    ``embed_tokens``->``embed``, ``lm_head``->``head``, ``input_layernorm``->``attn_norm``,
    ``post_attention_layernorm``->``ffn_norm``, ``q_a_proj``->``wq_a``, ``q_a_layernorm``->
    ``q_norm``, ``q_b_proj``->``wq_b``, ``kv_a_layernorm``->``kv_norm``, ``gate_proj``->``w1``,
    ``down_proj``->``w2``, ``up_proj``->``w3``). Returns None for tensors convert.py drops:
    ``mtp.*`` names containing ``emb`` or ending in ``head.weight`` (MTP shares the main
    embedding and head). Inference names pass through unchanged.
    """
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight")):
        return None
    return ".".join(_HF_SEGMENTS.get(s, s) for s in name.split("."))


# ----------------------------------------------------------------------------- files
def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of checkpoint directory ``path`` (index-listed shards, else
    ``model.safetensors``, else all ``*.safetensors`` except ``golden.safetensors``).
    Raises CheckpointError when none exist or an index-listed shard is missing."""
    return _checkpoint_layout(path)[0]


def _checkpoint_layout(path: str) -> tuple[list[str], Optional[dict[str, str]]]:
    """(shard paths, ``{tensor name: shard path}`` of the index or None), every path confined
    to the checkpoint directory (:func:`dsv4.checkpoint_io.confined_path`)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        confined_path(path, "model.safetensors.index.json", "the index", CheckpointError)
        d = read_json(index, "the safetensors index", CheckpointError)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} is not a safetensors index: expected a JSON object "
                                  "with a 'weight_map' object {tensor name: shard file}")
        # Each shard file is resolved and checked once (an index names ~10^5 tensors but tens
        # of files); an error names the first entry that lists the file.
        shard_of: dict[str, str] = {}
        resolved: dict[str, str] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or file not in shard_of:
                shard_of[file] = confined_path(
                    path, file, f"{index}: weight_map entry {name!r} -> {file!r}",
                    CheckpointError)
            resolved[name] = shard_of[file]
        shards = sorted(set(shard_of.values()))
        missing = sorted(f for f, p in shard_of.items() if not os.path.isfile(p))
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist in {path}: "
                                  + ", ".join(missing))
        return shards, resolved
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [confined_path(path, "model.safetensors", "model.safetensors",
                              CheckpointError)], None
    files = sorted(f for f in os.listdir(path)
                   if f.endswith(".safetensors") and f != "golden.safetensors")
    if not files:
        raise CheckpointError(f"no *.safetensors weights found in {path}")
    return [confined_path(path, f, f, CheckpointError) for f in files], None


# safetensors dtype strings
_FLOAT = {"F32", "BF16", "F16", "F64"}
_INT = {"I64", "I32", "I16", "I8", "U8"}
_FP4 = {"I8", "U8", "F4"}
_SCALE = {"F8_E8M0", "F32"}


@dataclasses.dataclass
class _Entry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    source: str          # the name in the file


@dataclasses.dataclass
class _Plan:
    """How one model tensor is filled: plain copy, or an FP8/FP4 linear weight."""
    kind: str            # "plain" | "fp8" | "fp4"
    weight: _Entry
    scale: Optional[_Entry] = None


def _read_headers(files, weight_map, stack, handles) -> dict[str, _Entry]:
    """Open every shard (kept open in ``handles``) and list its tensors by official name,
    reading headers only. ``files`` holds paths, or already opened readers with the
    :class:`SafetensorsFile` interface (``path``, ``tensors``, ``read``; see
    :func:`load_checkpoint`'s ``readers``)."""
    entries: dict[str, _Entry] = {}
    problems = []
    for file in files:
        if isinstance(file, str):
            f = stack.enter_context(SafetensorsFile(file, CheckpointError))
        else:
            f, file = file, file.path
        handles[file] = f
        info = {n: (dt, shape) for n, (dt, shape, _) in f.tensors.items()}
        for n, (dt, shape) in info.items():
            off = official_name(n)
            if off is None:
                continue
            if off in entries:
                problems.append(f"{off} appears twice ({entries[off].source} in "
                                f"{os.path.basename(entries[off].file)}, {n} in "
                                f"{os.path.basename(file)})")
                continue
            entries[off] = _Entry(file, dt, shape, n)
    if weight_map is not None:
        held = {e.source: e.file for e in entries.values()}
        wrong = [f"{n} (index: {os.path.basename(s)})" for n, s in weight_map.items()
                 if official_name(n) is not None and held.get(n) != s]
        if wrong:
            problems.append("the index lists tensors its shards do not hold: "
                            + _shorten(sorted(wrong)))
        # An index lists every tensor of its shards (the release's and those save_pretrained
        # and make_checkpoint write do); one that omits some does not describe the files.
        unlisted = [f"{n} (in {os.path.basename(h.path)})" for h in handles.values()
                    for n in h.tensors if n not in weight_map and official_name(n) is not None]
        if unlisted:
            problems.append("the index does not list tensors its shards hold: "
                            + _shorten(sorted(unlisted)))
    if problems:
        raise CheckpointError("inconsistent checkpoint files:\n  " + "\n  ".join(problems))
    return entries


def _shorten(items: list[str], n: int = 20) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _plan_linear(name: str, shape: tuple[int, int], entries: dict[str, _Entry],
                 used: set, bad: list, missing: list) -> Optional[_Plan]:
    """Match a Linear ``name`` ([N, K] logical) against the file's ``name.weight`` (+ scale)."""
    w, s = entries.get(f"{name}.weight"), entries.get(f"{name}.scale")
    if w is None:
        return None
    used.add(f"{name}.weight")
    if s is not None:
        used.add(f"{name}.scale")
    N, K = shape
    if w.dtype in _FLOAT:
        if s is not None:
            bad.append(f"{name}.scale: a scale for a {w.dtype} (unquantised) weight")
        elif w.shape != (N, K):
            bad.append(f"{name}.weight: file {list(w.shape)} vs model {[N, K]}")
        else:
            return _Plan("plain", w)
        return None
    if w.dtype == "F8_E4M3":
        kind, want_w, want_s = "fp8", (N, K), block_scale_shape("fp8", N, K)
    elif w.dtype in _FP4:
        kind = "fp4"
        want_w = (N, K) if w.dtype == "F4" else (N, K // 2)   # F4 headers count 4-bit values
        if K % FP4_BLOCK:
            bad.append(f"{name}.weight: packed FP4 needs in_features % {FP4_BLOCK} == 0 "
                       f"(model {[N, K]})")
            return None
        want_s = block_scale_shape("fp4", N, K)
    else:
        bad.append(f"{name}.weight: dtype {w.dtype} (accepted: BF16/F16/F32, F8_E4M3 + scale, "
                   f"I8/U8/F4 packed FP4 + scale)")
        return None
    ok = True
    if w.shape != want_w:
        bad.append(f"{name}.weight: file {w.dtype} {list(w.shape)} vs {list(want_w)} for "
                   f"{kind} storage of a {[N, K]} weight")
        ok = False
    if s is None:
        missing.append(f"{name}.scale (for the {w.dtype} weight)")
        return None
    if s.dtype not in _SCALE:
        bad.append(f"{name}.scale: dtype {s.dtype} (accepted: F8_E8M0, F32)")
        ok = False
    elif s.shape != want_s:
        bad.append(f"{name}.scale: file {list(s.shape)} vs {list(want_s)} for {kind} storage "
                   f"of a {[N, K]} weight")
        ok = False
    return _Plan(kind, w, s) if ok else None


def _plan_plain(name: str, target: torch.Tensor, entries: dict[str, _Entry], used: set,
                bad: list) -> Optional[_Plan]:
    e = entries.get(name)
    if e is None:
        return None
    used.add(name)
    if e.shape != tuple(target.shape):
        bad.append(f"{name}: file {list(e.shape)} vs model {list(target.shape)}")
        return None
    if target.is_floating_point() and e.dtype not in _FLOAT:
        bad.append(f"{name}: file dtype {e.dtype} vs a float tensor (accepted: BF16/F16/F32)")
        return None
    if not target.is_floating_point() and e.dtype not in _INT:
        bad.append(f"{name}: file dtype {e.dtype} vs an integer tensor")
        return None
    return _Plan("plain", e)


def _skipped(name: str, c: ModelConfig) -> bool:
    """Tensors of layers / MTP blocks that the (possibly truncated) model does not hold."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] in ("layers", "mtp") and parts[1].isdigit():
        limit = c.n_layers if parts[0] == "layers" else c.n_mtp_layers
        return int(parts[1]) >= limit
    return False


def _load_device(device) -> torch.device:
    """The device a checkpoint loads onto (None: torch's default device): a CPU or CUDA device;
    ValueError otherwise (a "meta" device would leave every tensor unloaded)."""
    if device is None:
        device = torch.get_default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device ('cpu', 'cuda', 'cuda:N' or a "
                         f"torch.device), got {device!r}")
    return dev


def _resolve_config(path: str, num_layers: Optional[int], overrides: dict) -> ModelConfig:
    """The config of ``path`` with overrides; ``num_layers`` / ``n_mtp_layers`` keep a prefix
    of the main layers / MTP blocks (their compress_ratios entries follow)."""
    keep_mtp = overrides.pop("n_mtp_layers", None)
    full = ModelConfig.from_json(path, **overrides)
    if num_layers is None and keep_mtp is None:
        return full
    n_want = f"an integer in [1, {full.n_layers}] (the checkpoint's layer count)"
    n = full.n_layers if num_layers is None else as_int(num_layers, "num_layers", n_want)
    if not 1 <= n <= full.n_layers:
        raise ValueError(f"num_layers must be {n_want}, got {num_layers!r}")
    m_want = f"an integer in [0, {full.n_mtp_layers}] (the checkpoint's MTP blocks)"
    m = ((0 if num_layers is not None else full.n_mtp_layers) if keep_mtp is None
         else as_int(keep_mtp, "n_mtp_layers", m_want))
    if not 0 <= m <= full.n_mtp_layers:
        raise ValueError(f"n_mtp_layers must be {m_want}, got {keep_mtp!r}")
    r = full.compress_ratios
    return dataclasses.replace(
        full, n_layers=n, n_mtp_layers=m, n_hash_layers=min(full.n_hash_layers, n),
        compress_ratios=tuple(r[:n]) + tuple(r[full.n_layers:full.n_layers + m]))


def _check_extent(c: ModelConfig, entries: dict[str, "_Entry"]) -> None:
    """Refuse, before any module is built, a config with more layers, MTP blocks or experts
    than the checkpoint holds: a config.json with 10^6 experts or 10^5 layers would otherwise
    build modules for minutes before the tensor comparison refuses it.

    Arithmetic on the header names only: the last main layer's and the last MTP block's
    ``attn_norm.weight``, and the last expert's ``w1.weight`` in the first and those blocks,
    must exist. (Any other missing
    tensor is listed by the full comparison that follows.)
    """
    ends = [f"layers.{c.n_layers - 1}"] + ([f"mtp.{c.n_mtp_layers - 1}"]
                                            if c.n_mtp_layers else [])
    probes = [f"{b}.attn_norm.weight" for b in ends] + [
        f"{b}.ffn.experts.{c.n_routed_experts - 1}.w1.weight"
        for b in dict.fromkeys(["layers.0"] + ends)]
    absent = [p for p in probes if p not in entries]
    if absent:
        layers = sorted({int(n.split(".")[1]) for n in entries
                         if n.startswith("layers.") and n.split(".")[1].isdigit()})
        experts = sorted({int(n.split(".")[4]) for n in entries
                          if ".ffn.experts." in n and n.split(".")[4].isdigit()})
        have = (f"layers {layers[0]}..{layers[-1]}" if layers else "no layers") + ", " + (
            f"experts {experts[0]}..{experts[-1]}" if experts else "no routed experts")
        raise CheckpointError(
            f"the config asks for n_layers={c.n_layers}, n_mtp_layers={c.n_mtp_layers} and "
            f"n_routed_experts={c.n_routed_experts}, but the checkpoint files hold {have} "
            f"(no {', '.join(absent)}): config.json does not describe these weights")


def load_checkpoint(model_cls, path, device=None, dtype=torch.bfloat16, weights="dequant",
                    num_layers=None, progress=True, *, skip_tensor=None, readers=None,
                    **config_overrides):
    """Build ``model_cls(config)`` from ``path/config.json`` and load its weights.

    Args:
        path: checkpoint directory: ``config.json`` plus ``model.safetensors.index.json`` and
            its shards, or one ``model.safetensors`` (else every ``*.safetensors`` but
            ``golden.safetensors``). Tensor names are the inference names of architecture.md
            §12; HF-transformers-style names are mapped as the official convert.py does
            (:func:`official_name`).
        device: where the weights go (None: ``torch.get_default_device()``, normally CPU).
        dtype: compute dtype (float32 or bfloat16; the caches take no float16) of the
            weights; the tensors the official code keeps in fp32 (norms, mHC, ``attn_sink``,
            ``ape``, compressor ``wkv``/``wgate``, gate bias, head) are held in fp32.
        weights: ``"dequant"``: FP8/FP4 linears are dequantised to ``dtype`` at load.
            ``"native"``: they keep their stored bytes (float8_e4m3fn or packed int8 plus the
            e8m0 scales; 1/2 or 1/4 of bf16) and are dequantised at every use
            (:class:`dsv4.layers.linear.Linear`). Either way each such Linear records its
            ``stored_format`` ("fp8"/"fp4"), which switches on the FP8 activation simulation
            of ``quant_sim`` (all but ``wo_a``, architecture.md §12.3; testdata README).
        num_layers: load only the first ``num_layers`` main layers (their compress_ratios and
            hash-layer count follow) plus embed, head, final norm and ``hc_head``; MTP blocks
            are then dropped unless ``n_mtp_layers=k`` is passed (keeps the first k).
            ``n_mtp_layers`` alone (without num_layers) also keeps only the first k MTP blocks.
        progress: show a tqdm bar over the tensors read (stderr).
        skip_tensor: None, or ``skip_tensor(name) -> bool``: checkpoint tensors (official
            names) it accepts are neither read nor reported as unexpected; the model built by
            ``model_cls`` must not hold them (expert parallelism: the other ranks' experts,
            :mod:`dsv4.distributed`).
        readers: None (read the directory's safetensors files), or a list of opened tensor
            sources used instead, each with the :class:`~dsv4.checkpoint_io.SafetensorsFile`
            interface (``path``, ``tensors`` ``{name: (dtype string, shape, _)}``, ``read(name)``;
            the caller closes them). ``path`` still supplies ``config.json``.
        config_overrides: replace config fields (e.g. ``quant_sim=False``).

    Raises:
        ConfigError: missing/unusable config.json, e.g. a ``compress_ratios`` whose length is
            not ``n_layers + n_mtp_layers`` (later revisions, §14), or quant_sim=True with an
            FP8/FP4-stored linear whose in_features is not a multiple of 128 (1x128 activation
            blocks).
        CheckpointError: one error listing every missing, unexpected, mis-shaped or mis-typed
            tensor (checked from the headers before any data is read, so nothing is partially
            loaded); an unreadable, truncated or corrupt shard (naming the file); an index that
            disagrees with its shards (lists a tensor a shard does not hold, or omits one a
            listed shard holds); NaN scales or NaN FP8 weight codes; a plain tensor holding
            NaN / inf or overflowing ``dtype``; ``tid2eid`` entries
            outside the expert range.
        ValueError: bad ``weights``, ``dtype``, ``device`` or ``num_layers``.
    """
    path = os.fspath(path)
    if weights not in ("dequant", "native"):
        raise ValueError(f"weights must be 'dequant' or 'native', got {weights!r}")
    if dtype not in (torch.float32, torch.bfloat16):   # float16: see Model.to
        raise ValueError(f"dtype must be torch.float32 or bfloat16, got {dtype}")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    device = _load_device(device)
    if os.path.exists(os.path.join(path, "config.json")):
        confined_path(path, "config.json", "config.json", CheckpointError)
    config = _resolve_config(path, num_layers, dict(config_overrides))
    files, weight_map = _checkpoint_layout(path) if readers is None else (list(readers), None)

    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}
        entries = _read_headers(files, weight_map, stack, handles)
        _check_extent(config, entries)
        with torch.device("meta"):
            model = model_cls(config)
        fp32_names = getattr(model, "_fp32_names", frozenset())
        linears = {n: m for n, m in model.named_modules() if _is_linear(m)}
        plans: dict[str, _Plan] = {}
        used: set = set()
        missing, bad = [], []
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            mod = name.rpartition(".")[0]
            if name.endswith(".weight") and mod in linears:
                lin = linears[mod]
                p = _plan_linear(mod, (lin.out_features, lin.in_features), entries, used, bad,
                                 missing)
            else:
                p = _plan_plain(name, t, entries, used, bad)
            if p is not None:
                plans[name] = p
            elif name not in used:
                missing.append(name)
        unexpected = sorted(n for n in entries if n not in used and not _skipped(n, config)
                            and not (skip_tensor is not None and skip_tensor(n)))
        if missing or unexpected or bad:
            msg = [f"checkpoint {path} does not match the model built from its config.json:"]
            for title, items in (("missing", sorted(missing)), ("unexpected", unexpected),
                                 ("wrong shape or dtype", bad)):
                if items:
                    msg.append(f"  {title}: {_shorten(items)}")
            raise CheckpointError("\n".join(msg))

        act_quant_bad = []
        for name, p in plans.items():
            mod = name.rpartition(".")[0]
            if p.kind != "plain":
                lin = linears[mod]
                lin.stored_format = p.kind
                lin.act_quant = act_quant_of(mod)
                lin.config = model.config
                if config.quant_sim and lin.act_quant and lin.in_features % FP8_BLOCK:
                    act_quant_bad.append(f"{mod} (in_features {lin.in_features})")
        if act_quant_bad:
            raise ConfigError(
                "quant_sim=True quantises the input of FP8/FP4-stored linears in 1x128 blocks "
                "(architecture.md §12.3), which needs in_features % 128 == 0; not so for "
                + _shorten(act_quant_bad) + ". Use quant_sim=False")

        _materialise(model, plans, linears, fp32_names, device, dtype, weights, handles,
                     progress, os.path.basename(os.path.normpath(path)))

    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:   # every tensor was planned above; this guards the loader itself
        raise CheckpointError("internal error: tensors left unloaded: " + _shorten(leftover))
    n_exp = config.n_routed_experts
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid") and buf.numel() and (int(buf.min()) < 0 or int(buf.max()) >= n_exp):
            raise CheckpointError(f"{name} holds expert ids outside [0, {n_exp})")
    return model


def _is_linear(m: nn.Module) -> bool:
    from .layers.linear import Linear
    return isinstance(m, Linear)


#: The largest dequantised weight magnitude accepted: the float16 range, the narrowest compute
#: dtype the loader offers. A trained weight is orders of magnitude smaller; a scale that makes
#: ``code x scale`` exceed it is corrupt.
MAX_WEIGHT = float(torch.finfo(torch.float16).max)
_MAX_CODE = {"fp8": float(torch.finfo(torch.float8_e4m3fn).max), "fp4": 6.0}   # e4m3, e2m1


def _check_scales(entry: _Entry, scale: torch.Tensor, kind: str) -> None:
    """Refuse block scales that are NaN, infinite, negative or absurdly large.

    Accepted: ``0 <= scale <= MAX_WEIGHT / max_code`` (max_code 448 for FP8 e4m3, 6 for FP4
    e2m1), i.e. every dequantised weight finite and within the float16 range. An e8m0 NaN
    (code 255) is NaN here too.
    """
    limit = MAX_WEIGHT / _MAX_CODE[kind]
    sf = scale.float()
    bad = ~((sf >= 0) & (sf <= limit))          # NaN fails both comparisons
    if bool(bad.any()):
        n = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        v = float(sf[first])
        shown = "NaN" if v != v else f"{v:.6g}"
        raise CheckpointError(
            f"{entry.source} in {os.path.basename(entry.file)}: {n} scale(s) outside the "
            f"accepted range [0, {limit:.6g}] ({kind.upper()} weights: scale x {_MAX_CODE[kind]:g} "
            f"must stay within the float16 range {MAX_WEIGHT:g}); the first, at {list(first)}, "
            f"is {shown}")


def _check_fp8_codes(entry: _Entry, weight: torch.Tensor) -> None:
    """Refuse an e4m3 weight holding NaN codes (0x7F / 0xFF; e4m3fn has no infinity), which
    would dequantise to NaN like a NaN scale. One pass over the bytes."""
    nan = (weight.view(torch.uint8) & 0x7F) == 0x7F
    if bool(nan.any()):
        first = [int(i) for i in nan.nonzero()[0]]
        raise CheckpointError(
            f"{entry.source} in {os.path.basename(entry.file)}: {int(nan.sum())} NaN code(s) "
            f"(e4m3 0x7F / 0xFF) in the FP8 weight; the first at {first} (accepted: finite "
            f"e4m3 values)")


def _refuse_non_finite(e: "_Entry", raw: torch.Tensor, want: torch.dtype) -> None:
    """Raise CheckpointError for a plain tensor that holds NaN / inf, or whose values overflow
    the dtype it is loaded in (an F32/F64 value beyond bf16's range): the model would compute
    NaN from it, found only at its first forward."""
    stored = raw.dtype
    if raw.is_floating_point() and not bool(torch.isfinite(raw).all()):
        bad = int((~torch.isfinite(raw)).sum())
        raise CheckpointError(f"{e.source} in {e.file} holds {bad} non-finite value(s) "
                              f"(NaN or inf) of {raw.numel()}")
    raise CheckpointError(f"{e.source} in {e.file}: its {stored} values overflow {want} "
                          f"(largest magnitude {float(raw.abs().max()):.3g}); load it with a "
                          "wider dtype or fix the checkpoint")


def _materialise(model, plans, linears, fp32_names, device, dtype, weights, handles, progress,
                 label):
    from tqdm.auto import tqdm

    def read(e: _Entry) -> torch.Tensor:
        return handles[e.file].read(e.source)

    modules = dict(model.named_modules())
    # Read shard by shard, in file order, for sequential I/O.
    order = sorted(plans, key=lambda n: (plans[n].weight.file, n))
    bar = tqdm(total=len(order), desc=f"loading {label}", unit="tensor", disable=not progress)
    try:
        for name in order:
            p = plans[name]
            mod_name, _, attr = name.rpartition(".")
            mod = modules[mod_name]
            old = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers[attr]
            want = (torch.float32 if name in fp32_names else dtype) if old.is_floating_point() \
                else old.dtype
            t = read(p.weight)
            if p.kind == "plain":
                raw, t = t, t.to(device=device, dtype=want)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    _refuse_non_finite(p.weight, raw, want)
            else:
                s = read(p.scale)
                _check_scales(p.scale, s, p.kind)
                t, s = t.to(device), s.to(device)
                if p.kind == "fp8":             # on the target device: a GPU scans it fast
                    _check_fp8_codes(p.weight, t)
                if p.kind == "fp4":
                    t = t.view(torch.int8)      # uint8 / float4_e2m1fn_x2 bytes alike
                if weights == "native":
                    linears[mod_name].set_quantized(t, s, p.kind, want)
                    bar.update(1)
                    continue
                if p.kind == "fp8":
                    # kept (1/16384 of the weight) so that save_pretrained writes the same
                    # codes back under a scale that is no power of two (the "-Base" F32 ones)
                    linears[mod_name]._stored_scale = s.cpu()
                t = (fp8_block_dequantize(t, s, want) if p.kind == "fp8"
                     else fp4_unpack(t, s, want))
            if attr in mod._parameters:
                mod._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
            else:
                mod._buffers[attr] = t
            bar.update(1)
    finally:
        bar.close()


def save_checkpoint(model, path, changed: str = "refuse") -> None:
    """Write ``config.json`` and ``model.safetensors`` (official names), so that
    ``from_pretrained(path)`` computes what ``model`` computes.

    What a linear computes depends on its storage: a Linear loaded from FP8/FP4 storage
    (``stored_format``) gets the FP8 activation quantisation under ``quant_sim``
    (``act_quant``), and the loader knows the storage only from the tensors' dtypes. So every
    such Linear is written back in its stored form, as the release is: ``<name>.weight``
    float8_e4m3fn / packed int8 plus ``<name>.scale`` e8m0 (:func:`tensor_specs`). A
    ``weights="native"`` model writes its bytes as held; a ``weights="dequant"`` model's
    weights are quantised again (:func:`dsv4.quant.fp8_block_quantize` / ``fp4_pack``) and
    written only if that gives back exactly the values held (always so for an unchanged
    dequantised weight: an FP8/FP4 code times a power of two). The release's own format is
    used, rather than plain weights plus a dsv4-only note of the formats, so that the
    written checkpoint is one every reader of the release (``dsv4 convert``, the official
    code) takes for what it is. Linears stored bf16/fp32 (and all of a randomly initialised
    or bf16-loaded model) are written as held. ``config.json`` describes the tensors written:
    with FP8/FP4 linears ``dtype`` fp8, ``expert_dtype`` of the routed experts and the
    release ``quantization_config``, else bf16 without one; ``torch_dtype`` the model dtype.

    A previous checkpoint in ``path`` is replaced like ``make_checkpoint(overwrite=True)``
    does: its ``config.json`` is removed first, then ``model.safetensors.index.json`` and the
    shards it lists (only ``*.safetensors`` files inside ``path``: an index left beside the
    new ``model.safetensors`` would win on reload); ``model.safetensors`` comes next and
    ``config.json`` last (a directory without it is not a checkpoint). Other files are kept.

    Raises ValueError, before anything is written, when a Linear cannot be written so that
    it reloads the same: a weight loaded from FP8/FP4 storage that no longer equals its
    quantised form (changed after loading; quantise it yourself with
    :meth:`~dsv4.layers.linear.Linear.set_quantized`, or clear ``stored_format`` and
    ``act_quant`` to write it plain, without the activation quantisation), or an
    ``act_quant`` other than the loader would give it (:func:`act_quant_of`).
    ``changed="plain"`` writes such changed weights (a fine-tuned dequantised model) as plain
    weights instead, with a warning: the reloaded model runs those linears without the FP8
    activation quantisation the model in memory applies.
    """
    from .synthetic import _QUANT_CONFIG

    if changed not in ("refuse", "plain"):
        raise ValueError(f"save_pretrained: changed must be 'refuse' or 'plain', got {changed!r}")
    path = os.fspath(path)
    state, formats = _stored_state(model, changed)
    quantised = any(f is not None for f in formats.values())
    experts = {f for n, f in formats.items() if ".ffn.experts." in n}
    config = dataclasses.replace(
        model.config, dtype="fp8" if quantised else "bf16",
        expert_dtype=("fp4" if "fp4" in experts else "fp8") if quantised else None)
    d = config.to_hf_dict(str(model.dtype).replace("torch.", ""))
    if quantised:
        d["quantization_config"] = dict(_QUANT_CONFIG)
    # (import here: dsv4.convert imports this module) the writers of every checkpoint file:
    # each file appears complete or not at all
    from .convert import DTYPE_NAMES, _Entry, _file_shape, atomic_write, write_safetensors

    os.makedirs(path, exist_ok=True)
    _remove_previous_checkpoint(path)
    write_safetensors(os.path.join(path, "model.safetensors"),
                      [_Entry(n, DTYPE_NAMES[t.dtype], _file_shape(t), lambda t=t: t)
                       for n, t in state.items()], {"format": "pt"})
    with atomic_write(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


def _stored_state(model, on_changed: str = "refuse"
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Optional[str]]]:
    """(the CPU tensors :func:`save_checkpoint` writes, ``{linear name: "fp8" | "fp4" | None}``
    the format each Linear is written in); raises ValueError as :func:`save_checkpoint`
    (``on_changed``: its ``changed``)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    formats: dict[str, Optional[str]] = {}
    changed, act, plain = [], [], []
    for name, lin in model.named_modules():
        if not _is_linear(lin):
            continue
        fmt = lin.weight_format or lin.stored_format
        if fmt is not None and lin.weight_format is None:
            w = lin._parameters["weight"].detach()
            q = _requantize(w, fmt, getattr(lin, "_stored_scale", None))
            if q is None and on_changed == "plain":
                plain.append(f"{name} ({fmt})")
                formats[name] = None
                continue
            if q is None:
                changed.append(f"{name} ({fmt})")
                continue
            state[f"{name}.weight"], state[f"{name}.scale"] = q
        formats[name] = fmt
        if bool(lin.act_quant) != (fmt is not None and act_quant_of(name)):
            act.append(f"{name} (act_quant={lin.act_quant}, stored "
                       f"{fmt or 'as ' + str(lin.weight.dtype).replace('torch.', '')})")
    if plain:
        warnings.warn("save_pretrained(changed='plain'): these linears were loaded from FP8/FP4 "
                      "storage and changed since; they are written as plain weights, so the "
                      "reloaded model runs them without the FP8 activation quantisation: "
                      + _shorten(plain), UserWarning, stacklevel=3)
    if changed:
        raise ValueError(
            "save_pretrained: these linears were loaded from FP8/FP4 storage (so their input "
            "gets the FP8 activation quantisation) but their weights no longer equal an "
            "FP8/FP4-quantised value (changed after loading), so no checkpoint reloads them "
            "the same: " + _shorten(changed) + ". Quantise them (Linear.set_quantized with "
            "dsv4.quant.fp8_block_quantize / fp4_pack), or pass changed='plain' to write "
            "them as plain weights (reloaded without the activation quantisation)")
    if act:
        raise ValueError(
            "save_pretrained: the loader gives a linear act_quant=True exactly when it is "
            "stored FP8/FP4 and is not an attention wo_a; these linears differ, so the "
            "reloaded model would compute something else: " + _shorten(act))
    return state, formats


def _requantize(w: torch.Tensor, fmt: str, stored_scale: Optional[torch.Tensor] = None
                ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, scale) of the float weight ``w`` in storage ``fmt`` ("fp8" / "fp4") on the
    CPU, or None when they do not dequantise to exactly ``w`` (or ``w`` holds inf/NaN).
    ``stored_scale``: the FP8 scale ``w`` was dequantised with at load, tried first (it need
    not be a power of two: the "-Base" checkpoints' float32 scales)."""
    if fmt == "fp8" and stored_scale is not None:
        q = _fp8_codes_under(w, stored_scale)
        if q is not None:
            return q, stored_scale.cpu()
    w = w.float()
    try:
        if fmt == "fp8":
            q, s = fp8_block_quantize(w)
            back = fp8_block_dequantize(q, s, torch.float32)
        else:
            q, s = fp4_pack(w)
            back = fp4_unpack(q, s, torch.float32)
    except ValueError:
        return None
    return (q.cpu(), s.cpu()) if torch.equal(back, w) else None


def _fp8_codes_under(w: torch.Tensor, scale: torch.Tensor) -> Optional[torch.Tensor]:
    """The e4m3 codes q (CPU) with ``fp8_block_dequantize(q, scale, w.dtype) == w``, or None:
    ``w / scale`` rounded to e4m3 (an unchanged weight gives back its codes exactly)."""
    w, scale = w.detach().cpu(), scale.cpu()
    if w.dim() != 2:
        return None
    try:   # the scale of every element: the dequantisation of e4m3 ones (exact)
        s = fp8_block_dequantize(torch.ones(w.shape, dtype=torch.float8_e4m3fn), scale,
                                 torch.float32)
    except ValueError:
        return None
    q = (w.float() / s).to(torch.float8_e4m3fn)
    return q if torch.equal(fp8_block_dequantize(q, scale, w.dtype), w) else None


def _remove_previous_checkpoint(path: str) -> None:
    """Remove ``config.json``, ``model.safetensors.index.json`` and the ``*.safetensors``
    shards the index lists inside ``path`` (entries naming other files, or files outside
    ``path``, are left alone; an unreadable index is removed with no shard)."""
    config = os.path.join(path, "config.json")
    if os.path.lexists(config):
        os.remove(config)
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.lexists(index):
        return
    try:
        d = read_json(index, "the safetensors index", CheckpointError)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
    except CheckpointError:
        weight_map = None
    shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    for file in sorted(f for f in shards if isinstance(f, str)):
        try:
            confined_path(path, file, "index entry", CheckpointError)
        except CheckpointError:
            continue
        shard = os.path.join(path, file)
        if (file.endswith(".safetensors") and file != "model.safetensors"
                and os.path.isfile(shard)):
            os.remove(shard)
    os.remove(index)
