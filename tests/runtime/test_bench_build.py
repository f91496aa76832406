"""dsv4 bench's model build: block by block (a V4-Flash MoE never holds its experts in fp32
at once) and without stale stacked expert storage (the 1M bench's 66 GB peak on the H100 held
two dead fp32 expert stacks of 26 GB each)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4
from dsv4.checkpoint import linear_formats
from dsv4.layers.moe import MoE
from dsv4.runtime import bench


def _reference(cfg, weights: str, head: str = "bf16") -> dsv4.Model:
    """The model build_model stands for: Model(config) cast to bf16, the release formats, the
    head (head="bf16") rounded to bf16 and held compact."""
    torch.manual_seed(0)
    m = dsv4.Model(cfg).to(torch.bfloat16).eval()
    if head == "bf16":
        with torch.no_grad():
            m.head.weight.copy_(m.head.weight.to(torch.bfloat16))
        m.compact_head()
    if weights == "fp8":
        for name, mod in m.named_modules():
            fmt = linear_formats(cfg, "fp8").get(name)
            if fmt in ("fp8", "fp4"):
                bench._quantize_linear(mod, name, fmt, cfg)
    return m


def _layout(m: dsv4.Model) -> dict:
    return {k: (tuple(t.shape), t.dtype) for k, t in
            list(m.named_parameters()) + list(m.named_buffers())}


def _fp4_config():
    """tiny at dims the FP4 experts take, routed experts stored FP4 as in V4-Flash."""
    return dataclasses.replace(bench.build_config("tiny", 3, 0), expert_dtype="fp4")


def test_streamed_build_has_the_models_layout_formats_and_current_stacks():
    for cfg in (bench.build_config("tiny", 2, 0), _fp4_config()):
        for weights in ("bf16", "fp8"):
            m = bench.build_model(cfg, weights, "cpu")
            ref = _reference(cfg, weights)
            assert _layout(m) == _layout(ref)
            fm = {n: mod.weight_format for n, mod in m.named_modules()
                  if hasattr(mod, "weight_format")}
            assert fm == {n: mod.weight_format for n, mod in ref.named_modules()
                          if hasattr(mod, "weight_format")}
            for mod in m.modules():
                if isinstance(mod, MoE):
                    st = mod._stack
                    assert mod._stack_current()        # the experts view the stack, no copy
                    want = (linear_formats(cfg, "fp8")["layers.0.ffn.experts.0.w1"]
                            if weights == "fp8" else None)
                    assert st.fmt == want
                    if want is None:
                        assert st.w_up.dtype == torch.bfloat16
            assert all(getattr(mod, "config", cfg) is cfg for mod in m.modules()
                       if getattr(mod, "config", None) is not None)
    m = bench.build_model(_fp4_config(), "fp8", "cpu")
    assert m.layers[0].ffn.experts[0].w1.weight_format == "fp4"
    assert m.layers[0].ffn.shared_experts.w1.weight_format == "fp8"


def test_build_holds_the_head_as_asked():
    """head="bf16" (dsv4 bench's default): the head holds bf16 values, once, in bf16; "fp32":
    the official fp32 parameter. non_layer_bytes (LayerFit's fixed part) is what the built
    model holds outside its layers, up to the final norm and hc_head."""
    from dsv4.runtime.floors import _tensor_bytes
    cfg = bench.build_config("tiny", 2, 0)
    for head, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        m = bench.build_model(cfg, "bf16", "cpu", head=head)
        assert m.head.weight.dtype == dtype and m.head_compact == (head == "bf16")
        assert _layout(m) == _layout(_reference(cfg, "bf16", head))
        outside = _tensor_bytes(m) - sum(_tensor_bytes(b) for b in m.layers)
        small = _tensor_bytes(m.norm) + sum(t.numel() * t.element_size() for t in (
            m.hc_head_fn, m.hc_head_base, m.hc_head_scale))
        assert outside - small == bench.non_layer_bytes(cfg, head) == \
            cfg.vocab_size * cfg.dim * (4 if head == "bf16" else 6)
    with pytest.raises(ValueError, match="head must be 'bf16' or 'fp32'"):
        bench.build_model(cfg, "bf16", "cpu", head="fp16")


def test_streamed_build_runs_like_the_reference_model():
    """Same random draws are not promised, but the built model is a working model: finite
    logits, and the same logits as a model loaded with its state dict."""
    cfg = _fp4_config()
    m = bench.build_model(cfg, "fp8", "cpu")
    ref = _reference(cfg, "fp8")
    ref.load_state_dict(m.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = m(ids), ref(ids)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_fits_stops_the_build_and_truncates_the_config():
    cfg = bench.build_config("tiny", 4, 0)
    seen = []

    def fits(i, blocks):
        seen.append((i, len(blocks)))
        return i < 3
    m = bench.build_model(cfg, "fp8", "cpu", fits=fits)
    assert seen == [(1, 1), (2, 2), (3, 3)]
    assert len(m.layers) == m.config.n_layers == 3
    assert m.config.compress_ratios == cfg.compress_ratios[:3]
    assert all(getattr(mod, "config", None) in (None, m.config) for mod in m.modules())
    m1 = bench.build_model(cfg, "bf16", "cpu", fits=lambda i, b: False)
    assert len(m1.layers) == 1                  # one layer at least


def test_model_to_dtype_frees_the_old_expert_stack():
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny())
    old = m.layers[0].ffn._stack.w_up
    assert old.dtype == torch.float32
    m.to(torch.bfloat16)
    st = m.layers[0].ffn._stack
    assert st.w_up.dtype == torch.bfloat16 and m.layers[0].ffn._stack_current()
    assert st.w_up.data_ptr() != old.data_ptr()
