"""Build of the dsv4._C extension (torch ops backed by the CUDA kernels in csrc/).

Metadata lives in pyproject.toml; this file only describes the extension.

    pip install --no-build-isolation -e .         # build against the installed torch
    DSV4_SKIP_CUDA_BUILD=1 pip install ...         # pure-Python install (reference ops only)

Environment:
    TORCH_CUDA_ARCH_LIST  ';'/' '/','-separated, e.g. "9.0a" (default: Hopper with wgmma),
                          "9.0a;10.0a", "9.0+PTX"
    MAX_JOBS              parallel compile jobs (read by torch's ninja build)
    NVCC_THREADS          passed to nvcc as --threads N (parallel per-arch compilation)
    CUDA_HOME             toolkit root; if unset it is discovered (see find_cuda_home)
    DSV4_SKIP_CUDA_BUILD  1: no extension at all

The .cu files in csrc/kernels include no torch header (nvcc takes ~2 s per file instead of
~100 s); the torch glue in csrc/torch/*.cpp is compiled by the host compiler.

Object files live in build/temp-dsv4-<python>/ (not in the throw-away directory pip gives an
editable build), so ninja recompiles only the sources that changed since the last build.

python/dsv4/_build_config.py records what was built (read by ``dsv4.info()``). An editable
install or ``build_ext --inplace`` writes it in the source tree; a wheel build writes it into
the wheel only, and never touches the source tree: building a pure-Python wheel
(``DSV4_SKIP_CUDA_BUILD=1 pip wheel .``) leaves an editable CUDA install of the same checkout
(its ``_C*.so`` and its build record) as it was. An editable pure-Python install of a tree that
still holds a ``_C*.so`` from an earlier build does not delete it either: its build record says
CUDA_BUILD = False, and ``dsv4`` then does not load the stale extension (``dsv4 info`` says so).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

ROOT = Path(__file__).resolve().parent
BUILD_CONFIG = ROOT / "python" / "dsv4" / "_build_config.py"
DEFAULT_ARCH_LIST = "9.0a"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_script(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _wrapper_target(path: Path) -> Path | None:
    """The nvcc a shell-script wrapper execs (`exec /opt/cuda/bin/nvcc "$@"`), if easy to see."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"""^\s*exec\s+["']?([^\s"']*/nvcc)\b""", text, re.MULTILINE)
    return Path(m.group(1)) if m else None


def _toolkit_root(nvcc: Path) -> Path | None:
    """The toolkit root of a real (non-wrapper) nvcc binary, or None."""
    nvcc = Path(os.path.realpath(nvcc))
    if not nvcc.is_file() or not os.access(nvcc, os.X_OK) or _is_script(nvcc):
        return None
    root = nvcc.parent.parent
    return root if (root / "lib64").is_dir() else None


def _version_key(path: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))


def find_cuda_home() -> str | None:
    """A CUDA toolkit root: a directory with a real bin/nvcc (not a shell wrapper) and lib64.

    Tried in order: the nvcc on PATH (symlinks resolved; a wrapper script's exec target),
    /usr/local/cuda, /usr/local/cuda-* (newest first), /opt/cuda.
    """
    candidates: list[Path] = []
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
        target = _wrapper_target(Path(os.path.realpath(on_path)))
        if target is not None:
            candidates.append(target)
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for d in sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True):
        candidates.append(Path(d) / "bin" / "nvcc")
    candidates.append(Path("/opt/cuda/bin/nvcc"))
    for nvcc in candidates:
        root = _toolkit_root(nvcc)
        if root is not None:
            return str(root)
    return None


