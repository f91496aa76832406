"""The model calls only CUDA kernels verified on a GPU unless the caller opts in
(dsv4.ops.backend.HARDWARE_VERIFIED, DSV4_UNVERIFIED_KERNELS, allow_unverified_kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import dsv4
from dsv4.ops import backend


@pytest.fixture
def cuda_like(monkeypatch):
    """A stand-in for CUDA bf16 activations with every kernel compiled (no GPU needed), from a
    build whose record has no source digest (not whatever dsv4/_build_config.py this checkout
    holds)."""
    import dsv4.ops._ext as ext
    monkeypatch.setattr(ext, "_build_config", lambda: types.SimpleNamespace())
    monkeypatch.setattr(backend, "_kernel_available", lambda op: True)
    monkeypatch.setattr(backend, "_kernels_run_on", lambda device: True)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_backend", "cuda")
    return types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda"))


def test_unverified_kernels_are_not_called_by_default(cuda_like, monkeypatch):
    monkeypatch.setattr(backend, "_allow_unverified", False)
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {})
    with pytest.warns(RuntimeWarning, match="moe_gate have not yet passed the GPU test suite"):
        assert backend.use_kernels(cuda_like, ("moe_gate",)) is False


def test_verified_kernels_are_called(cuda_like, monkeypatch):
    monkeypatch.setattr(backend, "_allow_unverified", False)
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {"moe_gate": "H200, test"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.use_kernels(cuda_like, ("moe_gate",)) is True
    # one unverified op among verified ones keeps the whole layer on the reference
    with pytest.warns(RuntimeWarning, match="moe_combine"):
        assert backend.use_kernels(cuda_like, ("moe_gate", "moe_combine")) is False


def test_opt_in_calls_unverified_kernels(cuda_like, monkeypatch):
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {})
    before = backend.unverified_allowed()
    try:
        dsv4.allow_unverified_kernels(True)
        assert backend.unverified_allowed()
        assert backend.use_kernels(cuda_like, ("moe_gate",)) is True
        dsv4.allow_unverified_kernels(False)
        with pytest.warns(RuntimeWarning):
            assert backend.use_kernels(cuda_like, ("moe_gate",)) is False
    finally:
        backend.allow_unverified_kernels(before)
    with pytest.raises(TypeError, match="bool"):
        dsv4.allow_unverified_kernels("yes")


@pytest.mark.parametrize("value,expected,said", [
    ("1", True, False), (" On ", True, False), ("0", False, False), ("", False, False),
    ("off", False, False), ("maybe", False, True), ("2", False, True)])
def test_environment_variable(value, expected, said):
    """Recognised values set the flag silently; any other value leaves unverified kernels off
    and says so on stderr, naming the accepted values."""
    env = dict(os.environ, DSV4_UNVERIFIED_KERNELS=value)
    code = "import dsv4.ops.backend as b; print(b.unverified_allowed())"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True)
    assert r.stdout.strip() == str(expected)
    assert ("DSV4_UNVERIFIED_KERNELS=" in r.stderr) is said, r.stderr
    if said:
        assert "1, true, yes, on" in r.stderr


def test_info_names_the_verified_kernels():
    assert "verified on a GPU" in dsv4.ops._ext.format_info()


def test_expert_gemm_kernels_are_gated_too(monkeypatch):
    """moe_up / moe_down are chosen inside the MoE layer's kernel path (not through
    use_kernels' op list): unverified, the layer takes the torch._grouped_mm fallback."""
    from dsv4.layers import moe
    from dsv4.ops import _ext
    monkeypatch.setattr(_ext, "_COMPILED_CUDA_OPS", ["moe_up", "moe_down"])
    monkeypatch.setattr(backend, "built_source_mismatch", lambda ops=None: None)
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {})
    monkeypatch.setattr(backend, "_allow_unverified", False)
    assert moe._grouped_kernels_available() is False
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {"moe_up": "H200", "moe_down": "H200"})
    assert moe._grouped_kernels_available() is True
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {"moe_up": "H200"})
    assert moe._grouped_kernels_available() is False
    monkeypatch.setattr(backend, "_allow_unverified", True)
    assert moe._grouped_kernels_available() is True


