"""Per-op digests of the kernel sources (dsv4._kernel_digest.op_source_digests): which files
each op's digest covers, that a change reaches exactly the ops built from the changed file, and
the guard that keeps OP_SOURCES complete."""

from __future__ import annotations

import pytest

from dsv4 import _kernel_digest as kd
from dsv4.ops import backend

GLUE_A = b'TORCH_LIBRARY_FRAGMENT(dsv4, m) {\n  m.def(\n      "op_a(Tensor x) -> Tensor");\n' \
         b'  m.def("op_a_out(Tensor x, Tensor! out) -> ()");\n}\n'
GLUE_B = b'#include "dsv4/b.h"\n' \
         b'TORCH_LIBRARY_FRAGMENT(dsv4, m) { m.def("op_b(Tensor x) -> Tensor"); }\n'


@pytest.fixture
def fake_tree(tmp_path, monkeypatch):
    """A small csrc/ with two ops: op_a (glue a.cpp, TU a.cu -> a.cuh, dsv4/a.h) and op_b
    (glue b.cpp -> dsv4/b.h, TU b.cu); both headers include dsv4/common.h."""
    files = {
        "include/dsv4/common.h": b"#pragma once\nstruct Common {};\n",
        "include/dsv4/a.h": b'#pragma once\n#include <cstdint>\n#include "dsv4/common.h"\n',
        "include/dsv4/b.h": b'#pragma once\n  #  include "dsv4/common.h"\n',
        "kernels/a.cuh": b"__device__ int helper_a() { return 1; }\n",
        "kernels/a.cu": b'#include "dsv4/a.h"\n#include "a.cuh"\n__global__ void ka() {}\n',
        "kernels/b.cu": b'#include "dsv4/b.h"\n__global__ void kb() {}\n',
        "torch/a.cpp": b'#include "dsv4/a.h"\n' + GLUE_A,
        "torch/b.cpp": GLUE_B,
        "torch/registration.cpp": b"TORCH_LIBRARY(dsv4, m) {}\n",
    }
    for rel, body in files.items():
        p = tmp_path / "csrc" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)
    monkeypatch.setattr(kd, "OP_SOURCES", {"op_a": ("torch/a.cpp", "kernels/a.cu"),
                                           "op_b": ("torch/b.cpp", "kernels/b.cu")})
    monkeypatch.setattr(kd, "SHARED", ("torch/registration.cpp",))
    return tmp_path


def _changed(root, rel, body):
    before = kd.op_source_digests(root)
    (root / "csrc" / rel).write_bytes(body)
    after = kd.op_source_digests(root)
    return {op for op in before if before[op] != after[op]}


def test_closure_follows_quoted_includes(fake_tree):
    c = kd.op_closures(fake_tree)
    assert c["op_a"] == ["csrc/include/dsv4/a.h", "csrc/include/dsv4/common.h",
                         "csrc/kernels/a.cu", "csrc/kernels/a.cuh", "csrc/torch/a.cpp",
                         "csrc/torch/registration.cpp"]
    assert c["op_b"] == ["csrc/include/dsv4/b.h", "csrc/include/dsv4/common.h",
                         "csrc/kernels/b.cu", "csrc/torch/b.cpp", "csrc/torch/registration.cpp"]
    assert kd.op_sources_problems(fake_tree) == []


def test_a_kernel_change_reaches_exactly_its_ops(fake_tree):
    assert _changed(fake_tree, "kernels/a.cuh", b"__device__ int helper_a() { return 2; }\n") \
        == {"op_a"}
    assert _changed(fake_tree, "kernels/b.cu", b'#include "dsv4/b.h"\n__global__ void kb(){}\n') \
        == {"op_b"}
    assert _changed(fake_tree, "torch/a.cpp", b'#include "dsv4/a.h"\n// x\n' + GLUE_A) == {"op_a"}
    assert _changed(fake_tree, "torch/registration.cpp", b"TORCH_LIBRARY(dsv4, m) { }\n") \
        == {"op_a", "op_b"}                                   # SHARED reaches every op
    before = kd.op_source_digests(fake_tree)
    (fake_tree / "csrc" / "kernels" / "notes.txt").write_text("not a source")
    (fake_tree / "csrc" / "kernels" / "b.cu").write_bytes(
        (fake_tree / "csrc" / "kernels" / "b.cu").read_bytes().replace(b"\n", b"\r\n"))
    assert kd.op_source_digests(fake_tree) == before          # CRLF reads as LF


