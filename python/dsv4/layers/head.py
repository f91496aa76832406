"""The vocabulary projection (the LM head) held in bf16: its maths and the check that admits a
weight to that storage (``Model.compact_head``).

The release ships ``head.weight`` [vocab, dim] in bf16 and the official code holds it in fp32
(architecture.md §"Globals"): its logits are fp32 products of bf16-exact weights and the normed
activations (bf16 when the model runs in bf16), summed in fp32 (§10.2). A bf16 copy of a
bf16-exact weight has the same values, so the same logits come from it with fp32 arithmetic;
holding it that way halves the head's bytes (V4-Flash: 1.06 GB instead of 2.12 GB).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["bf16_inexact", "check_bf16_exact", "fp32_logits", "mm_fp32_out", "same_bits"]

#: Bytes of one fp32 slice of the weight that :func:`fp32_logits` upcasts at a time (and of
#: one slice :func:`bf16_inexact` inspects): bounds their transient memory.
SLICE_BYTES = 64 << 20


def _slices(rows: int, cols: int):
    step = max(1, SLICE_BYTES // (4 * max(cols, 1)))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        i, r = divmod(i, s)
        out.append(r)
    return tuple(reversed(out))


def bf16_inexact(t: torch.Tensor) -> tuple[int, Optional[tuple[int, ...]]]:
    """How many values of the floating-point tensor ``t`` bf16 does not hold bit-exactly, and
    the index of the first one (None when there is none).

    A float32 value is a bf16 value iff the low 16 bits of its pattern are zero (bf16 is the
    high half of float32: same sign, exponent and top 7 mantissa bits), which also admits
    ±0, ±inf, subnormals and the NaNs bf16 can carry. Other dtypes are compared through their
    exact float32 value. Looks at ``t`` in slices of :data:`SLICE_BYTES` along dim 0 (the
    head's fp32 weight is 2.1 GB at V4-Flash width); synchronises with the device once per
    slice. A meta tensor has no values: (0, None).
    """
    if t.is_meta or t.dtype == torch.bfloat16:
        return 0, None
    if not t.is_floating_point():
        raise ValueError(f"bf16_inexact: expected a floating-point tensor, got {t.dtype}")
    t = t.detach()
    flat = t.reshape(1 if t.dim() == 0 else t.shape[0], -1)
    count, first = 0, None
    for a, b in _slices(flat.shape[0], flat.shape[1]):
        bits = flat[a:b].float().contiguous().view(torch.int32)
        bad = (bits & 0xFFFF) != 0
        n = int(bad.count_nonzero())
        if n and first is None:
            r, c = (int(v) for v in bad.nonzero()[0])
            first = _unravel((a + r) * flat.shape[1] + c, tuple(t.shape))
        count += n
    return count, first


def check_bf16_exact(t: torch.Tensor, what: str) -> None:
    """Raise ValueError unless every value of ``t`` is a bf16 value (:func:`bf16_inexact`),
    naming ``what``, how many values are not and the first of them."""
    n, first = bf16_inexact(t)
    if n:
        v = float(t.detach()[first])
        raise ValueError(
            f"{what} holds {n} of {t.numel()} values that bf16 cannot represent exactly (the "
            f"first at {list(first)}: {v!r}), so holding it in bf16 would change the logits. "
            "The release ships the head in bf16 (a checkpoint's head always passes); a randomly "
            "initialised or fp32-trained head does not: keep it in fp32, or round it to bf16 "
            "yourself first if that is what you want")


def same_bits(copy: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether the bf16 tensor ``copy`` is bit for bit ``t.to(torch.bfloat16)`` (same shape
    and device), compared in slices of :data:`SLICE_BYTES` along dim 0 without a full copy.
    ``Model.compact_head`` asks it before adopting a cached bf16 copy of the head as the
    weight: the cache is keyed on the weight's version counter, which an in-place write
    through ``weight.data`` does not advance."""
    if copy.dtype != torch.bfloat16 or copy.shape != t.shape or copy.device != t.device:
        return False
    if t.numel() == 0:
        return True
    rows = 1 if t.dim() == 0 else t.shape[0]
    c2, t2 = copy.detach().reshape(rows, -1), t.detach().reshape(rows, -1)
    for a, b in _slices(rows, t2.shape[1]):
        if not torch.equal(c2[a:b].contiguous().view(torch.int16),
                           t2[a:b].to(torch.bfloat16).contiguous().view(torch.int16)):
            return False
    return True


def mm_fp32_out(y: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """float32 [..., vocab] = ``y @ weight.T`` (the head of §10.2) with fp32 accumulation and
    output, from low-precision ``y`` [..., dim] and ``weight`` [vocab, dim] of the same dtype
    (bf16 here): one ``torch.mm(..., out_dtype=torch.float32)``, reading the weight's 2 bytes
    per value once. None where that call is not available (a CPU tensor, or a torch without
    ``mm(out_dtype=)``): the caller then takes its own fallback. Shared by the compact head's
    fp32 logits (:func:`fp32_logits`) and ``Model._head``'s bf16 head."""
    if y.device.type not in ("cuda", "meta"):
        return None
    try:
        return torch.mm(y.reshape(-1, y.shape[-1]), weight.t(), out_dtype=torch.float32
                        ).view(*y.shape[:-1], weight.shape[0])
    except (RuntimeError, TypeError):   # a torch without mm(out_dtype=)
        return None


def fp32_logits(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [..., vocab] of the official fp32 head (§10.2) from a bf16 weight.

    Args:
        y: [..., dim] the normed head input, any float dtype.
        weight: bf16 [vocab, dim], the head weight (bf16-exact values, as the release's).

    Returns float32 [..., vocab] = ``y.float() @ weight.float().T``: the products of the
    official head, summed in fp32 (the summation order may differ, as between two GEMMs).

    * bf16 ``y`` on CUDA (the bf16 model; ``meta`` too, for memory measurements), no gradient
      needed: one ``torch.mm(..., out_dtype=torch.float32)``: bf16 inputs, fp32 accumulation,
      fp32 output; it reads the weight's 2 bytes per value once.
    * otherwise (CPU, fp32 / fp16 activations, autograd through ``y``, or a torch without
      ``mm(out_dtype=)``): ``y`` in fp32 times the weight upcast one :data:`SLICE_BYTES` slice
      of rows at a time (no full fp32 copy of the weight is made). The weight gets no gradient
      (it is held frozen, see ``Model.compact_head``); ``y`` does.
    """
    if y.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and y.requires_grad):
        out = mm_fp32_out(y, weight)
        if out is not None:
            return out
    x = y.float()
    parts = _slices(weight.shape[0], weight.shape[1])
    if len(parts) == 1:
        return F.linear(x, weight.float())
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for a, b in parts:
        out[..., a:b] = F.linear(x, weight[a:b].float())
    return out
