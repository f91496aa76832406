"""Hashes of the kernel sources (standard library only: setup.py loads this file by path at
build time, before dsv4 is importable, and records the values in ``dsv4/_build_config.py``;
:mod:`dsv4.ops.backend` compares them with the GPU-verified ones).

Two hashes: :func:`kernel_source_digest`, one over the whole of csrc/{include,kernels,torch},
and :func:`op_source_digests`, one per op over the files its implementation is compiled from
(:data:`OP_SOURCES`, followed through ``#include "..."``, plus :data:`SHARED`), so that a
change to one op's kernel unverifies that op only. :func:`op_sources_problems` is the guard
that keeps :data:`OP_SOURCES` complete (every glue/kernel file claimed, every registered op
mapped)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_PARTS = ("include", "kernels", "torch")
_SUFFIXES = {".h", ".hpp", ".cuh", ".cu", ".cpp", ".cc"}

# The kernel translation units of the grouped GEMM: grouped_gemm.cu (the entry points
# dsv4::grouped_gemm, fp8_act_quant(_sim), zero_rows_past_offsets) picks at run time one of the
# TUs it calls (gg::launch_bf16 / launch_fp8 / launch_fp4 / launch_qmma / launch_skinny /
# launch_ws_bf16 / launch_gemv).
_GEMM_TUS = ("kernels/grouped_gemm.cu", "kernels/grouped_gemm_bf16.cu",
             "kernels/grouped_gemm_fp8.cu", "kernels/grouped_gemm_fp4.cu",
             "kernels/grouped_gemm_qmma.cu", "kernels/grouped_gemm_skinny.cu",
             "kernels/grouped_gemm_ws.cu", "kernels/grouped_gemm_gemv.cu")
_ATTN_TUS = ("kernels/sparse_attn.cu", "kernels/sparse_attn_prefill_sm90.cu")

# op -> the csrc/ files (relative to csrc/) its CUDA implementation starts from: the torch glue
# that registers it and the kernel TUs defining the launch functions that glue calls (headers
# are followed from these through #include). Out-variants (``<op>_out``) belong to their op.
# Derived by reading the glue and checked against the undefined/defined dsv4:: symbols of each
# object file of a build (nm): a new call from one TU into another must be added here by hand.
OP_SOURCES: dict[str, tuple[str, ...]] = {
    "rms_norm": ("torch/rms_norm.cpp", "kernels/rms_norm.cu"),
    "q_norm_rope": ("torch/qkv_rope.cpp", "kernels/qkv_rope.cu"),
    "kv_norm_rope": ("torch/qkv_rope.cpp", "kernels/qkv_rope.cu"),
    "compress_kv": ("torch/compress_kv.cpp", "kernels/compress_kv.cu"),
    "indexer_topk": ("torch/indexer_topk.cpp", "kernels/indexer_topk.cu"),
    # both ops go through the glue's shared run(): the decode kernel or the sm90 prefill one
    "sparse_attn": ("torch/sparse_attn.cpp",) + _ATTN_TUS,
    "hca_attn": ("torch/sparse_attn.cpp",) + _ATTN_TUS,
    "grouped_oproj": ("torch/grouped_oproj.cpp",) + _GEMM_TUS,
    "fp8_linear": ("torch/gemm.cpp",) + _GEMM_TUS,
    "moe_up": ("torch/grouped_gemm.cpp",) + _GEMM_TUS,
    "moe_down": ("torch/grouped_gemm.cpp",) + _GEMM_TUS,
    # registered beside moe_up / moe_down; calls only dsv4::fp8_act_quant (grouped_gemm.cu)
    "fp8_act_quant": ("torch/grouped_gemm.cpp", "kernels/grouped_gemm.cu"),
    "moe_gate": ("torch/moe_routing.cpp", "kernels/moe_gate.cu"),
    "moe_dispatch": ("torch/moe_routing.cpp", "kernels/moe_dispatch.cu"),
    "moe_combine": ("torch/moe_routing.cpp", "kernels/moe_combine.cu"),
    "moe_swiglu": ("torch/moe_swiglu.cpp", "kernels/moe_swiglu.cu"),
    "argmax_finite": ("torch/argmax_finite.cpp", "kernels/argmax_finite.cu"),
    "paged_rows": ("torch/paged_rows.cpp", "kernels/paged_rows.cu"),
    "mhc_pre": ("torch/mhc.cpp", "kernels/mhc.cu"),
    "mhc_post": ("torch/mhc.cpp", "kernels/mhc.cu"),
    "mhc_head": ("torch/mhc.cpp", "kernels/mhc.cu"),
}
# Files that affect every op: the library's TORCH_LIBRARY and module init.
SHARED: tuple[str, ...] = ("torch/registration.cpp",)

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)
_DEF = re.compile(r'\bm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)')


def _base(root: str | Path | None) -> Path:
    return Path(root) if root is not None else Path(__file__).resolve().parents[2]


def _tree(base: Path) -> list[Path] | None:
    dirs = [base / "csrc" / d for d in _PARTS]
    if not all(d.is_dir() for d in dirs):
        return None
    return sorted(f for d in dirs for f in d.rglob("*") if f.suffix in _SUFFIXES)


def _read(f: Path) -> bytes:
    return f.read_bytes().replace(b"\r\n", b"\n")


def _hash(base: Path, files) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        rel = f.relative_to(base).as_posix().encode()
        body = _read(f) if f.is_file() else b"\0(missing)"
        h.update(rel + b"\0" + body + b"\0")
    return h.hexdigest()


def kernel_source_digest(root: str | Path | None = None) -> str | None:
    """sha256 over the C++/CUDA files under csrc/include, csrc/kernels and csrc/torch of the
    source checkout at ``root`` (default: the one this file lies in): each file's path relative
    to ``root`` and its bytes with CRLF read as LF, in path order. None where there is no such
    tree (an installed wheel)."""
    base = _base(root)
    files = _tree(base)
    return None if files is None else _hash(base, files)


def _closure(base: Path, starts) -> set[Path]:
    """``starts`` (paths relative to csrc/) and every file they reach through ``#include "x"``:
    x is looked up beside the including file, then in csrc/include and csrc/kernels (the
    build's include paths); <system> includes and names found nowhere are not followed."""
    csrc = base / "csrc"
    todo = [csrc / s for s in starts]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if not f.is_file():
            continue
        for name in _INCLUDE.findall(_read(f).decode("utf-8", "replace")):
            for d in (f.parent, csrc / "include", csrc / "kernels"):
                g = d / name
                if g.is_file():
                    todo.append(_norm(base, g))
                    break
    return seen


def _norm(base: Path, f: Path) -> Path:
    """``f`` with ``..`` resolved, kept under ``base`` as given (not through symlinks)."""
    parts: list[str] = []
    for p in f.relative_to(base).parts:
        if p == "..":
            if parts:
                parts.pop()
        elif p != ".":
            parts.append(p)
    return base.joinpath(*parts)


def op_closures(root: str | Path | None = None) -> dict[str, list[str]] | None:
    """op -> the files (paths relative to ``root``, sorted) its digest covers: the closure of
    :data:`OP_SOURCES` [op] and :data:`SHARED` under ``#include "..."``. None without a source
    tree."""
    base = _base(root)
    if _tree(base) is None:
        return None
    return {op: sorted(f.relative_to(base).as_posix()
                       for f in _closure(base, srcs + SHARED))
            for op, srcs in OP_SOURCES.items()}


def op_source_digests(root: str | Path | None = None) -> dict[str, str] | None:
    """op -> sha256 over the files of its closure (:func:`op_closures`), each file's path and
    bytes (CRLF read as LF) in path order as in :func:`kernel_source_digest` (a listed file
    that is missing hashes as missing). None where there is no source tree (an installed
    wheel)."""
    base = _base(root)
    if _tree(base) is None:
        return None
    return {op: _hash(base, _closure(base, srcs + SHARED)) for op, srcs in OP_SOURCES.items()}


def registered_ops(root: str | Path | None = None) -> set[str]:
    """The op names the torch glue defines (``m.def("<name>(...``) in csrc/torch/*."""
    base = _base(root)
    names: set[str] = set()
    for f in sorted((base / "csrc" / "torch").rglob("*")):
        if f.suffix in _SUFFIXES:
            names.update(_DEF.findall(_read(f).decode("utf-8", "replace")))
    return names


def op_sources_problems(root: str | Path | None = None) -> list[str]:
    """What keeps :data:`OP_SOURCES` from describing the tree at ``root`` (empty = complete):
    a listed file that does not exist; a C++/CUDA file under csrc/kernels or csrc/torch in no
    op's closure and not in :data:`SHARED` (a new kernel file must be claimed by the ops that
    call it); an ``m.def`` in the glue that could not be read as a name; a registered op (or
    its ``_out`` variant's op) with no entry; an entry for an op nobody registers."""
    base = _base(root)
    if _tree(base) is None:
        return ["no csrc/{include,kernels,torch} tree at " + str(base)]
    csrc = base / "csrc"
    problems = [f"OP_SOURCES/SHARED lists csrc/{s}, which does not exist"
                for s in sorted({s for v in OP_SOURCES.values() for s in v} | set(SHARED))
                if not (csrc / s).is_file()]
    claimed: set[Path] = set()
    for srcs in OP_SOURCES.values():
        claimed |= _closure(base, srcs + SHARED)
    for d in ("kernels", "torch"):
        for f in sorted((csrc / d).rglob("*")):
            if f.suffix in _SUFFIXES and f not in claimed:
                problems.append(f"{f.relative_to(base).as_posix()} is in no op's sources "
                                "(add it to dsv4._kernel_digest.OP_SOURCES under the ops whose "
                                "implementation uses it, or to SHARED)")
    glue = "".join(_read(f).decode("utf-8", "replace")
                   for f in sorted((csrc / "torch").rglob("*")) if f.suffix in _SUFFIXES)
    if len(re.findall(r"\bm\.def\(", glue)) != len(_DEF.findall(glue)):
        problems.append("an m.def( in csrc/torch does not start with a literal \"<name>(\" "
                        "schema, so its op cannot be mapped to OP_SOURCES")
    names = set(_DEF.findall(glue))
    owners = set()
    for name in sorted(names):
        op = name if name in OP_SOURCES else name.removesuffix("_out")
        if op not in OP_SOURCES:
            problems.append(f"op {name} (m.def in csrc/torch) has no OP_SOURCES entry")
        owners.add(op)
    problems += [f"OP_SOURCES has {op}, which no m.def in csrc/torch registers"
                 for op in sorted(set(OP_SOURCES) - owners)]
    return problems
