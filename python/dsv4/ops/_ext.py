"""The compiled extension ``dsv4._C`` and the registration of every ``torch.ops.dsv4`` op.

Each op has one name, ``torch.ops.dsv4.<name>``, and two implementations:

* CUDA: the kernel compiled into ``dsv4._C`` (schema from ``TORCH_LIBRARY_FRAGMENT(dsv4, m)``
  and kernel from ``TORCH_LIBRARY_IMPL(dsv4, CUDA, m)``, both in the family's
  csrc/torch/<family>.cpp);
* CPU: the pure-PyTorch reference, plus a fake (shape-only) implementation for torch.compile /
  FakeTensor, registered by the family's Python module (python/dsv4/ops/<family>.py) through
  :func:`register_op` with the same schema string.

Without the extension (``DSV4_SKIP_CUDA_BUILD=1`` install, or a failed import) the op is
defined from Python with the same schema and the reference serves CPU and CUDA, so
``torch.ops.dsv4.<name>`` always exists. ``info()`` / ``format_info()`` say which kernels are
compiled and usable here (``dsv4 info``).

Importing this module loads only torch (no model code); ``dsv4.ops`` imports every family.
"""

from __future__ import annotations

import glob
import importlib
import math
import os
from typing import Any, Callable

import torch

__all__ = ["HAS_C", "info", "format_info", "OP_SCHEMAS", "register_op"]

_NAMESPACE = "dsv4"

# ---------------------------------------------------------------------------------------------
# Load the extension (its static initialisers register the schemas and CUDA kernels).
# ---------------------------------------------------------------------------------------------
_IMPORT_ERROR: str | None = None


def _build_config() -> Any:
    try:
        return importlib.import_module("dsv4._build_config")
    except ImportError:
        return None


def _skipped_build() -> str | None:
    """Why ``dsv4._C`` must not be loaded, or None: the build record says this install was
    built without CUDA (``DSV4_SKIP_CUDA_BUILD=1``), so a ``_C`` beside it, if any, is left from
    an earlier build of the same source tree (setup.py never deletes it); the reason mentions
    such a file only when there is one (a fresh pure-Python install has none)."""
    build = _build_config()
    if build is None or getattr(build, "CUDA_BUILD", True):
        return None
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stale = glob.glob(os.path.join(pkg, "_C*.so")) + glob.glob(os.path.join(pkg, "_C*.pyd"))
    left = ("; a dsv4._C beside it is left from an earlier build" if stale else "")
    return ("not loaded: this install was built with DSV4_SKIP_CUDA_BUILD=1 (dsv4/_build_config.py "
            f"says CUDA_BUILD = False){left}. "
            "Reinstall without DSV4_SKIP_CUDA_BUILD to use the kernels")


_IMPORT_ERROR = _skipped_build()
if _IMPORT_ERROR is None:
    try:
        importlib.import_module("dsv4._C")
        HAS_C: bool = True
    except (ImportError, OSError) as e:  # not built, or built against another torch/CUDA
        HAS_C = False
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    HAS_C = False


def _cuda_kernels_now() -> list[str]:
    """Names of dsv4 ops that currently have a CUDA kernel in the dispatcher."""
    try:
        names = torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
    except Exception:  # private API; fall back to probing the known ops
        return sorted(n for n in OP_SCHEMAS if _has_kernel(n, "CUDA"))
    prefix = _NAMESPACE + "::"
    return sorted(n[len(prefix):] for n in names if n.startswith(prefix))


def _has_kernel(name: str, dispatch_key: str) -> bool:
    try:
        return bool(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{name}", dispatch_key)
        )
    except Exception:
        return False


def has_compiled_kernel(name: str) -> bool:
    """Whether op ``name`` has a CUDA kernel compiled into dsv4._C. Ask this, not the
    dispatcher: without the extension :func:`register_op` registers the references for CUDA
    tensors too, so the dispatcher then has a "CUDA kernel" for every op."""
    return name in _COMPILED_CUDA_OPS


def _op_exists(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, _NAMESPACE), name)
        return True
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------------------------------------
# Op table: filled by register_op (schema identical to the C++ m.def of the family's .cpp).
# ---------------------------------------------------------------------------------------------
OP_SCHEMAS: dict[str, str] = {}

# The C++ kernels compiled into dsv4._C (snapshot before any Python kernel is registered).
_COMPILED_CUDA_OPS: list[str] = _cuda_kernels_now() if HAS_C else []
_PY_LIBS: list[Any] = []  # keep Library fragments alive
_PY_CUDA_OPS: set[str] = set()  # ops whose CUDA tensors this module gave the reference


