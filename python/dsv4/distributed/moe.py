"""Expert-parallel MoE: each rank holds ``E / world_size`` routed experts of every MoE layer;
tokens travel to the rank of their experts and back with ``all_to_all_single``.

One MoE call on rank r with its own tokens x [N, dim] (architecture.md §9 for the maths;
kernels.md §4.6 for the DeepEP-style layout)::

    weights, indices = gate(x)                        replicated gate, this rank's tokens
    row_ids, offsets, w, pair_pos = moe_dispatch(indices, weights, E)
        (global expert-major order = rank-major: rank d owns experts [d·L, (d+1)·L), L = E/W)
    1. counts: all_to_all_single of [tag, dtype, counts of d's L experts] to every rank d
       (one host synchronisation reads the split sizes; no per-expert host loop)
    2. pairs:  all_to_all_single of the rows x[row_ids[:n]] and their weights w[:n]
       (n = offsets[E] valid pairs; each destination's block in expert-major order)
    3. local experts: received rows → moe_dispatch over the L local experts →
       MoE.expert_pairs (moe_up / moe_down or their references: the single-process code) →
       back to arrival order
    4. return: all_to_all_single of the expert outputs, arriving in the sender's dispatch order
    y = moe_combine(y_back, pair_pos, shared_expert(x))

Because the returned rows are in the global dispatch order and ``pair_pos`` is the same as in
the single-process model, ``moe_combine`` sums each token's experts in the same (ascending
expert) order; the shared expert runs on the token's own rank. Given the same expert outputs
the result is bit-identical to :class:`dsv4.layers.moe.MoE`.

Lockstep: every rank takes part in every exchange. A rank calls the MoE layers of its own
forward (any number of tokens, zero included); a rank without work calls :func:`serve`, which
answers the exchanges of the others with no tokens of its own (computing its experts for
theirs) and returns when every rank is serving at once. Each counts message carries the
layer's tag (its ``layer_id``) and the activation dtype, so ranks that are out of step raise
the same RuntimeError everywhere instead of exchanging wrong data.

Inference only (the exchange has no backward); the host synchronisation in step 1 means a
step cannot be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..layers.moe import MoE
from ..ops.moe import moe_dispatch_reference
from .group import ExpertParallelGroup

__all__ = ["ExpertSlice", "ExpertParallelMoE", "serve_once", "IDLE"]

_dsv4 = torch.ops.dsv4

#: The tag of a rank that takes part in an exchange without tokens (:func:`serve_once`).
IDLE = -1
#: Activation dtypes the exchange carries (index = the code sent in the counts message).
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExpertSlice(nn.Module):
    """The routed experts one rank holds, as children named by their GLOBAL index (so that
    ``state_dict`` names are the checkpoint's ``experts.{e}.w1.weight``); indexed, iterated and
    counted like the ``nn.ModuleList`` of :class:`~dsv4.layers.moe.MoE` by LOCAL position.

    ``first``: the global index of local expert 0.
    """

    def __init__(self, experts: Mapping[int, nn.Module]):
        super().__init__()
        ids = sorted(experts)
        if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"a rank holds a non-empty contiguous range of experts, got {ids}")
        self.first = ids[0]
        for e in ids:
            self.add_module(str(e), experts[e])

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i: int) -> nn.Module:
        n = len(self._modules)
        if not -n <= i < n:
            raise IndexError(f"local expert {i} out of range ({n} experts on this rank)")
        return self._modules[str(self.first + (i % n))]


class _Counts(NamedTuple):
    send_splits: list[int]      # pairs this rank sends to each rank
    recv_splits: list[int]      # pairs this rank receives from each rank
    recv_counts: torch.Tensor   # int64 [W, L]: pairs from rank s for local expert j
    tags: list[int]             # each rank's tag (IDLE when serving)
    dtypes: list[int]           # each rank's activation dtype code (-1 when serving)


def _exchange_counts(group: ExpertParallelGroup, tag: int, dtype_code: int, n_local: int,
                     counts: Optional[torch.Tensor]) -> _Counts:
    """Step 1: every rank tells every rank its tag, dtype and how many pairs it sends to each of
    that rank's experts (``counts`` int [W, L], row d for rank d's experts; None = none)."""
    W = group.world_size
    msg = torch.zeros(W, 2 + n_local, dtype=torch.int64, device=group.device)
    msg[:, 0] = tag
    msg[:, 1] = dtype_code
    if counts is not None:
        msg[:, 2:] = counts
    recv = torch.empty_like(msg)
    dist.all_to_all_single(recv, msg, group=group.process_group)
    host = torch.cat([msg[:, 2:].sum(1), recv[:, 2:].sum(1), recv[:, 0], recv[:, 1]]).tolist()
    return _Counts(host[:W], host[W:2 * W], recv[:, 2:], host[2 * W:3 * W], host[3 * W:])


def _agree(c: _Counts) -> Optional[tuple[int, torch.dtype]]:
    """The (tag, activation dtype) of the ranks with work, or None when every rank is serving.
    Every rank sees the same tags, so every rank raises the same error."""
    active = [(r, t, d) for r, (t, d) in enumerate(zip(c.tags, c.dtypes)) if t != IDLE]
    if not active:
        return None
    if len({t for _, t, _ in active}) > 1 or len({d for _, _, d in active}) > 1:
        where = ", ".join(
            f"rank {r}: MoE of layer {t} ({_DTYPES[d] if 0 <= d < len(_DTYPES) else d})"
            for r, t, d in active)
        raise RuntimeError(
            f"expert-parallel ranks are out of step ({where}): in each step every rank must "
            "run the MoE layers in the same order with the same activation dtype, and a rank "
            "without tokens must call dsv4.distributed.serve(model)")
    _, tag, code = active[0]
    if not 0 <= code < len(_DTYPES):
        raise RuntimeError(f"expert-parallel exchange: unknown activation dtype code {code}")
    return tag, _DTYPES[code]


def _bytes(rows: torch.Tensor) -> torch.Tensor:
    """[n, dim] → its bytes, uint8 [n, dim·itemsize] (n = 0 included)."""
    return rows.contiguous().view(torch.uint8).view(rows.shape[0],
                                                    rows.shape[1] * rows.element_size())


def _pack(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[n, dim] activations + [n] fp32 weights → uint8 [n, dim·itemsize + 4] (one message)."""
    return torch.cat([_bytes(rows), _bytes(weights.float().view(-1, 1))], dim=1)


