"""The reference path is differentiable end to end: torch.autograd.gradcheck in float64 of each
block (mHC with Sinkhorn, compressor gated pooling, clamped SwiGLU, attention with sink, every
attention type inside a Block, the MTP block), and the documented gradient-free parts."""

import pytest
import torch
from torch.func import functional_call

import dsv4
from dsv4.cache import CompressorState
from dsv4.layers.compressor import Compressor
from dsv4.layers.mhc import hc_head, hc_post, hc_pre, sinkhorn
from dsv4.layers.moe import Expert, swiglu_clamped
from dsv4.layers.rope import rope_frequencies
from dsv4.ops.attention import sparse_attn_reference
from dsv4.train import model_losses

from ._float64 import Float64

F64 = torch.float64


def micro_config(**kw):
    """Every layer type at toy size, exact arithmetic (no quantisation simulation)."""
    base = dict(vocab_size=64, dim=16, moe_inter_dim=8, n_layers=3, n_hash_layers=1,
                n_mtp_layers=1, n_heads=2, n_routed_experts=4, n_activated_experts=2,
                q_lora_rank=8, head_dim=16, rope_head_dim=8, o_groups=1, o_lora_rank=8,
                window_size=4, compress_ratios=(0, 4, 8, 0), index_n_heads=2, index_head_dim=8,
                index_topk=2, quant_sim=False)
    base.update(kw)
    return dsv4.ModelConfig.tiny(**base)


def flat_params(module, names):
    """All ``names`` parameters of ``module`` as one flat float64 leaf, and the function that
    turns it back into a {name: tensor} dict (one gradcheck input instead of dozens)."""
    ps = dict(module.named_parameters())
    shapes = [ps[k].shape for k in names]
    flat = torch.cat([ps[k].detach().reshape(-1) for k in names]).requires_grad_()

    def unflat(v):
        out, i = {}, 0
        for k, sh in zip(names, shapes):
            n = sh.numel()
            out[k] = v[i:i + n].view(sh)
            i += n
        return out

    return flat, unflat


def gradcheck(fn, inputs):
    with Float64():
        return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=True)


def test_float64_mode_reaches_the_layer_code():
    # Sanity of the harness: inside Float64 the fp32 upcasts of the layers stay float64.
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    with Float64():
        assert sinkhorn(x, 20, 1e-6).dtype == F64
        assert swiglu_clamped(x, x, 10.0).dtype == F64
    assert sinkhorn(x, 20, 1e-6).dtype == torch.float32


def test_sinkhorn():
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 4, dtype=F64) * 3).requires_grad_()
    assert gradcheck(lambda l: sinkhorn(l, 20, 1e-6), (logits,))


def test_mhc_pre_post_head():
    torch.manual_seed(0)
    hc, d = 4, 5
    x = torch.randn(2, 3, hc, d, dtype=F64, requires_grad=True)
    fn = (torch.randn(24, hc * d, dtype=F64) * 0.3).requires_grad_()
    scale = torch.tensor([0.7, 0.4, 1.3], dtype=F64, requires_grad=True)
    base = (torch.randn(24, dtype=F64) * 0.5).requires_grad_()
    f = torch.randn(2, 3, d, dtype=F64, requires_grad=True)

    def site(x, fn, scale, base, f):
        u, post, comb = hc_pre(x, fn, scale, base, 1e-6, 20, 1e-6)
        return u, hc_post(f * u, x, post, comb)     # F(u) = f ⊙ u keeps u in the graph

    assert gradcheck(site, (x, fn, scale, base, f))
    hfn = (torch.randn(hc, hc * d, dtype=F64) * 0.3).requires_grad_()
    hscale = torch.tensor([0.5], dtype=F64, requires_grad=True)
    hbase = torch.randn(hc, dtype=F64, requires_grad=True)
    assert gradcheck(lambda x, a, b, c: hc_head(x, a, b, c, 1e-6, 1e-6), (x, hfn, hscale, hbase))


@pytest.mark.parametrize("ratio,n,start", [(4, 13, 0), (8, 19, 0), (4, 6, 3)])
def test_compressor_gated_pooling(ratio, n, start):
    torch.manual_seed(0)
    cfg = micro_config()
    comp = Compressor(cfg, ratio, cfg.head_dim).double()
    freqs = rope_frequencies(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.original_seq_len,
                             cfg.rope_factor, cfg.beta_fast, cfg.beta_slow)
    flat, unflat = flat_params(comp, [k for k, _ in comp.named_parameters()])
    x = torch.randn(n, cfg.dim, dtype=F64, requires_grad=True)
    prefix = torch.randn(start, cfg.dim, dtype=F64)

    def entries(x, flat):
        state = CompressorState(1, ratio, cfg.head_dim, F64, torch.device("cpu"))
        mod = unflat(flat)
        if start:                       # a partial block held in the state from before
            functional_call(comp, mod, (prefix, state, 0, 0, freqs))
        k = functional_call(comp, mod, (x, state, 0, start, freqs))
        return state.entries[0, :k], state.kv, state.score.clamp_min(-1e30)

    assert entries(x, flat)[0].shape[0] == (start + n) // ratio >= 1
    assert gradcheck(entries, (x, flat))


