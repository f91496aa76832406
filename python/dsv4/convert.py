"""Model-parallel sharding of official checkpoints (official convert.py; architecture.md §12.4).

:func:`convert` reads a Hugging Face checkpoint directory (``config.json`` + safetensors shards
with the inference names of §12) and writes ``model{rank}-mp{MP}.safetensors`` for each of the
``MP`` ranks, as the official ``inference/convert.py`` does:

* names: a ``model.`` prefix is stripped, MTP embedding/head copies are skipped, legacy HF names
  are renamed (``self_attn``->``attn``, ``mlp``->``ffn``, ``weight_scale_inv``->``scale``,
  ``e_score_correction_bias``->``bias``, V3 names such as ``q_a_proj``->``wq_a``); the release
  already uses the final names, so they pass unchanged;
* routed experts ``*.ffn.experts.{e}.*`` go whole to rank ``e // (n_experts / MP)``;
* dim-0 (output) split: ``embed``, ``head``, ``wq_b`` (attention and indexer), ``wo_a``,
  ``attn_sink``, ``weights_proj`` (FP8 weights and their ``.scale`` alike); dim-1 split:
  ``wo_b``; everything else is replicated on every rank;
* ``wo_a`` FP8 is de-quantised to bf16 and its scale dropped;
* routed-expert FP4 weights (int8) are stored as ``float4_e2m1fn_x2`` (safetensors ``F4``), or
  with ``expert_fp8=True`` re-encoded to FP8 128x128 blocks (:func:`dsv4.quant.fp4_to_fp8`);
* ``tokenizer.json`` / ``tokenizer_config.json`` are copied; dsv4 also copies ``config.json``
  and ``generation_config.json`` so that the directory describes itself.

Unlike the official script, tensors are read one at a time (only the rank's slice of a split
tensor) and each rank file is written by a streaming safetensors writer, so memory stays at
about one tensor whatever the model size. ``wo_a`` is de-quantised before it is split, so
ranks need not hold whole 128-row scale blocks (identical results where the official script
works).

:func:`load_model_parallel` reads the ``MP`` rank files back and reassembles the full tensors
(bit-equal to the input, except ``wo_a`` which is its exact bf16 de-quantisation and, with
``expert_fp8``, the experts' FP8 re-encoding); :func:`unshard` writes them as an ordinary
checkpoint directory that :meth:`dsv4.model.Model.from_pretrained` can read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import _FLOAT, _FP4, _SCALE  # the safetensors dtypes the loader takes
from .checkpoint import official_name  # the HF -> inference name map of convert.py (§12.4)
from .quant import FP4_BLOCK, block_scale_shape, e8m0_exponent

__all__ = [
    "ConvertError", "DTYPE_NAMES", "convert", "check_model_parallel", "split_rule",
    "official_name", "rank_file", "load_model_parallel", "unshard", "write_safetensors",
    "write_sharded", "read_checkpoint_index", "atomic_write", "entry_bytes",
]


class ConvertError(ValueError):
    """An input checkpoint or argument that the model-parallel conversion cannot handle."""


# ------------------------------------------------------------------------------ safetensors I/O

#: torch dtype -> safetensors dtype string (``float4_e2m1fn_x2`` is "F4", two values a byte).
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0",
}
if hasattr(torch, "float4_e2m1fn_x2"):
    DTYPE_NAMES[torch.float4_e2m1fn_x2] = "F4"
_ITEM_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16,
              "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4}


def _file_shape(t: torch.Tensor) -> list[int]:
    """Shape as safetensors records it (F4 counts 4-bit values: last dim doubled)."""
    shape = list(t.shape)
    if DTYPE_NAMES.get(t.dtype) == "F4":
        shape[-1] *= 2
    return shape


def entry_bytes(entries: list) -> int:
    """Data bytes of ``entries`` (objects with ``dtype`` and ``shape`` as the file records
    them), i.e. the size of the checkpoint :func:`write_sharded` writes, headers aside."""
    return sum(_nbytes(e.dtype, e.shape) for e in entries)


def _nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    bits = n * _ITEM_BITS[dtype]
    if bits % 8:
        raise ConvertError(f"{dtype} tensor of shape {list(shape)} is not a whole number of bytes")
    return bits // 8


@dataclass
class _Entry:
    """One output tensor: name, safetensors dtype string and shape, and how to produce it."""

    name: str
    dtype: str
    shape: list[int]
    produce: Callable[[], torch.Tensor]


class atomic_write:
    """``with atomic_write(path) as f: f.write(...)``: the file appears complete or not at all.

    On Linux the data goes to an unnamed file in the target directory (``O_TMPFILE``), given
    its name only when the block ends without an exception: a process killed while writing,
    even by SIGKILL, leaves nothing behind. Where ``O_TMPFILE`` is unavailable, the data goes
    to ``<path>.partial``, renamed at the end and removed on any exception (Ctrl-C included;
    only an uncatchable kill leaves it). An existing ``path`` is replaced atomically.
    """

    def __init__(self, path: str, mode: str = "wb"):
        self.path, self.mode = os.fspath(path), mode
        self._fd = self._tmp = self._file = None

    def __enter__(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        flag = getattr(os, "O_TMPFILE", None)
        if flag is not None and os.path.isdir("/proc/self/fd"):
            try:
                self._fd = os.open(directory, flag | os.O_WRONLY, 0o644)
            except OSError:              # filesystem without O_TMPFILE support
                self._fd = None
        encoding = None if "b" in self.mode else "utf-8"
        if self._fd is not None:
            self._file = os.fdopen(os.dup(self._fd), self.mode, encoding=encoding)
        else:
            self._tmp = self.path + ".partial"
            self._file = open(self._tmp, self.mode, encoding=encoding)
        return self._file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._file.flush()
            self._file.close()
            if exc_type is not None:
                return
            if self._fd is not None:
                self._link()
            else:
                os.replace(self._tmp, self.path)
                self._tmp = None
        finally:
            if self._fd is not None:
                os.close(self._fd)
            if self._tmp is not None and os.path.exists(self._tmp):
                os.remove(self._tmp)

    def _link(self) -> None:
        """Give the unnamed file its name (``linkat`` through /proc/self/fd)."""
        proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
        try:
            def link(dst: str) -> None:
                os.link(str(self._fd), dst, src_dir_fd=proc, follow_symlinks=True)
            try:
                link(self.path)
            except FileExistsError:      # replace: link under a private name, then rename
                tmp = f"{self.path}.{os.getpid()}.tmp"
                link(tmp)
                os.replace(tmp, self.path)
        finally:
            os.close(proc)


def write_safetensors(path: str, entries: list, metadata: Optional[dict] = None) -> int:
    """Write one safetensors file, producing and writing one tensor at a time.

    ``entries``: objects with ``name``, ``dtype`` (safetensors string, see :data:`DTYPE_NAMES`),
    ``shape`` (as the file records it) and ``produce()`` returning the CPU tensor. The header is
    written first from the declared dtypes/shapes; each produced tensor must match its
    declaration. Tensors are laid out by decreasing element size, then by name, so every tensor
    starts aligned (safetensors spec: 8-byte-padded JSON header, no holes).
    The file appears complete or not at all (:class:`atomic_write`: no partial file is left
    by an exception, Ctrl-C or, on Linux, even SIGKILL).
    Returns the number of data bytes. Raises ConvertError for a mismatching tensor or a
    duplicate name.
    """
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConvertError(f"duplicate tensor names for {path}: {dup[:5]}")
    order = sorted(entries, key=lambda e: (-_ITEM_BITS[e.dtype], e.name))
    header, offset = {}, 0
    for e in order:
        n = _nbytes(e.dtype, e.shape)
        header[e.name] = {"dtype": e.dtype, "shape": [int(s) for s in e.shape],
                          "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for e in order:
            t = e.produce()
            if (DTYPE_NAMES.get(t.dtype) != e.dtype or _file_shape(t) != list(e.shape)):
                raise ConvertError(
                    f"{e.name}: produced {t.dtype} {_file_shape(t)}, declared {e.dtype} "
                    f"{list(e.shape)} (internal error)")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(data.numpy().data)           # no extra copy of the tensor's bytes
    return offset


def write_sharded(out_dir: str, entries: list, n_shards: int = 1,
                  metadata: Optional[dict] = None) -> list[str]:
    """Write ``entries`` (in their order) as an HF-style checkpoint of ``n_shards`` files.

    ``n_shards == 1``: ``model.safetensors``; otherwise ``model-0000k-of-0000N.safetensors``
    files, cut greedily into contiguous runs of about ``total/N`` bytes (every shard gets at
    least one tensor), and ``model.safetensors.index.json`` with ``metadata.total_size`` and the
    ``weight_map`` in entry order, as the released checkpoints. Returns the file names.
    Raises ConvertError when ``n_shards`` is < 1 or exceeds the number of tensors.
    """
    if isinstance(n_shards, bool) or int(n_shards) != n_shards or n_shards < 1:
        raise ConvertError(f"number of shards must be an integer >= 1, got {n_shards!r}")
    if n_shards > len(entries):
        raise ConvertError(f"cannot cut {len(entries)} tensors into {n_shards} shards")
    os.makedirs(out_dir, exist_ok=True)
    if n_shards == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), entries,
                          metadata or {"format": "pt"})
        return ["model.safetensors"]
    sizes = [_nbytes(e.dtype, e.shape) for e in entries]
    total = sum(sizes)
    groups: list[list] = [[] for _ in range(n_shards)]
    acc, k = 0, 0
    for i, (e, n) in enumerate(zip(entries, sizes)):
        remaining = len(entries) - i
        # Move on when this shard is full, or when each later shard needs one of the rest.
        if groups[k] and k < n_shards - 1 and (acc >= total * (k + 1) / n_shards
                                               or remaining == n_shards - 1 - k):
            k += 1
        groups[k].append(e)
        acc += n
    files, weight_map = [], {}
    for k, g in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(os.path.join(out_dir, fname), g, metadata or {"format": "pt"})
        files.append(fname)
        for e in g:
            weight_map[e.name] = fname
    index = {"metadata": {"total_size": total},
             "weight_map": {e.name: weight_map[e.name] for e in entries}}
    with atomic_write(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return files


def read_checkpoint_index(path: str) -> dict[str, tuple[str, str, list[int]]]:
    """``{name: (file, dtype string, shape)}`` of a checkpoint directory, from file headers only.

    Files: those listed in ``model.safetensors.index.json``, else ``model.safetensors``, else
    every ``*.safetensors`` except ``golden.safetensors`` and model-parallel rank files (the
    loader's order, :func:`dsv4.checkpoint.checkpoint_files`, which also reads no other file
    beside an index or a ``model.safetensors``), each confined to the directory
    (:func:`dsv4.checkpoint_io.confined_path`). Raises ConvertError for a missing
    directory, no weights, a file outside the directory, an unreadable file or a tensor
    present in two files.
    """
    if not os.path.isdir(path):
        raise ConvertError(f"checkpoint directory not found: {path}")
    from .checkpoint_io import SafetensorsFile, confined_path, read_json

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        d = read_json(index, "the safetensors index", ConvertError)
        wm = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(wm, dict):
            raise ConvertError(f"{index} is not a safetensors index with a weight_map object")
        first = {}                       # each file resolved once, named by its first entry
        for n, f in wm.items():
            if not isinstance(f, str) or f not in first:
                first[f] = confined_path(path, f, f"{index}: weight_map entry {n!r} -> {f!r}",
                                         ConvertError)
        files = sorted(set(first.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = [confined_path(path, "model.safetensors", "model.safetensors", ConvertError)]
    else:
        files = sorted(confined_path(path, f, f, ConvertError) for f in os.listdir(path)
                       if f.endswith(".safetensors") and f != "golden.safetensors"
                       and not _RANK_FILE.match(f))
    if not files:
        raise ConvertError(f"no *.safetensors weights found in {path}")
    out: dict[str, tuple[str, str, list[int]]] = {}
    for fpath in files:
        with SafetensorsFile(fpath, ConvertError) as f:      # the header only
            for name, (dtype, shape, _) in f.tensors.items():
                if name in out:
                    raise ConvertError(f"tensor {name} is in both {out[name][0]} and {fpath}")
                out[name] = (fpath, dtype, list(shape))
    return out


def _safe_open(file: str):
    """``safe_open(file)``; ConvertError naming the file when safetensors refuses it."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ConvertError(f"cannot read {file} as safetensors: {e}") from None


