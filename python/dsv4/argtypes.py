"""Value checks shared by the command lines (argparse types of ``dsv4`` and its ``bench`` /
``train`` subcommands) and the public API (integer sequences): each error names what is
accepted."""

from __future__ import annotations

import argparse
import math
import operator
from collections.abc import Mapping
from typing import Callable

import torch

from .cache import as_int

__all__ = ["check_number", "check_seed", "int_at_least", "int_sequence", "iter_items",
           "resolve_device", "seed_arg", "token_count", "token_count_arg"]


def check_number(value, name: str, ok: Callable[[float], bool], accepted: str) -> float:
    """``value`` as a float when it is a finite python int or float (not a bool) for which
    ``ok`` holds; ``ValueError("{name} must be {accepted}, got {value!r}")`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return float(value)


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo``; anything else is a usage error naming the range."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    return parse


def token_count(v: str) -> int:
    """A token count written ``4096``, ``64K`` (x 1024) or ``1M`` (x 2**20), case and spaces
    ignored; ValueError for anything else (the sign is not checked here)."""
    v = v.strip().upper()
    mult = 1
    if v.endswith("K"):
        mult, v = 1024, v[:-1]
    elif v.endswith("M"):
        mult, v = 1 << 20, v[:-1]
    return int(v) * mult


def token_count_arg(s: str) -> int:
    """An argparse type: a positive :func:`token_count` (``4096``, ``64K``, ``1M``)."""
    try:
        v = token_count(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 4096, 64K or 1M, got "
                                         f"{s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive token count, got {s!r}")
    return v


def _seed_range(limit: int) -> str:
    return f"[0, 2**{limit.bit_length() - 1})"   # limit: a power of two


def check_seed(value, limit: int, what: str = "seed") -> int:
    """``value`` as a python int in [0, ``limit``) (``limit`` a power of two; integer-like values
    as :func:`dsv4.cache.as_int` takes them); ValueError ``"{what} must be an integer in
    [0, 2**N), got ..."`` otherwise. The limits: ``dsv4.generate.SEED_LIMIT`` (a
    ``torch.Generator`` seed), ``dsv4.synthetic.SEED_LIMIT`` (a synthetic checkpoint's)."""
    expected = f"an integer in {_seed_range(limit)}"
    v = as_int(value, what, expected)
    if not 0 <= v < limit:
        raise ValueError(f"{what} must be {expected}, got {value!r}")
    return v


def seed_arg(limit: int) -> Callable[[str], int]:
    """An argparse type: a seed in [0, ``limit``) (:func:`check_seed`'s range); anything else is
    a usage error naming the range."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        try:
            return check_seed(v, limit)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be in {_seed_range(limit)}, got {s}") from None
    return parse


def int_sequence(value, what: str) -> list[int]:
    """``value`` (a list, tuple or other ordered iterable of integers, or a 1-D integer tensor)
    as python ints. Raises ValueError ``f"{what}; got ..."`` for anything else: a string, a
    scalar (a numpy 0-d array too), a set / frozenset / dict (no order of their own: the ints
    would come out in whatever order they iterate), a float / bool / complex tensor or a
    tensor of another rank, an element that is a bool, float, string, None or non-integer
    tensor. Ranges and lengths are the caller's."""
    if isinstance(value, (set, frozenset, Mapping)):
        raise ValueError(f"{what}; got a {type(value).__name__} {value!r} (unordered: pass a "
                         "list or tuple)")
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex \
                or value.dtype == torch.bool:
            raise ValueError(f"{what}; got a {value.dtype} tensor of shape "
                             f"{tuple(value.shape)}")
        return value.tolist()
    items = iter_items(value)
    if items is None:
        raise ValueError(f"{what}; got {value!r}")
    out = []
    for v in items:
        if isinstance(v, (bool, float, str, bytes)) or v is None or (
                isinstance(v, torch.Tensor) and (v.dim() or not _integer(v.dtype))):
            raise ValueError(f"{what}; got {v!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{what}; got {v!r}") from None
    return out


def iter_items(value):
    """An iterator over ``value``, or None for a string / bytes or what ``iter`` refuses: a
    scalar, and a numpy / torch 0-d array (which has ``__iter__`` but raises TypeError)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return iter(value)
    except TypeError:
        return None


def _integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def resolve_device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """``--device`` of the command lines: cpu, or cuda / cuda:N where CUDA has that device
    (None: cuda when available, else cpu); anything else (a device string torch refuses, or
    one of another type: mps, meta, ...) is a usage error naming the accepted values."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accepted = "expected cpu, or cuda / cuda:N (a CUDA device)"
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"argument --device: invalid device {name!r}; {accepted}")
    if device.type == "cpu" and device.index in (None, 0):
        return torch.device("cpu")
    if device.type != "cuda":
        parser.error(f"argument --device: {name!r} is not supported; {accepted}")
    if not torch.cuda.is_available():
        parser.error(f"argument --device: {name!r} requested but CUDA is not available "
                     "(use --device cpu)")
    n = torch.cuda.device_count()
    if device.index is not None and device.index >= n:
        parser.error(f"argument --device: {name!r}: this machine has {n} CUDA device(s), "
                     f"cuda:0 .. cuda:{n - 1}")
    return device
