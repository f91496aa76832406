"""pytest configuration shared by all tests: `cuda`-marked tests skip without a GPU."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch CPU thread pool gets its share of the cores
    (cores // workers, at least 1), unless OMP_NUM_THREADS says otherwise: with every worker
    at the default (all cores), the CPU references' OpenMP regions oversubscribe the machine
    (12 workers x 16 threads on the GPU machine's 16 cores slowed the GEMM tests about tenfold)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(workers))))


@pytest.fixture(autouse=True)
def _cuda_tests_use_unverified_kernels(request):
    """A `cuda` test is what verifies a kernel on hardware, so inside it the model calls every
    compiled kernel, verified on a GPU yet or not (dsv4.ops.backend.HARDWARE_VERIFIED)."""
    if "cuda" not in request.keywords:
        yield
        return
    from dsv4.ops import backend

    before = backend.unverified_allowed()
    backend.allow_unverified_kernels(True)
    try:
        yield
    finally:
        backend.allow_unverified_kernels(before)


@pytest.fixture
def served(monkeypatch):
    """Records, per ``LinearGroup.apply`` call (eager, warm-up or captured), whether the group
    served it (one GEMM for its members: ``Model.fuse_projections``)."""
    from dsv4.layers.linear import LinearGroup

    calls = []
    orig = LinearGroup.apply

    def spy(self, x, linears):
        out = orig(self, x, linears)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(LinearGroup, "apply", spy)
    return calls


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


# All randomness in the tests is seeded (issue 13 item 7): every module's fixtures and every
# test start from seed 0 (torch CPU and CUDA, random, numpy), whatever ran before; a test that
# needs other numbers draws them from its own seeded generator. Hypothesis runs derandomised.
def _seed_all(seed: int = 0) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _seeded_module():
    _seed_all()


@pytest.fixture(autouse=True)
def _seeded_test():
    _seed_all()


try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("dsv4-seeded", derandomize=True)
    _hypothesis_settings.load_profile("dsv4-seeded")
except ImportError:  # hypothesis is in the `test` extra
    pass
