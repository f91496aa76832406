"""Model.fuse_projections: each layer's same-input projections as one GEMM over one weight
buffer, the members' weights row-slice views of it (issue 8: fewer small GEMMs per decode step).

The reference of every value here is the same model unfused (separate ``F.linear`` calls on
the same weights), run in the same process; CPU fp32 GEMMs may sum in another order for the
wider output, hence the 1e-6 relative bound (measured: bitwise equal on this CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

import dsv4
import dsv4.layers.attention as attention
from dsv4.layers import linear as linear_mod
from dsv4.layers.linear import Linear

REL = 1e-6


def _model(seed: int = 0, **overrides) -> dsv4.Model:
    torch.manual_seed(seed)
    return dsv4.Model(dsv4.ModelConfig.tiny(**overrides)).eval()


def _ids(m, batch=2, seq=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.config.vocab_size, (batch, seq), generator=g)


def _rel(a, b) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=["reference", "kernels"])
def path(request, monkeypatch):
    """The layers' per-sequence reference path (CPU's default) or, forced, their batched
    kernel path (the ops run their CPU references: the glue the GPU runs)."""
    if request.param == "kernels":
        monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    return request.param



# Expected groups of ModelConfig.tiny (layers: SWA, CSA, HCA, CSA; MTP: SWA): the members
# each layer applies to one input (layers/attention.py, compressor.py, indexer.py, moe.py).
_SWA = {"attn.input": ("wq_a", "wkv"), "ffn.shared": ("shared_experts.w1", "shared_experts.w3")}
_HCA = dict(_SWA, **{"attn.compressor": ("compressor.wkv", "compressor.wgate")})
_CSA = dict(_SWA, **{"attn.input": ("wq_a", "wkv", "indexer.weights_proj"),
                     "attn.compressor": ("compressor.wkv", "compressor.wgate",
                                         "indexer.compressor.wkv", "indexer.compressor.wgate")})


def _expected_groups(m) -> dict:
    out = {}
    for prefix, blocks in (("layers", m.layers), ("mtp", m.mtp)):
        for i, blk in enumerate(blocks):
            kind = {0: _SWA, 4: _CSA}.get(blk.attn.compress_ratio, _HCA)
            out.update({f"{prefix}.{i}.{k}": v for k, v in kind.items()})
    return out


def _views_of_one_buffer(m) -> bool:
    """Every fused group's member weights are row slices of one storage, back to back."""
    for name, members in m.fused_projection_groups().items():
        owner = m.get_submodule(name.rsplit(".", 1)[0])
        ws = [owner.get_submodule(n).weight for n in members]
        ptr = ws[0].untyped_storage().data_ptr()
        row = ws[0].data_ptr()
        for w in ws:
            if w.untyped_storage().data_ptr() != ptr or w.data_ptr() != row:
                return False
            row += w.numel() * w.element_size()
    return True


def test_groups_are_the_same_input_projections():
    m = _model()
    assert not m.projections_fused and m.fused_projection_groups() == {}
    before = {k: v.data_ptr() for k, v in m.state_dict().items()}
    params = dict(m.named_parameters())
    assert m.fuse_projections() is m
    assert m.projections_fused
    assert m.fused_projection_groups() == _expected_groups(m)
    assert _views_of_one_buffer(m)
    # the same Parameter objects (optimizers keep them), re-homed
    assert all(p is params[n] for n, p in m.named_parameters())
    moved = {k for k, v in m.state_dict().items() if v.data_ptr() != before[k]}
    assert moved and all(k.endswith("weight") for k in moved)
    assert m.fuse_projections().fused_projection_groups() == _expected_groups(m)   # idempotent


