"""Model.storage_version: it grows when a parameter or buffer moved to other storage through
the model's own methods (the runtime engine then captures its decode graphs again), and only
then: a call that leaves every tensor where it was (``.to`` the model's own device or dtype, a
second fuse, a refused cast) does not make the engine capture again."""

from __future__ import annotations

import pytest
import torch

import dsv4


@pytest.fixture
def model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()


def _where(m) -> dict:
    return {n: (t.device, t.dtype, t.data_ptr())
            for n, t in (*m.named_parameters(), *m.named_buffers())}


@pytest.mark.parametrize("call", [
    lambda m: m.to("cpu"),
    lambda m: m.cpu(),
    lambda m: m.to(torch.float32),
    lambda m: m.float(),
    lambda m: m.to("cpu", torch.float32),
    lambda m: m.layers[0].to("cpu"),
    lambda m: m.train().eval(),
    lambda m: m.requires_grad_(False),
    lambda m: m.unfuse_projections(),                    # not fused: a no-op
    lambda m: m.expand_head(),                           # an fp32 head: a no-op
], ids=["to-device", "cpu", "to-dtype", "float", "to-both", "layer-to-device", "train-eval",
        "requires-grad", "unfuse-not-fused", "expand-fp32-head"])
def test_calls_that_move_nothing_keep_the_version(model, call):
    """Nothing moves (not even the MoE's expert stack, which a ``.to`` of its own device used
    to copy), and the version stays."""
    where, v = _where(model), model.storage_version
    call(model)
    assert _where(model) == where
    assert model.storage_version == v


@pytest.mark.parametrize("call", [lambda m: m.half(), lambda m: m.to(torch.float16),
                                  lambda m: m.to("cpu", torch.float16),
                                  lambda m: m.type(torch.float16),
                                  lambda m: m.to(torch.float64)])
def test_refused_casts_change_nothing(model, call):
    where, v = _where(model), model.storage_version
    with pytest.raises(ValueError, match=r"Model dtype must be float32 or bfloat16 .*, got "
                                         r"torch\.float(16|64)$"):
        call(model)
    assert _where(model) == where and model.storage_version == v


def test_a_second_fuse_or_cast_keeps_the_version(model):
    """fuse_projections is idempotent, and so is a cast to the dtype the model has: neither
    moves a tensor the second time, nor advances the version."""
    v = model.storage_version
    model.fuse_projections()
    assert model.storage_version > v
    where, v = _where(model), model.storage_version
    model.fuse_projections()
    assert _where(model) == where and model.storage_version == v
    model.to(torch.bfloat16)
    assert model.storage_version > v and model.projections_fused
    where, v = _where(model), model.storage_version
    model.to(torch.bfloat16).bfloat16().to("cpu")
    assert _where(model) == where and model.storage_version == v
    model.unfuse_projections()
    assert model.storage_version > v
    v = model.storage_version
    model.unfuse_projections()
    assert model.storage_version == v


@pytest.mark.parametrize("call", [
    lambda m: m.to(torch.bfloat16),
    lambda m: m.double(),
    lambda m: m.share_memory(),
    lambda m: m.fuse_projections(),
    lambda m: m.load_state_dict(m.state_dict()),         # in place: derived copies stale
    lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()},
                                assign=True),
], ids=["bf16", "double", "share-memory", "fuse", "load", "load-assign"])
def test_calls_that_move_tensors_advance_the_version(model, call):
    v = model.storage_version
    call(model)
    assert model.storage_version > v


@pytest.mark.xfail(strict=True, reason="not counted (documented): calls on a submodule move its "
                   "storage behind the model's back; a captured CUDA graph would read the old one")
@pytest.mark.parametrize("call", [
    lambda m: m.layers[0].attn.to(torch.bfloat16),
    lambda m: m.layers[0].double(),
    lambda m: m.layers[1].attn.load_state_dict(
        {k: v.clone() for k, v in m.layers[1].attn.state_dict().items()}, assign=True),
    lambda m: torch.nn.utils.vector_to_parameters(
        torch.nn.utils.parameters_to_vector(m.layers[0].parameters()), m.layers[0].parameters()),
], ids=["attn-to-bf16", "layer-double", "attn-load-assign", "vector-to-parameters"])
def test_submodule_calls_that_move_tensors_advance_the_version(model, call):
    where, v = _where(model), model.storage_version
    call(model)
    assert _where(model) != where
    assert model.storage_version > v


@pytest.mark.xfail(strict=True, reason="not counted: an in-place write to the fp32 head leaves "
                   "the bf16 head copy a head_dtype=bfloat16 graph captured stale")
def test_in_place_head_write_advances_the_version(model):
    model._low_precision_head(torch.bfloat16)            # the copy a bf16-head step caches
    v = model.storage_version
    with torch.no_grad():
        model.head.weight.mul_(2)
    assert model.storage_version > v