def test_a_header_change_reaches_every_op_including_it(fake_tree):
    # through a.h and b.h
    assert _changed(fake_tree, "include/dsv4/common.h",
                    b"#pragma once\nstruct Common { int x; };\n") == {"op_a", "op_b"}
    assert _changed(fake_tree, "include/dsv4/a.h", b'#pragma once\n#include "dsv4/common.h"\n') \
        == {"op_a"}
    # a new include pulls the included file's bytes into the op's digest
    assert _changed(fake_tree, "kernels/b.cu",
                    b'#include "dsv4/b.h"\n#include "a.cuh"\n__global__ void kb() {}\n') == {"op_b"}
    assert _changed(fake_tree, "kernels/a.cuh", b"__device__ int helper_a() { return 3; }\n") \
        == {"op_a", "op_b"}


def test_completeness_guard_names_what_is_unclaimed(fake_tree, monkeypatch):
    csrc = fake_tree / "csrc"
    (csrc / "kernels" / "c.cu").write_bytes(b"__global__ void kc() {}\n")
    (csrc / "torch" / "c_utils.h").write_bytes(b"#pragma once\n")
    problems = kd.op_sources_problems(fake_tree)
    assert len(problems) == 2
    assert "csrc/kernels/c.cu is in no op's sources" in problems[0]
    assert "csrc/torch/c_utils.h is in no op's sources" in problems[1]
    (csrc / "kernels" / "c.cu").unlink()
    (csrc / "torch" / "c_utils.h").unlink()
    # a registered op without an entry; an out-variant maps to its op
    (csrc / "torch" / "b.cpp").write_bytes(GLUE_B + b'TORCH_LIBRARY_FRAGMENT(dsv4, m) { '
                                           b'm.def("op_b_out(Tensor x, Tensor! o) -> ()");\n'
                                           b'm.def("op_c(Tensor x) -> Tensor"); }\n')
    assert kd.op_sources_problems(fake_tree) == [
        "op op_c (m.def in csrc/torch) has no OP_SOURCES entry"]
    (csrc / "torch" / "b.cpp").write_bytes(GLUE_B + b'm.def(kSchema);\n')
    assert "does not start with a literal" in kd.op_sources_problems(fake_tree)[0]
    (csrc / "torch" / "b.cpp").write_bytes(GLUE_B)
    monkeypatch.setattr(kd, "OP_SOURCES", dict(kd.OP_SOURCES, op_d=("kernels/d.cu",)))
    assert kd.op_sources_problems(fake_tree) == [
        "OP_SOURCES/SHARED lists csrc/kernels/d.cu, which does not exist",
        "OP_SOURCES has op_d, which no m.def in csrc/torch registers"]
    assert kd.op_source_digests(fake_tree)["op_d"] != kd.op_source_digests(fake_tree)["op_a"]
    assert kd.op_source_digests(fake_tree / "nowhere") is None


def test_the_op_sources_cover_this_tree():
    """Every glue/kernel file of csrc/ is in some op's closure or SHARED, every registered op
    has an entry, and every op the model gates (HARDWARE_VERIFIED) is one of them: a new
    kernel file or op fails here until dsv4._kernel_digest.OP_SOURCES names it."""
    if kd.kernel_source_digest() is None:
        pytest.skip("no csrc/ beside the package (an installed wheel)")
    assert kd.op_sources_problems() == []
    assert set(backend.HARDWARE_VERIFIED) <= set(kd.OP_SOURCES)
    assert set(backend.HARDWARE_VERIFIED) <= kd.registered_ops()
