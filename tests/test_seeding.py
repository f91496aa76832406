"""The test suite's randomness is seeded (tests/conftest.py): a test that draws from the global
generators starts from seed 0, whatever ran before it and whichever tests were selected."""

from __future__ import annotations

import random

import torch


def _draw():
    return torch.rand(3).tolist(), random.random()


def _seed_0_draw():
    torch.manual_seed(0)
    random.seed(0)
    return _draw()


def test_a_test_starts_from_seed_0():
    first = _draw()
    torch.rand(1000)                      # consume: the next test must not notice
    random.random()
    assert first == _seed_0_draw()


def test_the_next_test_starts_from_seed_0_again():
    first = _draw()
    assert first == _seed_0_draw()