class _Files:
    """Lazily opened safetensors handles (read one tensor or one slice at a time)."""

    def __init__(self):
        self._open: dict[str, object] = {}

    def get(self, file: str):
        if file not in self._open:
            self._open[file] = _safe_open(file)
        return self._open[file]

    def tensor(self, file: str, name: str) -> torch.Tensor:
        return self.get(file).get_tensor(name)

    def close(self) -> None:
        for f in self._open.values():
            f.__exit__(None, None, None)
        self._open.clear()

    def __enter__(self) -> "_Files":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def slice(self, file: str, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        sl = self.get(file).get_slice(name)
        idx = (slice(None),) * dim + (slice(start, stop),)
        return sl[idx].contiguous()


# ------------------------------------------------------------------------------ names and rules

_SPLIT_DIM0 = {"embed", "head", "wq_b", "wo_a", "attn_sink", "weights_proj", "wq", "wkv_b"}
_SPLIT_DIM1 = {"wo_b", "wo"}
_RANK_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")


def split_rule(name: str) -> tuple[str, int]:
    """How tensor ``name`` (inference name) is distributed over model-parallel ranks (§12.4).

    Returns ``("expert", e)`` for routed-expert tensors (``*.ffn.experts.{e}.*``: whole, on the
    rank owning expert e), ``("split", 0)`` / ``("split", 1)`` for tensors cut along dim 0 /
    dim 1 (the module name decides: ``embed``, ``head``, ``wq_b``, ``wo_a``, ``attn_sink``,
    ``weights_proj`` -> 0; ``wo_b`` -> 1; a ``.scale`` follows its weight), and
    ``("replicate", -1)`` for everything else.
    """
    parts = name.split(".")
    if "experts" in parts:
        i = parts.index("experts")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return ("expert", int(parts[i + 1]))
    key = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "scale", "bias") else parts[-1]
    if key in _SPLIT_DIM0:
        return ("split", 0)
    if key in _SPLIT_DIM1:
        return ("split", 1)
    return ("replicate", -1)


