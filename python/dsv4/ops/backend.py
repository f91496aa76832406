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
CUDA bfloat16 tensors (the kernels' dtype; fp32 models run the reference), the compiled
extension has every op the layer needs, and every one of those kernels has passed the CUDA test
suite on a Hopper GPU (H100 / H200) at its current code (:data:`HARDWARE_VERIFIED`). Otherwise it
runs the reference and warns once, naming the reason.

Kernels written or changed since their last GPU run are *unverified*: the model does not call
them unless the caller opts in with ``DSV4_UNVERIFIED_KERNELS=1`` or
:func:`allow_unverified_kernels` (the GPU test harness ``scripts/gpu_check.sh`` and the
``cuda``-marked tests do, since they are what verifies them). Calling ``torch.ops.dsv4.<name>``
directly always runs the compiled kernel.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from .._kernel_digest import kernel_source_digest

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "HARDWARE_VERIFIED", "set_backend", "get_backend",
           "use_kernels", "check_backend", "allow_unverified_kernels", "unverified_allowed",
           "may_call", "kernel_source_digest", "built_source_mismatch",
           "VERIFIED_SOURCE_DIGEST"]

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

# Ops whose CUDA kernel passed the CUDA test suite (pytest -m cuda and the C++ checks) on a
# Hopper GPU at its current source, with where that was recorded. A change under csrc/ makes
# tests/ops/test_backend_verification.py fail until the suite has passed again on a GPU and
# VERIFIED_SOURCE_DIGEST is updated (an op whose kernel changed leaves this table meanwhile);
# an extension built from other sources has no verified kernel (built_source_mismatch).
# bench/README.md and the issue notes keep the history.
_RUN_20261205E = (
    "2026-12-05 (evening), on an H100 80GB, csrc a06f12f9 (the pipelined one-pass mHC prefill "
    "as the default, the FP8 x FP8 expert GEMM opt-in, the warp-specialised FP8-cache decode "
    "opt-in, the histogram top-k select of indexer_topk for batch-1 decode, the fixed "
    "warp-specialised sparse_attn prefill kernel): the whole CUDA suite in two calls (712 tests, "
    "then the remaining files: 299 more), every failure a test defect fixed and re-run on the "
    "same build (9 HCA FP8 tests) except tests/runtime/test_engine_cuda.py::"
    "test_fp8_kv_cache_on_cuda, which failed with the warp-specialised prefill kernel as the "
    "sparse_attn default and passed with the previous kernel (DSV4_SPARSE_PREFILL=old); so the "
    "default went back to the previous kernel: this csrc is a06f12f9 with that default (the "
    "environment switch's parse, two comments and an error message in sparse_attn_prefill.h, "
    "sparse_attn_prefill_sm90.cu and torch/sparse_attn.cpp). C++ checks grouped_gemm, hca_fp8, "
    "indexer_topk, mhc passed at a06f12f9 (sparse_attn_prefill at its earlier source, "
    "960e02e9; the other C++ checks last ran at a88eeb31); compute-sanitizer "
    "memcheck clean on the hca_fp8, mhc, grouped_gemm (FP8 x FP8 cases) and sparse_attn_prefill "
    "checks")
HARDWARE_VERIFIED: dict[str, str] = {op: _RUN_20261205E for op in (
    "rms_norm", "q_norm_rope", "kv_norm_rope", "compress_kv", "sparse_attn",
    "hca_attn", "grouped_oproj", "fp8_linear", "moe_gate", "moe_dispatch", "moe_combine",
    "moe_up", "moe_down", "mhc_pre", "mhc_post", "mhc_head")}
# sha256 over csrc/{include,kernels,torch} (dsv4._kernel_digest) of that run's csrc with the
# sparse_attn prefill default restored (see the record above)
VERIFIED_SOURCE_DIGEST = "00abaea6fce7b2924ecb6fefaa2853a85cc0fe3f0b71e6e0181664f7ac6efaa0"

_UNVERIFIED_ENV = "DSV4_UNVERIFIED_KERNELS"
_allow_unverified = os.environ.get(_UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes",
                                                                           "on")