def nvidia_include_dirs() -> list[str]:
    """site-packages/nvidia/cu*/include of the torch wheel's CUDA packages (cublas_v2.h,
    cusparse.h, ... that torch's CUDA headers include but a bare toolkit may lack)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs: list[str] = []
    for base in spec.submodule_search_locations:
        for inc in sorted(glob.glob(os.path.join(base, "cu[0-9]*", "include")), reverse=True):
            if re.fullmatch(r"cu\d+", Path(inc).parent.name) and inc not in dirs:
                dirs.append(inc)
    return dirs


def shared_libstdcxx_link_args() -> list[str]:
    """Link flags that force the shared libstdc++ when the C++ compiler would link it statically.

    A relocated GCC (e.g. CXX=/opt/gcc/bin/g++ whose -B dir holds libstdc++.a but no
    libstdc++.so) silently links a private copy of libstdc++ into _C.so; streams then crash
    (a TORCH_CHECK message with a number segfaults in std::ostream::_M_insert<long>). In that
    case link the libstdc++.so.6 that torch already loaded into this process. Call after
    importing torch.
    """
    if not sys.platform.startswith("linux"):
        return []
    cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    try:
        found = subprocess.run(
            [*cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []  # the compiler finds a shared libstdc++ itself
    try:
        with open("/proc/self/maps") as f:
            loaded = [ln.split()[-1] for ln in f if ln.rstrip().endswith("/libstdc++.so.6")
                      or "/libstdc++.so.6." in ln]
    except OSError:
        loaded = []
    if not loaded:
        return []
    libdir = os.path.dirname(loaded[0])
    print(f"dsv4 setup: {cxx[0]} has no shared libstdc++; linking {libdir}/libstdc++.so.6",
          file=sys.stderr)
    return [f"-L{libdir}", "-l:libstdc++.so.6"]


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST string ("9.0a" -> compute_90a/sm_90a)."""
    flags: list[str] = []
    for arch in filter(None, re.split(r"[;\s,]+", arch_list.strip())):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if m is None:
            raise SystemExit(
                f"dsv4 setup: cannot parse TORCH_CUDA_ARCH_LIST entry {arch!r} "
                f"(from {arch_list!r}); expected entries like 9.0a, 10.0a, 9.0+PTX"
            )
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise SystemExit(f"dsv4 setup: TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags


#: What this build produces, written to _build_config.py by the build commands below.
BUILD_VALUES: dict = {"CUDA_BUILD": False}


def write_build_config(values: dict, path: Path = BUILD_CONFIG) -> None:
    """Write ``_build_config.py`` (read by dsv4.ops._ext.info()) at ``path``: the source tree's
    python/dsv4/ for in-place builds, build_lib/dsv4/ for a wheel."""
    lines = ['"""Written by setup.py at build time; do not edit (gitignored)."""', ""]
    lines += [f"{k} = {v!r}" for k, v in values.items()]
    text = "\n".join(lines) + "\n"
    path = Path(path)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


class BuildPy(_build_py):
    """build_py that records the build: in the source tree for an editable install, in the
    wheel's build directory otherwise (the source tree is left alone)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            write_build_config(BUILD_VALUES)
        else:
            write_build_config(BUILD_VALUES, Path(self.build_lib) / "dsv4" / "_build_config.py")


def _kernel_digest_module():
    """dsv4/_kernel_digest.py, loaded by path (dsv4 is not importable while it is being
    built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_dsv4_kernel_digest", ROOT / "python" / "dsv4" / "_kernel_digest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kernel_source_digest() -> str | None:
    """dsv4._kernel_digest.kernel_source_digest of this tree."""
    return _kernel_digest_module().kernel_source_digest(ROOT)


def _kernel_op_digests() -> dict[str, str] | None:
    """dsv4._kernel_digest.op_source_digests of this tree (op -> digest of its sources)."""
    return _kernel_digest_module().op_source_digests(ROOT)


def source_digest() -> str:
    """SHA-256 of what the compiled extension depends on: every file under csrc/, setup.py,
    pyproject.toml, and the build environment (python, torch, CUDA_HOME, TORCH_CUDA_ARCH_LIST,
    DSV4_SKIP_CUDA_BUILD). scripts/test.sh rebuilds only when it changes."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file())
    for p in files + [ROOT / "setup.py", ROOT / "pyproject.toml"]:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    try:
        from importlib.metadata import version
        torch_version = version("torch")
    except Exception:
        torch_version = "none"
    env = [sys.executable, torch_version, os.environ.get("CUDA_HOME", ""),
           os.environ.get("TORCH_CUDA_ARCH_LIST", ""), os.environ.get("DSV4_SKIP_CUDA_BUILD", "")]
    h.update("\0".join(env).encode())
    return h.hexdigest()


def cuda_extensions() -> tuple[list, dict]:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first. The nvcc on PATH
    # may be a wrapper script (torch would then guess its parent's parent, e.g. /usr/local).
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise SystemExit(
                "dsv4 setup: no CUDA toolkit found (no real nvcc with a lib64 next to it via "
                "PATH, /usr/local/cuda or /usr/local/cuda-*). Install the CUDA toolkit and/or "
                "set CUDA_HOME=/path/to/cuda, or set DSV4_SKIP_CUDA_BUILD=1 for a pure-Python "
                "install (reference ops only)."
            )
        os.environ["CUDA_HOME"] = cuda_home
    cuda_home = os.environ.get("CUDA_HOME") or os.environ["CUDA_PATH"]
    if not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        raise SystemExit(
            f"dsv4 setup: CUDA_HOME={cuda_home!r} has no bin/nvcc. Point CUDA_HOME at a CUDA "
            "toolkit root or set DSV4_SKIP_CUDA_BUILD=1 for a pure-Python install."
        )

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class BuildExt(BuildExtension):
        """torch's BuildExtension with a persistent object directory (ninja then recompiles
        only what changed; pip's editable builds otherwise use a fresh temporary directory)
        that records the build in the source tree when it builds in place."""

        def finalize_options(self) -> None:
            super().finalize_options()
            tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
            self.build_temp = str(ROOT / "build" / f"temp-dsv4-{tag}")

        def run(self) -> None:
            super().run()
            if self.inplace or getattr(self, "editable_mode", False):
                write_build_config(BUILD_VALUES)

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    # Our own -gencode flags (torch then adds none): independent of torch's arch table.
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *gencode_flags(arch_list)]
    nvcc_threads = os.environ.get("NVCC_THREADS", "").strip()
    if nvcc_threads:
        nvcc_flags += ["--threads", nvcc_threads]
    # The host compiler's C++ standard is left to torch (its headers need C++17 up to torch
    # 2.9 and C++20 since; torch appends the right -std). The library headers are searched
    # after the toolkit's own (-idirafter), so the toolkit's cuda_runtime.h etc. win.
    cxx_flags = ["-O3"]
    extra_dirs = []
    cccl = os.path.join(cuda_home, "include", "cccl")  # CUDA 13 moved CCCL (cuda/std, cub) here
    if os.path.isdir(cccl):
        extra_dirs.append(cccl)
    extra_dirs += nvidia_include_dirs()
    for d in extra_dirs:
        cxx_flags += ["-idirafter", d]

    sources = sorted(glob.glob("csrc/torch/*.cpp")) + sorted(glob.glob("csrc/kernels/*.cu"))
    ext = CUDAExtension(
        name="dsv4._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "include")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=shared_libstdcxx_link_args(),
        depends=sorted(glob.glob("csrc/include/**/*.h", recursive=True))
        + sorted(glob.glob("csrc/kernels/*.cuh")),
    )
    BUILD_VALUES.clear()
    BUILD_VALUES.update(
        {
            "CUDA_BUILD": True,
            "TORCH_CUDA_ARCH_LIST": arch_list,
            "NVCC_GENCODE": [f for f in nvcc_flags if f.startswith("-gencode")],
            "CUDA_HOME": cuda_home,
            "TORCH_VERSION": torch.__version__,
            "TORCH_CUDA_VERSION": torch.version.cuda,
            # the kernels' source hash (dsv4.ops.backend compares it with the GPU-verified one)
            "KERNEL_SOURCE_DIGEST": _kernel_source_digest(),
            # per op (dsv4.ops.backend compares each with the op's GPU-verified digest)
            "KERNEL_OP_DIGESTS": _kernel_op_digests(),
        }
    )
    print(
        f"dsv4 setup: CUDA_HOME={cuda_home} TORCH_CUDA_ARCH_LIST={arch_list} "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')} "
        f"NVCC_THREADS={nvcc_threads or '(unset)'}",
        file=sys.stderr,
    )
    return [ext], {"build_ext": BuildExt}


def main() -> None:
    os.chdir(ROOT)  # source paths must be relative to setup.py
    if _env_flag("DSV4_SKIP_CUDA_BUILD"):
        BUILD_VALUES.clear()
        BUILD_VALUES["CUDA_BUILD"] = False
        ext_modules, cmdclass = [], {}
    else:
        ext_modules, cmdclass = cuda_extensions()
    cmdclass["build_py"] = BuildPy
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


# Guarded so that scripts can reuse the discovery without building:
#   python -c "import setup; print(setup.find_cuda_home())"
if __name__ == "__main__":
    main()
