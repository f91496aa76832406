"""The attention layers' kernel path (batched, torch.ops.dsv4.* ops) equals their reference path.

On CPU the ops dispatch to their registered pure-PyTorch references, so forcing the kernel path
here checks the glue that the CUDA path uses (varlen token layout, window-scope indices into the
ring buffers plus the new keys, compressed-scope indices, HCA causal lengths, ring updates)
against the per-sequence reference attention, with no GPU. tests/test_model_cuda.py runs the
same model on the CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

import dsv4
import dsv4.layers.attention as attention
from _model_params import vary_constant_parameters

pytest.importorskip("dsv4.ops.compressor")
pytest.importorskip("dsv4.ops.indexer")


@pytest.fixture
def kernel_path(monkeypatch):
    """Make every attention layer take its kernel path, on any device and dtype."""
    calls = []

    def always(x, ops, unsupported=None):
        calls.append(ops)
        return True

    monkeypatch.setattr(attention, "use_kernels", always)
    return calls


def _model(**overrides) -> dsv4.Model:
    """The tiny model with its norm weights, sinks and hc scales varied (a glue bug that drops
    or swaps one of them must change the logits)."""
    torch.manual_seed(0)
    return vary_constant_parameters(dsv4.Model(dsv4.ModelConfig.tiny(**overrides)).eval())


def _run(m: dsv4.Model, ids: torch.Tensor, lens: list[int], splits: list[int]) -> torch.Tensor:
    """Feed ``ids`` [B, S] (row b has lens[b] valid tokens) in chunks ending at ``splits``;
    returns the logits of every fed position concatenated, padding positions zeroed."""
    cache = m.make_cache(ids.shape[0])
    outs, p = [], 0
    for e in splits:
        chunk_lens = [max(0, min(n, e) - p) for n in lens]
        out = m(ids[:, p:e], cache=cache, seq_lens=torch.tensor(chunk_lens))
        mask = torch.arange(e - p)[None, :] < torch.tensor(chunk_lens)[:, None]
        outs.append(out * mask[..., None])
        p = e
    return torch.cat(outs, 1)


@pytest.mark.parametrize("index_budget", [None, 300])
@pytest.mark.parametrize("quant_sim", [False, True])
@pytest.mark.parametrize("splits", [[70], [33, 34, 35, 70], [1, 2, 3, 4, 5, 64, 70]])
def test_kernel_path_matches_reference(kernel_path, monkeypatch, quant_sim, splits,
                                       index_budget):
    """index_budget 300: the queries of a step are attended in blocks of a few tokens (the
    bound that keeps long-prompt index lists small), which must not change anything."""
    if index_budget is not None:
        monkeypatch.setattr(attention, "_INDEX_ELEMENTS", index_budget)
    m = _model(quant_sim=quant_sim)
    lens = [70, 37, 1, 0]
    ids = torch.randint(0, m.config.vocab_size, (4, 70))
    with torch.no_grad():
        got = _run(m, ids, lens, splits)
        assert kernel_path, "the kernel path was not taken"
        monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: False)
        ref = _run(m, ids, lens, splits)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err
    fused = ("sparse_attn", "q_norm_rope", "kv_norm_rope", "rms_norm")
    assert {ops for ops in kernel_path} == {
        fused, fused + ("compress_kv", "indexer_topk", "paged_rows"),
        fused + ("compress_kv", "hca_attn"),
        ("grouped_oproj",)}


def test_backend_switch_validates():
    with pytest.raises(ValueError, match="cuda, reference"):
        dsv4.set_backend("triton")
    old = dsv4.get_backend()
    try:
        dsv4.set_backend("reference")
        assert dsv4.get_backend() == "reference"
        assert not dsv4.ops.backend.use_kernels(torch.zeros(1, dtype=torch.bfloat16),
                                                ("sparse_attn",))
    finally:
        dsv4.set_backend(old)


def test_cpu_tensors_never_take_kernels():
    old = dsv4.get_backend()
    try:
        dsv4.set_backend("cuda")
        assert not dsv4.ops.backend.use_kernels(torch.zeros(1, dtype=torch.bfloat16),
                                                ("sparse_attn",))
    finally:
        dsv4.set_backend(old)


def test_layers_outside_the_kernels_range_name_the_reason():
    """A config the kernels cannot take (index_topk > 2048, odd head dims) runs the reference
    path on CUDA; the layer says why (use_kernels warns with that reason once)."""
    ok = dsv4.Model(dsv4.ModelConfig.tiny())
    assert all(b.attn._kernel_unsupported is None for b in ok.layers)
    big = dsv4.Model(dsv4.ModelConfig.tiny(index_topk=4096))
    reasons = {b.attn._kernel_unsupported for b in big.layers if b.attn.indexer is not None}
    assert reasons == {"indexer_topk takes index_topk 1..2048, not 4096"}
