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
``fp32`` turns it (and the bf16 copy below) off (PyTorch's fp32 GEMM), unset = the row rule
(another value: a warning, then the rule). The split path needs
``torch.mm(..., out_dtype=torch.float32)`` (CUDA; an older torch without that overload runs the
fp32 GEMM). The weight is split at every call (~5 elementwise passes over it, small beside a
GEMM of 4096+ rows).

**bf16-valued weights** (:func:`bf16_copy`): the release stores the compressors' ``wkv`` /
``wgate`` in bf16 and the model promotes them to fp32 (architecture.md §12.3), so every
element is a bf16 value: ``mid`` and ``lo`` are zero and ``x @ w.T`` is ONE bf16 GEMM on
``hi`` with fp32 output, the same products and accumulation as the split path. It pays at
every row count: a decode step's GEMV reads 2 bytes per weight instead of 4, and a prefill's
GEMM runs on tensor cores instead of fp32 CUDA cores. The bf16 copy is held beside the fp32
weight (half its bytes again: ~0.6 GB over V4-Flash's 43 layers), made once per weight
version after one check (a pass over the weight and a host sync; never while a CUDA graph is
captured: an unchecked weight then takes the fp32 path). A weight made under
``torch.inference_mode`` has no version counter and keeps the fp32 / split path.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterable, Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .backend import env_choice

__all__ = ["split_bf16x3", "linear_bf16x3", "use_split", "split_rule", "SPLIT_MIN_ROWS",
           "bf16_copy", "bf16_valued", "linear_bf16", "recording_copies", "copies_current",
           "pending_copy_bytes"]

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


def _operands_qualify(x: torch.Tensor, w: torch.Tensor) -> bool:
    """bf16 x and fp32 w [N, K] on CUDA with x [..., K], torch's ``mm`` with ``out_dtype``, and
    no gradient needed: what both bf16 paths ask of their operands."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.float32
            and w.dim() == 2 and x.shape[-1] == w.shape[1] and _has_mm_out_dtype()):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))


def use_split(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`linear_bf16x3` serves ``x @ w.T``: bf16 x and fp32 w on CUDA, no gradient
    needed, and :func:`split_rule` on x's rows and ``DSV4_FP32_LINEAR`` (read at each call)."""
    if not _operands_qualify(x, w):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return split_rule(rows, env_choice("DSV4_FP32_LINEAR", _MODES))


# weight -> (key, all values bf16?, the bf16 copy or None); key: _copy_key
_bf16_checked: WeakIdKeyDictionary = WeakIdKeyDictionary()
# per thread: the list recording_copies() fills, or None
_recording = threading.local()


def _copy_key(w: torch.Tensor, also: Sequence[torch.Tensor]) -> tuple:
    """What a copy of ``w`` depends on: its storage pointer and version, and the versions of
    ``also`` (the Parameters viewing a fused group's buffer: a write through one of them
    advances its own version, not the buffer's)."""
    return (w.data_ptr(), w._version, tuple(t._version for t in also))


def _bf16_check(x: torch.Tensor, w: torch.Tensor, keep: bool,
                also: Sequence[torch.Tensor] = ()) -> tuple[bool, Optional[torch.Tensor]]:
    """(whether every element of ``w`` is a bf16 value, the bf16 copy when ``keep``) for the
    bf16 paths of ``x @ w.T``; (False, None) when the operands do not qualify,
    ``DSV4_FP32_LINEAR`` is ``fp32``, or ``w`` was not checked before and a CUDA graph is being
    captured (the check needs a host sync). Cached per weight; redone after an in-place
    change or a new storage (:func:`_copy_key`)."""
    if not _operands_qualify(x, w) or env_choice("DSV4_FP32_LINEAR", _MODES) == "fp32":
        return False, None
    if w.is_inference() or any(t.is_inference() for t in also):
        # (made under torch.inference_mode: no version counter, so an in-place change, e.g.
        # new weights loaded in inference mode, could not be seen; such a weight keeps its
        # fp32 / split path)
        return False, None
    key = _copy_key(w, also)
    hit = _bf16_checked.get(w)
    checked = hit is not None and hit[0] == key         # this version of w was checked
    if checked and (hit[2] is not None or not (keep and hit[1])):   # nothing left to make
        exact, copy = hit[1], hit[2]
    elif w.is_cuda and torch.cuda.is_current_stream_capturing():
        return False, None
    else:
        with torch.no_grad():
            hi = w.to(torch.bfloat16)
            exact = (checked and hit[1]) or bool(torch.equal(hi.float(), w))
        copy = hi if exact and keep else None
        _bf16_checked[w] = (key, exact, copy)
    records = getattr(_recording, "list", None)
    if copy is not None and records is not None:
        records.append((weakref.ref(w), tuple(weakref.ref(t) for t in also), key, copy))
    return exact, copy


@contextlib.contextmanager
def recording_copies():
    """Inside the block (this thread), every bf16 copy :func:`bf16_copy` serves is recorded in
    the yielded list: a CUDA graph captured there reads those copies, so its owner keeps the
    records (they hold the copies: a graph never reads a freed one) and replays the graph
    only while :func:`copies_current` says their weights have not changed since."""
    prev = getattr(_recording, "list", None)
    records: list = []
    _recording.list = records
    try:
        yield records
    finally:
        _recording.list = prev


def copies_current(records: Sequence[tuple]) -> bool:
    """Whether every weight a recorded copy was made from (:func:`recording_copies`) is still
    alive with the same storage and versions (a write through the parameter, an optimizer
    step or ``load_state_dict`` advances them; a write through ``.data`` does not: write
    through the parameter under ``torch.no_grad()``)."""
    # (runs before every graph replay: compares the key's fields in place rather than building
    # a new _copy_key per record, ~2x less host time per step)
    for wref, also_refs, (ptr, version, versions), _copy in records:
        w = wref()
        if w is None or w._version != version or w.data_ptr() != ptr:
            return False
        for ref, v in zip(also_refs, versions):
            t = ref()
            if t is None or t._version != v:
                return False
    return True


def bf16_valued(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`bf16_copy` would serve ``x @ w.T`` (without keeping a copy for it): the
    same operands and rules; never raises."""
    return _bf16_check(x, w, keep=False)[0]


def bf16_copy(x: torch.Tensor, w: torch.Tensor,
              also: Sequence[torch.Tensor] = ()) -> Optional[torch.Tensor]:
    """``w`` (fp32 [N, K]) as bf16 [N, K] for ``x @ w.T`` (x bf16 [..., K]) when the operands
    qualify (both on CUDA, no gradient), ``DSV4_FP32_LINEAR`` is not ``fp32``, and every
    element of ``w`` is a bf16 value (the release stores the compressors' weights so,
    architecture.md §12.3; module doc); else None (never raises: a non-qualifying call keeps
    its fp32 / split path). The copy is kept with the weight (remade after an in-place change
    or a new storage, of ``w`` or of a tensor in ``also``: the Parameters viewing a fused
    group's buffer); while a CUDA graph is captured a weight without one gets None (its fp32
    path)."""
    return _bf16_check(x, w, keep=True, also=also)[1]


def _may_copy(w: torch.Tensor) -> bool:
    """Whether :func:`bf16_copy` could ever keep a copy of ``w``: an fp32 CUDA tensor with a
    version counter (not made under inference mode)."""
    return w.is_cuda and w.dtype == torch.float32 and not w.is_inference()


def _span(w: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first element, end element) of the elements ``w`` covers (a
    contiguous weight or a fused group's row slice: what :func:`bf16_copy` copies)."""
    return (w.untyped_storage().data_ptr(), w.storage_offset(), w.storage_offset() + w.numel())


def pending_copy_bytes(weights: Iterable[torch.Tensor]) -> int:
    """An upper bound of the bytes :func:`bf16_copy` may still allocate for ``weights`` (the
    fp32 weights it may serve): 2 per element of the CUDA fp32 weights among them that no
    current copy covers (a fused group's copy covers its members; elements shared by several
    weights count once; a weight whose current version was found not bf16-valued is never
    copied and not counted; one not checked yet is counted whatever its values). 0 when
    ``DSV4_FP32_LINEAR`` is ``fp32``. For a memory budget made before the first step, when
    the copies do not exist yet (V4-Flash: ~0.6 GB)."""
    if env_choice("DSV4_FP32_LINEAR", _MODES) == "fp32":
        return 0
    covered: dict[int, list[tuple[int, int]]] = {}
    # (a snapshot of the underlying dict: list() of a dict is one step under the GIL, while
    # iterating the WeakIdKeyDictionary itself raises if another thread adds a weight)
    for ref, (key, exact, copy) in list(_bf16_checked.data.items()):
        w = ref()
        if w is None or key[:2] != (w.data_ptr(), w._version):
            continue                     # gone, or changed since: its copy will be remade
        if copy is not None or not exact:
            ptr, a, b = _span(w)
            covered.setdefault(ptr, []).append((a, b))
    todo: dict[int, list[tuple[int, int]]] = {}
    for w in weights:
        if not _may_copy(w):
            continue
        ptr, a, b = _span(w)
        if any(c <= a and b <= d for c, d in covered.get(ptr, ())):
            continue
        todo.setdefault(ptr, []).append((a, b))
    total = 0
    for spans in todo.values():          # union of each storage's spans
        end = -1
        for a, b in sorted(spans):
            if b > end:
                total += b - max(a, end)
                end = b
    return 2 * total


def linear_bf16(x: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x.float() @ w.T`` (fp32 [..., N]) for bf16 ``x`` [..., K] and ``hi`` = :func:`bf16_copy`
    of an fp32 ``w`` [N, K] whose values are all bf16: one bf16 tensor-core GEMM with fp32
    output (the products exact, as the fp32 GEMM's; fp32 accumulation). No checks of its own
    (:func:`bf16_copy` decides when it applies): mismatched shapes or dtypes raise torch's
    RuntimeError from ``torch.mm``."""
    x2 = x.reshape(-1, x.shape[-1])
    return torch.mm(x2, hi.t(), out_dtype=torch.float32).view(*x.shape[:-1], hi.shape[0])


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
