"""The MoE layer's two paths and its stacked expert storage (docs/contracts.md §B).

CPU: the reference path equals the official per-expert loop bit for bit; experts are views of
``w_up`` [E, 2, N, K] / ``w_down`` [E, dim, N] with unchanged state_dict names; in-place loads
write through; dtype changes and native FP8/FP4 storage restack.
CUDA: the kernel path (gate → dispatch → grouped GEMMs → combine) against the reference path
with the 2x-bf16 rule, on hash and learned layers, T = 1, sizes that are no multiple of a
tile, skewed routing (every token to one expert), experts with no tokens, weights at the
SwiGLU clamp limits; the tiny model's logits with and without the MoE/mHC kernels.
"""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.layers.linear import Linear
from dsv4.layers.moe import MoE
from dsv4.quant import fp4_pack, fp8_block_quantize

cuda = pytest.mark.cuda


def _cfg(**kw):
    base = dict(vocab_size=64, dim=64, moe_inter_dim=32, n_routed_experts=8, n_activated_experts=3)
    base.update(kw)
    return dsv4.ModelConfig.tiny(**base)


def _official_loop(moe: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The official MoE.forward (per-expert index_add_ in expert order, + shared)."""
    shape = x.shape
    x = x.reshape(-1, moe.dim)
    weights, indices = moe.gate(x, ids.reshape(-1))
    y = torch.zeros_like(x, dtype=torch.float32)
    for e in range(len(moe.experts)):
        tok, slot = torch.where(indices == e)
        if tok.numel():
            y.index_add_(0, tok, moe.experts[e](x[tok], weights[tok, slot, None]).float())
    y = y + moe.shared_experts(x).float()
    return y.to(x.dtype).view(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hash_layer", [True, False])
def test_reference_path_equals_official_loop_bitwise(dtype, hash_layer):
    """fp32: bit for bit. bf16: the reference path forms each expert GEMM as an fp32 product
    rounded once to bf16 (moe_up_reference), the official loop as ``F.linear`` on bf16, whose
    CPU kernel sums in its own order on some CPUs (a 2-core AVX-512 Xeon without bf16 units,
    torch 2.14.1: one element of 896 one bf16 step apart); so bf16 asks for equality on all
    but a few elements and 2 bf16 steps on those. A wrong expert, weight or order changes
    most elements by far more."""
    torch.manual_seed(0)
    cfg = _cfg()
    moe = MoE(cfg, 0 if hash_layer else cfg.n_hash_layers).to(dtype)
    x = (torch.randn(2, 7, cfg.dim) * 4).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        got, want = moe(x, ids), _official_loop(moe, x, ids)
    if dtype == torch.float32:
        assert torch.equal(got, want)
        return
    differ = got != want
    assert differ.float().mean().item() <= 0.01, f"{int(differ.sum())} of {got.numel()} differ"
    step = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp_min(2 ** -100))) - 7)
    assert ((got.float() - want.float()).abs() <= 2 * step).all()


def test_experts_are_views_of_the_stack_with_official_names():
    torch.manual_seed(1)
    cfg = _cfg()
    moe = MoE(cfg, cfg.n_hash_layers)
    st = moe.stacked_weights()
    E, N, K = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
    assert st.fmt is None and st.w_up.shape == (E, 2, N, K) and st.w_down.shape == (E, K, N)
    for e, ex in enumerate(moe.experts):
        assert ex.w1.weight.data_ptr() == st.w_up[e, 0].data_ptr()
        assert ex.w3.weight.data_ptr() == st.w_up[e, 1].data_ptr()
        assert ex.w2.weight.data_ptr() == st.w_down[e].data_ptr()
        assert isinstance(ex.w1.weight, torch.nn.Parameter)
    keys = set(moe.state_dict())
    assert {f"experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w2", "w3")} <= keys
    assert not any("w_up" in k or "w_down" in k for k in keys)
    # an in-place load writes through to the stack
    sd = {k: torch.randn_like(v) if "experts." in k else v for k, v in moe.state_dict().items()}
    moe.load_state_dict(sd)
    assert moe.stacked_weights() is st
    assert torch.equal(st.w_up[3, 1], sd["experts.3.w3.weight"])
    assert torch.equal(st.w_down[7], sd["experts.7.w2.weight"])


def test_dtype_change_restacks_and_keeps_one_copy():
    torch.manual_seed(2)
    cfg = _cfg()
    model = dsv4.Model(cfg)
    moe = model.layers[0].ffn
    old = moe.stacked_weights().w_up
    model.to(torch.bfloat16)                        # p.data = p.data.to(...) per parameter
    assert moe.experts[0].w1.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, cfg.dim).to(torch.bfloat16)
    with torch.no_grad():
        y = moe(x, torch.zeros(1, 3, dtype=torch.long))
    st = moe.stacked_weights()
    assert st.w_up.dtype == torch.bfloat16 and st.w_up.data_ptr() != old.data_ptr()
    assert moe.experts[5].w3.weight.data_ptr() == st.w_up[5, 1].data_ptr()
    with torch.no_grad():
        assert torch.equal(y, _official_loop(moe, x, torch.zeros(1, 3, dtype=torch.long)))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_native_experts_stack_their_bytes(fmt):
    torch.manual_seed(3)
    cfg = _cfg(dim=128, moe_inter_dim=64)
    moe = MoE(cfg, cfg.n_hash_layers)
    dense = MoE(cfg, cfg.n_hash_layers)
    dense.load_state_dict(moe.state_dict())
    for ex, dx in zip(moe.experts, dense.experts):
        for name in ("w1", "w3", "w2"):
            lin: Linear = getattr(ex, name)
            q, s = (fp8_block_quantize if fmt == "fp8" else fp4_pack)(lin.weight.detach())
            lin.set_quantized(q, s, fmt, torch.float32)
            with torch.no_grad():
                getattr(dx, name).weight.copy_(lin.weight)     # its exact dequantisation
    st = moe.restack()
    assert st is not None and st.fmt == fmt
    E, N, K = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
    if fmt == "fp4":
        assert st.w_up.shape == (E, 2, N, K // 2) and st.w_up_scale.shape == (E, 2, N, K // 32)
        assert st.w_down.shape == (E, K, N // 2) and st.w_down_scale.shape == (E, K, N // 32)
    else:
        assert st.w_up.shape == (E, 2, N, K) and st.w_up_scale.shape == (E, 2, 1, 1)
        assert st.w_down.dtype == torch.float8_e4m3fn and st.w_down_scale.shape == (E, 1, 1)
    assert moe.experts[4].w3.qweight.data_ptr() == st.w_up[4, 1].data_ptr()
    x = torch.randn(5, cfg.dim)
    ids = torch.zeros(5, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, ids), dense(x, ids), atol=1e-5, rtol=1e-5)
    # state_dict keeps the release names: weight (packed bytes) + scale
    sd = moe.state_dict()
    assert sd["experts.2.w1.weight"].dtype == (torch.int8 if fmt == "fp4" else torch.float8_e4m3fn)
    assert "experts.2.w1.scale" in sd


def test_mixed_formats_do_not_stack():
    torch.manual_seed(4)
    cfg = _cfg(dim=128, moe_inter_dim=64)
    moe = MoE(cfg, cfg.n_hash_layers)
    lin = moe.experts[2].w1
    q, s = fp8_block_quantize(lin.weight.detach())
    lin.set_quantized(q, s, "fp8", torch.float32)
    assert moe.restack() is None
    with torch.no_grad():                             # the reference still runs
        moe(torch.randn(3, cfg.dim), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# CUDA: kernel path vs reference path
# ---------------------------------------------------------------------------------------------
def _cuda_moe(hash_layer, seed, **kw):
    """A bf16 MoE on the GPU with the gate bias kept in fp32 (as Model.to does)."""
    torch.manual_seed(seed)
    cfg = _cfg(**kw)
    moe = MoE(cfg, 0 if hash_layer else cfg.n_hash_layers).to("cuda", torch.bfloat16)
    if moe.gate.bias is not None:
        moe.gate.bias.data = moe.gate.bias.data.float()
    return cfg, moe


class _CountingOps:
    """Stands in for torch.ops.dsv4 in a layer module and counts the ops it runs."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        op = getattr(torch.ops.dsv4, name)

        def run(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return op(*args, **kwargs)
        return run


def _both_paths(moe, x, ids, gemm=None):
    """(kernel path, bf16 reference path) of ``moe`` on ``x``; ``gemm``: DSV4_MOE_GEMM for the
    kernel path (None: the layer's rule). Checks that the kernel path ran the ops it should:
    moe_up / moe_down, or torch._grouped_mm around moe_swiglu (bf16 experts at prefill size)."""
    import os

    before = os.environ.pop("DSV4_MOE_GEMM", None)
    if gemm is not None:
        os.environ["DSV4_MOE_GEMM"] = gemm
    try:
        return _both_paths_now(moe, x, ids)
    finally:
        os.environ.pop("DSV4_MOE_GEMM", None)
        if before is not None:
            os.environ["DSV4_MOE_GEMM"] = before


def _both_paths_now(moe, x, ids):
    import dsv4.layers.moe as moe_mod
    from dsv4.layers.moe import (_grouped_kernels_available, _prefer_grouped_mm,
                                 _swiglu_kernel_available)

    with torch.no_grad():
        dsv4.set_backend("reference")
        try:
            ref16 = moe(x, ids)
        finally:
            dsv4.set_backend("cuda")
        spy = _CountingOps()
        real, moe_mod._dsv4 = moe_mod._dsv4, spy
        try:
            got = moe(x, ids)
        finally:
            moe_mod._dsv4 = real
    want = {"moe_gate", "moe_dispatch", "moe_combine"}
    pairs = x.numel() // moe.dim * moe.gate.topk
    if _grouped_kernels_available() and not _prefer_grouped_mm(moe.stacked_weights(), pairs):
        want |= {"moe_up", "moe_down"}
    elif _swiglu_kernel_available():
        want |= {"moe_swiglu"}
        assert "moe_up" not in spy.calls, spy.calls
    assert want <= set(spy.calls), f"the kernel path did not run: {spy.calls}"
    return got, ref16


def _fp32_reference(moe, x, ids):
    """The reference path in fp32 on a float copy of the layer (same routing inputs)."""
    import copy
    m32 = copy.deepcopy(moe).float()
    with torch.no_grad():
        dsv4.set_backend("reference")
        try:
            return m32(x.float(), ids)
        finally:
            dsv4.set_backend("cuda")


def _check(moe, x, ids, gemm=None):
    got, ref16 = _both_paths(moe, x, ids, gemm)
    ref32 = _fp32_reference(moe, x, ids)
    err = (got.float() - ref32).abs().max().item()
    err16 = (ref16.float() - ref32).abs().max().item()
    assert torch.isfinite(got).all()
    assert err <= 2 * err16 + 1e-6, f"kernel error {err:.3g} > 2 x bf16 reference error {err16:.3g}"


@cuda
@pytest.mark.parametrize("gemm", ["kernel", "grouped_mm"])
@pytest.mark.parametrize("hash_layer", [True, False])
@pytest.mark.parametrize("T", [1, 7, 64, 131, 1000])
def test_kernel_path_matches_reference(hash_layer, T, gemm):
    """Both expert-GEMM paths (DSV4_MOE_GEMM: moe_up / moe_down, or torch._grouped_mm around
    moe_swiglu) at every size; by default the rule picks the second from 128 pairs per expert."""
    cfg, moe = _cuda_moe(hash_layer, T)
    x = torch.randn(1, T, cfg.dim, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
    _check(moe, x, ids, gemm)


@cuda
def test_prefill_size_takes_grouped_mm_for_bf16_experts():
    """The rule: below 128 pairs per expert on average moe_up / moe_down, from 128 on
    torch._grouped_mm + moe_swiglu (8 experts, top-3: 341 tokens = 1023 pairs < 1024; 342 =
    1026)."""
    from dsv4.layers.moe import (GROUPED_MM_MIN_PAIRS_PER_EXPERT, _prefer_grouped_mm,
                                 _swiglu_kernel_available)

    cfg, moe = _cuda_moe(False, 14)
    st = moe.stacked_weights()
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    if not _swiglu_kernel_available():
        pytest.skip("no compiled moe_swiglu kernel")
    assert GROUPED_MM_MIN_PAIRS_PER_EXPERT * E == 1024 and k == 3
    assert not _prefer_grouped_mm(st, 341 * k) and _prefer_grouped_mm(st, 342 * k)
    for T in (341, 342):
        x = torch.randn(1, T, cfg.dim, device="cuda").to(torch.bfloat16)
        _check(moe, x, torch.zeros(1, T, dtype=torch.long, device="cuda"))


@cuda
def test_kernel_path_skewed_routing_and_idle_experts():
    """A bias that sends every token's first slot to expert 5; most experts get no token."""
    cfg, moe = _cuda_moe(False, 11, n_routed_experts=64, n_activated_experts=2)
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[5] = 100.0
    x = torch.randn(1, 300, cfg.dim, device="cuda").to(torch.bfloat16)
    _check(moe, x, torch.zeros(1, 300, dtype=torch.long, device="cuda"))


@cuda
def test_kernel_path_at_the_swiglu_clamp():
    """Large activations put gate and up outputs beyond ±swiglu_limit (the clamp is active)."""
    cfg, moe = _cuda_moe(False, 12)
    x = (torch.randn(1, 50, cfg.dim, device="cuda") * 40).to(torch.bfloat16)
    with torch.no_grad():
        g = moe.experts[0].w1(x[0])
    assert g.float().abs().max() > 2 * cfg.swiglu_limit
    _check(moe, x, torch.zeros(1, 50, dtype=torch.long, device="cuda"))


@cuda
@pytest.mark.parametrize("gemm", ["kernel", "grouped_mm"])
def test_kernel_path_is_deterministic_and_graph_capturable(monkeypatch, gemm):
    monkeypatch.setenv("DSV4_MOE_GEMM", gemm)
    cfg, moe = _cuda_moe(False, 13)
    x = torch.randn(4, 16, cfg.dim, device="cuda").to(torch.bfloat16)
    ids = torch.zeros(4, 16, dtype=torch.long, device="cuda")
    with torch.no_grad():
        a, b = moe(x, ids), moe(x, ids)
        assert torch.equal(a, b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            moe(x, ids)                              # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe(x, ids)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, a)


@cuda
def test_tiny_model_logits_with_moe_and_mhc_kernels():
    """The tiny model (hash and learned MoE layers, every mHC site, MTP) on the cuda backend
    against its fp32 reference, with the 2x-bf16 rule on the logits."""
    import dsv4.layers.mhc as mhc_mod
    import dsv4.layers.moe as moe_mod

    torch.manual_seed(0)
    cfg = dsv4.ModelConfig.tiny()
    model32 = dsv4.Model(cfg).to("cuda")
    model16 = dsv4.Model(cfg)
    model16.load_state_dict(model32.state_dict())
    model16 = model16.to("cuda", torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        dsv4.set_backend("reference")
        try:
            ref32 = model32(ids)
            ref16 = model16(ids)
        finally:
            dsv4.set_backend("cuda")
        spy_moe, spy_mhc = _CountingOps(), _CountingOps()
        real_moe, real_mhc = moe_mod._dsv4, mhc_mod._dsv4
        moe_mod._dsv4, mhc_mod._dsv4 = spy_moe, spy_mhc
        try:
            got = model16(ids)
        finally:
            moe_mod._dsv4, mhc_mod._dsv4 = real_moe, real_mhc
    n_moe = cfg.n_layers       # forward() runs the main layers (MTP only in forward_mtp)
    assert spy_moe.calls.get("moe_combine") == n_moe, spy_moe.calls
    assert spy_mhc.calls.get("mhc_pre") == 2 * n_moe and spy_mhc.calls.get("mhc_head") == 1
    err = (got - ref32).abs().max().item()
    err16 = (ref16 - ref32).abs().max().item()
    assert err <= 2 * err16, f"logits: kernel error {err:.3g} > 2 x bf16 error {err16:.3g}"


def test_reference_path_trains_the_expert_parameters():
    """With gradients the reference goes through the experts' Linear layers, so every routed
    expert that received a token gets a gradient (the stack itself is plain storage)."""
    torch.manual_seed(5)
    cfg = _cfg()
    moe = MoE(cfg, cfg.n_hash_layers)
    x = torch.randn(2, 9, cfg.dim, requires_grad=True)
    y = moe(x, torch.zeros(2, 9, dtype=torch.long))
    y.square().sum().backward()
    _, idx = moe.gate(x.detach().reshape(-1, cfg.dim), torch.zeros(18, dtype=torch.long))
    for e in idx.unique().tolist():
        for name in ("w1", "w2", "w3"):
            g = getattr(moe.experts[e], name).weight.grad
            assert g is not None and g.abs().sum() > 0
    assert moe.gate.weight.grad is not None and x.grad is not None
    with torch.no_grad():                            # same values as the stacked path
        torch.testing.assert_close(y, moe(x, torch.zeros(2, 9, dtype=torch.long)))


@cuda
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_kernel_path_native_experts_against_exact_dequantisation(fmt):
    """Native FP8 / FP4 experts (stacked bytes + scales) on the kernel path against the same
    layer holding their exact bf16 dequantisation, both judged against its fp32 reference."""
    cfg, moe = _cuda_moe(False, 21, dim=128, moe_inter_dim=128)
    with torch.no_grad():
        for ex in moe.experts:
            for name in ("w1", "w3", "w2"):
                lin = getattr(ex, name)
                q, s = (fp8_block_quantize if fmt == "fp8" else fp4_pack)(lin.weight.float())
                lin.set_quantized(q, s, fmt, torch.bfloat16)
    assert moe.restack().fmt == fmt
    import copy
    dense = copy.deepcopy(moe)
    for ex in dense.experts:                         # the exact dequantisation, as parameters
        for name in ("w1", "w3", "w2"):
            lin = getattr(ex, name)
            w = lin.dequantized_weight(torch.bfloat16)
            for buf in ("qweight", "scale"):
                lin._buffers.pop(buf)
            lin.weight_format = None
            lin.weight = torch.nn.Parameter(w)
    dense.restack()
    x = torch.randn(1, 77, cfg.dim, device="cuda").to(torch.bfloat16)
    ids = torch.zeros(1, 77, dtype=torch.long, device="cuda")
    got, _ = _both_paths(moe, x, ids)
    ref32 = _fp32_reference(dense, x, ids)
    with torch.no_grad():
        dsv4.set_backend("reference")
        try:
            ref16 = dense(x, ids)
        finally:
            dsv4.set_backend("cuda")
    err = (got.float() - ref32).abs().max().item()
    err16 = (ref16.float() - ref32).abs().max().item()
    assert err <= 2 * err16 + 1e-6, f"{fmt}: kernel error {err:.3g} > 2 x bf16 error {err16:.3g}"


def test_deepcopy_holds_the_experts_once():
    """copy.deepcopy of a MoE: the copy's experts view the copy's own stack (held once, not a
    stack plus separate expert tensors), nothing is shared with the original, and the copy
    computes what the original does."""
    import copy as _copy

    torch.manual_seed(3)
    cfg = dsv4.ModelConfig.tiny(quant_sim=False)
    moe = MoE(cfg, cfg.n_hash_layers).eval()
    dup = _copy.deepcopy(moe)
    assert dup._stack is not None and dup._stack_current()
    assert dup._stack.w_up.data_ptr() != moe._stack.w_up.data_ptr()
    base = dup._stack.w_up.untyped_storage().data_ptr()
    for ex in dup.experts:
        assert ex.w1.weight.untyped_storage().data_ptr() == base
    x = torch.randn(7, cfg.dim)
    ids = torch.randint(0, cfg.vocab_size, (7,))
    with torch.no_grad():
        assert torch.equal(dup(x, ids), moe(x, ids))


# --------------------------------------------------------------------------- shared expert
def test_adjacent_halves_only_for_the_two_halves_of_one_buffer():
    """The shared expert's w1 / w3 outputs are taken as one [N, 2I] tensor only when they are
    the two column halves of one contiguous buffer, in that order (the fused GEMM's output)."""
    from dsv4.layers.moe import _adjacent_halves
    buf = torch.randn(5, 16).bfloat16()
    g, u = buf[:, :8], buf[:, 8:]
    gu = _adjacent_halves(g, u)
    assert gu is not None and gu.data_ptr() == buf.data_ptr() and torch.equal(gu, buf)
    assert _adjacent_halves(u, g) is None                       # wrong order
    assert _adjacent_halves(g, g) is None
    assert _adjacent_halves(g.contiguous(), u.contiguous()) is None   # two buffers
    assert _adjacent_halves(buf[:, :4], buf[:, 4:8]) is None    # not the whole row
    f = buf.float()
    assert _adjacent_halves(f[:, :8], f[:, 8:]) is None         # fp32
    assert _adjacent_halves(buf[1:, :8], buf[:-1, 8:]) is None  # rows shifted


@cuda
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_shared_expert_fused_swiglu_equals_the_elementwise_path(rows, monkeypatch):
    """Fused w1 / w3 on CUDA: one moe_swiglu launch (routing weight 1) gives the bits of
    swiglu_clamped's elementwise path; values at and beyond the clamp limit included. The
    reference backend and unfused outputs take the formula (no kernel call)."""
    from dsv4.layers import moe as moe_mod
    torch.manual_seed(1)
    m = MoE(_cfg(dim=256, moe_inter_dim=128, swiglu_limit=7.0), 5).cuda().bfloat16()
    m.fuse_projections()
    assert m.projection_group("shared") is not None
    x = torch.randn(rows, 256, device="cuda").bfloat16() * 4
    calls = []

    class CountingOps:            # torch.ops.dsv4, counting moe_swiglu calls
        def moe_swiglu(self, *args):
            calls.append(args)
            return torch.ops.dsv4.moe_swiglu(*args)

        def __getattr__(self, name):
            return getattr(torch.ops.dsv4, name)

    monkeypatch.setattr(moe_mod, "_dsv4", CountingOps())
    with torch.no_grad():
        fused = m.shared_expert(x)
    assert calls, "the shared expert did not take moe_swiglu"
    calls.clear()
    dsv4.set_backend("reference")             # the formula, no kernel
    try:
        with torch.no_grad():
            ref = m.shared_expert(x)
    finally:
        dsv4.set_backend("cuda")
    assert not calls and torch.equal(fused, ref)
    monkeypatch.setattr(moe_mod, "_adjacent_halves", lambda g, u: None)
    with torch.no_grad():
        plain = m.shared_expert(x)
    assert not calls and torch.equal(fused, plain)