@pytest.mark.parametrize("quant_sim", [False, True])
def test_logits_equal_the_unfused_model(path, served, quant_sim):
    """Prefill of 2 rows (one shorter) then 3 decode steps through a cache, main logits and
    the MTP's: the fused model's equal the unfused model's (fp32, CPU), every group served."""
    m = _model(quant_sim=quant_sim)
    ids = _ids(m, 2, 23)
    lens = torch.tensor([23, 17])

    def run():
        cache = m.make_cache(2)
        with torch.no_grad():
            out, hidden = m(ids[:, :20], cache=cache, seq_lens=lens.clamp(max=20),
                            return_hidden=True)
            outs = [out]
            for t in range(20, 23):
                outs.append(m(ids[:, t:t + 1], cache=cache))
            mtp = m.forward_mtp(hidden, ids[:, 1:21], m.make_cache(2))
        return torch.cat(outs, 1), mtp

    ref, ref_mtp = run()
    assert not served
    m.fuse_projections()
    got, got_mtp = run()
    assert served and all(served)
    # 4 forward steps call every main-layer group once (the reference path: the compressor
    # groups once per row, 2 rows), the MTP step its own groups once
    groups = m.fused_projection_groups()
    main = [g for g in groups if g.startswith("layers.")]
    per_row = sum(g.endswith(".compressor") for g in main) if path == "reference" else 0
    assert len(served) == 4 * len(main) + 4 * per_row + (len(groups) - len(main))
    assert _rel(got, ref) <= REL and _rel(got_mtp, ref_mtp) <= REL
    m.unfuse_projections()
    assert not m.projections_fused and m.fused_projection_groups() == {}
    again, _ = run()
    assert torch.equal(again, ref)          # the separate layout again: the same GEMMs


def test_engine_logits_equal_the_unfused_engine(path, served):
    """The runtime engine (paged pool, chunked prefill, mixed prefill + decode steps, a
    request joining when another leaves): fused logits equal the unfused model's."""
    from dsv4.runtime import Engine, SamplingParams
    m = _model(quant_sim=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=g).tolist()
               for n in (37, 5, 30)]
    params = SamplingParams(max_new_tokens=5, eos_token_id=-1)

    def run():
        eng = Engine(m, max_batch=2, max_model_len=64, block_tokens=16,
                     max_num_batched_tokens=23)
        ids = [eng.add_request(p, params) for p in prompts]
        got = {rid: [] for rid in ids}
        while eng.has_unfinished():
            for out in eng.step(logits="all"):
                got[out.request_id].append(out.logits.clone())
        return [torch.cat(got[rid]) for rid in ids]

    ref = run()
    m.fuse_projections()
    out = run()
    assert served and all(served)
    for a, b in zip(out, ref):
        assert _rel(a, b) <= REL


def test_state_dict_round_trip(tmp_path):
    m = _model()
    ref_sd = {k: v.clone() for k, v in m.state_dict().items()}
    ids = _ids(m)
    with torch.no_grad():
        ref = m(ids)
    m.fuse_projections()
    sd = m.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) and sd[k].dtype == ref_sd[k].dtype
               and sd[k].shape == ref_sd[k].shape for k in sd)
    # into an unfused model: the same logits
    u = _model(seed=5)
    u.load_state_dict(sd)
    with torch.no_grad():
        assert _rel(u(ids), ref) <= REL
    # a checkpoint written by the fused model (views of one buffer) reads back exactly
    m.save_pretrained(tmp_path)
    r = dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    assert all(torch.equal(v, ref_sd[k]) for k, v in r.state_dict().items())


def test_load_state_dict_keeps_it_fused_and_follows_the_new_weights():
    m = _model().fuse_projections()
    other = _model(seed=7)
    ids = _ids(m)
    with torch.no_grad():
        want = other(ids)
    groups = m.fused_projection_groups()
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    m.load_state_dict(other.state_dict())               # in place: the views are kept
    assert m.fused_projection_groups() == groups and _views_of_one_buffer(m)
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == ptrs
    with torch.no_grad():
        assert _rel(m(ids), want) <= REL


def test_load_state_dict_assign_refuses_and_never_computes_stale_weights():
    m = _model().fuse_projections()
    ids = _ids(m)
    src = _model(seed=8)
    with torch.no_grad():
        want = src(ids)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    m.load_state_dict(sd, assign=True)                  # new tensors: rebuilt groups
    assert m.fused_projection_groups() == _expected_groups(m) and _views_of_one_buffer(m)
    with torch.no_grad():
        assert _rel(m(ids), want) <= REL
    # assign on a submodule (the model's load_state_dict does not see it): its groups fall
    # back to the separate GEMMs of the new weights
    src2 = _model(seed=9)
    attn = m.layers[1].attn
    attn.load_state_dict({k: v.clone() for k, v in src2.layers[1].attn.state_dict().items()},
                         assign=True)
    assert "layers.1.attn.input" not in m.fused_projection_groups()
    assert "layers.1.attn.compressor" not in m.fused_projection_groups()
    ref = copy.deepcopy(src)
    ref.layers[1].attn.load_state_dict(src2.layers[1].attn.state_dict())
    with torch.no_grad():
        assert _rel(m(ids), ref(ids)) <= REL
    m.fuse_projections()
    assert m.fused_projection_groups() == _expected_groups(m)
    with torch.no_grad():
        assert _rel(m(ids), ref(ids)) <= REL


