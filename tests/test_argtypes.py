"""dsv4.argtypes: the value checks shared by the command lines and the public API."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from dsv4.argtypes import int_at_least, int_sequence


def test_int_at_least_names_the_range():
    parse = int_at_least(2)
    assert parse("7") == 7
    for bad in ("1", "x", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 2"):
            parse(bad)


def test_int_sequence_accepts_integer_sequences_and_tensors():
    assert int_sequence([3, np.int64(4), torch.tensor(5)], "ids") == [3, 4, 5]
    assert int_sequence((1, 2), "ids") == [1, 2]
    assert int_sequence(range(3), "ids") == [0, 1, 2]
    assert int_sequence(torch.tensor([7, 8], dtype=torch.int32), "ids") == [7, 8]
    assert int_sequence([], "ids") == []


@pytest.mark.parametrize("bad", ["12", b"12", 3, None, 2.0, [1, 2.0], [True], [None], ["1"],
                                 [torch.tensor([1, 2])], [torch.tensor(1.0)],
                                 torch.tensor([1.0]), torch.tensor([[1]]),
                                 torch.tensor([True]), torch.tensor(3), np.array(3)])
def test_int_sequence_refuses_everything_else(bad):
    with pytest.raises(ValueError, match=r"^ids must be integers; got "):
        int_sequence(bad, "ids must be integers")


@pytest.mark.parametrize("bad", [{5, 3}, frozenset({9, 3, 7}), {5: 0, 3: 1}])
def test_int_sequence_refuses_unordered_collections(bad):
    """A set iterates in hash order (seq_lens={5, 3} came out as [3, 5]) and a dict as its
    keys: neither is a sequence, whatever ints they hold."""
    name = type(bad).__name__
    with pytest.raises(ValueError, match=rf"^ids must be integers; got a {name} .* \(unordered: "
                                         r"pass a list or tuple\)$"):
        int_sequence(bad, "ids must be integers")
