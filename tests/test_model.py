"""Whole-model properties of the reference: decode = prefill, chunking, batching, causality."""

from __future__ import annotations

import os

import pytest
import torch

import dsv4
from dsv4.layers.indexer import indexer_topk_reference

VOCAB = 129280


def _model(**over) -> dsv4.Model:
    """The tiny config with exact arithmetic: with quant_sim on, fp32 rounding differences
    between batched and incremental GEMMs may flip FP8/FP4 roundings (tested separately)."""
    torch.manual_seed(0)
    over.setdefault("quant_sim", False)
    return dsv4.Model(dsv4.ModelConfig.tiny(**over)).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 300), generator=g)


@pytest.fixture(scope="module")
def full_logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _close(a, b, tol=2e-5):
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < tol, err


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 7, 8, 15, 16, 17, 33, 127, 128, 129, 200])
def test_prefill_then_decode_equals_full_forward(model, ids, full_logits, prompt_len):
    n_decode = 4
    cache = model.make_cache(2)
    with torch.no_grad():
        out = [model(ids[:, :prompt_len], cache=cache)]
        for p in range(prompt_len, prompt_len + n_decode):
            out.append(model(ids[:, p:p + 1], cache=cache))
    out = torch.cat(out, 1)
    assert cache.lengths == [prompt_len + n_decode] * 2
    _close(out, full_logits[:, :prompt_len + n_decode])


def test_quant_sim_decode_matches_full_forward(ids):
    """With quant_sim, decode equals prefill up to rare FP8/FP4 rounding-boundary flips."""
    m = _model(quant_sim=True)
    with torch.no_grad():
        full = m(ids[:, :96])
        cache = m.make_cache(2)
        out = torch.cat([m(ids[:, :40], cache=cache)] +
                        [m(ids[:, p:p + 1], cache=cache) for p in range(40, 96)], 1)
    err = (out - full).abs().amax(-1) / full.abs().max()
    assert err.max() < 1e-2 and (err < 1e-5).float().mean() > 0.5, err


def test_real_window_ratios_and_topk():
    """window 128, ratios 4 and 128, index_topk 512 (the released values) on tiny dims."""
    m = _model(window_size=128, compress_ratios=(0, 4, 128, 4, 0), index_topk=512)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 400), generator=g)
    with torch.no_grad():
        full = m(ids)
        for prompt_len in (127, 128, 129, 255, 256, 257, 390):
            cache = m.make_cache(1)
            out = [m(ids[:, :prompt_len], cache=cache)]
            for p in range(prompt_len, min(prompt_len + 3, 400)):
                out.append(m(ids[:, p:p + 1], cache=cache))
            out = torch.cat(out, 1)
            _close(out, full[:, :out.shape[1]])


def test_real_topk_512_saturated():
    """Past 2048 tokens more than 512 blocks are complete: top-k really selects (§5)."""
    m = _model(window_size=128, compress_ratios=(0, 4, 128, 4, 0), index_topk=512)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (1, 2110), generator=g)
    with torch.no_grad():
        full = m(ids)
        cache = m.make_cache(1)
        out = torch.cat([m(ids[:, :2100], cache=cache)] +
                        [m(ids[:, p:p + 1], cache=cache) for p in range(2100, 2110)], 1)
    assert cache.layers[1].indexer.entries.shape[1] >= 2110 // 4 > 512
    _close(out, full)


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_chunked_prefill_equals_one_shot(model, ids, full_logits, chunk):
    n = 140 if chunk > 1 else 40
    cache = model.make_cache(2)
    with torch.no_grad():
        out = torch.cat([model(ids[:, p:p + chunk], cache=cache)
                         for p in range(0, n, chunk)], 1)[:, :n]
    _close(out, full_logits[:, :n])


def test_mixed_length_batch_equals_each_alone(model, ids):
    lens = [150, 37, 1]
    batch = ids[[0, 1, 0], :150].clone()
    batch[1, 37:] = -1        # padding values must not matter
    batch[2, 1:] = 5
    cache = model.make_cache(3)
    with torch.no_grad():
        out = model(batch, cache=cache, seq_lens=lens)
        # then one decode step for every row
        nxt = torch.tensor([[7], [8], [9]])
        step = model(nxt, cache=cache)
        for r, n in enumerate(lens):
            alone_ids = torch.cat([batch[r:r + 1, :n], nxt[r:r + 1]], 1)
            alone = model(alone_ids)
            _close(out[r, :n], alone[0, :n])
            _close(step[r, 0], alone[0, n])
    assert cache.lengths == [151, 38, 2]