def test_replaced_weights_or_modules_fall_back():
    """``p.data = ...``, a module swapped in, native FP8 storage: the group stops serving and
    the layer computes with what it holds now."""
    m = _model().fuse_projections()
    u = _model()
    ids = _ids(m)
    torch.manual_seed(11)
    new = torch.randn_like(u.layers[3].attn.wkv.weight)
    for mm in (m, u):
        mm.layers[3].attn.wkv.weight.data = new.clone()
    swap = Linear(m.config.dim, m.config.moe_inter_dim)
    m.layers[0].ffn.shared_experts.w3 = swap
    u.layers[0].ffn.shared_experts.w3 = copy.deepcopy(swap)
    groups = m.fused_projection_groups()
    assert "layers.3.attn.input" not in groups and "layers.0.ffn.shared" not in groups
    with torch.no_grad():
        assert _rel(m(ids), u(ids)) <= REL
    # in-place writes through a member keep the group and are seen by it
    with torch.no_grad():
        for mm in (m, u):
            mm.layers[2].attn.compressor.wgate.weight.mul_(0.5)
    assert "layers.2.attn.compressor" in m.fused_projection_groups()
    with torch.no_grad():
        assert _rel(m(ids), u(ids)) <= REL
    m.fuse_projections()
    assert m.fused_projection_groups() == _expected_groups(m)
    with torch.no_grad():
        assert _rel(m(ids), u(ids)) <= REL


def test_native_fp8_members_and_act_quant_partition():
    """A natively stored member does not take part (the rest of its group does, if two are
    left); members whose act_quant differ do not share one input."""
    from dsv4.quant import fp8_block_quantize
    m = _model(quant_sim=True)
    attn = m.layers[1].attn
    q, s = fp8_block_quantize(attn.wq_a.weight.detach())
    attn.wq_a.set_quantized(q, s, "fp8", torch.float32)
    attn.wq_a.act_quant = True
    m.layers[3].attn.wkv.act_quant = True        # as a dequantised FP8 checkpoint loads it
    m.layers[3].attn.wq_a.act_quant = True
    u = copy.deepcopy(m)
    m.fuse_projections()
    groups = m.fused_projection_groups()
    assert groups["layers.1.attn.input"] == ("wkv", "indexer.weights_proj")
    assert groups["layers.3.attn.input"] == ("wq_a", "wkv")          # not weights_proj
    ids = _ids(m)
    with torch.no_grad():
        assert _rel(m(ids), u(ids)) <= REL
    # a group of one eligible member is not built
    se = m.layers[0].ffn.shared_experts
    q, s = fp8_block_quantize(se.w1.weight.detach())
    se.w1.set_quantized(q, s, "fp8", torch.float32)
    m.fuse_projections()
    assert "layers.0.ffn.shared" not in m.fused_projection_groups()
    assert m.layers[0].ffn.projection_group("shared") is None


