"""The block norms (attn_norm, ffn_norm) and the head's final norm take the one-launch
``torch.ops.dsv4.rms_norm`` when the layer may use kernels, and keep the reference when a
gradient is needed (the op has no backward). On the CPU the op runs its registered reference,
so forcing the kernel decision here checks the routing with no GPU: the same logits bit for
bit, one op call per norm; tests/test_model_cuda.py runs the model on the CUDA kernels."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4
import dsv4.layers.norm as norm


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def decisions(monkeypatch):
    """use_kernels as seen from layers/norm.py: records each (ops, reason) and allows the
    kernel exactly when no reason was given (the backend's answer on a verified GPU build)."""
    seen = []

    def decide(x, ops, unsupported=None):
        seen.append((ops, unsupported))
        return unsupported is None

    monkeypatch.setattr(norm, "use_kernels", decide)
    return seen


def _model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()


def test_block_and_head_norms_take_the_rms_norm_op(decisions, monkeypatch):
    m = _model()
    ids = torch.randint(0, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with _OpCount() as count:
            got = m(ids)
        monkeypatch.setattr(norm, "use_kernels", lambda x, ops, unsupported=None: False)
        want = m(ids)
    n = m.config.n_layers
    assert count.calls["dsv4.rms_norm"] == 2 * n + 1      # attn_norm, ffn_norm per layer, norm
    assert decisions == [(("rms_norm",), None)] * (2 * n + 1)
    assert torch.equal(got, want)


def test_norms_keep_the_reference_when_gradients_are_needed(decisions):
    """Training: the norms run the reference (autograd reaches their weights), saying why."""
    m = _model().train()
    ids = torch.randint(0, m.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    with _OpCount() as count:
        m(ids).logsumexp(-1).mean().backward()
    assert count.calls["dsv4.rms_norm"] == 0
    assert decisions and all("no backward" in (reason or "") for _, reason in decisions)
    assert m.layers[0].attn_norm.weight.grad is not None and m.norm.weight.grad is not None


def test_kernel_serves_only_fp32_weights(decisions):
    n = norm.RMSNorm(8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert n.kernel_serves(x)
        n.weight.data = n.weight.data.bfloat16()
        assert not n.kernel_serves(x)
    assert "float32 weight" in decisions[-1][1]