def test_cache_reset_leaks_nothing(model, ids):
    cache = model.make_cache(2)
    with torch.no_grad():
        _, hidden = model(ids[:, :50], cache=cache, return_hidden=True)
        model.forward_mtp(hidden, ids[:, 1:51], cache)
        cache.reset([1])
        assert cache.lengths == [50, 0] and cache.mtp_lengths == [50, 0]
        # 45 tokens: 11 ratio-4 entries, more than index_topk, so the indexer's keys choose
        a, hidden = model(ids[:, 60:105], cache=cache, seq_lens=[45, 45], return_hidden=True)
        fresh_cache = model.make_cache(1)
        fresh, fresh_hidden = model(ids[1:, 60:105], cache=fresh_cache, return_hidden=True)
        _close(a[1], fresh[0], tol=1e-5)
        mtp = model.forward_mtp(hidden, ids[:, 61:106], cache)
        _close(mtp[1], model.forward_mtp(fresh_hidden, ids[1:, 61:106], fresh_cache)[0],
               tol=1e-5)
        # a prompt shorter than one block after a long one: stale "previous block" rows
        # of the overlapping compressor must be cleared by reset (architecture.md §15)
        cache.reset()
        b = model(ids[:, 100:102], cache=cache)
        c = model(ids[:, 102:110], cache=cache)
        ref = model(ids[:, 100:110])
        _close(torch.cat([b, c], 1), ref)


def test_causality(model, ids, full_logits):
    changed = ids[:, :120].clone()
    changed[:, 80:] = (changed[:, 80:] + 1234) % VOCAB
    with torch.no_grad():
        out = model(changed)
    _close(out[:, :80], full_logits[:, :80], tol=1e-5)
    assert ((out[:, 80:] - full_logits[:, 80:120]).abs().amax(-1) > 1e-2).all()


def test_indexer_topk_rules():
    torch.manual_seed(3)
    ratio, k = 4, 5
    q = torch.randn(40, 3, 16)
    w = torch.rand(40, 3)
    keys = torch.randn(10, 16)
    pos = torch.arange(40)
    idx = indexer_topk_reference(q, w, keys, pos, ratio, k)
    assert idx.shape == (40, k)
    n_valid = (pos + 1) // ratio
    for t in range(40):
        row = idx[t]
        picked = row[row >= 0]
        assert (picked < n_valid[t]).all()                        # never an incomplete block
        assert len(picked) == min(k, int(n_valid[t]))              # fewer blocks than k: all of them
        assert (row[len(picked):] == -1).all()                     # -1 padding at the end
        if len(picked) == k:
            s = ((q[t] @ keys[:n_valid[t]].T).relu() * w[t, :, None]).sum(0)
            assert set(picked.tolist()) == set(s.topk(k).indices.tolist())


def test_indexer_ties_lowest_index_first():
    q = torch.ones(1, 1, 4)
    keys = torch.ones(6, 4)
    idx = indexer_topk_reference(q, torch.ones(1, 1), keys, torch.tensor([23]), 4, 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_mtp_decode_equals_full(model, ids):
    with torch.no_grad():
        cache = model.make_cache(2)
        _, h = model(ids[:, :30], cache=cache, return_hidden=True)
        full = model.forward_mtp(h, ids[:, 1:31], cache)
        cache = model.make_cache(2)
        _, h1 = model(ids[:, :20], cache=cache, return_hidden=True)
        parts = [model.forward_mtp(h1, ids[:, 1:21], cache)]
        for p in range(20, 30):
            _, hp = model(ids[:, p:p + 1], cache=cache, return_hidden=True)
            parts.append(model.forward_mtp(hp, ids[:, p + 1:p + 2], cache))
    assert full.shape == (2, 30, VOCAB) and torch.isfinite(full).all()
    _close(torch.cat(parts, 1), full)


def test_save_load_round_trip_is_exact(model, ids, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(ids[:, :20]), model(ids[:, :20]))


def test_checkpoint_mismatch_lists_tensors(model, tmp_path):
    from safetensors.torch import load_file, save_file
    from dsv4.checkpoint import CheckpointError
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["layers.0.attn.wq_a.weight"]
    sd["layers.0.attn.bogus"] = torch.zeros(1)
    sd["norm.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32)
    msg = str(e.value)
    assert "layers.0.attn.wq_a.weight" in msg and "layers.0.attn.bogus" in msg and "norm.weight" in msg


def test_bf16_runs_and_tracks_fp32(model, ids, full_logits):
    m = _model().to(dtype=torch.bfloat16)
    assert m.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    assert m.head.weight.dtype == torch.float32 and m.layers[0].hc_attn_fn.dtype == torch.float32
    with torch.no_grad():
        out = m(ids[:, :64])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    a, b = out.double().flatten(0, 1), full_logits[:, :64].double().flatten(0, 1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert cos.median() > 0.995, cos


def test_input_validation(model):
    with pytest.raises(ValueError, match="seq_lens"):
        model(torch.zeros(2, 3, dtype=torch.long), seq_lens=[4, 1])
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.make_cache(1))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 3))