def test_gradients_equal_the_unfused_model():
    """A training step: loss gradients of every parameter equal the unfused model's (grad
    mode runs the separate GEMMs); after an optimizer step the weights are still the group's
    views and the logits equal the unfused model's after the same step. With frozen weights
    and an input that needs a gradient, the fused GEMM serves and the input gradient is the
    same."""
    m = _model(quant_sim=False).train()
    u = _model(quant_sim=False).train()
    m.fuse_projections()
    ids = _ids(m, 2, 12)
    grads = []
    for mm in (m, u):
        mm.zero_grad()
        mm(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in mm.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n
    for mm in (m, u):
        torch.optim.SGD(mm.parameters(), lr=0.1).step()
    assert m.fused_projection_groups() == _expected_groups(m) and _views_of_one_buffer(m)
    with torch.no_grad():
        assert _rel(m.eval()(ids), u.eval()(ids)) <= 1e-5

    attn_m, attn_u = m.layers[1].attn, u.layers[1].attn
    for mm in (m, u):
        mm.requires_grad_(False)
    x = torch.randn(5, m.config.dim, generator=torch.Generator().manual_seed(4))
    qx = []
    for a in (attn_m, attn_u):
        xi = x.clone().requires_grad_(True)
        ys = linear_mod.project(xi, a._input_linears(), a.projection_group("input"))
        ys2 = linear_mod.project(xi.float(), a._compressor_linears(),
                                 a.projection_group("compressor"))
        sum((y * (k + 1)).sum() for k, y in enumerate(ys + ys2)).backward()
        qx.append(xi.grad)
    assert attn_m.projection_group("input").apply(x, attn_m._input_linears()) is not None
    assert attn_u.projection_group("input") is None
    assert _rel(qx[0], qx[1]) <= 1e-5      # one GEMM sums over every member's columns


def test_dtype_cast_frees_each_old_group_buffer_before_the_rebuild(monkeypatch):
    """.to(bfloat16) on a model fused in fp32: every compute-weight group buffer (attention
    input, shared expert) is gone before the groups are rebuilt (the cast frees each as soon
    as its members are cast), the fp32 compressor groups stay the same objects, and the model
    ends fused in the new dtype."""
    import gc
    import weakref

    m = _model(quant_sim=False).fuse_projections()
    old, kept = [], []
    for mod in m._projection_owners():
        for name, g in mod._fused.items():
            if g is None:
                continue
            (kept if g.weight.dtype == torch.float32 and name == "compressor" else old).append(
                (mod, name, g))
    assert old and kept
    dead = [weakref.ref(g.weight) for _, _, g in old]
    del old, g                                  # the test holds no group nor buffer
    rebuild = m._refuse_projections
    seen = {}

    def check_then_rebuild():
        gc.collect()
        seen["dead"] = [r() is None for r in dead]
        seen["kept"] = [mod._fused[name] is g for mod, name, g in kept]
        rebuild()
    monkeypatch.setattr(m, "_refuse_projections", check_then_rebuild)
    m.to(torch.bfloat16)
    assert all(seen["dead"]) and all(seen["kept"]), seen
    assert m.fused_projection_groups() == _expected_groups(m) and _views_of_one_buffer(m)
    assert m.layers[1].attn.projection_group("input").weight.dtype == torch.bfloat16


def test_dtype_changes_rebuild_the_groups():
    """.double() (the float64 gradient checks of tests/train), .to(bfloat16), .float(): the
    groups are rebuilt in the new storage (no stale buffer is read), logits equal the unfused
    model's in the same dtype, gradients flow in float64."""
    m = _model(quant_sim=False).fuse_projections()
    u = _model(quant_sim=False)
    ids = _ids(m, 1, 9)
    with torch.no_grad():
        truth = u(ids)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        m.to(torch.float64)                         # refused, nothing changed
    assert m.fused_projection_groups() == _expected_groups(m)
    m.type(torch.float64)                           # = .double()
    u.double()
    assert m.fused_projection_groups() == _expected_groups(m) and _views_of_one_buffer(m)
    assert m.layers[1].attn.projection_group("input").weight.dtype == torch.float64
    with torch.no_grad():
        assert _rel(m(ids), u(ids)) <= 1e-12
    for mm in (m, u):
        mm.zero_grad()
        mm(ids).sum().backward()
    w_m, w_u = m.layers[1].attn.wq_a.weight.grad, u.layers[1].attn.wq_a.weight.grad
    assert w_m.dtype == torch.float64 and torch.allclose(w_m, w_u, rtol=1e-10)
    for mm in (m, u):
        mm.to(torch.bfloat16)
    assert m.fused_projection_groups() == _expected_groups(m) and _views_of_one_buffer(m)
    g = m.layers[1].attn
    assert g.projection_group("input").weight.dtype == torch.bfloat16
    assert g.projection_group("compressor").weight.dtype == torch.float32   # kept fp32
    with torch.no_grad():
        out, ref = m(ids), u(ids)
    # bf16 GEMMs of another width may round differently: the kernel tolerance rule against
    # the fp32 model (error <= 2x the unfused bf16 model's)
    assert (out - truth).abs().mean() <= 2 * (ref - truth).abs().mean()
    m.float()
    u.float()
    assert m.fused_projection_groups() == _expected_groups(m)
    with torch.no_grad():
        assert _rel(m(ids), u(ids)) <= REL


def test_deepcopy_stays_fused_and_independent():
    """copy.deepcopy re-fuses the copy over its own Parameters; torch.save / torch.load of
    the whole model keeps the views (one storage per group) and stays fused."""
    import io
    m = _model().fuse_projections()
    ids = _ids(m)
    with torch.no_grad():
        ref = m(ids)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.fused_projection_groups() == _expected_groups(m) and _views_of_one_buffer(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref)
    d = copy.deepcopy(m)
    assert d.fused_projection_groups() == _expected_groups(d) and _views_of_one_buffer(d)
    ptrs = {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert not ptrs & {p.untyped_storage().data_ptr() for p in d.parameters()}
    with torch.no_grad():
        m.layers[1].attn.wkv.weight.zero_()            # the original only
        assert _rel(d(ids), ref) <= REL
        assert _rel(m(ids), ref) > 1e-3


def test_unfuse_gives_each_weight_its_own_storage():
    m = _model()
    ids = _ids(m)
    with torch.no_grad():
        ref = m(ids)
    m.fuse_projections().unfuse_projections()
    stores = [p.untyped_storage().data_ptr() for n, p in m.named_parameters()
              if not n.startswith(("layers.", "mtp.")) or ".experts." not in n]
    assert len(stores) == len(set(stores))
    assert m.unfuse_projections() is m                  # no-op
    with torch.no_grad():
        assert torch.equal(m(ids), ref)


def test_no_extra_memory():
    """Fusing holds the same weight bytes (the members' old storage is freed)."""
    m = _model()

    def held(mm):
        seen = {}
        for t in list(mm.parameters()) + list(mm.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())
    before = held(m)
    m.fuse_projections()
    assert held(m) == before


def test_meta_model_fuses():
    """On the meta device (what dsv4 info and the layer planner build) the groups form too;
    V4-Flash's two-layer bench model (one CSA, one HCA layer) saves 9 GEMMs a step."""
    from dsv4.runtime import bench
    cfg = bench.build_config("flash", 2, 4)
    with torch.device("meta"):
        m = dsv4.Model(cfg).to(torch.bfloat16).fuse_projections()
    groups = m.fused_projection_groups()
    assert groups == {f"layers.{i}.{k}": v for i, kind in enumerate((_CSA, _HCA))
                      for k, v in kind.items()}
    assert sum(len(v) - 1 for v in groups.values()) == 9


def test_hooked_members_run_their_hooks():
    """A forward hook (one that changes the output), a forward pre-hook, a backward hook, a
    global module hook or an instance ``forward`` on a member: the group stops serving, so
    that every hook runs and the logits are the unfused model's with the same hooks; a fuse
    leaves the hooked linear out, and fuses it again once the hook is removed."""
    m = _model().fuse_projections()
    u = _model()
    ids = _ids(m)

    def install(mm, calls):
        a = mm.layers[1].attn
        return [a.wkv.register_forward_hook(lambda mod, i, o: calls.append("wkv") or 2 * o),
                a.compressor.wgate.register_forward_pre_hook(
                    lambda mod, i: calls.append("wgate") or (i[0] * 0.5,)),
                mm.layers[0].ffn.shared_experts.w3.register_full_backward_hook(
                    lambda mod, gi, go: calls.append("w3-backward"))]

    got, want = [], []
    hm, hu = install(m, got), install(u, want)
    assert "layers.1.attn.input" not in m.fused_projection_groups()
    assert "layers.1.attn.compressor" not in m.fused_projection_groups()
    with torch.no_grad():
        out, ref = m(ids), u(ids)
    assert _rel(out, ref) <= REL and sorted(set(got)) == sorted(set(want)) == ["wgate", "wkv"]
    # frozen weights, an input needing a gradient: the backward hook runs in both models
    for mm in (m, u):
        mm.requires_grad_(False)
    for mm in (m, u):
        se = mm.layers[0].ffn
        x = torch.randn(3, mm.config.dim, generator=torch.Generator().manual_seed(2),
                        requires_grad=True)
        se.shared_expert(x).sum().backward()
    assert got.count("w3-backward") == want.count("w3-backward") == 1
    # a fuse leaves the hooked linears out; removing the hooks lets them in again
    m.fuse_projections()
    groups = m.fused_projection_groups()
    assert groups["layers.1.attn.input"] == ("wq_a", "indexer.weights_proj")
    assert "layers.0.ffn.shared" not in groups
    for h in hm + hu:
        h.remove()
    m.fuse_projections()
    assert m.fused_projection_groups() == _expected_groups(m)
    # a global module hook and an instance forward
    seen = []
    h = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: seen.append(mod) if isinstance(mod, Linear) else None)
    try:
        assert m.fused_projection_groups() == {}
        with torch.no_grad():
            m(ids)
        assert any(mod is m.layers[2].attn.compressor.wkv for mod in seen)
    finally:
        h.remove()
    wkv = m.layers[3].attn.wkv
    wkv.forward = lambda x: torch.zeros(*x.shape[:-1], wkv.out_features)
    u.layers[3].attn.wkv.forward = wkv.forward
    assert "layers.3.attn.input" not in m.fused_projection_groups()
    with torch.no_grad():
        assert _rel(m(ids), u(ids)) <= REL
