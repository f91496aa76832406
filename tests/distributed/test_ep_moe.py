"""Expert-parallel MoE layer on CPU processes (gloo): the output of each rank's tokens equals,
bit for bit, the single-process MoE on all ranks' tokens.

Bit-exact needs results of a row that do not depend on the other rows (CPU BLAS picks other
kernels for other row counts, and vectorised transcendentals differ from their scalar tails,
a few ulps apart), so the layers here use exact-arithmetic weights (:func:`_exact_moe`): dyadic
inputs, gate, w1, w3 (every product and sum exact in fp32), gate logits above 20 (where
softplus is the identity, then an exact sqrt) and w2 with one power-of-two entry per row (each
output one exact product). What remains inexact is the SiLU (over whole rows of 128) and the
fp32 sum of each token's three expert outputs plus the shared expert, whose result depends on
the order: equal bits mean the same pairs, weights and combine order as the single-process
model (ascending expert, then shared).
Every routing corner case of kernels.md §5 #14 runs in 2 and 4 processes: a rank whose experts
get no token, a rank that receives every token, a rank with zero local tokens (calling the
layer, or serving), heavily skewed routing, ranks out of step (a clear error on every rank, the
group still usable), bf16 activations.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.distributed import (ExpertParallelGroup, ExpertParallelMoE, ExpertSlice, IDLE,
                              convert_moe_layers, serve, serve_once)
from dsv4.layers.moe import MoE
from dsv4.model import Model

from _ep_harness import run_ranks

# 8 routed experts, top-3 (three terms: their sum depends on the order), dim 128, 2 hash layers
CFG = ModelConfig.tiny(vocab_size=512, n_activated_experts=3)
E, K, D = CFG.n_routed_experts, CFG.n_activated_experts, CFG.dim
LEARNED, HASHED = 3, 0                      # layer ids (layer < n_hash_layers: hash routing)


# ------------------------------------------------------------------------ no processes needed
def test_world_size_must_divide_the_experts():
    torch.manual_seed(0)
    model = Model(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for world in (3, 5, 16):
        group = ExpertParallelGroup(rank=0, world_size=world, device="cpu")
        with pytest.raises(ValueError, match=rf"over {world} processes needs a world size that "
                                             rf"divides n_routed_experts \(8\); use one of "
                                             r"\[1, 2, 4, 8\]"):
            convert_moe_layers(model, group)
        with pytest.raises(ValueError, match="divides n_routed_experts"):
            ExpertParallelMoE(model.layers[0].ffn, group, tag=0)
    assert all(isinstance(b.ffn, MoE) and not isinstance(b.ffn, ExpertParallelMoE)
               for b in model.layers)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_group_arguments_are_checked():
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        ExpertParallelGroup(rank=2, world_size=2, device="cpu")
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        ExpertParallelGroup(rank=0, world_size=0, device="cpu")
    with pytest.raises(ValueError, match=r"device must be a torch.device or a device string"):
        ExpertParallelGroup(rank=0, world_size=1, device="foo")
    group = ExpertParallelGroup(rank=0, world_size=1, device="cpu")
    for bad in (-3, 2.0, True):
        with pytest.raises(ValueError, match="n_experts must be an integer >= 0"):
            group.expert_range(bad)
    assert group.expert_range(0) == range(0, 0)


def test_init_names_a_bad_local_rank_and_serve_once_an_empty_mapping(monkeypatch):
    from dsv4.distributed import init
    from dsv4.distributed.moe import serve_once
    for bad in ("x", "-1", ""):
        monkeypatch.setenv("LOCAL_RANK", bad)
        with pytest.raises(ValueError, match="LOCAL_RANK must be an integer >= 0"):
            init(device="cpu")
    with pytest.raises(ValueError, match="serve_once: moes must map tags"):
        serve_once({})


def test_rank_keeps_its_experts_under_their_global_names():
    torch.manual_seed(0)
    model = Model(CFG)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    convert_moe_layers(model, ExpertParallelGroup(rank=1, world_size=4, device="cpu"))
    sd = model.state_dict()
    experts = {k.split(".")[4] for k in sd if ".ffn.experts." in k}
    assert experts == {"2", "3"}                           # rank 1 of 4: experts [2, 4)
    assert set(sd) == {k for k in full if ".ffn.experts." not in k
                       or k.split(".")[4] in ("2", "3")}
    assert all(torch.equal(sd[k], full[k]) for k in sd)
    moe = model.layers[LEARNED].ffn
    assert isinstance(moe.experts, ExpertSlice) and len(moe.experts) == 2
    assert moe.experts[0] is moe.experts._modules["2"] and moe.experts[-1] is moe.experts[1]
    with pytest.raises(IndexError):
        moe.experts[2]
    stack = moe.stacked_weights()          # the grouped-GEMM layout of the local experts
    assert stack.w_up.shape[0] == 2
    assert torch.equal(stack.w_up[1, 0], full[f"layers.{LEARNED}.ffn.experts.3.w1.weight"])
    assert not any(p.requires_grad for p in model.parameters())   # inference only
    with pytest.raises(ValueError, match="expert-parallel already"):
        convert_moe_layers(model, ExpertParallelGroup(rank=1, world_size=4, device="cpu"))


def test_serve_needs_an_expert_parallel_model():
    with pytest.raises(ValueError, match="needs a model made expert-parallel"):
        serve(Model(CFG))


# ------------------------------------------------------------------------ N processes
def _dyadic(shape, scale: int, g: torch.Generator, span: int = 8, low=None) -> torch.Tensor:
    """Integers in [low (default -span), span] / scale."""
    lo = -span if low is None else low
    return torch.randint(lo, span + 1, shape, generator=g).float() / scale


def _tokens(n: int, g: torch.Generator) -> torch.Tensor:
    """Dyadic activations in [1/2, 1]: with the gate's weights in [3/8, 1] every gate logit is
    >= 128 · 1/2 · 3/8 = 24 > 20, where torch's softplus returns its input exactly."""
    return _dyadic((n, D), 8, g, 8, low=4)