def test_verified_table_matches_the_kernel_sources():
    """Each op of HARDWARE_VERIFIED holds for the sources its GPU run passed at: a change to an
    op's kernel (its files in dsv4._kernel_digest.OP_SOURCES or a header they include) without
    a new GPU run fails here for that op (the model would otherwise call an unverified kernel
    by default); the other ops stay verified."""
    digests = backend.op_source_digests()
    if digests is None:
        pytest.skip("no csrc/ beside the package (an installed wheel)")
    stale = {op: digests.get(op) for op in backend.HARDWARE_VERIFIED
             if digests.get(op) != backend.VERIFIED_OP_DIGESTS.get(op)}
    assert not stale, (
        f"the sources of {', '.join(stale)} changed since their kernels passed the GPU suite "
        "(dsv4.ops.backend.HARDWARE_VERIFIED): run their CUDA tests (scripts/gpu_check.sh) on an "
        "H100 / H200, then set VERIFIED_OP_DIGESTS[op] to the new digest and update the op's "
        "HARDWARE_VERIFIED record; meanwhile drop those ops from HARDWARE_VERIFIED. New "
        f"digests: {stale}")


def test_kernel_source_digest_sees_every_byte(tmp_path):
    for d in ("include", "kernels", "torch"):
        (tmp_path / "csrc" / d).mkdir(parents=True)
    f = tmp_path / "csrc" / "kernels" / "a.cu"
    f.write_bytes(b"__global__ void k() {}\n")
    (tmp_path / "csrc" / "kernels" / "notes.txt").write_text("not a source")
    d0 = backend.kernel_source_digest(str(tmp_path))
    (tmp_path / "csrc" / "kernels" / "notes.txt").write_text("changed")
    assert backend.kernel_source_digest(str(tmp_path)) == d0        # not a C++/CUDA file
    f.write_bytes(b"__global__ void k() { }\n")
    d1 = backend.kernel_source_digest(str(tmp_path))
    assert d1 != d0
    f.rename(tmp_path / "csrc" / "kernels" / "b.cu")                 # same bytes, new name
    d2 = backend.kernel_source_digest(str(tmp_path))
    assert d2 not in (d0, d1)
    (tmp_path / "csrc" / "kernels" / "b.cu").write_bytes(b"__global__ void k() { }\r\n")
    assert backend.kernel_source_digest(str(tmp_path)) == d2        # a CRLF checkout
    assert backend.kernel_source_digest(str(tmp_path / "nowhere")) is None


def test_an_old_build_record_falls_back_to_the_whole_tree_digest(cuda_like, monkeypatch):
    """A build record without KERNEL_OP_DIGESTS (built before per-op digests): an extension
    built from csrc/ other than the verified one has no verified kernel (a warning says why),
    whatever HARDWARE_VERIFIED lists; a record without any digest (older still) is trusted."""
    import dsv4.ops._ext as ext
    monkeypatch.setattr(backend, "_allow_unverified", False)
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {"moe_gate": "H200, test"})
    for digest in (backend.VERIFIED_SOURCE_DIGEST, None):
        monkeypatch.setattr(ext, "_build_config",
                            lambda d=digest: types.SimpleNamespace(KERNEL_SOURCE_DIGEST=d))
        assert backend.built_source_mismatch() is None
        assert backend.use_kernels(cuda_like, ("moe_gate",)) is True
    monkeypatch.setattr(ext, "_build_config",
                        lambda: types.SimpleNamespace(KERNEL_SOURCE_DIGEST="f" * 64))
    assert "ffffffffffff" in backend.built_source_mismatch()
    with pytest.warns(RuntimeWarning, match=r"moe_gate have not yet passed the GPU test suite "
                                            r"at this version \(the extension was built from"):
        assert backend.use_kernels(cuda_like, ("moe_gate",)) is False
    assert not backend.may_call(("moe_gate",))
    monkeypatch.setattr(backend, "_allow_unverified", True)                # the opt-in still works
    assert backend.may_call(("moe_gate",))


