"""The reference model on a CUDA device gives the CPU's logits (runs on the GPU machine)."""

from __future__ import annotations

import os

import pytest
import torch

import dsv4

pytestmark = pytest.mark.cuda
TESTDATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "testdata")


def test_tiny_model_cuda_matches_cpu():
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()
    ids = torch.randint(0, 129280, (2, 150))
    with torch.no_grad():
        ref = m(ids)
        m.to("cuda")
        cache = m.make_cache(2)
        out = torch.cat([m(ids[:, :100].cuda(), cache=cache)] +
                        [m(ids[:, p:p + 1].cuda(), cache=cache) for p in range(100, 150)], 1)
    err = ((out.cpu() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, err     # TF32 is off by default for fp32 matmuls in torch


def test_tiny_model_cuda_bf16_generates():
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny()).eval().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 129280, (1, 40), device="cuda")
    with torch.no_grad():
        out = m(ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="golden cases not found")
def test_golden_on_cuda():
    from safetensors.torch import load_file
    d = os.path.join(TESTDATA, "golden_quant")
    g = load_file(os.path.join(d, "golden.safetensors"))
    m = dsv4.Model.from_pretrained(d, device="cuda", dtype=torch.float32, quant_sim=False)
    with torch.no_grad():
        out = m(g["input_ids"].cuda()).cpu()
    ref = g["logits_exact"]
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, err


@pytest.mark.parametrize("quant_sim", [False, True])
def test_tiny_model_cuda_backend_matches_reference_backend(quant_sim):
    """The whole tiny model in bf16 on the CUDA kernels vs the reference backend: prefill of a
    mixed-length batch, then decode; logits close and the same greedy tokens."""
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=quant_sim)).eval().to("cuda", torch.bfloat16)
    assert set(dsv4.info()["cuda_usable_ops"]) >= {"sparse_attn", "indexer_topk", "compress_kv"}
    ids = torch.randint(0, 129280, (3, 200), device="cuda")
    lens = torch.tensor([200, 77, 5])

    def run(backend):
        dsv4.set_backend(backend)
        cache = m.make_cache(3)
        with torch.no_grad():
            first = m(ids, cache=cache, seq_lens=lens)
            last = first[torch.arange(3), lens - 1]
            toks, logits = [], [last]
            for _ in range(24):
                nxt = logits[-1].argmax(-1)
                toks.append(nxt)
                logits.append(m(nxt[:, None], cache=cache)[:, 0])
        return first, torch.stack(toks, 1), torch.stack(logits, 1)

    old = dsv4.get_backend()
    try:
        f_ref, t_ref, l_ref = run("reference")
        f_cu, t_cu, l_cu = run("cuda")
    finally:
        dsv4.set_backend(old)
    valid = torch.arange(200, device="cuda")[None, :] < lens.cuda()[:, None]
    scale = f_ref[valid].abs().max()
    assert ((f_cu - f_ref)[valid].abs().max() / scale).item() < 3e-2
    assert torch.equal(t_cu, t_ref), (t_cu, t_ref)
    assert ((l_cu - l_ref).abs().max() / l_ref.abs().max()).item() < 3e-2


def test_generate_on_cuda_uses_kernels(monkeypatch):
    """dsv4's attention layers call the CUDA ops on a bf16 CUDA model (backend 'cuda')."""
    import dsv4.layers.attention as attention
    called = []
    real = torch.ops.dsv4

    class Spy:
        def sparse_attn(self, *a, **k):
            called.append(a[0].device)
            return real.sparse_attn(*a, **k)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(attention, "_dsv4", Spy())
    dsv4.set_backend("cuda")
    m = dsv4.Model(dsv4.ModelConfig.tiny()).eval().to("cuda", torch.bfloat16)
    with torch.no_grad():
        m(torch.randint(0, 129280, (1, 20), device="cuda"))
    assert called and all(d.type == "cuda" for d in called)
