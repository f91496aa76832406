"""The Engine's up-front memory check counts the cache formats it will allocate."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.runtime import Engine
from dsv4.runtime import engine as engine_mod
from dsv4.runtime.pool import PagedCache


def test_the_check_counts_fp8_kv_and_indexer_entries(monkeypatch):
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(head_dim=512)).to(torch.bfloat16).eval()
    c, args = m.config, (4, 64, 256, torch.bfloat16)
    need = {f: PagedCache.estimate_bytes(c, *args, f, f) for f in ("bf16", "fp8")}
    assert need["fp8"] < need["bf16"]
    # Room for the FP8 pool, not for the bf16 one: only the bf16 engine is refused.
    monkeypatch.setattr(engine_mod, "_available_bytes",
                        lambda device: (need["fp8"] + need["bf16"]) // 2)
    kw = dict(max_batch=4, max_model_len=2048, num_blocks=64, block_tokens=256)
    with pytest.raises(ValueError, match="lower max_batch, max_model_len or num_blocks"):
        Engine(m, **kw)
    e = Engine(m, kv_cache="fp8", indexer_cache="fp8", **kw)
    assert e.cache.bytes <= need["fp8"]


@pytest.mark.parametrize("kw,match", [(dict(indexer_cache="fp4"), "indexer_cache must be"),
                                      (dict(kv_cache="int8"), "kv_cache must be")])
def test_unknown_formats_are_refused_before_the_estimate(monkeypatch, kw, match):
    m = dsv4.Model(dsv4.ModelConfig.tiny()).eval()
    monkeypatch.setattr(PagedCache, "estimate_bytes",
                        lambda *a, **k: pytest.fail("estimated an unknown format"))
    with pytest.raises(ValueError, match=match):
        Engine(m, max_batch=2, max_model_len=256, **kw)
