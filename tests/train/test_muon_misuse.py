"""dsv4.optim.Muon with odd parameters and bad group values: empty matrices step like any
other, huge aspect ratios keep the update RMS, a bad parameter changes nothing in that step,
and a bad hyper-parameter in any group is refused by name (it used to turn the weights into
NaN / inf silently)."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.optim import Muon, orthogonalize


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (3, 0, 4), (0, 3, 4)])
def test_empty_matrices_step(shape):
    w = torch.nn.Parameter(torch.zeros(shape))
    keep = torch.nn.Parameter(torch.ones(4, 6))
    opt = Muon([w, keep], lr=0.1)
    w.grad = torch.zeros(shape)
    keep.grad = torch.ones(4, 6)
    opt.step()
    assert w.shape == shape and not torch.equal(keep, torch.ones(4, 6))
    assert orthogonalize(torch.zeros(shape)).shape == shape


@pytest.mark.parametrize("shape", [(1, 4096), (4096, 1), (2, 3000)])
def test_extreme_aspect_ratios_keep_the_update_rms(shape):
    """O = NS(G/|G|) has min(n, m) singular values ~1, so |O|_F² = min(n, m) and the step
    −γ·sqrt(max(n, m))·O (lr 1, no weight decay, no momentum) has RMS
    γ·sqrt(max·min / (n·m)) = γ = 0.18 whatever the aspect ratio."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = Muon([w], lr=1.0, weight_decay=0.0, momentum=0.0, ns_dtype=torch.float64)
    w.grad = torch.randn(shape)
    opt.step()
    rms = float(w.detach().pow(2).mean().sqrt())
    assert math.isfinite(rms) and abs(rms - 0.18) < 0.18 * 0.05, rms


def test_a_bad_parameter_changes_nothing_in_that_step():
    a = torch.nn.Parameter(torch.randn(4, 4))
    v = torch.nn.Parameter(torch.randn(4))            # 1-D in a Muon group: refused
    c = torch.nn.Parameter(torch.randn(3))
    opt = Muon([dict(params=[c], use_muon=False), dict(params=[a, v])])
    for p in (a, v, c):
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in (a, v, c)]
    with pytest.raises(ValueError, match="AdamW group"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip((a, v, c), before))
    assert not opt.state


@pytest.mark.parametrize("sparse_first", [False, True])
def test_a_sparse_gradient_is_refused_before_anything_changes(sparse_first):
    """A sparse gradient failed in the middle of the step, after weight decay and the AdamW
    step count had been applied to the parameters before it."""
    e = torch.nn.Parameter(torch.randn(5, 3))         # an embedding with a sparse gradient
    a = torch.nn.Parameter(torch.randn(4, 4))
    c = torch.nn.Parameter(torch.randn(3))
    groups = [dict(params=[c], use_muon=False), dict(params=[a])]
    groups.insert(0 if sparse_first else 2, dict(params=[e], use_muon=False))
    opt = Muon(groups, weight_decay=0.1)
    for p in (a, c):
        p.grad = torch.ones_like(p)
    e.grad = torch.sparse_coo_tensor([[1, 3]], torch.ones(2, 3), (5, 3))
    before = [p.detach().clone() for p in (e, a, c)]
    with pytest.raises(ValueError, match="expected a dense floating-point gradient of the "
                       r"parameter's shape \(5, 3\), got a sparse torch.float32 gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip((e, a, c), before))
    assert not opt.state


@pytest.mark.parametrize("key, value", [
    ("lr", -1.0), ("lr", float("nan")), ("lr", float("inf")), ("lr", "0.1"),
    ("weight_decay", float("inf")), ("momentum", 2.0), ("update_rms", -1.0),
    ("eps", 0.0), ("ns_eps", 0.0), ("betas", (2.0, 0.0)), ("betas", (0.9,)),
    ("ns_schedule", [(1.0, 2.0)]), ("ns_schedule", [(float("nan"), 0.0, 0.0)]),
    ("ns_dtype", torch.int32), ("ns_dtype", torch.float8_e4m3fn), ("row_blocks", 0),
    # an epsilon that rounds to 0 where it is added is 0 (fp32 moments; bf16 Newton-Schulz)
    ("eps", 1e-50), ("ns_eps", 1e-45),
    ("row_blocks", 1.5), ("use_muon", "yes"),
])
def test_bad_group_values_are_refused_by_name(key, value):
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=f"param group 0: {key} must be"):
        Muon([{"params": [w], key: value}])
    opt = Muon([torch.nn.Parameter(torch.randn(2, 2))])
    with pytest.raises(ValueError, match=f"param group 1: {key} must be"):
        opt.add_param_group({"params": [w], key: value})
    assert len(opt.param_groups) == 1
    if key not in ("row_blocks", "use_muon"):
        with pytest.raises(ValueError, match=f"Muon: {key} must be|ns_schedule"):
            Muon([w], **{key: value})


