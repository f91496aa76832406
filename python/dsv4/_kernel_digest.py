"""The hash of the kernel sources (standard library only: setup.py loads this file by path at
build time, before dsv4 is importable, and records the value in ``dsv4/_build_config.py``;
:mod:`dsv4.ops.backend` compares both with ``VERIFIED_SOURCE_DIGEST``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_PARTS = ("include", "kernels", "torch")
_SUFFIXES = {".h", ".hpp", ".cuh", ".cu", ".cpp", ".cc"}


def kernel_source_digest(root: str | Path | None = None) -> str | None:
    """sha256 over the C++/CUDA files under csrc/include, csrc/kernels and csrc/torch of the
    source checkout at ``root`` (default: the one this file lies in): each file's path relative
    to ``root`` and its bytes with CRLF read as LF, in path order. None where there is no such
    tree (an installed wheel)."""
    base = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    dirs = [base / "csrc" / d for d in _PARTS]
    if not all(d.is_dir() for d in dirs):
        return None
    h = hashlib.sha256()
    for f in sorted(f for d in dirs for f in d.rglob("*") if f.suffix in _SUFFIXES):
        body = f.read_bytes().replace(b"\r\n", b"\n")
        h.update(f.relative_to(base).as_posix().encode() + b"\0" + body + b"\0")
    return h.hexdigest()
