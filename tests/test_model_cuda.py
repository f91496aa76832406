"""The reference model on a CUDA device gives the CPU's logits (runs on the GPU machine)."""

from __future__ import annotations

import os

import pytest
import torch

import dsv4
from _model_params import vary_constant_parameters

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
def test_tiny_model_cuda_backend_as_accurate_as_reference_backend(quant_sim):
    """The whole tiny model in bf16 on the CUDA kernels is as close to the fp32 model as the bf16
    reference backend is (FlashAttention's rule at model level: error ≤ 2× the reference's).

    A mixed-length prefill, then teacher-forced decode. The two bf16 backends do not give equal
    logits: each op agrees with its reference to bf16 rounding (tests/test_model_ops_cuda.py),
    but the indexer's top-k and the MoE routing are discrete, so a rounding-level difference can
    move a near-tie selection and change a position's logits by a lot; the fp32 model is the
    judge of which backend is closer.
    """
    torch.manual_seed(0)
    m = vary_constant_parameters(dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=quant_sim)).eval())
    m = m.to("cuda")    # (norm weights, sinks, hc scales varied: the kernels' glue must pass them)
    assert set(dsv4.info()["cuda_usable_ops"]) >= {"sparse_attn", "indexer_topk", "compress_kv"}
    ids = torch.randint(0, 129280, (3, 200), device="cuda")
    forced = torch.randint(0, 129280, (3, 16), device="cuda")
    lens = torch.tensor([200, 77, 5])
    valid = torch.arange(200)[None, :] < lens[:, None]

    def run(model):
        cache = model.make_cache(3)
        with torch.no_grad():
            out = [model(ids, cache=cache, seq_lens=lens)[valid.cuda()]]
            out += [model(forced[:, p:p + 1], cache=cache)[:, 0] for p in range(forced.shape[1])]
        return torch.cat(out)

    old = dsv4.get_backend()
    try:
        truth = run(m)                       # fp32: the reference path
        m = m.to(torch.bfloat16)
        dsv4.set_backend("reference")
        ref = run(m)
        dsv4.set_backend("cuda")
        cu = run(m)
    finally:
        dsv4.set_backend(old)
    e_ref = (ref - truth).abs().mean().item()
    e_cu = (cu - truth).abs().mean().item()
    assert e_cu <= 2 * e_ref, (e_cu, e_ref)
    agree_ref = (ref.argmax(-1) == truth.argmax(-1)).float().mean().item()
    agree_cu = (cu.argmax(-1) == truth.argmax(-1)).float().mean().item()
    assert agree_cu >= agree_ref - 0.05, (agree_cu, agree_ref)


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


def test_cuda_backend_greedy_tokens_agree_as_often_as_bf16_agrees_with_fp32():
    """Greedy decoding, teacher-forced on the reference backend's own tokens: the cuda backend
    picks the reference backend's token at least as often (within 5 points) as the bf16
    reference picks the fp32 model's token on the same steps.

    Exact token equality of two bf16 backends is not a property of this random-weight model: its
    top-2 logit gaps are often below the bf16 rounding of the logits (the indexer's top-k and
    the MoE routing turn rounding-level differences into different selections), and the bf16
    reference itself disagrees with the fp32 model's argmax at ~10-20% of positions. The test
    therefore measures the cuda backend against that yardstick.
    """
    torch.manual_seed(0)
    m32 = dsv4.Model(dsv4.ModelConfig.tiny()).eval().to("cuda")
    m16 = dsv4.Model(dsv4.ModelConfig.tiny()).eval()
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to("cuda", torch.bfloat16)
    prompt = torch.randint(0, 129280, (1, 40), device="cuda")
    steps = 96

    def greedy(backend, forced=None):
        dsv4.set_backend(backend)
        cache = m16.make_cache(1)
        with torch.no_grad():
            last = m16(prompt, cache=cache)[0, -1]
            picks = []
            for i in range(steps):
                picks.append(int(last.argmax()))
                nxt = picks[-1] if forced is None else forced[i]
                last = m16(torch.tensor([[nxt]], device="cuda"), cache=cache)[0, -1]
        return picks

    old = dsv4.get_backend()
    try:
        ref = greedy("reference")
        cu = greedy("cuda", forced=ref)
    finally:
        dsv4.set_backend(old)
    with torch.no_grad():
        seq = torch.cat([prompt, torch.tensor([ref[:-1]], device="cuda")], 1)
        truth = m32(seq)[0, prompt.shape[1] - 1:].argmax(-1).tolist()   # fp32 picks, same steps
    agree_cu_ref = sum(a == b for a, b in zip(cu, ref)) / steps
    agree_ref_fp32 = sum(a == b for a, b in zip(ref, truth)) / steps
    first = next((i for i, (a, b) in enumerate(zip(cu, ref)) if a != b), steps)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "greedy_agreement.txt"), "w") as f:
            f.write(f"cuda==reference {agree_cu_ref:.3f}; bf16 reference==fp32 "
                    f"{agree_ref_fp32:.3f}; first difference at step {first} of {steps}\n")
    assert agree_cu_ref >= agree_ref_fp32 - 0.05, (agree_cu_ref, agree_ref_fp32, first)
