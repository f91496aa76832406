"""Run dsv4's layer code in float64 for ``torch.autograd.gradcheck``.

The reference layers compute "in fp32" by upcasting explicitly (``x.float()``,
``dtype=torch.float32``, ``.to(torch.float32)``), which would round float64 inputs down and make
finite differences meaningless. Inside :class:`Float64`, every such request for float32 (or
complex64) yields float64 (complex128) instead, so the *same code* runs in double precision;
bf16 / integer casts are untouched, and a bit-level view of fp32 data as int32 (the
indexer's top-k sort keys) gets real fp32 bits. Nothing in the package is changed.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_UP = {torch.float32: torch.float64, torch.complex64: torch.complex128}


def _swap(v):
    if isinstance(v, torch.dtype):
        return _UP.get(v, v)
    return v


class Float64(TorchFunctionMode):
    """Context manager: float32 requests become float64 (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {k: _swap(v) for k, v in (kwargs or {}).items()}
        if func is torch.Tensor.float:
            return args[0].to(torch.float64)
        if (func is torch.Tensor.view and len(args) == 2 and args[0].dtype == torch.float64
                and isinstance(args[1], torch.dtype) and args[1].itemsize == 4):
            # A bit-level view of fp32 data (the indexer's top-k order keys: selection only,
            # no gradient): give it real fp32 bits.
            return args[0].to(torch.float32).view(args[1])
        if func is torch.Tensor.type and len(args) > 1:
            args = (args[0], _swap(args[1]), *args[2:])
        args = tuple(_swap(a) for a in args)
        return func(*args, **kwargs)