def register_op(name: str, schema: str, reference: Callable, fake: Callable) -> None:
    """Give ``torch.ops.dsv4.<name>`` its reference (CPU) and fake implementations.

    ``schema`` is the part after the name, e.g. ``"(Tensor x, float eps) -> Tensor"``, and must
    equal the C++ ``m.def`` (tests/test_build.py checks this). Without a compiled kernel for the
    op, the op is defined here and the reference also serves CUDA tensors.
    """
    qualname = f"{_NAMESPACE}::{name}"
    OP_SCHEMAS[name] = schema
    if not _op_exists(name):  # no extension (or an old one without this op)
        lib = torch.library.Library(_NAMESPACE, "FRAGMENT")
        _PY_LIBS.append(lib)
        lib.define(name + schema)
    has_cuda = _has_kernel(name, "CUDA")
    if has_cuda and HAS_C and name not in _PY_CUDA_OPS and name not in _COMPILED_CUDA_OPS:
        _COMPILED_CUDA_OPS.append(name)  # compiled, and missed by the snapshot (private API)
    if not has_cuda:
        _PY_CUDA_OPS.add(name)
    device_types = ["cpu"] if has_cuda else ["cpu", "cuda"]
    torch.library.register_kernel(qualname, device_types, reference)
    torch.library.register_fake(qualname)(fake)


def raise_value_error(cond, msg_fn: Callable[[], str]) -> None:
    """``check`` of the ops' shared argument checks on the reference path: ValueError with
    ``msg_fn()`` unless ``cond`` (the fakes pass ``torch._check`` instead)."""
    if not cond:
        raise ValueError(msg_fn())


# The largest finite float32, the smallest positive one (subnormal: the kernels are built
# without fast-math) and the smallest normal one (the lowest nonzero clamp limit the ops take),
# as Python floats; csrc/torch/scalar_checks.h and the SwiGLU glue hold the same values.
FLOAT32_MAX = 3.4028234663852886e+38
FLOAT32_TRUE_MIN = 1.4012984643248171e-45
FLOAT32_NORMAL_MIN = 1.1754943508222875e-38


def check_finite_f32(op: str, name: str, value, check=raise_value_error) -> None:
    """``check`` that the float scalar ``name`` is a finite float32 (the CUDA kernels take it as
    one): NaN, +-inf and values beyond the float32 range are refused; 0 and negative values are
    accepted. The words of the CUDA glue's ``check_finite_f32`` (csrc/torch/scalar_checks.h)."""
    v = float(value)
    check(math.isfinite(v) and abs(v) <= FLOAT32_MAX,
          lambda: f"{op}: {name} must be a finite float32 (|{name}| <= 3.40282347e+38), got {v}")


def check_clamp_limit_f32(op: str, name: str, value, check=raise_value_error) -> None:
    """``check`` that the SwiGLU clamp limit ``name`` is 0 (no clamp) or a finite float32 >= the
    smallest normal one (a positive double that rounds to float32 0 would clamp to 0 in the
    reference and not at all in the kernels; NaN clamps nothing there). The rule of
    moe_swiglu's ``limit`` and moe_up's ``swiglu_limit``, the words of their CUDA glue
    (csrc/torch/scalar_checks.h check_clamp_limit_f32)."""
    check(math.isfinite(value) and (value == 0 or value >= FLOAT32_NORMAL_MIN),
          lambda: f"{op}: {name} must be 0 (no clamp) or a finite float32 >= 1.17549435e-38, "
                  f"got {value}")


def check_positive_f32(op: str, name: str, value, check=raise_value_error) -> None:
    """``check`` that the float scalar ``name`` (an epsilon added before a square root or a
    division) is a positive finite float32: 0, negative values, NaN, inf and positive values
    that round to 0 or inf in float32 are refused. The words of the CUDA glue's
    ``check_positive_f32`` (csrc/torch/scalar_checks.h)."""
    v = float(value)
    check(FLOAT32_TRUE_MIN <= v <= FLOAT32_MAX,
          lambda: f"{op}: {name} must be a finite float32 > 0 (1.40129846e-45 <= {name} <= "
                  f"3.40282347e+38), got {v}")


def check_writable(op: str, **buffers) -> None:
    """ValueError unless every named buffer (None: skipped) the op writes in place has its own
    memory for each element: no dimension of size > 1 with stride 0 (a broadcast / ``expand``
    view; an empty tensor has no element to share, as ``at::has_internal_overlap`` says in the
    CUDA glue). Ops that write several buffers, or write by index (a broadcast buffer takes such
    writes without an error, every row landing on the same memory), call it before writing
    anything, so a refused call leaves every buffer as it was."""
    for name, t in buffers.items():
        if t is not None and t.numel() > 0 and any(n > 1 and st == 0
                                                    for n, st in zip(t.shape, t.stride())):
            raise ValueError(f"{op}: {name} must not be broadcast (an expanded view whose elements "
                             f"share memory): it is written in place, and shape {list(t.shape)} "
                             f"with strides {list(t.stride())} maps several elements to one "
                             "memory location (pass a tensor with its own storage per element, "
                             "e.g. .contiguous() or .clone())")


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dsv4")
    except Exception:
        return "unknown"


