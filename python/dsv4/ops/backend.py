"""Which implementation ``dsv4.Model`` calls for CUDA tensors: the CUDA kernels or the reference.

Every op has one name, ``torch.ops.dsv4.<name>``; on a CUDA tensor the dispatcher runs the
compiled kernel when ``dsv4._C`` has one. The *model* decides per layer whether to take its
kernel path (batched, ops from :mod:`dsv4.ops`) or its reference path (per-sequence pure
PyTorch, the semantics every kernel is checked against). This module holds that switch so that
a user can compare the two on the same model in one process::

    dsv4.set_backend("reference")   # the pure-PyTorch model everywhere
    dsv4.set_backend("cuda")        # kernels on CUDA tensors where supported (the default)

The environment variable ``DSV4_BACKEND`` (``cuda`` or ``reference``) sets the initial value;
an unknown value is not an import error (``import dsv4`` and ``dsv4 --help`` keep working): it
prints one notice line to stderr and the default, ``cuda``, applies.

With ``"cuda"``, a layer uses its kernels only when all of these hold: the activations are
CUDA bfloat16 tensors (the kernels' dtype; fp32 models run the reference) and the compiled
extension has every op the layer needs. Otherwise it runs the reference and warns once.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "set_backend", "get_backend", "use_kernels",
           "check_backend"]

BACKENDS = ("cuda", "reference")
DEFAULT_BACKEND = "cuda"


def _initial() -> str:
    raw = os.environ.get("DSV4_BACKEND", "")
    name = raw.strip().lower() or DEFAULT_BACKEND
    if name not in BACKENDS:
        print(f"dsv4: DSV4_BACKEND={raw!r} is not one of {', '.join(BACKENDS)}; using "
              f"{DEFAULT_BACKEND!r} (the default)", file=sys.stderr, flush=True)
        return DEFAULT_BACKEND
    return name


_backend = _initial()
_warned: set[str] = set()


def set_backend(name: str) -> None:
    """Select what ``dsv4.Model`` runs on CUDA tensors.

    Args:
        name: ``"cuda"`` (the CUDA kernels where the layer's inputs are supported, else the
            reference with a one-time warning) or ``"reference"`` (the pure-PyTorch path).

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
    """
    global _backend
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    _backend = key


def get_backend() -> str:
    """The current backend name (``"cuda"`` or ``"reference"``)."""
    return _backend


def check_backend(name: str, device: torch.device) -> None:
    """Check that backend ``name`` can run a model on ``device`` before a run that asks for it.

    ``"reference"`` runs anywhere. ``"cuda"`` needs a CUDA device (the kernels take CUDA
    tensors; on the CPU the reference would run silently instead) and a compiled extension
    with CUDA kernels (``dsv4 info``).

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`, or ``"cuda"`` cannot run on
            ``device``; the message says why and what to use instead.
    """
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if key != "cuda":
        return
    device = torch.device(device)
    if device.type != "cuda":
        why = ("no CUDA device is available (torch.cuda.is_available() is False)"
               if not torch.cuda.is_available() else f"the model runs on {device}")
        raise ValueError(f"backend 'cuda' runs the dsv4 CUDA kernels on CUDA tensors, but {why}; "
                         "use backend 'reference' (the pure-PyTorch model) or a CUDA device")
    from ._ext import info
    if not info()["cuda_compiled_ops"]:
        raise ValueError("backend 'cuda': this dsv4 install has no compiled CUDA kernels "
                         f"({info()['import_error'] or 'none registered'}; see `dsv4 info`); "
                         "rebuild with nvcc available, or use backend 'reference'")


def _kernel_available(op: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"dsv4::{op}", "CUDA"))
    except Exception:
        return False


def use_kernels(x: torch.Tensor, ops: tuple[str, ...], unsupported: str | None = None) -> bool:
    """Whether a layer whose activations are ``x`` runs its kernel path through ``ops``.

    True iff the backend is ``"cuda"``, ``x`` is a CUDA bfloat16 tensor, every op in ``ops``
    has a compiled CUDA kernel and the layer passes no ``unsupported`` reason (a shape outside
    the kernels' range, e.g. ``index_topk > 2048``). When the backend is ``"cuda"`` and ``x`` is
    on CUDA but a condition fails, a warning names the reason (once per reason).
    """
    if _backend != "cuda" or not x.is_cuda:
        return False
    if unsupported:
        reason = f"dsv4: {unsupported}; those layers run the pure-PyTorch reference"
    elif x.dtype != torch.bfloat16:
        reason = (f"dsv4: the CUDA kernels take bfloat16 activations; a {x.dtype} model on "
                  "CUDA runs the pure-PyTorch reference")
    else:
        missing = [op for op in ops if not _kernel_available(op)]
        if not missing:
            return True
        reason = (f"dsv4: no compiled CUDA kernel for {', '.join(missing)} (see `dsv4 info`); "
                  "those layers run the pure-PyTorch reference")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return False