def rank_file(rank: int, model_parallel: int) -> str:
    """File name of one rank's shard: ``model{rank}-mp{model_parallel}.safetensors``."""
    return f"model{rank}-mp{model_parallel}.safetensors"


# ------------------------------------------------------------------------------ checks


def _read_config(path: str) -> Optional[dict]:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {cfg} as JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConvertError(f"{cfg} must hold a JSON object")
    return d


def _cfg_value(d: dict, *keys: str):
    for k in keys:
        if k in d:
            try:
                return int(d[k])
            except (TypeError, ValueError):
                raise ConvertError(f"config.json: {k} must be an integer, got {d[k]!r}") from None
    return None


def check_model_parallel(model_parallel: int, config: Optional[dict] = None,
                         n_experts: Optional[int] = None) -> None:
    """Raise ConvertError unless ``model_parallel`` can shard this model (§12.4).

    MP must be an integer >= 1 dividing ``n_routed_experts`` (experts by index), ``n_heads``,
    ``o_groups``, ``index_n_heads`` (heads split over ranks) and ``vocab_size`` (embed/head
    split). ``config``: an HF or inference ``config.json`` dict (either naming); ``n_experts``
    overrides / supplies the expert count. The message lists every quantity MP fails to divide.
    """
    mp = model_parallel
    if isinstance(mp, bool) or not isinstance(mp, int) or mp < 1:
        raise ConvertError(f"model_parallel must be an integer >= 1, got {model_parallel!r}")
    d = config or {}
    quantities = {
        "n_routed_experts": (n_experts if n_experts is not None
                             else _cfg_value(d, "n_routed_experts")),
        "n_heads": _cfg_value(d, "num_attention_heads", "n_heads"),
        "o_groups": _cfg_value(d, "o_groups"),
        "index_n_heads": _cfg_value(d, "index_n_heads"),
        "vocab_size": _cfg_value(d, "vocab_size"),
    }
    bad = [f"{k} ({v})" for k, v in quantities.items() if v is not None and v % model_parallel]
    if bad:
        raise ConvertError(f"--model-parallel {model_parallel} must divide " + ", ".join(bad) +
                           " (experts are split by index and heads, o_groups and the vocabulary "
                           "across ranks; architecture.md §12.4)")