def _arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for TORCH_CUDA_ARCH_LIST entry ``arch`` (e.g. "9.0a") runs on a
    device of compute capability ``capability``."""
    base, ptx = arch.split("+")[0], arch.endswith("+PTX")
    suffix = base[-1] if base[-1] in "af" else ""
    major, minor = (int(v) for v in base.rstrip("af").split("."))
    if ptx and not suffix:
        return capability >= (major, minor)
    if suffix == "a":
        return capability == (major, minor)
    if suffix == "f":  # family-specific: same major, minor >= built minor
        return capability[0] == major and capability[1] >= minor
    return capability[0] == major and capability[1] >= minor


def _built_for(capability: tuple[int, int]) -> bool:
    """Whether the extension's recorded TORCH_CUDA_ARCH_LIST has code for ``capability``
    (True when the record is missing or unparsable: the kernel launch then reports it)."""
    arch_list = getattr(_build_config(), "TORCH_CUDA_ARCH_LIST", None) or ""
    archs = [a for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a]
    try:
        return not archs or any(_arch_runs_on(a, capability) for a in archs)
    except ValueError:
        return True


_RUNS_ON: dict[int, bool] = {}


def kernels_run_on(device: torch.device) -> bool:
    """Whether the compiled kernels have code for CUDA ``device`` (cached per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _RUNS_ON:
        _RUNS_ON[idx] = _built_for(tuple(torch.cuda.get_device_capability(idx)))
    return _RUNS_ON[idx]


def info() -> dict[str, Any]:
    """What this dsv4 install can run.

    Returns a dict with keys:
        version, torch_version, torch_cuda_version: package / torch / torch's CUDA versions.
        compiled: whether ``dsv4._C`` imported.
        import_error: why it did not (``"ExcType: message"``), else None.
        cuda_compiled_ops: ops with a compiled CUDA kernel (names in ``torch.ops.dsv4``).
        cuda_available: ``torch.cuda.is_available()``.
        device_name, device_capability: of CUDA device 0, or None.
        build_arch_list: TORCH_CUDA_ARCH_LIST the extension was built for (None if unknown).
        build_torch_version: torch version the extension was built against (None if unknown).
        cuda_usable_ops: compiled ops whose kernels can run on device 0 (else []).
    """
    build = _build_config()
    cuda_available = torch.cuda.is_available()
    device_name = capability = None
    if cuda_available:
        device_name = torch.cuda.get_device_name(0)
        capability = tuple(torch.cuda.get_device_capability(0))
    arch_list = getattr(build, "TORCH_CUDA_ARCH_LIST", None) if HAS_C else None
    usable: list[str] = []
    if HAS_C and capability is not None:
        usable = list(_COMPILED_CUDA_OPS) if _built_for(capability) else []
    return {
        "version": _version(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "compiled": HAS_C,
        "import_error": _IMPORT_ERROR,
        "cuda_compiled_ops": list(_COMPILED_CUDA_OPS),
        "cuda_available": cuda_available,
        "device_name": device_name,
        "device_capability": capability,
        "build_arch_list": arch_list,
        "build_torch_version": getattr(build, "TORCH_VERSION", None) if HAS_C else None,
        "cuda_usable_ops": usable,
    }


def format_info() -> str:
    """``info()`` as a human-readable multi-line report."""
    d = info()
    lines = [
        f"dsv4 {d['version']}  (torch {d['torch_version']}, torch CUDA {d['torch_cuda_version']})"
    ]
    if d["compiled"]:
        built = f"built for {d['build_arch_list'] or 'unknown arch'}"
        if d["build_torch_version"]:
            built += f" against torch {d['build_torch_version']}"
        lines.append(f"compiled extension: yes (dsv4._C, {built})")
        ops = ", ".join(d["cuda_compiled_ops"]) or "(none)"
        lines.append(f"CUDA kernels compiled: {ops}")
    else:
        lines.append(f"compiled extension: no ({d['import_error']})")
        lines.append("CUDA kernels compiled: none (every op runs its PyTorch reference)")
    if d["cuda_available"]:
        cc = ".".join(str(v) for v in d["device_capability"])
        lines.append(f"CUDA device: {d['device_name']} (compute capability {cc})")
        usable = ", ".join(d["cuda_usable_ops"]) or "none (reference ops only on this device)"
        lines.append(f"CUDA kernels usable here: {usable}")
    else:
        lines.append("CUDA device: none (torch.cuda.is_available() is False); ops run on CPU")
    from .backend import HARDWARE_VERIFIED, unverified_allowed
    verified = ", ".join(sorted(HARDWARE_VERIFIED)) or "none at this version"
    lines.append(f"CUDA kernels verified on a GPU (the model calls only these): {verified}"
                 + ("; unverified kernels allowed (DSV4_UNVERIFIED_KERNELS)"
                    if unverified_allowed() else ""))
    lines.append(f"ops: {', '.join('torch.ops.dsv4.' + n for n in OP_SCHEMAS)}")
    return "\n".join(lines)
