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