def test_from_pretrained_bf16_keeps_fp32_parameters(model, tmp_path):
    model.save_pretrained(tmp_path)
    m = dsv4.Model.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fp32 = {n for n, p in m.named_parameters() if p.dtype == torch.float32}
    assert fp32 == set(model._fp32_names)
    for name in ("head.weight", "layers.0.hc_attn_fn", "layers.1.attn.attn_sink", "norm.weight",
                 "layers.1.attn.compressor.wkv.weight", "layers.1.attn.compressor.ape",
                 "layers.3.ffn.gate.bias", "layers.0.attn_norm.weight"):
        assert name in fp32, name
    assert m.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    assert m.embed.weight.dtype == torch.bfloat16
    assert m.layers[0].ffn.gate.tid2eid.dtype == torch.int64


def test_truncated_shard_error(model, tmp_path):
    from dsv4.checkpoint import CheckpointError
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32)


def test_empty_sequence_and_mtp_shape_checks(model, ids):
    cache = model.make_cache(2)
    with torch.no_grad():
        out = model(ids[:, :0], cache=cache)
        assert out.shape == (2, 0, VOCAB) and cache.lengths == [0, 0]
        _, h = model(ids[:, :10], cache=cache, return_hidden=True)
        with pytest.raises(ValueError, match="hidden must be"):
            model.forward_mtp(h[:, :1], ids[:, 1:11], cache)
        with pytest.raises(ValueError, match="hidden must be"):
            model.forward_mtp(h[:1], ids[:, 1:11], cache)


def test_cache_must_match_model(model):
    other = _model().to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="make the cache after"):
        other(torch.zeros(1, 2, dtype=torch.long), cache=model.make_cache(1))
    small = _model(window_size=8)
    with pytest.raises(ValueError, match="config differs"):
        small(torch.zeros(1, 2, dtype=torch.long), cache=model.make_cache(1))
    with pytest.raises(ValueError, match="integers"):
        model(torch.zeros(1, 3, dtype=torch.long), seq_lens=[2.7])


def test_mtp_input_takes_the_next_token_through_e_proj_and_the_streams_through_h_proj():
    """§10.3: x = e_proj(enorm(embed(next))) + h_proj(hnorm(h)). The MTP tests compared the model
    with itself (decode vs prefill, fused vs not), so e_proj and h_proj could be swapped: with
    e_proj zeroed the draft must not depend on next_ids, with h_proj zeroed not on hidden."""
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (1, 12), generator=g)
    other = torch.randint(0, V, (1, 10), generator=g)

    def draft(hidden_of=None, nxt=None):
        cache = m.make_cache(1)
        _, h = m(ids[:, :10], cache=cache, return_hidden=True)
        h = h if hidden_of is None else hidden_of(h)
        return m.forward_mtp(h, ids[:, 1:11] if nxt is None else nxt, cache)

    blk = m.mtp[0]
    with torch.no_grad():
        base = draft()
        assert not torch.equal(base, draft(nxt=other))
        assert not torch.equal(base, draft(hidden_of=lambda h: torch.randn_like(h)))
        w = blk.e_proj.weight.clone()
        blk.e_proj.weight.zero_()
        assert torch.equal(draft(), draft(nxt=other))
        blk.e_proj.weight.copy_(w)
        blk.h_proj.weight.zero_()
        assert torch.equal(draft(), draft(hidden_of=lambda h: torch.randn_like(h)))