def test_clamped_swiglu_and_expert():
    torch.manual_seed(0)
    # Values on both sides of the clamp (limit 10), none within 1e-3 of it.
    gate = torch.tensor([-15.0, -12.0, -3.0, 0.5, 5.0, 9.0, 11.0, 14.0], dtype=F64)
    up = torch.tensor([13.0, -14.0, 2.0, -11.0, 0.5, 9.5, -3.0, 10.5], dtype=F64)
    gate, up = gate.requires_grad_(), up.requires_grad_()
    assert gradcheck(lambda g, u: swiglu_clamped(g, u, 10.0), (gate, up))
    g = torch.autograd.grad(swiglu_clamped(gate, up, 10.0).sum(), (gate, up))
    assert torch.all(g[0][gate > 10] == 0) and torch.all(g[1][up.abs() > 10] == 0)
    assert torch.all(g[0][gate < 10] != 0) and torch.all(g[1][up.abs() < 10] != 0)
    ex = Expert(6, 5, 10.0).double()
    names = [k for k, _ in ex.named_parameters()]
    ps = tuple((p.detach() * 8).requires_grad_() for _, p in ex.named_parameters())
    x = torch.randn(7, 6, dtype=F64, requires_grad=True)
    w = torch.rand(7, 1, dtype=F64, requires_grad=True)
    out = functional_call(ex, dict(zip(names, ps)), (x, w))
    assert out.abs().max() > 0
    assert gradcheck(lambda x, w, *ps: functional_call(ex, dict(zip(names, ps)), (x, w)),
                     (x, w, *ps))


def test_sparse_attention_with_sink():
    torch.manual_seed(0)
    T, H, D, N = 5, 3, 8, 9
    q = torch.randn(T, H, D, dtype=F64, requires_grad=True)
    kv = torch.randn(N, D, dtype=F64, requires_grad=True)
    sink = torch.randn(H, dtype=F64, requires_grad=True)
    idx = torch.randint(0, N, (T, 6))
    idx[0, :3] = -1
    idx[1, 2] = -1
    extra = torch.randn(4, D, dtype=F64, requires_grad=True)
    eidx = torch.tensor([[0, 1], [2, -1], [3, 3], [-1, -1], [1, 0]])
    assert gradcheck(lambda q, kv, s, e: sparse_attn_reference(q, kv, idx, s, D ** -0.5, None, e,
                                                               eidx)[0], (q, kv, sink, extra))


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = dsv4.Model(micro_config(**kw)).double()
    return m


@pytest.mark.parametrize("layer", [0, 1, 2])      # SWA (hash MoE), CSA, HCA (learned MoE)
def test_block_each_attention_type(layer):
    model = _model()
    blk = model.layers[layer]
    B, S = 2, 12
    ids = torch.randint(0, 64, (B, S))
    names = [k for k, p in blk.named_parameters() if "gate.bias" not in k]
    flat, unflat = flat_params(blk, names)
    x = torch.randn(B, S, model.config.hc_mult, model.config.dim, dtype=F64, requires_grad=True)

    def run(x, flat):
        cache = model.make_cache(B)
        batch = model._step_batch([0] * B, [S] * B, "all")  # the step every layer receives
        out = functional_call(blk, unflat(flat), (x.flatten(0, 1), ids.reshape(-1),
                                                  cache.layers[layer], batch))
        return out.view_as(x)

    assert gradcheck(run, (x, flat))


def test_mtp_block():
    model = _model(1)
    B, S = 2, 10
    ids = torch.randint(0, 64, (B, S))
    blk = model.mtp[0]
    names = [k for k, p in blk.named_parameters() if "gate.bias" not in k]
    flat, unflat = flat_params(blk, names)
    hidden = torch.randn(B, S, 4, model.config.dim, dtype=F64, requires_grad=True)

    class MTP(torch.nn.Module):               # functional_call runs forward(): route it
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, hidden, ids, cache):
            return self.m.forward_mtp(hidden, ids, cache)

    wrapped = MTP(model)

    def run(hidden, flat):
        params = {f"m.mtp.0.{k}": p for k, p in unflat(flat).items()}
        return functional_call(wrapped, params, (hidden, ids, model.make_cache(B)))

    assert gradcheck(run, (hidden, flat))


def test_training_loss_gradients_reach_every_trained_parameter():
    # fp32, the training loss (main + MTP): every parameter gets a non-zero gradient except the
    # documented ones: the Lightning Indexer (its top-k selection is discrete, so the language
    # model loss gives it no signal) and the router biases (moved by the loss-free rule).
    model = _model(2).float()
    tokens = torch.randint(0, 64, (2, 18))
    main, extra = model_losses(model, tokens)
    (main + 0.3 * extra).backward()
    none = {n for n, p in model.named_parameters() if p.grad is None}
    assert none == {n for n, _ in model.named_parameters()
                    if ".indexer." in n or n.endswith("gate.bias")}
    assert any(".indexer." in n for n in none)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
