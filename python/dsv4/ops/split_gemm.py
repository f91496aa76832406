"""An fp32-weight linear on bf16 tensor cores: ``x @ w.T`` for bf16 ``x`` and fp32 ``w``, the
products exact, as three bf16 GEMMs with fp32 accumulation.

The model keeps a few weights in fp32 and applies them to a bf16 activation promoted to fp32
(the compressors' ``wkv`` / ``wgate``, architecture.md §4.1, §12.3). PyTorch runs such a
product as an fp32 GEMM on CUDA cores (cuBLAS's sm80 ``ffma`` kernels, ~50 TFLOP/s on an H100):
at prefill size it was 16% of a 64 x 512 prefill's GPU time (H100, 2026-12-06). Here the
weight is split once per call into three bf16 terms,

    w = hi + mid + lo,  hi = bf16(w), mid = bf16(w - hi), lo = bf16(w - hi - mid)

(exact where the three terms lie in fp32's normal range, i.e. for all |w| above ~2^-110, and
off by less than 2^-126 below: each term takes the next 8 significant bits of the 24, the
differences are exact in fp32), and ``x @ w.T`` = ``x @ lo.T + x @ mid.T + x @ hi.T`` runs as
three bf16 tensor-core GEMMs with fp32 output, summed in fp32, smallest term first. A bf16 x bf16 product has at most 16 significant bits, so every product is the fp32
product of the original operands; what differs from an fp32 GEMM is how the sums round: the
tensor cores add with fewer guard bits than an FMA chain, so the split result carries a few
bits less (H100, K = 4096, outputs of magnitude ~1: max |error| against fp64 2.6-3.1e-5, the
fp32 GEMM's 1.4e-6 at 64 rows and 1.6-1.9e-5 at 4096+ rows, where cuBLAS splits K), far below
the bf16 rounding (2^-9 relative) of the compressed entries these projections feed.

It pays where the GEMM is bound by FLOPs: 3.2x / 3.9x faster than the fp32 GEMM at 4096 /
32768 rows of the V4-Flash CSA compressors (H100, bench_gemm --only split). At a few rows the
fp32 weight stream is cheaper than splitting it (64 rows: 4x slower), and at a 2048-token
prefill, bound by the host, its ~10 extra launches per call cost more wall time than the 0.8 ms
of GPU time it saved (H100, dsv4 bench 1 x 2048: 5% slower in two runs), so :func:`use_split`
asks for ``SPLIT_MIN_ROWS`` = 4096 rows.
``DSV4_FP32_LINEAR`` (read at each call): ``split`` forces the split path for any row count,
``fp32`` turns it off (PyTorch's fp32 GEMM), unset = the row rule (another value: a warning,
then the rule). The split path needs ``torch.mm(..., out_dtype=torch.float32)`` (CUDA; an
older torch without that overload runs the fp32 GEMM). The weight is split at every call
(~5 elementwise passes over it, small beside a GEMM of 4096+ rows); for the release's
bf16-exact compressor weights ``mid`` and ``lo`` are zero and two of the three GEMMs add
nothing (a cached ``hi`` would make it one GEMM, at the cost of holding it: not done).
"""

from __future__ import annotations

import torch

from .backend import env_choice

__all__ = ["split_bf16x3", "linear_bf16x3", "use_split", "split_rule", "SPLIT_MIN_ROWS"]

#: Fewest rows of x for which the split path runs by default (module doc: measured crossover).
SPLIT_MIN_ROWS = 4096

_MODES = ("", "fp32", "split")


def split_rule(rows: int, mode: str = "") -> bool:
    """The row rule of :func:`use_split` once the operands qualify: ``mode`` "fp32" never,
    "split" always, "" (unset) from ``SPLIT_MIN_ROWS`` rows."""
    if mode == "fp32":
        return False
    return mode == "split" or rows >= SPLIT_MIN_ROWS


def split_bf16x3(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hi, mid, lo) bf16 with ``hi.float() + mid.float() + lo.float() == w`` exactly for
    finite fp32 w whose terms stay in the normal range (bf16 shares fp32's exponents; below
    it the sum is off by less than 2^-126) and |w| below bf16's largest finite value,
    ~3.39e38 (above it ``hi`` rounds to inf)."""
    if w.dtype != torch.float32:
        raise ValueError(f"split_bf16x3: w must be float32, got {w.dtype}")
    hi = w.to(torch.bfloat16)
    r = w - hi.float()
    mid = r.to(torch.bfloat16)
    lo = (r - mid.float()).to(torch.bfloat16)
    return hi, mid, lo


def _has_mm_out_dtype() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype")


def use_split(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`linear_bf16x3` serves ``x @ w.T``: bf16 x and fp32 w on CUDA, no gradient
    needed, and :func:`split_rule` on x's rows and ``DSV4_FP32_LINEAR`` (read at each call)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.float32
            and w.dim() == 2 and x.shape[-1] == w.shape[1] and _has_mm_out_dtype()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return split_rule(rows, env_choice("DSV4_FP32_LINEAR", _MODES))


def linear_bf16x3(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x.float() @ w.T`` (fp32 [..., N]) for bf16 ``x`` [..., K] and fp32 ``w`` [N, K], as
    three bf16 tensor-core GEMMs on the exact split of ``w`` (module doc), each with fp32
    output, summed smallest term first (in place; an fp32 add rounds ``acc + y`` once, as a
    GEMM's beta = 1 epilogue would). No checks of its own (:func:`use_split` decides when it
    applies); mismatched shapes or dtypes raise torch's RuntimeError from ``torch.mm``, and
    ``split_bf16x3``'s ValueError for a non-fp32 ``w``."""
    hi, mid, lo = split_bf16x3(w)
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, lo.t(), out_dtype=torch.float32)
    y += torch.mm(x2, mid.t(), out_dtype=torch.float32)
    y += torch.mm(x2, hi.t(), out_dtype=torch.float32)
    return y.view(*x.shape[:-1], w.shape[0])
