"""Where the project's shared test data lives: ``../shared/testdata`` beside the repository
(architecture.md's golden checkpoints). Tests that read it skip when it is absent."""

from __future__ import annotations

import os

import pytest

TESTDATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                         "testdata"))
GOLDEN_FP8 = os.path.join(TESTDATA, "golden_fp8")
needs_golden_fp8 = pytest.mark.skipif(not os.path.isdir(GOLDEN_FP8),
                                      reason=f"golden_fp8 not found at {GOLDEN_FP8}")


def checkpoint_tensors(path) -> dict:
    """Every tensor of a checkpoint directory, by its stored name (read through its index)."""
    from safetensors import safe_open

    from dsv4.convert import read_checkpoint_index

    out = {}
    for name, (file, _, _) in read_checkpoint_index(str(path)).items():
        with safe_open(file, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out
