"""MoE routing, dispatch and combine: the references of ``torch.ops.dsv4.moe_gate``,
``moe_dispatch`` and ``moe_combine`` (architecture.md §9, training.md §3.2, §3.5, §3.8).

The three ops carry a token through the routed experts without a host synchronisation::

    weights, indices = moe_gate(x, gate.weight, gate.bias, tid2eid, input_ids, topk, route_scale)
    row_ids, expert_offsets, route_weight, pair_pos = moe_dispatch(indices, weights, n_experts)
    h = moe_up(x, row_ids, expert_offsets, w_up, ...)   # grouped GEMMs (docs/contracts.md §B)
    y_pair = moe_down(h, expert_offsets, w_down, ...)
    y = moe_combine(y_pair, pair_pos, shared_expert(x))

Contracts shared by the references here and the CUDA kernels (csrc/kernels/moe_*.cu):

* gate: scores ``s = sqrt(softplus(x·Wᵀ))`` in fp32 (torch's softplus: exact above 20, log1p
  below, so very negative logits keep a positive score); learned layers select the ``topk``
  largest ``s + bias`` (descending; equal keys by the LOWEST expert index; NaN ranks highest, as
  ``torch.sort`` does); hash layers select ``tid2eid[input_ids]`` in table order. Weights =
  ``s[selected] / Σ s[selected] · route_scale`` (the bias never enters them); a zero sum gives
  zero weights instead of 0/0.
* dispatch: pairs ``p = t·topk + slot`` in expert-major order, stable (within an expert by
  ascending p, i.e. token then slot); invalid indices (outside ``[0, n_experts)``) go after
  ``expert_offsets[n_experts]`` and get ``pair_pos = -1`` and weight 0.
* combine: ``y[t] = Σ y_pair[pos]`` over the token's valid positions in ASCENDING position
  order (= ascending expert, the order in which the reference MoE accumulates its experts), in
  fp32 starting from 0, then ``+ shared[t]``, rounded once to the output dtype. Given the same
  expert outputs the result is therefore bit-identical to the per-expert reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._ext import check_finite_f32, check_writable, raise_value_error, register_op

__all__ = [
    "moe_gate", "moe_gate_reference", "moe_dispatch", "moe_dispatch_reference",
    "moe_combine", "moe_combine_reference", "GATE_MAX_EXPERTS", "MAX_TOPK",
    "DISPATCH_MAX_EXPERTS",
]

# What the CUDA kernels support (the ops check it on every device; csrc/include/dsv4/moe_routing.h).
GATE_MAX_EXPERTS = 512
MAX_TOPK = 16
DISPATCH_MAX_EXPERTS = 1023


# ---------------------------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------------------------
_GATE_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor? tid2eid, Tensor? input_ids, "
                "int topk, float route_scale) -> (Tensor, Tensor)")
_GATE_OUT_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor? tid2eid, Tensor? input_ids, "
                    "int topk, float route_scale, *, Tensor(a!) weights, Tensor(b!) indices) -> ()")


_ID_DTYPES = (torch.int32, torch.int64)


def _check_gate(x, weight, bias, tid2eid, input_ids, topk, route_scale, check):
    # the kernel's float32 factor on the normalised weights: any finite one (the CUDA glue's)
    check_finite_f32("moe_gate", "route_scale", route_scale, check)
    check(x.dim() == 2, lambda: f"moe_gate: x must be [tokens, dim], got {tuple(x.shape)}")
    check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
          lambda: f"moe_gate: weight must be [experts, {x.shape[-1]}] ([experts, dim]), got "
                  f"{tuple(weight.shape)}")
    check(x.dtype.is_floating_point and weight.dtype.is_floating_point,
          lambda: f"moe_gate: x and weight must be floating-point, got {x.dtype} and {weight.dtype}")
    E = weight.shape[0]
    check(1 <= topk <= min(E, MAX_TOPK),
          lambda: f"moe_gate: topk must be in [1, min(experts={E}, {MAX_TOPK})], got {topk}")
    check(E <= GATE_MAX_EXPERTS,
          lambda: f"moe_gate: at most {GATE_MAX_EXPERTS} experts are supported, got {E}")
    if bias is not None:
        check(tid2eid is None, lambda: "moe_gate: hash routing (tid2eid) takes no bias")
        check(bias.dim() == 1 and bias.shape[0] == E and bias.dtype.is_floating_point,
              lambda: f"moe_gate: bias must be a float [{E}] ([experts]), got {bias.dtype} "
                      f"{tuple(bias.shape)}")
    if tid2eid is not None:
        check(input_ids is not None, lambda: "moe_gate: hash routing (tid2eid) needs input_ids")
        # int32 / int64, as the CUDA kernel: a bool (or complex) table or ids would otherwise be
        # read as expert / token ids 0 and 1
        check(tid2eid.dim() == 2 and tid2eid.shape[1] == topk and tid2eid.dtype in _ID_DTYPES,
              lambda: f"moe_gate: tid2eid must be an int32/int64 [vocab, {topk}] ([vocab, topk]) "
                      f"table, got {tid2eid.dtype} {tuple(tid2eid.shape)}")
        check(input_ids.dim() == 1 and input_ids.shape[0] == x.shape[0]
              and input_ids.dtype in _ID_DTYPES,
              lambda: f"moe_gate: input_ids must be an int32/int64 [{x.shape[0]}] ([tokens]), got "
                      f"{input_ids.dtype} {tuple(input_ids.shape)}")


def moe_gate_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       tid2eid: Optional[torch.Tensor], input_ids: Optional[torch.Tensor],
                       topk: int, route_scale: float, *, select_hook=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE router (architecture.md §9; official ``Gate.forward``; training.md §3.2, §3.5).

    Args:
        x: [tokens, dim] float (the ffn-normed hidden state; upcast to fp32).
        weight: [experts, dim] float gate weight (upcast to fp32).
        bias: [experts] fp32 selection bias (learned layers) or None.
        tid2eid: [vocab, topk] int32 / int64 table (hash layers) or None (learned routing).
        input_ids: [tokens] int32 / int64 token ids (hash layers; ignored otherwise).
        topk: experts per token, in [1, min(experts, 16)].
        route_scale: factor on the normalised weights (1.5 Flash, 2.5 Pro).
        select_hook: optional Python callable ``(scores [tokens, experts] fp32, indices
            [tokens, topk] int64) -> indices`` run after the selection and before the weights
            are gathered (training: balance loss, load statistics, anticipatory routing; see
            ``dsv4.layers.moe.Gate.route_hook``). Not part of the op schema.

    Returns:
        (weights fp32 [tokens, topk], indices int32 [tokens, topk]), slots in selection order
        (descending ``score + bias``; table order for hash layers).

    Raises:
        ValueError: bad shapes or dtypes, a bias with tid2eid, token ids outside
            ``[0, tid2eid.shape[0])``, or table entries outside ``[0, experts)`` (the CUDA
            kernel cannot raise: it gives such slots index -1 and weight 0).
    """
    _check_gate(x, weight, bias, tid2eid, input_ids, topk, route_scale, raise_value_error)
    E = weight.shape[0]
    scores = F.softplus(F.linear(x.float(), weight.float())).sqrt()
    if tid2eid is None:
        key = scores if bias is None else scores + bias.float()
        indices = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :topk]
    else:
        ids = input_ids.to(device=x.device, dtype=torch.long)
        n_ids = tid2eid.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_ids):
            raise ValueError(
                f"hash-routed MoE: token ids must lie in [0, {n_ids}) (the rows of tid2eid); "
                f"got ids in [{int(ids.min())}, {int(ids.max())}]")
        indices = tid2eid.to(x.device)[ids].long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= E):
            raise ValueError(f"moe_gate: tid2eid holds expert ids outside [0, {E})")
    if select_hook is not None:
        indices = select_hook(scores, indices)
    w = scores.gather(1, indices)
    denom = w.sum(-1, keepdim=True)
    w = w / torch.where(denom == 0, torch.ones_like(denom), denom) * route_scale
    return w, indices.to(torch.int32)


