"""More cases for the attention layers' kernel path against their reference path (CPU).

tests/test_model_kernel_path.py covers a mixed batch fed in several chunk patterns; these add
the situations a serving loop meets: batch 1 with a prompt long enough that the compressed
stores grow several times and the indexer really selects (entries >> index_topk), decode after
it, a window longer than the prompt, rows reset between calls (new requests in old slots), the
MTP block, a call where every row is idle, and an HCA ratio larger than the prompt of a row.
The kernel path is forced with monkeypatch, so on CPU the ops run their references and what is
checked is the glue (token layout, index arithmetic, capacity growth, ring updates).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import dsv4
import dsv4.layers.attention as attention
from _model_params import vary_constant_parameters

pytest.importorskip("dsv4.ops.compressor")
pytest.importorskip("dsv4.ops.indexer")

V = 129280


def _run(m: dsv4.Model, steps, kernels: bool, monkeypatch) -> torch.Tensor:
    """Feed ``steps`` = [(ids [B, S], lens, rows to reset first or None, run MTP)] through one
    cache; returns every valid logit (main and MTP) flattened, padding zeroed."""
    taken = []

    def choose(x, ops, unsupported=None):
        taken.append(ops)
        return kernels

    monkeypatch.setattr(attention, "use_kernels", choose)
    cache = m.make_cache(steps[0][0].shape[0])
    outs = []
    with torch.no_grad():
        for ids, lens, reset, mtp in steps:
            if reset is not None:
                cache.reset(reset)
            lens_t = torch.tensor(lens)
            mask = (torch.arange(ids.shape[1])[None, :] < lens_t[:, None])[..., None]
            logits, hidden = m(ids, cache=cache, seq_lens=lens_t, return_hidden=True)
            outs.append((logits * mask).flatten())
            if mtp:
                outs.append((m.forward_mtp(hidden, ids, cache, seq_lens=lens_t) * mask).flatten())
    assert taken, "no attention layer ran"
    return torch.cat(outs)


def _steps(seed: int, plan):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (len(lens), s), generator=g), lens, reset, mtp)
            for s, lens, reset, mtp in plan]


CASES = {
    # 150 tokens: 37 CSA entries against index_topk 8, stores grow 0 -> 37 -> 38 ... in decode.
    "batch1_long_prompt_then_decode": ({}, [(150, [150], None, False)]
                                       + [(1, [1], None, False)] * 6),
    "window_longer_than_prompt": ({"window_size": 64},
                                  [(20, [20, 7], None, False), (3, [3, 3], None, False)]),
    "rows_reset_between_calls": ({}, [(45, [45, 30, 12], None, False),
                                      (10, [10, 10, 10], [1], False),
                                      (1, [1, 1, 0], [0], False),
                                      (33, [5, 33, 2], None, False)]),
    "mtp_block": ({}, [(30, [30, 11], None, True), (1, [1, 1], None, True)]),
    "idle_call_then_prefill": ({}, [(5, [0, 0], None, False), (25, [25, 3], None, False)]),
    "index_topk_larger_than_entries": ({"index_topk": 64},
                                       [(90, [90, 66], None, False), (2, [2, 1], None, False)]),
    "hca_ratio_above_row_prompt": ({"compress_ratios": (0, 4, 128, 4, 0)},
                                   [(140, [140, 100], None, False),
                                    (130, [120, 130], None, False)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_path_matches_reference_more(name, monkeypatch):
    overrides, plan = CASES[name]
    torch.manual_seed(0)
    m = vary_constant_parameters(dsv4.Model(dsv4.ModelConfig.tiny(**overrides)).eval())
    steps = _steps(zlib.crc32(name.encode()), plan)
    got = _run(m, steps, True, monkeypatch)
    ref = _run(m, steps, False, monkeypatch)
    assert got.shape == ref.shape and ref.abs().max() > 0
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err