def test_an_extension_built_from_other_sources_for_one_op_leaves_the_others_verified(
        cuda_like, monkeypatch):
    """setup.py records each op's source digest (KERNEL_OP_DIGESTS); an op whose built digest
    differs from VERIFIED_OP_DIGESTS is not verified (a warning names it), the others are."""
    import dsv4.ops._ext as ext
    monkeypatch.setattr(backend, "_allow_unverified", False)
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {"moe_gate": "H200", "mhc_pre": "H200"})
    monkeypatch.setattr(backend, "VERIFIED_OP_DIGESTS", {"moe_gate": "a" * 64,
                                                         "mhc_pre": "b" * 64})
    built = {"moe_gate": "a" * 64, "mhc_pre": "c" * 64}
    # the whole-tree digest no longer decides once per-op digests are recorded
    monkeypatch.setattr(ext, "_build_config", lambda: types.SimpleNamespace(
        KERNEL_SOURCE_DIGEST="f" * 64, KERNEL_OP_DIGESTS=built))
    assert backend.may_call(("moe_gate",)) and not backend.may_call(("mhc_pre",))
    assert backend.built_source_mismatch(("moe_gate",)) is None
    assert backend.built_source_mismatch() == (
        "the extension was built from sources of mhc_pre other than the GPU-verified ones "
        "(dsv4.ops.backend.VERIFIED_OP_DIGESTS)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.use_kernels(cuda_like, ("moe_gate",)) is True
    with pytest.warns(RuntimeWarning, match=r"of mhc_pre have not yet passed the GPU test suite "
                                            r"at this version \(the extension was built from "
                                            r"sources of mhc_pre other"):
        assert backend.use_kernels(cuda_like, ("moe_gate", "mhc_pre")) is False
    built.pop("mhc_pre")                          # a build that does not know the op
    assert not backend.may_call(("mhc_pre",)) and backend.may_call(("moe_gate",))
    built["mhc_pre"] = "b" * 64
    assert backend.may_call(("moe_gate", "mhc_pre")) and backend.built_source_mismatch() is None
    monkeypatch.setattr(backend, "VERIFIED_OP_DIGESTS", {"moe_gate": "a" * 64})
    assert not backend.may_call(("mhc_pre",))     # listed as verified but no verified digest



def test_a_reference_registered_for_cuda_is_not_a_compiled_kernel(monkeypatch):
    """Without dsv4._C the references serve CUDA tensors too (register_op), so the dispatcher
    has a CUDA kernel for every op; a layer must still take its reference path and say so
    (a GPU run with a truncated _C.so once timed the references through the kernel path)."""
    from dsv4.ops import _ext
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dsv4::moe_gate", "CUDA")
    monkeypatch.setattr(_ext, "_COMPILED_CUDA_OPS", [])
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_backend", "cuda")
    monkeypatch.setattr(backend, "_allow_unverified", True)
    monkeypatch.setattr(backend, "_kernels_run_on", lambda device: True)
    x = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda"))
    with pytest.warns(RuntimeWarning, match="no compiled CUDA kernel for moe_gate"):
        assert backend.use_kernels(x, ("moe_gate",)) is False
    monkeypatch.setattr(_ext, "_COMPILED_CUDA_OPS", ["moe_gate"])
    assert backend.use_kernels(x, ("moe_gate",)) is True


def test_kernels_built_for_another_gpu_are_not_called(monkeypatch):
    """An sm_90a build on another GPU: the layers say so and run the reference instead of
    failing with 'no kernel image is available'."""
    from dsv4.ops import _ext
    monkeypatch.setattr(backend, "_kernel_available", lambda op: True)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_backend", "cuda")
    monkeypatch.setattr(backend, "_allow_unverified", True)
    monkeypatch.setattr(_ext, "_RUNS_ON", {})
    monkeypatch.setattr(_ext, "_build_config",
                        lambda: types.SimpleNamespace(TORCH_CUDA_ARCH_LIST="9.0a"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    x = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    with pytest.warns(RuntimeWarning, match="built for TORCH_CUDA_ARCH_LIST='9.0a'.*8.0"):
        assert backend.use_kernels(x, ("moe_gate",)) is False
    monkeypatch.setattr(_ext, "_RUNS_ON", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert backend.use_kernels(x, ("moe_gate",)) is True


def test_compiled_ops_are_recorded_when_the_registry_snapshot_fails(monkeypatch):
    """register_op records an op whose CUDA kernel came with dsv4._C even when the private
    registry API gave an empty snapshot, and never records a reference it registered."""
    from dsv4.ops import _ext
    monkeypatch.setattr(_ext, "_COMPILED_CUDA_OPS", [])
    monkeypatch.setattr(_ext, "HAS_C", True)
    monkeypatch.setattr(_ext, "_has_kernel", lambda name, key: name == "compiled_op")
    monkeypatch.setattr(_ext, "_op_exists", lambda name: True)
    calls = []
    monkeypatch.setattr(torch.library, "register_kernel", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch.library, "register_fake", lambda q: (lambda f: f))
    monkeypatch.setattr(_ext, "OP_SCHEMAS", dict(_ext.OP_SCHEMAS))
    monkeypatch.setattr(_ext, "_PY_CUDA_OPS", set())
    _ext.register_op("compiled_op", "(Tensor x) -> Tensor", None, None)
    _ext.register_op("py_only_op", "(Tensor x) -> Tensor", None, None)
    assert _ext._COMPILED_CUDA_OPS == ["compiled_op"]
    assert [c[1] for c in calls] == [["cpu"], ["cpu", "cuda"]]