def _moe_gate_kernel(x, weight, bias, tid2eid, input_ids, topk, route_scale):
    w, idx = moe_gate_reference(x, weight, bias, tid2eid, input_ids, topk, route_scale)
    return w.contiguous(), idx.contiguous()


def _moe_gate_out_kernel(x, weight, bias, tid2eid, input_ids, topk, route_scale, *, weights,
                         indices):
    _check_gate(x, weight, bias, tid2eid, input_ids, topk, route_scale, raise_value_error)
    T = x.shape[0]
    if (tuple(weights.shape) != (T, topk) or weights.dtype != torch.float32
            or tuple(indices.shape) != (T, topk) or indices.dtype != torch.int32):
        raise ValueError(f"moe_gate_out: weights must be float32 [{T}, {topk}] and indices int32 "
                         f"[{T}, {topk}], got {weights.dtype} {tuple(weights.shape)} and "
                         f"{indices.dtype} {tuple(indices.shape)}")
    check_writable("moe_gate_out", weights=weights, indices=indices)
    w, idx = moe_gate_reference(x, weight, bias, tid2eid, input_ids, topk, route_scale)
    weights.copy_(w)
    indices.copy_(idx)


def _moe_gate_fake(x, weight, bias, tid2eid, input_ids, topk, route_scale):
    _check_gate(x, weight, bias, tid2eid, input_ids, topk, route_scale, torch._check)
    T = x.shape[0]
    return (x.new_empty((T, topk), dtype=torch.float32),
            x.new_empty((T, topk), dtype=torch.int32))


