"""argparse value types shared by the command lines (``dsv4`` and its ``bench`` / ``train``
subcommands): each names the accepted range in its error message."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["int_at_least"]


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