# ------------------------------------------------------------------------------ convert


def _plan_rank(rank: int, mp: int, n_local: int, src: dict, expert_fp8: bool,
               files: _Files) -> list[_Entry]:
    """Output entries of one rank (in input order), each with a lazy producer."""
    from .quant import fp4_to_fp8, fp8_block_dequantize

    def read(name: str) -> Callable[[], torch.Tensor]:
        return lambda: files.tensor(src[name][0], name)

    memo: dict[str, tuple] = {}

    def fp8_pair(module: str) -> tuple:
        # weight and scale are written one after the other: convert once, use twice
        if module not in memo:
            memo.clear()
            memo[module] = fp4_to_fp8(files.tensor(src[module + ".weight"][0], module + ".weight"),
                                      files.tensor(src[module + ".scale"][0], module + ".scale"))
        return memo[module]

    entries: list[_Entry] = []
    for name, (_, dtype, shape) in src.items():
        kind, arg = split_rule(name)
        module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".scale")) else name
        if kind == "expert":
            if not rank * n_local <= arg < (rank + 1) * n_local:
                continue
            w = src.get(module + ".weight")
            if w is None or w[1] not in _FP4:              # FP8 (-Base) or bf16 experts: as is
                entries.append(_Entry(name, dtype, shape, read(name)))
                continue
            N, K = w[2][0], _fp4_in_features(w[1], w[2])   # logical [out, in]
            is_weight = name.endswith(".weight")
            if not expert_fp8:                             # the official float4_e2m1fn_x2 view
                if is_weight:
                    entries.append(_Entry(name, "F4", [N, K], lambda r=read(name): r().view(
                        torch.float4_e2m1fn_x2)))
                else:
                    entries.append(_Entry(name, dtype, shape, read(name)))
            elif is_weight:
                entries.append(_Entry(name, "F8_E4M3", [N, K],
                                      lambda m=module: fp8_pair(m)[0]))
            else:
                entries.append(_Entry(name, "F8_E8M0", [-(-N // 128), -(-K // 128)],
                                      lambda m=module: fp8_pair(m)[1]))
            continue
        if kind == "replicate":
            entries.append(_Entry(name, dtype, shape, read(name)))
            continue
        dim = arg
        if _is_fp8_wo_a(module, src):
            if name != module + ".weight":
                continue                                   # the scale is folded into the weight
            # De-quantise the whole weight, then cut (official: per-rank dequant of the slice).
            n = shape[0] // mp

            def wo_a(m=module, r=rank, n=n):
                w = fp8_block_dequantize(files.tensor(src[m + ".weight"][0], m + ".weight"),
                                         files.tensor(src[m + ".scale"][0], m + ".scale"),
                                         torch.bfloat16)
                return w[r * n:(r + 1) * n].contiguous()
            entries.append(_Entry(name, "BF16", [n, shape[1]], wo_a))
            continue
        size = shape[dim] // mp
        out_shape = list(shape)
        out_shape[dim] = size
        entries.append(_Entry(name, dtype, out_shape,
                              lambda n=name, d=dim, a=rank * size, b=(rank + 1) * size:
                              files.slice(src[n][0], n, d, a, b)))
    return entries


def _fp4_in_features(dtype: str, shape: list[int]) -> int:
    """in_features of a packed FP4 weight from its header: F4 headers count the 4-bit codes,
    I8 / U8 ones the bytes (two codes each)."""
    return shape[1] if dtype == "F4" else 2 * shape[1]


def _check_scales(src: dict) -> None:
    """Every FP8 / FP4 weight has a scale of the shape its storage needs (the rules of
    :func:`dsv4.checkpoint.tensor_specs`: FP8 [N, K] -> [ceil(N/128), ceil(K/128)]; packed FP4
    [N, K/2] -> [N, K/32]), and no unquantised weight has one. ConvertError naming every bad
    tensor and its file otherwise (checked before anything is written: a wrong scale was
    split into the rank files as it was)."""
    errs = []
    for name, (file, dtype, shape) in src.items():
        if not name.endswith(".weight"):
            continue
        module = name[:-len(".weight")]
        scale = src.get(module + ".scale")
        if dtype in _FLOAT:
            if scale is not None:
                errs.append(f"{module}.scale in {scale[0]}: a scale for a {dtype} (unquantised) "
                            "weight")
            continue
        if dtype not in _FP4 and dtype != "F8_E4M3":
            continue
        want = None
        if len(shape) == 2 and dtype == "F8_E4M3":
            want = list(block_scale_shape("fp8", *shape))
        elif len(shape) == 2:     # packed FP4
            K = _fp4_in_features(dtype, shape)
            want = list(block_scale_shape("fp4", shape[0], K)) if K % FP4_BLOCK == 0 else None
        if want is None:
            errs.append(f"{name} in {file}: a {dtype} weight of shape {shape} (accepted: "
                        f"[N, K], packed FP4 with K a multiple of {FP4_BLOCK})")
        elif scale is None:
            errs.append(f"{module}.scale: missing for the {dtype} weight {name} in {file}")
        elif scale[1] not in _SCALE:
            errs.append(f"{module}.scale in {scale[0]}: dtype {scale[1]} (accepted: F8_E8M0, "
                        "F32)")
        elif scale[2] != want:
            errs.append(f"{module}.scale in {scale[0]}: shape {scale[2]}, the {dtype} weight "
                        f"{shape} needs {want}")
    if errs:
        raise ConvertError("malformed quantisation scales:\n  " + "\n  ".join(errs[:20]) +
                           (f"\n  ... ({len(errs)} in all)" if len(errs) > 20 else ""))


def _check_expert_fp8_scales(src: dict) -> None:
    """With ``--expert-fp8``: the float (F32) 1x32 scales of FP4 routed experts are powers of
    two in [2**-127, 2**127], the only scales an e8m0 128x128 block can carry
    (:func:`dsv4.quant.fp4_to_fp8`; e8m0 scales always are). ConvertError naming every other
    tensor and its file, before anything is written (such a weight has no exact FP8 form;
    without ``--expert-fp8`` it is kept as FP4 with its scales)."""
    errs = []
    with _Files() as files:
        for name, (file, dtype, _) in src.items():
            w = src.get(name[:-len(".scale")] + ".weight") if name.endswith(".scale") else None
            if (dtype != "F32" or w is None or w[1] not in _FP4
                    or split_rule(name)[0] != "expert"):
                continue
            scale = files.tensor(file, name).float()
            ok = e8m0_exponent(scale)[1]
            if not bool(ok.all()):
                bad = scale[~ok].flatten()[:2].tolist()
                errs.append(f"{name} in {file}: e.g. {bad}")
    if errs:
        raise ConvertError("--expert-fp8: these FP4 experts' float scales are not powers of two "
                           "in [2**-127, 2**127], so they have no exact FP8 block form (convert "
                           "without --expert-fp8 keeps them as FP4):\n  " + "\n  ".join(errs[:20])
                           + (f"\n  ... ({len(errs)} in all)" if len(errs) > 20 else ""))


def _is_fp8_wo_a(module: str, src: dict) -> bool:
    """``module`` is a ``wo_a`` stored as FP8 weight + scale (de-quantised by the conversion)."""
    w = src.get(module + ".weight")
    return (module.endswith("wo_a") and w is not None and w[1] == "F8_E4M3"
            and (module + ".scale") in src)


def _check_splits(src: dict, mp: int) -> None:
    """Every dim-split tensor must divide evenly, FP8 weights on whole 128-wide scale blocks."""
    errs: dict[str, None] = {}
    for name, (_, dtype, shape) in src.items():
        kind, dim = split_rule(name)
        if kind != "split":
            continue
        module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".scale")) else name
        if name.endswith(".scale") and (module + ".weight") in src:
            continue  # checked with its weight
        # One message per tensor kind: layer numbers collapse to '*'.
        label = re.sub(r"\.\d+\.", ".*.", name) + f" {shape}"
        if dim >= len(shape):
            errs[f"{label}: no dim {dim} to split"] = None
        elif _is_fp8_wo_a(module, src):
            if shape[0] % mp:
                errs[f"{label}: dim 0 not divisible by {mp}"] = None
        elif shape[dim] % mp:
            errs[f"{label}: dim {dim} not divisible by {mp}"] = None
        elif dtype == "F8_E4M3" and (module + ".scale") in src and (shape[dim] // mp) % 128:
            errs[f"{label}: {shape[dim] // mp} per rank along dim {dim} is not a multiple of "
                 f"the 128-wide FP8 scale blocks"] = None
    if errs:
        raise ConvertError(f"--model-parallel {mp} cannot split these tensors: " +
                           "; ".join(errs))


_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json")


def _same_directory(a: str, b: str) -> bool:
    """Whether two paths name one directory: equal once resolved (symbolic links, ``..``), or
    the same file on disk (a bind mount, another mount of it)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:     # either does not exist (yet)
        return False


def convert(in_dir: str, out_dir: str, model_parallel: int, expert_fp8: bool = False,
            overwrite: bool = False, progress: bool = False) -> list[str]:
    """Shard an official checkpoint for ``model_parallel`` ranks (official convert.py; §12.4).

    Args:
        in_dir: HF checkpoint directory (``config.json``, index + shards or single file).
        out_dir: output directory; receives ``model{r}-mp{MP}.safetensors`` for r < MP plus
            copies of tokenizer.json, tokenizer_config.json, config.json and
            generation_config.json where present.
        model_parallel: number of ranks MP (see :func:`check_model_parallel`).
        expert_fp8: re-encode FP4 routed experts as FP8 with 128x128 e8m0 scales (the official
            ``--expert-dtype fp8``); otherwise they are stored as ``float4_e2m1fn_x2``.
        overwrite: allow a non-empty ``out_dir``.
        progress: show a tqdm bar per rank.

    Returns the rank file names. Raises ConvertError for an unreadable input, an MP that does
    not divide the experts/heads/o_groups/vocabulary or a split tensor, malformed scales (with
    ``expert_fp8`` also float FP4-expert scales that are not powers of two), a non-empty
    ``out_dir`` without ``overwrite``, or ``out_dir`` equal to ``in_dir``; all before anything
    is written.
    """
    in_dir, out_dir = os.fspath(in_dir), os.fspath(out_dir)
    if _same_directory(in_dir, out_dir):
        raise ConvertError(f"--out must differ from --in ({out_dir} is {in_dir})")
    config = _read_config(in_dir)
    raw = read_checkpoint_index(in_dir)
    src: dict[str, tuple[str, str, list[int]]] = {}
    for name, meta in raw.items():
        new = official_name(name)
        if new is None:
            continue
        if new in src:
            raise ConvertError(f"two input tensors map to the name {new}")
        src[new] = meta
    experts = {split_rule(n)[1] for n in src if split_rule(n)[0] == "expert"}
    n_experts = _cfg_value(config or {}, "n_routed_experts")
    if n_experts is None:
        n_experts = max(experts) + 1 if experts else 0
    if experts and max(experts) >= n_experts:
        raise ConvertError(f"expert index {max(experts)} >= n_routed_experts {n_experts}")
    check_model_parallel(model_parallel, config, n_experts if experts else None)
    _check_scales(src)
    if expert_fp8:
        _check_expert_fp8_scales(src)
    _check_splits(src, model_parallel)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConvertError(f"output directory {out_dir} is not empty (pass overwrite=True / "
                           "--overwrite to replace its files)")
    os.makedirs(out_dir, exist_ok=True)
    n_local = n_experts // model_parallel if n_experts else 0
    out = []
    with _Files() as files:
        for rank in range(model_parallel):
            entries = _plan_rank(rank, model_parallel, n_local, src, expert_fp8, files)
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=len(entries), desc=f"rank {rank}/{model_parallel}",
                           unit="tensor")
                entries = [_Entry(e.name, e.dtype, e.shape,
                                  (lambda p=e.produce: (bar.update(1), p())[1])) for e in entries]
            fname = rank_file(rank, model_parallel)
            write_safetensors(os.path.join(out_dir, fname), entries, {"format": "pt"})
            if progress:
                bar.close()
            out.append(fname)
    for fname in os.listdir(out_dir):      # (overwrite) another MP's ranks would mix with ours
        m = _RANK_FILE.match(fname)
        if m and int(m.group(2)) != model_parallel:
            os.remove(os.path.join(out_dir, fname))
    for fname in _COPY_FILES:
        p = os.path.join(in_dir, fname)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(out_dir, fname))
    return out


# ------------------------------------------------------------------------------ reassembly


def _rank_files(path: str) -> tuple[int, list[str]]:
    if not os.path.isdir(path):
        raise ConvertError(f"directory not found: {path}")
    found: dict[int, dict[int, str]] = {}
    for f in os.listdir(path):
        m = _RANK_FILE.match(f)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = os.path.join(path, f)
    if not found:
        raise ConvertError(f"no model-parallel files model{{rank}}-mp{{MP}}.safetensors in {path}")
    if len(found) > 1:
        raise ConvertError(f"{path} mixes conversions for MP = {sorted(found)}")
    (mp, ranks), = found.items()
    missing = [r for r in range(mp) if r not in ranks]
    if missing or len(ranks) != mp:
        raise ConvertError(f"{path}: MP {mp} conversion lacks rank files {missing}")
    return mp, [ranks[r] for r in range(mp)]


class RankTensor(NamedTuple):
    """Where one tensor of a ``--model-parallel`` conversion lives: ``kind`` "expert" (on one
    rank), "split" (every rank holds a slice; concatenate along ``dim`` in rank order) or
    "replicate" (every rank holds a copy); ``dim`` -1 unless split; ``dtype`` the safetensors
    dtype string; ``shape`` the full (reassembled) shape."""
    kind: str
    dim: int
    holders: list[int]
    dtype: str
    shape: list[int]


def plan_rank_tensors(metas: list[dict[str, tuple[str, Sequence[int]]]]
                      ) -> tuple[dict[str, RankTensor], list[str]]:
    """How to read each tensor from the rank files' headers ``metas[rank][name] = (dtype,
    shape)`` (:func:`split_rule` decides the kind by name). Returns the plan of the consistent
    tensors (in rank-0-first name order) and one message per inconsistent one: a routed expert
    on several ranks, a tensor missing on some rank, dtypes that differ between ranks, split
    slices that differ in a dim other than the split one (or lack that dim), replicas whose
    shapes differ. One definition for ``dsv4 convert
    --unshard`` and the expert-parallel loader (dsv4.distributed.loading.RankFiles)."""
    mp = len(metas)
    plan: dict[str, RankTensor] = {}
    problems: list[str] = []
    for name in dict.fromkeys(n for m in metas for n in m):
        holders = [r for r in range(mp) if name in metas[r]]
        kind, dim = split_rule(name)
        dtype, shape = metas[holders[0]][name]
        shape = list(shape)
        if kind == "expert":
            if len(holders) != 1:
                problems.append(f"{name} is on ranks {holders}; a routed expert must be on one")
                continue
        elif len(holders) != mp:
            problems.append(f"{name} is on ranks {holders} only; expected every rank of {mp}")
            continue
        elif any(metas[r][name][0] != dtype for r in holders):
            problems.append(f"{name} has different dtypes across ranks")
            continue
        elif kind == "split":
            parts = [list(metas[r][name][1]) for r in range(mp)]
            if len(shape) <= dim:
                problems.append(f"{name} has {len(shape)} dims; it is split along dim {dim}")
                continue
            if any(len(p) != len(shape) or any(a != b for i, (a, b) in enumerate(zip(p, shape))
                                               if i != dim) for p in parts):
                problems.append(f"{name}: rank slices differ in dims other than {dim}")
                continue
            shape[dim] = sum(p[dim] for p in parts)
        elif any(list(metas[r][name][1]) != shape for r in holders):
            problems.append(f"{name}: a replicated tensor with different shapes across ranks")
            continue
        plan[name] = RankTensor(kind, dim if kind == "split" else -1, holders, dtype, shape)
    return plan, problems


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (bitwise comparison of any dtype, NaN included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _plan_unshard(path: str, check_replicas: bool, files: _Files) -> list[_Entry]:
    mp, paths = _rank_files(path)
    metas = []
    for p in paths:
        with _safe_open(p) as f:
            metas.append({n: (f.get_slice(n).get_dtype(), list(f.get_slice(n).get_shape()))
                          for n in f.keys()})
    plan, problems = plan_rank_tensors(metas)
    if problems:
        raise ConvertError(f"inconsistent rank files in {path}:\n  " + "\n  ".join(problems[:20]))

    def replica(n: str) -> torch.Tensor:
        t = files.tensor(paths[0], n)
        if check_replicas:
            for p in paths[1:]:
                o = files.tensor(p, n)
                if o.shape != t.shape or not torch.equal(_raw(o), _raw(t)):
                    raise ConvertError(f"replicated tensor {n} differs between ranks")
        return t

    entries = []
    for name, t in plan.items():
        if t.kind == "expert":
            p = paths[t.holders[0]]
            if t.dtype == "F4":        # back to the release's int8 [out, in/2]
                entries.append(_Entry(name, "I8", [t.shape[0], t.shape[1] // 2],
                                      lambda p=p, n=name: files.tensor(p, n).view(torch.int8)))
            else:
                entries.append(_Entry(name, t.dtype, t.shape,
                                      lambda p=p, n=name: files.tensor(p, n)))
        elif t.kind == "split":
            entries.append(_Entry(name, t.dtype, t.shape, lambda n=name, d=t.dim: torch.cat(
                [files.tensor(p, n) for p in paths], dim=d)))
        else:
            entries.append(_Entry(name, t.dtype, t.shape, lambda n=name: replica(n)))
    return entries


def load_model_parallel(path: str, check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """Reassemble the full tensors from the rank files of a :func:`convert` output directory.

    Routed experts come from the rank that holds them (FP4 ``float4_e2m1fn_x2`` viewed back as
    the release's int8 [out, in/2]); dim-split tensors are concatenated in rank order;
    replicated tensors are taken from rank 0 (with ``check_replicas``, checked bit-equal on
    every rank). Names are the official inference names, in rank-0 file order.

    The result equals the input checkpoint bit for bit except: ``wo_a.weight`` is its exact bf16
    de-quantisation (no ``wo_a.scale``), and with ``expert_fp8`` the experts are the FP8
    re-encoding. All tensors are loaded into memory (use :func:`unshard` for large models).
    Raises ConvertError for missing ranks, a tensor missing on some rank, an expert on two
    ranks, or (``check_replicas``) differing replicas.
    """
    with _Files() as files:
        return {e.name: e.produce()
                for e in _plan_unshard(os.fspath(path), check_replicas, files)}


def unshard(in_dir: str, out_dir: str, n_shards: int = 1, check_replicas: bool = True,
            overwrite: bool = False) -> list[str]:
    """Write the reassembled tensors of a model-parallel directory as an HF-style checkpoint.

    Streams one tensor at a time into ``n_shards`` files (see :func:`write_sharded`) and
    copies config.json, generation_config.json and the tokenizer files. The result can be
    opened by :meth:`dsv4.model.Model.from_pretrained` where the loader accepts the mixed
    storage (bf16 ``wo_a`` without scale; FP8 experts after ``expert_fp8``).
    Raises ConvertError as :func:`load_model_parallel`, for an ``out_dir`` equal to ``in_dir``
    or a non-empty ``out_dir`` without ``overwrite``.
    """
    in_dir, out_dir = os.fspath(in_dir), os.fspath(out_dir)
    if _same_directory(in_dir, out_dir):
        raise ConvertError(f"output directory must differ from the input directory ({out_dir} "
                           f"is {in_dir})")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConvertError(f"output directory {out_dir} is not empty (pass overwrite=True)")
    with _Files() as files:
        written = write_sharded(out_dir, _plan_unshard(in_dir, check_replicas, files), n_shards)
    for fname in _COPY_FILES:
        p = os.path.join(in_dir, fname)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(out_dir, fname))
    return written
