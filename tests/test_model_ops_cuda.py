"""sparse_attn, compress_kv and indexer_topk on CUDA, called by the tiny model with the inputs the
model really produces (mixed-length prefill, decode, ring buffers, growing compressed stores),
agree with their references on the same inputs. This pins down which of them differs when the
cuda and reference backends diverge.

The other ops the model calls (hca_attn, q/kv_norm_rope, paged_rows, grouped_oproj, rms_norm, the
MoE and mHC ops) pass through the spy unchecked: tests/ops checks each against its reference on
random inputs, and test_model_cuda.py the whole model against the fp32 one.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import dsv4
import dsv4.layers.attention as attention
import dsv4.layers.compressor as compressor
import dsv4.layers.indexer as indexer
from dsv4.ops.attention import _sparse_attn_op
from dsv4.ops.compressor import compress_kv_reference
from dsv4.ops.indexer import _indexer_topk_kernel

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


class _Spy:
    """Stands in for torch.ops.dsv4: runs each kernel, then the reference on the same inputs."""

    def __init__(self):
        self.real = torch.ops.dsv4
        self.stats: dict[str, list[float]] = {"sparse_attn": [], "compress_kv_entries": [],
                                              "indexer_topk": []}

    def sparse_attn(self, *args):
        out, lse = self.real.sparse_attn(*args)
        ref, ref_lse = _sparse_attn_op(*args)
        scale = ref.float().abs().max().clamp_min(1e-6)
        self.stats["sparse_attn"].append(((out.float() - ref.float()).abs().max() / scale).item())
        return out, lse

    def compress_kv(self, kv, score, ape, nw, freqs, cu, starts, skv, ssc, entries, *rest):
        c_skv, c_ssc, c_ent = skv.clone(), ssc.clone(), entries.clone()
        self.real.compress_kv(kv, score, ape, nw, freqs, cu, starts, skv, ssc, entries, *rest)
        compress_kv_reference(kv, score, ape, nw, freqs, cu, starts, c_skv, c_ssc, c_ent, *rest)
        scale = c_ent.float().abs().max().clamp_min(1e-6)
        self.stats["compress_kv_entries"].append(
            ((entries.float() - c_ent.float()).abs().max() / scale).item())

    def indexer_topk(self, q, w, keys, rows, n_valid, topk):
        got = self.real.indexer_topk(q, w, keys, rows, n_valid, topk)
        ref = _indexer_topk_kernel(q, w, keys, rows, n_valid, topk)
        # Compare the selections by their total score in fp64 (near-tie swaps cost ~0).
        s = torch.einsum("thd,tnd->thn", q.double(), keys[rows.long()].double()).relu()
        s = (s * w.double()[..., None]).sum(1)                                   # [T, C]

        def total(sel):
            return torch.where(sel >= 0, s.gather(1, sel.long().clamp_min(0)), 0.0).sum(1)

        same_count = torch.equal((got >= 0).sum(1), (ref >= 0).sum(1))
        gap = ((total(ref) - total(got)).abs() / total(ref).abs().clamp_min(1e-6)).max().item()
        self.stats["indexer_topk"].append(gap if same_count else float("inf"))
        return got

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("quant_sim", [False, True])
def test_ops_inside_the_model_match_their_references(monkeypatch, quant_sim):
    spy = _Spy()
    for module in (attention, compressor, indexer):
        monkeypatch.setattr(module, "_dsv4", spy)
    dsv4.set_backend("cuda")
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=quant_sim)).eval().to(DEVICE, torch.bfloat16)
    ids = torch.randint(0, 129280, (3, 200), device=DEVICE)
    cache = m.make_cache(3)
    with torch.no_grad():
        m(ids, cache=cache, seq_lens=torch.tensor([200, 77, 5]))
        for p in range(6):
            m(ids[:, p:p + 1], cache=cache)
    summary = {k: max(v) if v else None for k, v in spy.stats.items()}
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"model_ops_quant{int(quant_sim)}.json"), "w") as f:
            json.dump({"max": summary, "all": spy.stats}, f, indent=1)
    print(summary)
    assert all(spy.stats.values()), summary
    assert summary["sparse_attn"] < 1e-2, summary
    assert summary["compress_kv_entries"] < 0.1, summary   # a rare FP8/FP4 step flip allowed
    assert summary["indexer_topk"] < 1e-4, summary
