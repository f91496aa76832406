"""Value checks shared by the command lines (argparse types of ``dsv4`` and its ``bench`` /
``train`` subcommands) and the public API (integer sequences): each error names what is
accepted."""

from __future__ import annotations

import argparse
import operator
from collections.abc import Mapping
from typing import Callable

import torch

__all__ = ["int_at_least", "int_sequence"]


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


def int_sequence(value, what: str) -> list[int]:
    """``value`` (a list, tuple or other ordered iterable of integers, or a 1-D integer tensor)
    as python ints. Raises ValueError ``f"{what}; got ..."`` for anything else: a string, a
    scalar, a set / frozenset / dict (no order of their own: the ints would come out in
    whatever order they iterate), a float / bool / complex tensor or a tensor of another rank,
    an element that is a bool, float, string, None or non-integer tensor. Ranges and lengths
    are the caller's."""
    if isinstance(value, (set, frozenset, Mapping)):
        raise ValueError(f"{what}; got a {type(value).__name__} {value!r} (unordered: pass a "
                         "list or tuple)")
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex \
                or value.dtype == torch.bool:
            raise ValueError(f"{what}; got a {value.dtype} tensor of shape "
                             f"{tuple(value.shape)}")
        return value.tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{what}; got {value!r}")
    out = []
    for v in value:
        if isinstance(v, (bool, float, str, bytes)) or v is None or (
                isinstance(v, torch.Tensor) and (v.dim() or not _integer(v.dtype))):
            raise ValueError(f"{what}; got {v!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{what}; got {v!r}") from None
    return out


def _integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