def _sparse_down(out: int, inner: int, g: torch.Generator) -> torch.Tensor:
    """[out, inner] with one ±2^-k entry per row: each output is one exact product."""
    w = torch.zeros(out, inner)
    cols = torch.randint(0, inner, (out,), generator=g)
    signs = torch.randint(0, 2, (out,), generator=g).float() * 2 - 1
    w[torch.arange(out), cols] = signs * 2.0 ** -torch.randint(0, 4, (out,), generator=g).float()
    return w


def _exact_moe(layer_id: int, seed: int, dtype=torch.float32, bias=None, device="cpu") -> MoE:
    """A MoE whose GEMMs are exact in fp32 (module docstring); the gate bias stays fp32 (as
    ``Model.to`` keeps it, and the CUDA gate kernel wants it)."""
    torch.manual_seed(seed)
    moe = MoE(CFG, layer_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.gate.weight.copy_(_dyadic(moe.gate.weight.shape, 8, g, 8, low=3))
        if moe.gate.bias is not None:
            moe.gate.bias.copy_(torch.randn(E, generator=g) * 0.01 if bias is None else bias)
        for ex in list(moe.experts) + [moe.shared_experts]:
            ex.w1.weight.copy_(_dyadic(ex.w1.weight.shape, 32, g, 4))
            ex.w3.weight.copy_(_dyadic(ex.w3.weight.shape, 32, g, 4))
            ex.w2.weight.copy_(_sparse_down(*ex.w2.weight.shape, g))
    moe = moe.to(device=device, dtype=dtype)
    if moe.gate.bias is not None:
        moe.gate.bias.data = moe.gate.bias.data.float()
    return moe


def _split(n: list[int], rank: int) -> slice:
    return slice(sum(n[:rank]), sum(n[:rank + 1]))


def _case(rank, world, layer_id, counts, seed, *, dtype=torch.float32, bias=None, x=None,
          expect_received=None, serve_ranks=()):
    """One exchange: rank r has counts[r] tokens (or serves); compare with the single process
    (on this rank's device: the CPU with gloo, its GPU with NCCL)."""
    group = ExpertParallelGroup.current()
    dev = group.device
    ref = _exact_moe(layer_id, seed, dtype, bias, dev)
    ep = ExpertParallelMoE(copy.deepcopy(ref), group, tag=layer_id)
    received = []
    local = ep.local_experts
    ep.local_experts = lambda xs, w, c: (received.append(xs.shape[0]), local(xs, w, c))[1]
    g = torch.Generator().manual_seed(seed + 1)
    N = sum(counts)
    if x is None:
        x = _tokens(N, g)
    x = x.to(dev, dtype)
    ids = torch.randint(0, CFG.vocab_size, (N,), generator=g).to(dev)
    with torch.no_grad():
        want = ref(x, ids)
        mine = _split(counts, rank)
        if rank in serve_ranks:
            assert serve_once({layer_id: ep}) == layer_id
        else:
            got = ep(x[mine], ids[mine])
            assert got.shape == (counts[rank], D) and got.dtype == dtype
            assert torch.equal(got, want[mine]), (
                f"rank {rank}: max |EP - single| = {(got - want[mine]).abs().max().item()}")
    if expect_received is not None:
        assert received == [expect_received[rank]], (rank, received, expect_received)
    return received


def _bias_towards(rank_experts: range, value: float) -> torch.Tensor:
    b = torch.zeros(E)
    b[list(rank_experts)] = value
    return b


def layer_cases(rank, world, dtype=torch.float32):
    """Every case of this module in one process group; ``dtype`` of most cases (the CUDA
    version runs bfloat16: the MoE kernels)."""
    L = E // world
    group = ExpertParallelGroup.current()
    uneven = [5, 11, 1, 8][:world]
    # learned and hash routing, uneven token counts per rank
    for layer_id in (LEARNED, HASHED):
        _case(rank, world, layer_id, uneven, seed=10 + layer_id, dtype=dtype)
    # bf16 activations and weights (the reference path on CPU, the kernels on CUDA)
    _case(rank, world, LEARNED, uneven, seed=20, dtype=torch.bfloat16)
    # a rank with zero local tokens calling the layer; then one serving instead
    zero = [6, 0, 3, 0][:world]
    _case(rank, world, LEARNED, zero, seed=30, dtype=dtype)
    _case(rank, world, HASHED, zero, seed=31, serve_ranks=(1, 3), dtype=dtype)
    # rank 0's experts get no token (their bias pushes every token away)
    got = _case(rank, world, LEARNED, uneven, seed=40, bias=_bias_towards(range(L), -100.0),
                dtype=dtype)
    if rank == 0:
        assert got == [0]
    # the last rank receives every token of every rank (min(top-k, its experts) pairs each)
    total = sum(uneven) * min(K, L)
    got = _case(rank, world, LEARNED, uneven, seed=50,
                bias=_bias_towards(range(E - L, E), 100.0), dtype=dtype)
    if rank == world - 1:
        assert got == [total], got
    elif K <= L:
        assert got == [0], got
    # kernels.md §5 #14: 2304 tokens, all but 10 identical (routed identically), skewed ranks
    g = torch.Generator().manual_seed(60)
    x = _tokens(1, g).repeat(2304, 1)
    x[torch.randperm(2304, generator=g)[:10]] = _tokens(10, g)
    skew = [1500, 0, 700, 104][:world]
    skew[-1] += 2304 - sum(skew)
    _case(rank, world, LEARNED, skew, seed=61, x=x, dtype=dtype)
    # every rank serving: nothing is exchanged, serve_once says so on every rank
    dev = group.device
    ep = ExpertParallelMoE(_exact_moe(LEARNED, 70, dtype, device=dev), group, tag=LEARNED)
    assert serve_once({LEARNED: ep}) is None
    # ranks out of step (odd ranks in another layer): the same error everywhere ...
    ep2 = ExpertParallelMoE(_exact_moe(HASHED, 71, dtype, device=dev), group, tag=HASHED)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"out of step \(rank 0: MoE of layer "
                                                           r"3 .*rank 1: MoE of layer 0"):
        (ep if rank % 2 == 0 else ep2)(torch.randn(3, D, device=dev, dtype=dtype),
                                       torch.zeros(3, dtype=torch.long, device=dev))
    # ... and the group is still usable
    _case(rank, world, LEARNED, uneven, seed=80, dtype=dtype)
    assert IDLE < 0


@pytest.mark.parametrize("world", [2, 4])
def test_layer_equals_single_process(world):
    run_ranks(world, layer_cases)


def _gradient_refused(rank, world):
    ep = ExpertParallelMoE(_exact_moe(LEARNED, 0), ExpertParallelGroup.current(), tag=LEARNED)
    x = torch.randn(4, D, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        ep(x, torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        assert ep(x, torch.zeros(4, dtype=torch.long)).shape == (4, D)


def test_gradients_are_refused_before_any_exchange():
    run_ranks(2, _gradient_refused)