def test_tiny_epsilons_and_the_ns_dtype_they_need():
    """ns_eps is checked in the group's ns_dtype: 1e-45 is a float32 subnormal, zero in bf16."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    w0 = w.detach().clone()
    opt = Muon([dict(params=[w], ns_eps=1e-45, ns_dtype=torch.float32)])
    w.grad = torch.zeros(4, 4)
    opt.step()
    # a zero gradient orthogonalises to 0 / (0 + 1e-45) = 0: only the decoupled weight decay
    # W (1 - lr wd) remains (lr 1e-3, wd 0.1 by default)
    assert torch.equal(w.detach(), w0.mul(1 - 1e-3 * 0.1))


def test_complex_parameters_are_refused():
    w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="real floating tensors, got a torch.complex64"):
        Muon([w])
    with pytest.raises(ValueError, match="real floating"):
        Muon([dict(params=[w], use_muon=False)])


def test_saved_groups_with_bad_values_are_refused_before_anything_is_loaded():
    """A saved momentum of NaN (or 5) loaded, and the next step made every weight NaN."""
    a = torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([a], lr=0.1)
    a.grad = torch.ones(4, 4)
    opt.step()
    before = opt.state_dict()
    for key, value in (("momentum", float("nan")), ("momentum", 5.0), ("lr", -1.0),
                       ("ns_dtype", torch.float8_e4m3fn)):
        bad = opt.state_dict()
        bad["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=f"saved param group 0: {key} must be"):
            opt.load_state_dict(bad)
        after = opt.state_dict()
        assert after["param_groups"] == before["param_groups"]
        assert torch.equal(after["state"][0]["momentum_buffer"],
                           before["state"][0]["momentum_buffer"])


def test_group_schedules_given_as_lists_work():
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([dict(params=[w], ns_schedule=[[3.4445, -4.7750, 2.0315]] * 5)])
    w.grad = torch.randn(4, 4)
    opt.step()
    assert torch.isfinite(w).all()


def test_zero_gradients_stay_finite_with_the_defaults():
    w = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = Muon([dict(params=[w]), dict(params=[b], use_muon=False)])
    for _ in range(2):
        w.grad, b.grad = torch.zeros(4, 4), torch.zeros(4)
        opt.step()
    assert torch.isfinite(w).all() and torch.isfinite(b).all()


def test_state_of_another_model_is_refused_before_anything_is_loaded():
    """It loaded, then the first step died in a raw size-mismatch RuntimeError."""
    def stepped(shape_a, shape_b):
        a = torch.nn.Parameter(torch.ones(shape_a))
        b = torch.nn.Parameter(torch.ones(shape_b))
        opt = Muon([{"params": [a]}, {"params": [b], "use_muon": False}], lr=0.1)
        a.grad, b.grad = torch.ones(shape_a), torch.ones(shape_b)
        opt.step()
        return opt
    other = stepped((4, 6), (3,)).state_dict()
    opt = stepped((4, 8), (5,))
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter 0 has shape \(4, 6\)"):
        opt.load_state_dict(other)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i, s in before["state"].items()
               for k, v in s.items() if isinstance(v, torch.Tensor))
    opt.load_state_dict(stepped((4, 8), (5,)).state_dict())     # the same shapes load
