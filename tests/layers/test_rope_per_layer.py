"""Which RoPE table each attention layer uses (architecture.md §3.4), without the golden data:
SWA layers (ratio 0, the MTP layer included) plain RoPE with ``rope_theta``; CSA and HCA layers
``compress_rope_theta`` with YaRN (``rope_factor``, ``original_seq_len``, ``beta_fast/slow``)
for their queries, window keys, compressed keys and indexer (issue 13 item 7).

Behavioural: two models with the same weights whose configs differ in one RoPE field; a forward
hook on ``layers.{i}.attn`` (the official module names) compares what each layer computes from
the same input. A field a layer uses changes its output; a field it does not use leaves it
bit-identical. The table itself is checked against the formula written out here."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import dsv4

VOCAB = 1024


@functools.lru_cache(maxsize=None)
def _outputs_cached(ratios, change):
    return _outputs(ratios, **dict(change))


def _outputs(ratios, seed=0, **over):
    """Per-layer attention outputs of a tiny model (weights from ``seed``) on fixed tokens."""
    over.setdefault("quant_sim", False)
    cfg = dsv4.ModelConfig.tiny(compress_ratios=ratios, n_hash_layers=0, vocab_size=VOCAB,
                                **over)
    torch.manual_seed(seed)
    model = dsv4.Model(cfg).eval()
    got = {}
    for i, layer in enumerate(model.layers):
        layer.attn.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out.detach()))
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    return got


# The released values and a different value for each field.
CHANGES = {
    "rope_theta": 50000.0,
    "compress_rope_theta": 40000.0,
    "rope_factor": 4.0,
    "original_seq_len": 4096,
    "beta_fast": 8.0,
}
USED_BY = {"swa": {"rope_theta"},
           "compressed": {"compress_rope_theta", "rope_factor", "original_seq_len", "beta_fast"}}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_each_layer_kind_uses_its_own_table(field):
    # A layer answers for itself only while its input is the same in both models: layer 0
    # (the embedding), and the layers after it while no earlier layer used the field. So each
    # kind goes first once: SWA, CSA (then HCA), HCA.
    for ratios, kinds in (((0, 4, 16, 4, 0), ["swa"]),
                          ((4, 16, 0, 4, 0), ["compressed", "compressed"]),
                          ((16, 4, 0, 4, 0), ["compressed"])):
        base = _outputs_cached(ratios, ())
        other = _outputs_cached(ratios, ((field, CHANGES[field]),))
        for i, kind in enumerate(kinds):       # layers whose input is the same in both models
            used = field in USED_BY[kind]
            same = torch.equal(base[i], other[i])
            assert same != used, (ratios, i, kind, field, (base[i] - other[i]).abs().max())


def _yarn_table(rope_dim, theta, original, factor, beta_fast, beta_slow):
    """architecture.md §3.4 / official precompute_freqs_cis, in float64."""
    f = [theta ** (-2 * i / rope_dim) for i in range(rope_dim // 2)]
    if original <= 0:
        return f

    def corr(rot):
        return rope_dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(theta))
    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i, fi in enumerate(f):
        rho = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(fi / factor * rho + fi * (1 - rho))
    return out


def test_layer_tables_are_the_formula():
    """Flash's numbers: SWA layers (and the MTP layer) plain theta 10000; CSA/HCA layers
    theta 160000 with YaRN factor 16 over 65536, betas 32/1 (low 15, high 25)."""
    cfg = dsv4.ModelConfig.tiny(rope_head_dim=64, compress_ratios=(0, 4, 16, 4, 0))
    torch.manual_seed(0)
    model = dsv4.Model(cfg)
    plain = torch.tensor(_yarn_table(64, 10000.0, 0, 1, 1, 1), dtype=torch.float64)
    yarn = torch.tensor(_yarn_table(64, 160000.0, 65536, 16.0, 32.0, 1.0), dtype=torch.float64)
    assert torch.allclose(yarn[:16], torch.tensor(_yarn_table(64, 160000.0, 0, 1, 1, 1),
                                                  dtype=torch.float64)[:16])
    blocks = list(model.layers) + list(model.mtp)
    for i, blk in enumerate(blocks):
        want = plain if cfg.compress_ratios[i] == 0 else yarn
        got = blk.attn.freqs(torch.device("cpu")).double()
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
