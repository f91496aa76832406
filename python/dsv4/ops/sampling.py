"""The greedy draw op: ``torch.ops.dsv4.argmax_finite`` (each row's argmax and whether the row
is all finite, in one pass over the logits) and its reference.

``argmax_finite(logits)`` for float32 ``logits`` [rows, n] (n >= 1) returns int64 [2, rows]:
row 0 ``torch.argmax(logits, -1)`` (the first index of the maximum; a row holding NaN gives
its first NaN), row 1 ``1`` where ``torch.isfinite(logits).all(-1)``, else ``0``. The runtime's
sampler (:func:`dsv4.runtime.sampler.sample_greedy`) takes it on CUDA: one kernel where its
PyTorch form (:func:`~dsv4.runtime.sampler.argmax_rows` + :func:`~dsv4.runtime.sampler.
rows_finite`, the same values) launches nine.
"""

from __future__ import annotations

import torch

from ._ext import raise_value_error, register_op

__all__ = ["ARGMAX_FINITE_SCHEMA", "argmax_finite", "argmax_finite_reference"]

ARGMAX_FINITE_SCHEMA = "(Tensor logits) -> Tensor"


def _check(logits, check) -> None:
    check(logits.dtype == torch.float32,
          lambda: f"argmax_finite: logits must be float32, got {logits.dtype}")
    check(logits.dim() == 2 and logits.shape[1] >= 1,
          lambda: f"argmax_finite: logits must be [rows, n] with n >= 1, got "
                  f"{tuple(logits.shape)}")


def argmax_finite_reference(logits: torch.Tensor) -> torch.Tensor:
    """int64 [2, rows]: ``[torch.argmax(logits, -1); torch.isfinite(logits).all(-1)]`` for
    float32 ``logits`` [rows, n], n >= 1 (see the module doc). Raises ValueError otherwise."""
    _check(logits, raise_value_error)
    return torch.stack([torch.argmax(logits, dim=-1),
                        torch.isfinite(logits).all(dim=-1).long()])


def _argmax_finite_fake(logits):
    _check(logits, torch._check)
    return logits.new_empty(2, logits.shape[0], dtype=torch.long)


register_op("argmax_finite", ARGMAX_FINITE_SCHEMA, argmax_finite_reference, _argmax_finite_fake)


def argmax_finite(logits: torch.Tensor) -> torch.Tensor:
    """``torch.ops.dsv4.argmax_finite``: see :func:`argmax_finite_reference` (on CUDA one
    kernel, the reference's values)."""
    return torch.ops.dsv4.argmax_finite(logits)