def _unpack(buf: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    nb = dim * dtype.itemsize
    rows = buf[:, :nb].contiguous().view(dtype)
    weights = buf[:, nb:].contiguous().view(torch.float32).view(-1)
    return rows, weights


def _exchange_pairs(group: ExpertParallelGroup, moe: "ExpertParallelMoE", rows: torch.Tensor,
                    weights: torch.Tensor, c: _Counts, dtype: torch.dtype) -> torch.Tensor:
    """Steps 2-4: send ``rows`` [n, dim] / ``weights`` [n] (dispatch order, blocks by
    destination), compute ``moe``'s local experts for the rows received, send the outputs back.
    Returns the outputs of this rank's pairs [n, dim] in their dispatch order."""
    pg = group.process_group
    dim = moe.dim
    send = _pack(rows, weights)
    recv = torch.empty(sum(c.recv_splits), dim * dtype.itemsize + 4, dtype=torch.uint8,
                       device=group.device)
    dist.all_to_all_single(recv, send, c.recv_splits, c.send_splits, group=pg)
    x_in, w_in = _unpack(recv, dim, dtype)
    y_in = moe.local_experts(x_in, w_in, c.recv_counts)
    back = torch.empty(rows.shape[0], dim * dtype.itemsize, dtype=torch.uint8,
                       device=group.device)
    dist.all_to_all_single(back, _bytes(y_in), c.send_splits, c.recv_splits, group=pg)
    return back.view(dtype)


class ExpertParallelMoE(MoE):
    """An :class:`~dsv4.layers.moe.MoE` whose routed experts are spread over a process group.

    Built from a full (or meta) MoE: keeps its gate and shared expert (replicated) and this
    rank's experts ``group.expert_range(E)`` (:class:`ExpertSlice`, stacked for the grouped
    GEMMs as in the single-process layer); the other experts are dropped. ``tag`` identifies
    the layer in the exchange (its ``layer_id``).

    ``forward(x [batch, seq, dim], input_ids [batch, seq])`` → [batch, seq, dim], the
    single-process MoE's function of this rank's tokens (module docstring for the exchange).
    Every rank must call it (or :func:`serve_once`) at the same time.

    Raises (construction) ValueError when the world size does not divide the expert count.
    Raises (forward) RuntimeError with gradients required (inference only), inside CUDA graph
    capture, or when the ranks are out of step.
    """

    def __init__(self, moe: MoE, group: ExpertParallelGroup, tag: int):
        nn.Module.__init__(self)
        E = len(moe.experts)
        local = group.expert_range(E)
        self.dim = moe.dim
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        self.swiglu_limit = moe.swiglu_limit
        self.experts = ExpertSlice({e: moe.experts[e] for e in local})
        self.n_routed_experts = E
        self.group = group
        self.tag = int(tag)
        self._stack = None
        self.restack()

    def extra_repr(self) -> str:
        r = self.group
        return (f"experts {self.experts.first}..{self.experts.first + len(self.experts) - 1} of "
                f"{self.n_routed_experts} (rank {r.rank} of {r.world_size}), layer {self.tag}")

    # ------------------------------------------------------------------ this rank's tokens
    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_call(x.reshape(-1, self.dim))
        return super().forward(x, input_ids)

    def routed_pairs(self, x: torch.Tensor, row_ids: torch.Tensor, offsets: torch.Tensor,
                     route_weight: torch.Tensor, stack) -> torch.Tensor:
        """The single-process MoE's routed step across ranks: this rank's pairs (dispatched
        over all ``n_routed_experts``, blocks by owning rank) go to their experts' ranks and
        their outputs come back in dispatch order; pairs of no expert stay out of the exchange
        (combine skips them)."""
        W, L = self.group.world_size, len(self.experts)
        counts = (offsets[1:] - offsets[:-1]).view(W, L)
        c = _exchange_counts(self.group, self.tag, _DTYPES.index(x.dtype), L, counts)
        _agree(c)   # raises unless every rank with work is in this layer with this dtype
        n = sum(c.send_splits)
        rows = x.index_select(0, row_ids[:n].long())
        return _exchange_pairs(self.group, self, rows, route_weight[:n], c, x.dtype)

    def _check_call(self, x: torch.Tensor) -> None:
        """Refuse, before any exchange, what this rank cannot send (the others then wait: a
        rank that raises here must stop the job, as torchrun does)."""
        if torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in self.parameters())):
            raise RuntimeError("the expert-parallel MoE is inference-only (its all-to-all has no "
                               "backward): run it under torch.no_grad() or "
                               "torch.inference_mode()")
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the expert-parallel MoE cannot be captured in a CUDA graph (the "
                               "all-to-all split sizes are read on the host); run the step "
                               "eagerly")
        if x.device != self.group.device:
            raise ValueError(f"the expert-parallel MoE of this rank runs on "
                             f"{self.group.device}, got activations on {x.device}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"the expert-parallel MoE exchanges float32, bfloat16 or float16 "
                             f"activations, not {x.dtype}")

    # ------------------------------------------------------------------ other ranks' tokens
    def local_experts(self, x: torch.Tensor, weights: torch.Tensor,
                      recv_counts: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the received pairs, through the single-process code.

        ``x`` [R, dim] and ``weights`` fp32 [R] in arrival order: for each source rank s in
        turn, its pairs for local expert 0, 1, ... (``recv_counts`` int [W, L]: how many).
        Returns the expert outputs [R, dim] in arrival order.
        """
        R, L = x.shape[0], len(self.experts)
        local = torch.arange(L, dtype=torch.int32, device=x.device).repeat(
            recv_counts.shape[0])
        ids = torch.repeat_interleave(local, recv_counts.reshape(-1), output_size=R)
        stack = self.kernel_path_stack(x)
        dispatch = _dsv4.moe_dispatch if stack is not None else moe_dispatch_reference
        row_ids, offsets, route_weight, pos = dispatch(ids.view(R, 1), weights.view(R, 1), L)
        y = self.expert_pairs(x, row_ids, offsets, route_weight, stack)
        return y.index_select(0, pos.view(-1).long())


def serve_once(moes: Mapping[int, ExpertParallelMoE]) -> Optional[int]:
    """Take part in one exchange without tokens of this rank.

    ``moes``: this rank's expert-parallel MoE layers by tag. Computes this rank's experts for
    the pairs the other ranks send. Returns the tag of the layer served, or None when every
    rank was serving (nothing was exchanged). Raises ValueError for an empty ``moes``, and
    RuntimeError when the ranks with work are out of step, or when a tag names a layer this
    rank does not have.
    """
    if not moes:
        raise ValueError("serve_once: moes must map tags to at least one of this rank's "
                         "ExpertParallelMoE layers, got an empty mapping")
    any_moe = next(iter(moes.values()))
    group = any_moe.group
    c = _exchange_counts(group, IDLE, -1, len(any_moe.experts), None)
    agreed = _agree(c)
    if agreed is None:
        return None
    tag, dtype = agreed
    moe = moes.get(tag)
    if moe is None:   # cannot happen for models checked by check_same_model
        raise RuntimeError(f"expert-parallel exchange for layer {tag}, which this rank's model "
                           f"does not have (its MoE layers: {sorted(moes)})")
    with torch.no_grad():
        _exchange_pairs(group, moe, torch.empty(0, moe.dim, dtype=dtype, device=group.device),
                        torch.empty(0, dtype=torch.float32, device=group.device), c, dtype)
    return tag


def moe_layers(modules: Iterable[nn.Module]) -> dict[int, ExpertParallelMoE]:
    """The expert-parallel MoE layers among ``modules`` (e.g. ``model.modules()``) by tag.
    Raises ValueError for two layers with one tag."""
    out: dict[int, ExpertParallelMoE] = {}
    for m in modules:
        if isinstance(m, ExpertParallelMoE):
            if m.tag in out:
                raise ValueError(f"two expert-parallel MoE layers share the tag {m.tag}")
            out[m.tag] = m
    return out
