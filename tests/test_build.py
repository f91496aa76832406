"""The build/import state of the compiled extension, as reported by dsv4.ops._ext.info().

CI builds with CUDA and sets DSV4_EXPECT_C=1, so a broken extension build fails here instead of
silently falling back to the reference ops.
"""

from __future__ import annotations

import os

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
import dsv4.ops._ext as ext

INFO_KEYS = {
    "version",
    "torch_version",
    "torch_cuda_version",
    "compiled",
    "import_error",
    "cuda_compiled_ops",
    "cuda_available",
    "device_name",
    "device_capability",
    "build_arch_list",
    "build_torch_version",
    "cuda_usable_ops",
}


def test_info_keys_and_consistency():
    d = ext.info()
    assert set(d) == INFO_KEYS
    assert d["compiled"] is ext.HAS_C
    assert d["torch_version"] == torch.__version__
    assert d["cuda_available"] is torch.cuda.is_available()
    assert (d["import_error"] is None) == ext.HAS_C
    if not ext.HAS_C:
        assert d["cuda_compiled_ops"] == [] and d["cuda_usable_ops"] == []
    if not d["cuda_available"]:
        assert d["device_name"] is None and d["cuda_usable_ops"] == []
    assert set(d["cuda_usable_ops"]) <= set(d["cuda_compiled_ops"])


def test_format_info_mentions_state():
    text = ext.format_info()
    assert ("compiled extension: yes" in text) == ext.HAS_C
    assert "torch.ops.dsv4.rms_norm" in text
    for op in ext.info()["cuda_compiled_ops"]:
        assert op in text


def test_dsv4_info_is_the_same_function():
    import dsv4

    assert dsv4.info is ext.info


@pytest.mark.skipif(os.environ.get("DSV4_EXPECT_C") != "1", reason="DSV4_EXPECT_C=1 not set")
def test_extension_built_when_expected():
    d = ext.info()
    assert ext.HAS_C, f"dsv4._C did not import: {d['import_error']}"
    assert "rms_norm" in d["cuda_compiled_ops"], d["cuda_compiled_ops"]
    assert d["build_arch_list"], "python/dsv4/_build_config.py missing: was setup.py run?"


@pytest.mark.skipif(not ext.HAS_C, reason="without the extension the ops are defined from "
                    "this table (the comparison would be the table with itself)")
@pytest.mark.parametrize("name", sorted(ext.OP_SCHEMAS))
def test_op_schema_matches_python_table(name):
    # The C++ m.def and the Python fallback definition must declare the same schema.
    op = getattr(torch.ops.dsv4, name).default
    assert str(op._schema) == f"dsv4::{name}{ext.OP_SCHEMAS[name]}"


@pytest.mark.parametrize(
    ("arch", "cc", "runs"),
    [
        ("9.0a", (9, 0), True),
        ("9.0a", (10, 0), False),
        ("9.0", (9, 0), True),
        ("8.0", (8, 6), True),
        ("8.0", (9, 0), False),
        ("8.0+PTX", (9, 0), True),
        ("10.0f", (10, 3), True),
        ("10.0a", (10, 3), False),
    ],
)
def test_arch_runs_on(arch, cc, runs):
    assert ext._arch_runs_on(arch, cc) is runs
