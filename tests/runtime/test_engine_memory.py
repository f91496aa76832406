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


def test_the_check_names_the_weights_a_step_copies():
    """The bf16-path weights are the compressors' wkv / wgate (not the head, not another
    linear); the head's bf16 copy counts for head_dtype=bfloat16 unless the head is compact."""
    m = dsv4.Model(dsv4.ModelConfig.tiny()).to(torch.bfloat16).eval()
    want = {id(p) for n, p in m.named_parameters()
            if n.endswith(("compressor.wkv.weight", "compressor.wgate.weight"))}
    assert want and {id(p) for p in engine_mod._bf16_path_weights(m)} == want
    head = 2 * m.head.weight.numel()
    assert engine_mod._pending_copy_bytes(m, torch.bfloat16) == head     # CPU: no compressor copy
    assert engine_mod._pending_copy_bytes(m, None) == 0
    with torch.no_grad():
        m.head.weight.copy_(m.head.weight.bfloat16())
    m.compact_head()
    assert engine_mod._pending_copy_bytes(m, torch.bfloat16) == 0


def test_the_check_refuses_for_the_head_copy(monkeypatch):
    m = dsv4.Model(dsv4.ModelConfig.tiny()).to(torch.bfloat16).eval()
    kw = dict(max_batch=1, max_model_len=256)
    c = m.config
    from dsv4.runtime.engine import default_block_tokens
    from dsv4.runtime.pool import blocks_needed
    bt = default_block_tokens(c)
    need = PagedCache.estimate_bytes(c, 1, blocks_needed(c, 256, bt), bt, torch.bfloat16,
                                     "bf16", "bf16")
    monkeypatch.setattr(engine_mod, "_available_bytes", lambda device: need + 1)
    Engine(m, **kw)
    with pytest.raises(ValueError, match=r"GiB of bf16 weight copies.*DSV4_FP32_LINEAR=fp32"):
        Engine(m, head_dtype=torch.bfloat16, **kw)