def _moe_gate_out_fake(x, weight, bias, tid2eid, input_ids, topk, route_scale, *, weights,
                       indices):
    _check_gate(x, weight, bias, tid2eid, input_ids, topk, route_scale, torch._check)


register_op("moe_gate", _GATE_SCHEMA, _moe_gate_kernel, _moe_gate_fake)
register_op("moe_gate_out", _GATE_OUT_SCHEMA, _moe_gate_out_kernel, _moe_gate_out_fake)


def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             tid2eid: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
             *, topk: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.dsv4.moe_gate``: the router of :func:`moe_gate_reference`.

    The CUDA kernel takes bfloat16 x and weight with dim % 8 == 0, fp32 bias, int32/int64
    tid2eid and input_ids, experts <= 512, topk <= 16 (two launches; no host synchronisation;
    token ids outside the table give index -1 and weight 0 instead of an error).
    Returns (weights fp32 [tokens, topk], indices int32 [tokens, topk]).
    """
    return torch.ops.dsv4.moe_gate(x, weight, bias, tid2eid, input_ids, topk, route_scale)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
_DISPATCH_SCHEMA = "(Tensor indices, Tensor weights, int n_experts) -> (Tensor, Tensor, Tensor, Tensor)"
_DISPATCH_OUT_SCHEMA = ("(Tensor indices, Tensor weights, int n_experts, *, Tensor(a!) row_ids, "
                        "Tensor(b!) expert_offsets, Tensor(c!) route_weight, Tensor(d!) pair_pos) -> ()")


def _check_dispatch(indices, weights, n_experts, check):
    check(indices.dim() == 2 and indices.shape[1] >= 1,
          lambda: f"moe_dispatch: indices must be [tokens, topk], got {tuple(indices.shape)}")
    check(indices.dtype == torch.int32,
          lambda: f"moe_dispatch: indices must be int32, got {indices.dtype}")
    check(tuple(weights.shape) == tuple(indices.shape)
          and weights.dtype in (torch.float32, torch.float64),
          lambda: f"moe_dispatch: weights must be float32 {tuple(indices.shape)} (as indices; the "
                  f"CPU reference also takes float64, for gradient checks), got "
                  f"{weights.dtype} {tuple(weights.shape)}")
    check(1 <= n_experts <= DISPATCH_MAX_EXPERTS,
          lambda: f"moe_dispatch: n_experts must be in [1, {DISPATCH_MAX_EXPERTS}], got {n_experts}")
    check(indices.numel() < 2**31 - 1,
          lambda: f"moe_dispatch: at most 2^31 - 2 pairs, got {indices.numel()}")


def moe_dispatch_reference(indices: torch.Tensor, weights: torch.Tensor, n_experts: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-major, stable order of the (token, slot) pairs (docs/contracts.md §B;
    training.md §3.8).

    Args:
        indices: int32 [tokens, topk] selected experts (from :func:`moe_gate_reference`).
        weights: float32 [tokens, topk] routing weights (float64 too, on the CPU reference:
            ``route_weight`` keeps the dtype, so float64 gradient checks stay float64).
        n_experts: number of routed experts E (<= 1023).

    Returns:
        row_ids int32 [P] (P = tokens · topk): the token of the pair at each position;
        expert_offsets int32 [E + 1]: pairs of expert e at ``[offsets[e], offsets[e + 1])``,
        ``offsets[E]`` = number of valid pairs (invalid ones follow, in pair order);
        route_weight float32 [P]: the pair's weight at each position (0 if invalid);
        pair_pos int32 [tokens, topk]: where pair (t, slot) went, -1 if its index is invalid.

    Raises:
        ValueError: shapes/dtypes other than the above, or n_experts outside [1, 1023].
    """
    _check_dispatch(indices, weights, n_experts, raise_value_error)
    T, k = indices.shape
    dev = indices.device
    idx = indices.reshape(-1).long()
    valid = (idx >= 0) & (idx < n_experts)
    bucket = torch.where(valid, idx, n_experts)
    order = torch.sort(bucket, stable=True).indices            # position -> pair
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=dev)
    row_ids = (order // k).to(torch.int32)
    route_weight = torch.where(valid, weights.reshape(-1), 0.0)[order]
    counts = torch.bincount(bucket, minlength=n_experts + 1)[:n_experts]
    offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    pair_pos = torch.where(valid, pos, -1).view(T, k).to(torch.int32)
    return row_ids, offsets, route_weight, pair_pos


def _moe_dispatch_kernel(indices, weights, n_experts):
    return tuple(t.contiguous() for t in moe_dispatch_reference(indices, weights, n_experts))


def _moe_dispatch_out_kernel(indices, weights, n_experts, *, row_ids, expert_offsets,
                             route_weight, pair_pos):
    _check_dispatch(indices, weights, n_experts, raise_value_error)
    _check_dispatch_out(indices, n_experts, row_ids, expert_offsets, route_weight, pair_pos,
                        raise_value_error)
    check_writable("moe_dispatch_out", row_ids=row_ids, expert_offsets=expert_offsets,
                   route_weight=route_weight, pair_pos=pair_pos)
    outs = moe_dispatch_reference(indices, weights, n_experts)
    for dst, src in zip((row_ids, expert_offsets, route_weight, pair_pos), outs):
        dst.copy_(src)


def _check_dispatch_out(indices, n_experts, row_ids, expert_offsets, route_weight, pair_pos, check):
    P = indices.numel()
    want = ((row_ids, (P,), torch.int32, "row_ids"),
            (expert_offsets, (n_experts + 1,), torch.int32, "expert_offsets"),
            (route_weight, (P,), torch.float32, "route_weight"),
            (pair_pos, tuple(indices.shape), torch.int32, "pair_pos"))
    for t, shape, dtype, name in want:
        check(tuple(t.shape) == shape and t.dtype == dtype,
              lambda t=t, shape=shape, dtype=dtype, name=name:
              f"moe_dispatch_out: {name} must be {dtype} {list(shape)}, got {t.dtype} "
              f"{list(t.shape)}")


def _moe_dispatch_fake(indices, weights, n_experts):
    _check_dispatch(indices, weights, n_experts, torch._check)
    P = indices.shape[0] * indices.shape[1]
    return (indices.new_empty((P,)), indices.new_empty((n_experts + 1,)),
            weights.new_empty((P,)), indices.new_empty(indices.shape))


def _moe_dispatch_out_fake(indices, weights, n_experts, *, row_ids, expert_offsets,
                           route_weight, pair_pos):
    _check_dispatch(indices, weights, n_experts, torch._check)


register_op("moe_dispatch", _DISPATCH_SCHEMA, _moe_dispatch_kernel, _moe_dispatch_fake)
register_op("moe_dispatch_out", _DISPATCH_OUT_SCHEMA, _moe_dispatch_out_kernel,
            _moe_dispatch_out_fake)


def moe_dispatch(indices: torch.Tensor, weights: torch.Tensor, n_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.dsv4.moe_dispatch``: see :func:`moe_dispatch_reference` (same contract on
    CUDA: counts, offsets and positions computed on the device, deterministic, buffers sized
    for the worst case P = tokens · topk, so the step is CUDA-graph capturable)."""
    return torch.ops.dsv4.moe_dispatch(indices, weights, n_experts)


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------
_COMBINE_SCHEMA = "(Tensor y_pair, Tensor pair_pos, Tensor? shared) -> Tensor"
_COMBINE_OUT_SCHEMA = "(Tensor y_pair, Tensor pair_pos, Tensor? shared, *, Tensor(a!) y) -> ()"


def _check_combine(y_pair, pair_pos, shared, check):
    check(y_pair.dim() == 2, lambda: f"moe_combine: y_pair must be [pairs, dim], got "
                                     f"{tuple(y_pair.shape)}")
    check(y_pair.dtype.is_floating_point,
          lambda: f"moe_combine: y_pair must be floating-point, got {y_pair.dtype}")
    check(pair_pos.dim() == 2 and pair_pos.dtype == torch.int32,
          lambda: f"moe_combine: pair_pos must be int32 [tokens, topk], got {pair_pos.dtype} "
                  f"{tuple(pair_pos.shape)}")
    check(1 <= pair_pos.shape[1] <= MAX_TOPK,
          lambda: f"moe_combine: topk must be in [1, {MAX_TOPK}], got {pair_pos.shape[1]}")
    if shared is not None:
        check(tuple(shared.shape) == (pair_pos.shape[0], y_pair.shape[1])
              and shared.dtype == y_pair.dtype,
              lambda: f"moe_combine: shared must be {y_pair.dtype} [{pair_pos.shape[0]}, "
                      f"{y_pair.shape[1]}] ([tokens, dim]), got {shared.dtype} "
                      f"{tuple(shared.shape)}")


def moe_combine_reference(y_pair: torch.Tensor, pair_pos: torch.Tensor,
                          shared: Optional[torch.Tensor]) -> torch.Tensor:
    """Sum of each token's expert outputs plus the shared expert (official ``MoE.forward``).

    ``y[t] = (Σ_{pos in sorted(valid pair_pos[t])} y_pair[pos]) + shared[t]`` in fp32, the sum
    starting from 0 in ascending position order (= the reference's expert order), rounded once
    to ``y_pair.dtype``.

    Args:
        y_pair: [pairs, dim] expert outputs in dispatch order (the routing weight already
            applied inside the expert, before its down projection, architecture.md §9).
        pair_pos: int32 [tokens, topk] from :func:`moe_dispatch_reference`; values outside
            ``[0, pairs)`` (-1) are skipped.
        shared: [tokens, dim] shared-expert output of y_pair's dtype, or None.

    Returns:
        [tokens, dim] of y_pair's dtype.

    Raises:
        ValueError: shapes/dtypes other than the above, or topk > 16.
    """
    _check_combine(y_pair, pair_pos, shared, raise_value_error)
    T, k = pair_pos.shape
    n_rows, D = y_pair.shape
    pos = pair_pos.long()
    valid = (pos >= 0) & (pos < n_rows)
    sorted_pos = torch.sort(torch.where(valid, pos, n_rows), dim=1).values
    acc = torch.zeros(T, D, dtype=torch.float32, device=y_pair.device)
    if n_rows:
        for j in range(k):
            pj = sorted_pos[:, j]
            acc = torch.where((pj < n_rows)[:, None], acc + y_pair[pj.clamp_max(n_rows - 1)].float(),
                              acc)
    if shared is not None:
        acc = acc + shared.float()
    return acc.to(y_pair.dtype)


def _moe_combine_kernel(y_pair, pair_pos, shared):
    return moe_combine_reference(y_pair, pair_pos, shared)


def _moe_combine_out_kernel(y_pair, pair_pos, shared, *, y):
    _check_combine(y_pair, pair_pos, shared, raise_value_error)
    want = (pair_pos.shape[0], y_pair.shape[1])
    if tuple(y.shape) != want or y.dtype != y_pair.dtype:
        raise ValueError(f"moe_combine_out: y must be {y_pair.dtype} {list(want)}, got {y.dtype} "
                         f"{list(y.shape)}")
    check_writable("moe_combine_out", y=y)
    y.copy_(moe_combine_reference(y_pair, pair_pos, shared))


def _moe_combine_fake(y_pair, pair_pos, shared):
    _check_combine(y_pair, pair_pos, shared, torch._check)
    return y_pair.new_empty((pair_pos.shape[0], y_pair.shape[1]))


def _moe_combine_out_fake(y_pair, pair_pos, shared, *, y):
    _check_combine(y_pair, pair_pos, shared, torch._check)


register_op("moe_combine", _COMBINE_SCHEMA, _moe_combine_kernel, _moe_combine_fake)
register_op("moe_combine_out", _COMBINE_OUT_SCHEMA, _moe_combine_out_kernel, _moe_combine_out_fake)


def moe_combine(y_pair: torch.Tensor, pair_pos: torch.Tensor,
                shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.dsv4.moe_combine``: see :func:`moe_combine_reference` (the CUDA kernel takes
    bfloat16 y_pair/shared and gives the same bits as the reference for the same inputs)."""
    return torch.ops.dsv4.moe_combine(y_pair, pair_pos, shared)
