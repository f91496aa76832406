"""Bad inputs to the torch.ops.dsv4 references (CPU) raise clear errors instead of a silently
wrong result: integer q/kv, out/lse buffers of the wrong dtype, a q of the wrong rank given
to indexer_topk (used to be an IndexError from the head-dim check), and unknown config
overrides (used to be dropped without a word)."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.config import ConfigError, ModelConfig

pytest.importorskip("dsv4.ops.attention")
pytest.importorskip("dsv4.ops.indexer")


def _attn_inputs(T=5, H=4, D=64, N=20):
    return (torch.randn(T, H, D), torch.randn(N, D),
            torch.randint(0, N, (T, 8), dtype=torch.int32), torch.randn(H))


@pytest.mark.parametrize("which", ["q", "kv", "extra_kv"])
def test_sparse_attn_rejects_integer_activations(which):
    q, kv, idx, sink = _attn_inputs()
    extra = torch.randn(7, q.shape[2])
    args = {"q": q, "kv": kv, "extra_kv": extra}
    args[which] = args[which].round().to(torch.int32)
    with pytest.raises((ValueError, RuntimeError), match=f"{which} must be a floating-point"):
        torch.ops.dsv4.sparse_attn(args["q"], args["kv"], idx, sink, 0.125, None,
                                   args["extra_kv"], torch.zeros_like(idx), None)


@pytest.mark.parametrize("bad", ["out", "lse"])
def test_sparse_attn_out_rejects_wrong_buffer_dtypes(bad):
    q, kv, idx, sink = _attn_inputs()
    out = torch.empty(q.shape, dtype=torch.int32 if bad == "out" else q.dtype)
    lse = torch.empty(q.shape[:2], dtype=torch.int32 if bad == "lse" else torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="sparse_attn_out: out must have"):
        torch.ops.dsv4.sparse_attn_out(q, kv, idx, sink, 0.125, out=out, lse=lse)
    # the right buffers still work and hold the op's result
    out, lse = torch.empty(q.shape), torch.empty(q.shape[:2])
    torch.ops.dsv4.sparse_attn_out(q, kv, idx, sink, 0.125, out=out, lse=lse)
    ref_out, ref_lse = torch.ops.dsv4.sparse_attn(q, kv, idx, sink, 0.125)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def _indexer_inputs(T=5, H=8, D=64, B=2, C=30):
    return (torch.randn(T, H, D), torch.rand(T, H), torch.randn(B, C, D),
            torch.randint(0, B, (T,), dtype=torch.int32),
            torch.randint(1, C, (T,), dtype=torch.int32))


@pytest.mark.parametrize("op", ["indexer_topk", "indexer_topk_out"])
def test_indexer_topk_wrong_rank_q_names_the_shape(op):
    q, w, keys, rows, nv = _indexer_inputs()
    extra = (torch.empty(q.shape[0], 8, dtype=torch.int32),) if op.endswith("out") else ()
    with pytest.raises((ValueError, RuntimeError), match=r"q must be \[tokens, heads, head_dim\]"):
        getattr(torch.ops.dsv4, op)(q[0], w, keys, rows, nv, 8, *extra)


def test_indexer_topk_rejects_integer_queries():
    q, w, keys, rows, nv = _indexer_inputs()
    with pytest.raises((ValueError, RuntimeError), match="must be floating-point"):
        torch.ops.dsv4.indexer_topk(q.round().to(torch.int32), w, keys, rows, nv, 8)
    got = torch.ops.dsv4.indexer_topk(q, w, keys, rows, nv, 8)
    assert got.dtype == torch.int32 and got.shape == (q.shape[0], 8)
    assert bool(((got >= -1) & (got < nv[:, None])).all())


def test_unknown_config_override_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(
        __import__("json").dumps(ModelConfig.tiny().to_hf_dict()))
    assert ModelConfig.from_json(tmp_path, quant_sim=False).quant_sim is False
    with pytest.raises(ConfigError, match="quantsim"):
        ModelConfig.from_json(tmp_path, quantsim=False)
    with pytest.raises(ConfigError, match="unknown config override"):
        dsv4.Model.from_pretrained(tmp_path, device="cpu", dtype=torch.float32,
                                   progress=False, window_sise=4)
