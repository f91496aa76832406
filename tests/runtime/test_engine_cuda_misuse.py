"""The runtime's memory check on a GPU (runs on the H200): a pool that fits the device counts
the caching allocator's unused reserve, so building engine after engine is not refused; one
that cannot fit is refused before allocating."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import dsv4
from dsv4.runtime import Engine
from dsv4.runtime import engine as engine_mod

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def model():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny()).to("cuda", torch.bfloat16).eval()


def test_available_memory_counts_the_allocators_reserve(model):
    """What the allocator holds unused counts as available, what a live tensor holds does not.
    Each reading is set against the device's free memory read at the same moment (other
    processes, e.g. other pytest workers, change the free memory between readings)."""
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        pytest.skip("no caching allocator: a freed tensor goes back to the device")
    dev = model.device

    def beyond_free() -> int:           # available minus the device's free memory, now
        return engine_mod._available_bytes(dev) - torch.cuda.mem_get_info(dev)[0]

    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)      # 1 GiB allocated
    held = beyond_free()
    unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    assert abs(held - unused) < (64 << 20)                       # x's GiB not among it
    del x                                                        # reserved, unused
    assert beyond_free() >= held + (1 << 30) - (64 << 20)


def test_engines_in_sequence_and_an_impossible_one(model):
    free = engine_mod._available_bytes(model.device)
    bt = engine_mod.default_block_tokens(model.config)
    # one slot whose pool takes ~60 % of what is free: fits twice in sequence (the first
    # engine's pool returns to the allocator's reserve), never twice at once.
    per_block = dsv4.runtime.PagedCache.block_bytes(model.config, bt, torch.bfloat16)
    blocks = int(0.6 * free / per_block)
    for _ in range(2):
        e = Engine(model, max_batch=1, max_model_len=bt, num_blocks=blocks, cuda_graphs=False)
        del e
        gc.collect()
    with pytest.raises(ValueError, match="lower max_batch, max_model_len or num_blocks"):
        Engine(model, max_batch=1, max_model_len=bt, num_blocks=4 * blocks, cuda_graphs=False)
