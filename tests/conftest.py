"""pytest configuration shared by all tests: `cuda`-marked tests skip without a GPU."""

from __future__ import annotations

import pytest
import torch


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