def allow_unverified_kernels(flag: bool = True) -> None:
    """Let (``True``) or stop (``False``) the model calling CUDA kernels that have not passed
    the GPU test suite at their current code (see :data:`HARDWARE_VERIFIED`). The initial value
    comes from the environment variable ``DSV4_UNVERIFIED_KERNELS`` (``1`` = allow).

    Raises:
        TypeError: ``flag`` is not a bool.
    """
    global _allow_unverified
    if not isinstance(flag, bool):
        raise TypeError(f"allow_unverified_kernels takes a bool, got {flag!r}")
    _allow_unverified = flag


def unverified_allowed() -> bool:
    """Whether the model may call CUDA kernels not (yet) verified on a GPU."""
    return _allow_unverified


def may_call(ops: tuple[str, ...]) -> bool:
    """Whether the model may call the CUDA kernels of ``ops``: each is in
    :data:`HARDWARE_VERIFIED` and the extension was built from the verified source (see
    :func:`built_source_mismatch`), or unverified kernels are allowed (compilation is not
    checked here; :func:`use_kernels` checks everything and says why not)."""
    return _allow_unverified or (built_source_mismatch() is None
                                 and all(op in HARDWARE_VERIFIED for op in ops))


def built_source_mismatch() -> str | None:
    """None when the compiled extension was built from the kernel sources of
    :data:`VERIFIED_SOURCE_DIGEST` (or its build record predates the digest), else a sentence
    saying it was not: then no kernel counts as verified (a csrc/ change since the last GPU
    run reaches the model only by opting in)."""
    from . import _ext
    built = getattr(_ext._build_config(), "KERNEL_SOURCE_DIGEST", None)
    if built is None or built == VERIFIED_SOURCE_DIGEST:
        return None
    return (f"the extension was built from kernel sources (digest {built[:12]}) other than the "
            f"GPU-verified ones ({VERIFIED_SOURCE_DIGEST[:12]})")


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
    from . import _ext
    return _ext.has_compiled_kernel(op)


def _kernels_run_on(device: torch.device) -> bool:
    from . import _ext
    return _ext.kernels_run_on(device)


def use_kernels(x: torch.Tensor, ops: tuple[str, ...], unsupported: str | None = None) -> bool:
    """Whether a layer whose activations are ``x`` runs its kernel path through ``ops``.

    True iff the backend is ``"cuda"``, ``x`` is a CUDA bfloat16 tensor, every op in ``ops``
    has a compiled CUDA kernel that is hardware-verified (or unverified kernels are allowed, see
    :func:`allow_unverified_kernels`) and the layer passes no ``unsupported`` reason (a shape
    outside the kernels' range, e.g. ``index_topk > 2048``). When the backend is ``"cuda"`` and
    ``x`` is on CUDA but a condition fails, a warning names the reason (once per reason).
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
        if missing:
            reason = (f"dsv4: no compiled CUDA kernel for {', '.join(missing)} (see `dsv4 info`); "
                      "those layers run the pure-PyTorch reference")
        elif not _kernels_run_on(x.device):
            from . import _ext
            arch = getattr(_ext._build_config(), "TORCH_CUDA_ARCH_LIST", None)
            cc = ".".join(str(v) for v in torch.cuda.get_device_capability(x.device))
            reason = (f"dsv4: the extension was built for TORCH_CUDA_ARCH_LIST={arch!r}, which "
                      f"has no code for this GPU (compute capability {cc}); those layers run the "
                      "pure-PyTorch reference (rebuild with this GPU's arch to use the kernels)")
        elif not may_call(ops):
            mismatch = built_source_mismatch()
            unverified = ops if mismatch else [op for op in ops if op not in HARDWARE_VERIFIED]
            reason = (f"dsv4: the CUDA kernels of {', '.join(unverified)} have not yet passed the "
                      "GPU test suite at this version"
                      + (f" ({mismatch})" if mismatch else "") + "; those layers run the "
                      f"pure-PyTorch reference (set {_UNVERIFIED_ENV}=1 or call "
                      "dsv4.allow_unverified_kernels() to use them)")
        else:
            return True
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return False
