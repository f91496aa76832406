"""setup.py and scripts/test.sh on first use: a pure-Python build leaves another install's
extension alone, the extension is rebuilt only when its inputs change (issue 13 item 6)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_copy(dst) -> str:
    """The git-tracked files of this checkout copied to ``dst`` (a fresh-clone stand-in)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))
    return str(dst)


def _load_setup(root):
    spec = importlib.util.spec_from_file_location(f"setup_{abs(hash(str(root)))}",
                                                  os.path.join(root, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".git")), reason="needs a git checkout")
def test_source_digest_follows_the_extension_inputs_only(tmp_path, monkeypatch):
    root = _tracked_copy(tmp_path / "src")
    setup = _load_setup(root)
    base = setup.source_digest()
    assert base == setup.source_digest()
    with open(os.path.join(root, "python", "dsv4", "chat.py"), "a") as f:
        f.write("\n# a Python change needs no rebuild\n")
    assert setup.source_digest() == base
    kernel = os.path.join(root, "csrc", "kernels", "rms_norm.cu")
    with open(kernel, "a") as f:
        f.write("\n// a kernel change does\n")
    changed = setup.source_digest()
    assert changed != base
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "10.0a")
    assert setup.source_digest() != changed


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".git")), reason="needs a git checkout")
def test_pure_python_wheel_leaves_an_editable_cuda_install_alone(tmp_path):
    root = _tracked_copy(tmp_path / "src")
    pkg = os.path.join(root, "python", "dsv4")
    so = os.path.join(pkg, "_C.cpython-311-x86_64-linux-gnu.so")
    record = os.path.join(pkg, "_build_config.py")
    with open(so, "wb") as f:
        f.write(b"\x7fELF stand-in for an editable install's extension")
    with open(record, "w") as f:
        f.write("CUDA_BUILD = True\nTORCH_CUDA_ARCH_LIST = '9.0a'\n")
    before = {p: open(p, "rb").read() for p in (so, record)}
    env = dict(os.environ, DSV4_SKIP_CUDA_BUILD="1")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {q: open(q, "rb").read() for q in (so, record)} == before   # untouched
    (wheel,) = os.listdir(tmp_path / "dist")
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as z:
        names = z.namelist()
        assert "dsv4/_build_config.py" in names
        assert "CUDA_BUILD = False" in z.read("dsv4/_build_config.py").decode()
        assert not [n for n in names if "/_C." in n]


def test_a_skipped_build_does_not_load_a_stale_extension(monkeypatch):
    from dsv4.ops import _ext

    record = types.ModuleType("dsv4._build_config")
    record.CUDA_BUILD = False
    monkeypatch.setitem(sys.modules, "dsv4._build_config", record)
    reason = _ext._skipped_build()
    assert reason and "DSV4_SKIP_CUDA_BUILD=1" in reason and "not loaded" in reason
    # The stale-file remark only when such a file is there (a fresh pure-Python install has none).
    monkeypatch.setattr(_ext.glob, "glob", lambda pattern: [])
    assert "left from an earlier build" not in _ext._skipped_build()
    monkeypatch.setattr(_ext.glob, "glob",
                        lambda pattern: [pattern.replace("*", ".cpython-311")])
    assert "a dsv4._C beside it is left from an earlier build" in _ext._skipped_build()
    record.CUDA_BUILD = True
    assert _ext._skipped_build() is None


def test_the_build_record_holds_the_per_op_kernel_digests(tmp_path):
    """setup.py records KERNEL_OP_DIGESTS (dsv4._kernel_digest.op_source_digests of the tree it
    builds) beside KERNEL_SOURCE_DIGEST, and the record reads back as the same dict."""
    from dsv4 import _kernel_digest
    setup = _load_setup(ROOT)
    digests = setup._kernel_op_digests()
    if digests is None:
        pytest.skip("no csrc/ beside setup.py")
    assert digests == _kernel_digest.op_source_digests(ROOT)
    assert set(digests) == set(_kernel_digest.OP_SOURCES)
    path = tmp_path / "_build_config.py"
    setup.write_build_config({"KERNEL_SOURCE_DIGEST": setup._kernel_source_digest(),
                              "KERNEL_OP_DIGESTS": digests}, path)
    spec = importlib.util.spec_from_file_location("_bc_roundtrip", path)
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    assert record.KERNEL_OP_DIGESTS == digests
    assert record.KERNEL_SOURCE_DIGEST == _kernel_digest.kernel_source_digest(ROOT)
