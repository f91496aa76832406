"""Mixture of experts: sqrt-softplus gate, hash routing, clamped SwiGLU experts (§9).

Two paths compute the same function:

* reference (CPU, fp32 models, the ``"reference"`` backend, or whenever gradients are needed):
  router → :func:`~dsv4.ops.moe.moe_dispatch_reference` → the references of ``moe_up`` /
  ``moe_down`` (:mod:`dsv4.ops.grouped_gemm`: the official per-expert SwiGLU expert on the
  stacked weights, the one definition of the expert formula) →
  :func:`~dsv4.ops.moe.moe_combine_reference` (the fp32 sum in expert order, then the shared
  expert, as the official ``MoE.forward``);
* kernels (CUDA bfloat16 with the ``"cuda"`` backend): ``moe_gate`` → ``moe_dispatch`` →
  grouped expert GEMMs (``moe_up`` / ``moe_down`` of docs/contracts.md §B when compiled; for bf16
  experts at prefill size, or without those kernels, ``torch._grouped_mm`` around the
  ``moe_swiglu`` kernel) → ``moe_combine``; no host synchronisation, so the step can be
  captured in a CUDA graph.

Routed experts are stored stacked (docs/contracts.md §B): ``w_up`` [E, 2, N, K] (index 0 = w1, the
gate; 1 = w3, the up projection) and ``w_down`` [E, dim, N] (w2), in the experts' dtype, or
their native FP8/FP4 bytes with stacked scales after ``from_pretrained(weights="native")``.
Each ``experts.{e}.w1/w3/w2`` keeps its official name and is a view into the stack, so
``state_dict``, ``load_state_dict`` (in place) and checkpoints see the per-expert tensors.
Operations that give an expert a new tensor (``Model.to(dtype)``, the checkpoint loader, a
``.data =`` assignment) are detected on the next kernel-path forward (the first and last
expert are checked) and the stack is rebuilt; after replacing a middle expert's tensor object
by hand, call :meth:`MoE.restack`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.backend import env_choice, get_backend, may_call, use_kernels
from ..ops.moe import (DISPATCH_MAX_EXPERTS, GATE_MAX_EXPERTS, MAX_TOPK, moe_combine_reference,
                       moe_dispatch_reference, moe_gate_reference)
from ..ops.grouped_gemm import moe_down_reference, moe_up_reference
from ..ops.quant import fp8_e4m3_sim
from ..quant import FP8_BLOCK
from .branch import Branch
from .linear import Linear, ProjectionGroups, project

__all__ = ["Gate", "Expert", "MoE", "ExpertStack", "experts_grouped_mm", "swiglu_clamped"]

_dsv4 = torch.ops.dsv4


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor, limit: float,
                   weight: Optional[torch.Tensor] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``silu(min(gate, limit)) * clamp(up, -limit, limit)`` in fp32 (limit 0 = no clamp),
    times ``weight`` (fp32, broadcast; the routing weight) when given, returned in fp32 or,
    with ``dtype``, rounded once to ``dtype``.

    gate, up: [..., N] float (the w1 / w3 outputs, bf16 in the model). Source: official
    ``Expert.forward``; training.md §3.6 / §7.4 (test vectors).

    The values are those of upcasting both to fp32 first; fewer launches: ``up`` enters the
    fp32 product by type promotion (clamped in its own dtype when ``limit`` is exact there,
    which gives the same values), and the last product is written in ``dtype`` directly.
    """
    gate = gate.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        if not _exact_in(limit, up.dtype):
            up = up.float()
        up = up.clamp(-limit, limit)
    h = F.silu(gate)
    if weight is not None:
        h = h * up
        up = weight
    return _mul_rounded(h, up, dtype)


@functools.lru_cache(maxsize=None)
def _exact_in(value: float, dtype: torch.dtype) -> bool:
    """Whether ``value`` is a normal number of the floating ``dtype`` (clamping to it there
    is exact). Pure Python (no tensor: also under fake / meta modes)."""
    fi = torch.finfo(dtype)
    bits = round(-math.log2(fi.eps)) + 1          # significand bits (8 for bfloat16)
    m, _ = math.frexp(value)
    return fi.tiny <= abs(value) <= fi.max and (m * 2 ** bits).is_integer()


def _mul_rounded(a: torch.Tensor, b: torch.Tensor,
                 dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``(a * b).to(dtype)`` (``a * b`` for dtype None): the product in the promoted dtype,
    rounded to ``dtype`` as it is stored (one launch; the same values). Autograd takes the
    two-step form (``out=`` has no backward)."""
    if dtype is None:
        return a * b
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return (a * b).to(dtype)
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype, device=a.device)
    return torch.mul(a, b, out=out)


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Gate(nn.Module):
    """Router: scores ``sqrt(softplus(x·Wᵀ))`` in fp32; selection by top-k of ``score + bias``
    (learned layers; equal keys: lowest expert first) or by ``tid2eid[token_id]`` (hash layers,
    ``layer_id < n_hash_layers``); weights = selected scores / their sum × ``route_scale`` (the
    bias never enters the weights). The maths is :func:`dsv4.ops.moe.moe_gate_reference`; on
    CUDA bfloat16 inputs with the ``"cuda"`` backend the fused ``torch.ops.dsv4.moe_gate`` runs.
    Parameters: ``weight`` [n_routed_experts, dim]; ``bias`` [n_routed_experts] fp32 (learned)
    or the int64 buffer ``tid2eid`` [vocab_size, n_activated_experts] (hash).

    ``route_hook`` (None by default; set by :mod:`dsv4.train.routing`): a callable
    ``(gate, scores [N, n_routed_experts] fp32, indices [N, topk] int64) -> indices`` run after
    the selection and before the weights are gathered. Training uses it to read the scores
    (balance loss) and the load, and to apply routing indices computed earlier (anticipatory
    routing, training.md §3.7); the weights always come from this call's scores. A set hook
    keeps the gate on the reference path.
    """

    route_hook = None

    def __init__(self, config, layer_id: int):
        super().__init__()
        self.topk = config.n_activated_experts
        self.route_scale = config.route_scale
        self.n_experts = config.n_routed_experts
        self.hash = layer_id < config.n_hash_layers
        self.weight = nn.Parameter(torch.randn(config.n_routed_experts, config.dim) * config.dim ** -0.5)
        if self.hash:
            self.bias = None
            tid2eid = torch.rand(config.vocab_size, config.n_routed_experts).argsort(-1)[:, :self.topk]
            self.register_buffer("tid2eid", tid2eid.long())
        else:
            self.bias = nn.Parameter(torch.randn(config.n_routed_experts) * 0.01)
            self.bias._dsv4_keep_fp32 = True

    def kernel_unsupported(self, x: torch.Tensor) -> Optional[str]:
        """Why ``torch.ops.dsv4.moe_gate`` cannot serve ``x`` [N, dim], or None."""
        if self.weight.dtype != torch.bfloat16:
            return f"the MoE gate kernel takes a bfloat16 gate weight, not {self.weight.dtype}"
        if x.shape[-1] % 8 or not 1 <= self.n_experts <= GATE_MAX_EXPERTS or self.topk > MAX_TOPK:
            return (f"the MoE gate kernel takes dim % 8 == 0, <= {GATE_MAX_EXPERTS} experts, "
                    f"top-k <= {MAX_TOPK} (got {x.shape[-1]}, {self.n_experts}, {self.topk})")
        if self.bias is not None and self.bias.dtype != torch.float32:
            return f"the MoE gate kernel takes a float32 bias, not {self.bias.dtype}"
        if _needs_grad(x, self.weight, self.bias):
            return ("the MoE kernels have no backward; with gradients enabled the MoE runs the "
                    "reference (wrap inference in torch.no_grad())")
        return None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim], input_ids [N] → (weights [N, topk] fp32, indices [N, topk] int32).

        Raises ValueError (reference path, hash layers) for a token id outside
        [0, tid2eid.shape[0]). The kernel path does not synchronise with the host to check ids
        (``Model`` checks them before the step); there such a token gets no routed expert
        (index -1, weight 0) and no memory outside the table is read.
        """
        tid2eid = self.tid2eid if self.hash else None
        ids = input_ids if self.hash else None
        hook = self.route_hook
        if (hook is None and x.is_cuda
                and use_kernels(x, ("moe_gate",), self.kernel_unsupported(x))):
            return _dsv4.moe_gate(x, self.weight, self.bias, tid2eid, ids, self.topk,
                                  self.route_scale)
        select = None if hook is None else (lambda scores, idx: hook(self, scores, idx))
        return moe_gate_reference(x, self.weight, self.bias, tid2eid, ids, self.topk,
                                  self.route_scale, select_hook=select)


class Expert(nn.Module):
    """SwiGLU expert ``w2(clamped_swiglu(w1 x, w3 x) · weight)`` (routing weight before ``w2``)."""

    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None,
                up: Optional[tuple] = None) -> torch.Tensor:
        """x [N, dim] → [N, dim] in x.dtype; ``weights`` [N, 1] fp32 routing weights or None;
        ``up``: ``(w1(x), w3(x))`` when the caller computed them (the MoE for its shared
        expert, one GEMM when fused), else None."""
        gate, lin = (self.w1(x), self.w3(x)) if up is None else up
        gu = _adjacent_halves(gate, lin) if weights is None and x.dtype == gate.dtype else None
        if (gu is not None and gu.is_cuda and get_backend() == "cuda" and not _needs_grad(gu)
                and _swiglu_kernel_available()):
            # one moe_swiglu launch (weight 1: the same bits, x * 1.0 is exact) in place of
            # swiglu_clamped's five elementwise kernels (the cuda backend only: the reference
            # backend runs the formula)
            ones = torch.ones(gu.shape[0], dtype=torch.float32, device=gu.device)
            return self.w2(_dsv4.moe_swiglu(gu, ones, float(self.swiglu_limit)))
        return self.w2(swiglu_clamped(gate, lin, self.swiglu_limit, weights, x.dtype))


def _adjacent_halves(gate: torch.Tensor, up: torch.Tensor) -> Optional[torch.Tensor]:
    """``[gate | up]`` as one bf16 [N, 2I] tensor when ``gate`` and ``up`` (bf16 [N, I]) are the
    two halves of the rows of one contiguous buffer (the output of a fused w1 / w3 GEMM), else
    None. A view: nothing is copied."""
    if gate.dtype != torch.bfloat16 or up.dtype != gate.dtype or gate.dim() != 2:
        return None
    n, i = gate.shape
    if (up.shape != gate.shape or gate.stride() != (2 * i, 1) or up.stride() != (2 * i, 1)
            or up.device != gate.device
            or up.untyped_storage().data_ptr() != gate.untyped_storage().data_ptr()
            or up.storage_offset() != gate.storage_offset() + i):
        return None
    return gate.as_strided((n, 2 * i), (2 * i, 1))


def _stored(lin: Linear) -> tuple[Optional[str], torch.Tensor, Optional[torch.Tensor]]:
    """(format, weight or packed weight, scale) of a Linear as it holds them now."""
    if lin.weight_format is None:
        return None, lin._parameters["weight"], None
    return lin.weight_format, lin.qweight, lin.scale


def _repoint(lin: Linear, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> None:
    """Make a Linear's storage the given views (keeping its Parameter object)."""
    if lin.weight_format is None:
        lin._parameters["weight"].data = weight
    else:
        lin._buffers["qweight"] = weight
        lin._buffers["scale"] = scale


@dataclasses.dataclass
class ExpertStack:
    """The routed experts of one MoE in the layout of docs/contracts.md §B.

    fmt None: ``w_up`` [E, 2, N, K] / ``w_down`` [E, dim, N] float (bf16/fp32), no scales;
    ``"fp8"``: float8_e4m3fn with 128x128 block scales [E, 2, ceil(N/128), ceil(K/128)] /
    [E, ceil(dim/128), ceil(N/128)]; ``"fp4"``: packed int8 [E, 2, N, K/2] / [E, dim, N/2] with
    1x32 scales [E, 2, N, K/32] / [E, dim, N/32] (scales float8_e8m0fnu or float32).
    """
    fmt: Optional[str]
    w_up: torch.Tensor
    w_up_scale: Optional[torch.Tensor]
    w_down: torch.Tensor
    w_down_scale: Optional[torch.Tensor]


class MoE(ProjectionGroups, nn.Module):
    """Routed experts (top-``n_activated_experts``) plus the always-on shared expert, both clamped.

    ``y = Σ_routed expert_e(x, w_e)`` accumulated in fp32 in expert order, ``+ shared(x)``, cast to
    x.dtype (official ``MoE.forward``; the shared expert is clamped too, architecture.md §9).
    See the module docstring for the two paths and the stacked expert storage.
    Same-input projections (one GEMM after ``Model.fuse_projections``): ``"shared"`` = the
    shared expert's ``w1``, ``w3`` (the routed experts' w1 / w3 are already adjacent in the
    stack, ``w_up``).
    """

    def __init__(self, config, layer_id: int):
        super().__init__()
        c = config
        self.dim = c.dim
        self.gate = Gate(c, layer_id)
        self.experts = nn.ModuleList(
            Expert(c.dim, c.moe_inter_dim, c.swiglu_limit) for _ in range(c.n_routed_experts))
        if c.n_shared_experts != 1:
            raise ValueError("dsv4 supports n_shared_experts == 1 (the released V4 models)")
        self.shared_experts = Expert(c.dim, c.n_shared_experts * c.moe_inter_dim, c.swiglu_limit)
        self.swiglu_limit = c.swiglu_limit
        self.n_routed_experts = c.n_routed_experts  # what the gate routes over (dispatch bins)
        self._stack: Optional[ExpertStack] = None
        self.restack()

    def projection_groups(self) -> dict:
        """{"shared": (shared_experts.w1, shared_experts.w3)}: the linears applied to the
        layer input (see :class:`~dsv4.layers.linear.ProjectionGroups`)."""
        se = self.shared_experts
        return {"shared": (se.w1, se.w3)} if isinstance(se, Expert) else {}

    # ------------------------------------------------------------------ stacked storage
    def restack(self) -> Optional[ExpertStack]:
        """(Re)build the stacked expert storage from the experts' current tensors and make each
        expert's w1/w3/w2 a view into it. Returns the stack, or None (and leaves the experts
        as they are) when the experts differ in format, dtype, device or shape."""
        self._stack = None
        stored = [[_stored(getattr(e, n)) for n in ("w1", "w3", "w2")] for e in self.experts]
        if not stored:
            return None
        first = stored[0]
        for row in stored:
            for (fmt, w, s), (fmt0, w0, s0) in zip(row, first):
                if (fmt != fmt0 or w.dtype != w0.dtype or w.device != w0.device
                        or w.shape != w0.shape or (s is None) != (s0 is None)
                        or (s is not None and (s.dtype != s0.dtype or s.shape != s0.shape))):
                    return None
        if first[0][1].shape != first[1][1].shape:
            return None
        E = len(stored)
        fmt, w1, s1 = first[0]
        _, w2, s2 = first[2]
        with torch.no_grad():
            w_up = torch.empty((E, 2) + tuple(w1.shape), dtype=w1.dtype, device=w1.device)
            w_down = torch.empty((E,) + tuple(w2.shape), dtype=w2.dtype, device=w2.device)
            su = sd = None
            if s1 is not None:
                su = torch.empty((E, 2) + tuple(s1.shape), dtype=s1.dtype, device=s1.device)
                sd = torch.empty((E,) + tuple(s2.shape), dtype=s2.dtype, device=s2.device)
            for e, row in enumerate(stored):
                for i in (0, 1):
                    w_up[e, i].copy_(row[i][1])
                    if su is not None:
                        su[e, i].copy_(row[i][2])
                w_down[e].copy_(row[2][1])
                if sd is not None:
                    sd[e].copy_(row[2][2])
        for e, ex in enumerate(self.experts):
            _repoint(ex.w1, w_up[e, 0], None if su is None else su[e, 0])
            _repoint(ex.w3, w_up[e, 1], None if su is None else su[e, 1])
            _repoint(ex.w2, w_down[e], None if sd is None else sd[e])
        self._stack = ExpertStack(fmt, w_up, su, w_down, sd)
        return self._stack

    def _stack_current(self) -> bool:
        """Whether the first and last experts still view the stack (cheap staleness check)."""
        st = self._stack
        if st is None:
            return False
        E = len(self.experts)
        for e in (0, E - 1):
            ex = self.experts[e]
            for lin, w, s in ((ex.w1, st.w_up[e, 0], None if st.w_up_scale is None else st.w_up_scale[e, 0]),
                              (ex.w3, st.w_up[e, 1], None if st.w_up_scale is None else st.w_up_scale[e, 1]),
                              (ex.w2, st.w_down[e], None if st.w_down_scale is None else st.w_down_scale[e])):
                fmt, tw, ts = _stored(lin)
                if (fmt != st.fmt or tw.device != w.device or tw.dtype != w.dtype
                        or tw.data_ptr() != w.data_ptr()):
                    return False
                if (ts is None) != (s is None) or (ts is not None and ts.data_ptr() != s.data_ptr()):
                    return False
        return True

    def stacked_weights(self) -> Optional[ExpertStack]:
        """The stacked expert storage (docs/contracts.md §B), rebuilt if an expert got a new
        tensor; None when the experts cannot be stacked (mixed formats, dtypes or devices)."""
        if self._stack_current():
            return self._stack
        stack = self.restack()
        if stack is not None and stack.w_up.is_cuda and not torch.cuda.is_current_stream_capturing():
            torch.cuda.empty_cache()  # the per-expert blocks just freed would stay reserved
        return stack

    def __deepcopy__(self, memo):
        # The default copy would clone the stack and, separately, every expert Parameter (their
        # views of the stack become tensors of their own): the experts held twice until the
        # copy's first forward restacked them. Here the stack is not copied; the copy restacks
        # its experts at once (each copied expert's storage freed as it is stacked).
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = None if k == "_stack" else copy.deepcopy(v, memo)
        if self._stack is not None:
            new.restack()
        return new

    def _expert_storage(self) -> list:
        return [(t.device, t.dtype, t.data_ptr()) for e in self.experts
                for n in ("w1", "w3", "w2") for t in _stored(getattr(e, n))[1:]
                if t is not None]

    def _apply(self, fn, recurse=True):
        # .to(device/dtype), .cuda(), .double(), to_empty(): convert, then restack on the
        # result, unless no expert tensor moved (.to the device / dtype it is on already).
        before = self._expert_storage() if self._stack is not None else None
        out = super()._apply(fn, recurse)
        if self._stack is not None and (before != self._expert_storage()
                                        or not self._stack_current()):
            self.restack()
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, dim], input_ids [batch, seq] → [batch, seq, dim].

        gate → dispatch (pairs grouped by expert) → :meth:`routed_pairs` → combine with the
        shared expert; dispatch and combine are the kernels on the kernel path, their
        references otherwise (the same contract, docs/contracts.md §B)."""
        shape = x.shape
        x2 = x.reshape(-1, self.dim)
        ids = input_ids.reshape(-1)
        stack = self.kernel_path_stack(x2)
        if stack is not None:
            dispatch, combine = _dsv4.moe_dispatch, _dsv4.moe_combine
        else:
            dispatch, combine = moe_dispatch_reference, moe_combine_reference
        x2 = x2.contiguous()
        # A decode-size step on the kernel path runs the shared expert beside the routed
        # experts (dsv4.layers.branch; x2 stays referenced until the join), forked where
        # _shared_expert_fork says (by default before the gate); else after them (its output
        # is then not held through the routed experts' peak). Not urgent: the routed path is
        # the critical one (stream priorities, dsv4.layers.branch).
        branch, shared = Branch(x2, enabled=stack is not None, urgent=False), None
        fork_at = _shared_expert_fork() if branch.active else None

        def fork(at: str) -> None:
            nonlocal shared
            if fork_at == at:
                with branch:
                    shared = self.shared_expert(x2)

        try:
            fork("before-gate")
            weights, indices = self.gate(x2, ids)
            fork("after-gate")
            row_ids, offsets, route_weight, pair_pos = dispatch(indices, weights,
                                                                self.n_routed_experts)
            fork("after-dispatch")
            y_pair = self.routed_pairs(x2, row_ids, offsets, route_weight, stack)
        finally:
            branch.join()           # (on an error too: no side-stream work left unjoined)
        if shared is None:
            shared = self.shared_expert(x2)
        return combine(y_pair, pair_pos, shared).view(shape)

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert on x [N, dim] (its w1 and w3 as one GEMM when fused)."""
        se, group = self.shared_experts, self.projection_group("shared")
        if group is None or not isinstance(se, Expert):
            return se(x)
        return se(x, up=tuple(project(x, (se.w1, se.w3), group)))

    def routed_pairs(self, x: torch.Tensor, row_ids: torch.Tensor, offsets: torch.Tensor,
                     route_weight: torch.Tensor, stack: Optional[ExpertStack]) -> torch.Tensor:
        """The routed experts' outputs for the dispatched pairs (``y_pair`` of combine): here
        :meth:`expert_pairs` on this module's experts; the expert-parallel layer overrides it
        with the all-to-all exchange (dsv4.distributed.moe)."""
        return self.expert_pairs(x, row_ids, offsets, route_weight, stack)

    def kernel_path_stack(self, x: torch.Tensor) -> Optional[ExpertStack]:
        """The stacked experts when the kernel path serves ``x`` [N, dim] (CUDA bfloat16, the
        ``"cuda"`` backend, every kernel and shape supported), else None: the reference path.
        Warns once per reason when the kernel path was asked for but cannot run."""
        if x.is_cuda and x.dtype == torch.bfloat16 and get_backend() == "cuda":
            reason = self.kernel_unsupported(x)
            stack = None
            if reason is None:
                stack = self.stacked_weights()
                reason = self._stack_unsupported(stack)
            if use_kernels(x, ("moe_gate", "moe_dispatch", "moe_combine"), reason):
                return stack
        return None

    def kernel_unsupported(self, x: torch.Tensor) -> Optional[str]:
        """Why this layer's kernel path cannot serve ``x`` [N, dim] (before looking at the
        expert storage), or None."""
        reason = self.gate.kernel_unsupported(x)
        if reason is not None:
            return reason
        if len(self.experts) > DISPATCH_MAX_EXPERTS:
            return f"moe_dispatch takes <= {DISPATCH_MAX_EXPERTS} experts, not {len(self.experts)}"
        if _needs_grad(self.experts[0].w1._parameters.get("weight")):
            return ("the MoE kernels have no backward; with gradients enabled the MoE runs the "
                    "reference (wrap inference in torch.no_grad())")
        return None

    def _stack_unsupported(self, stack: Optional[ExpertStack]) -> Optional[str]:
        if stack is None:
            return "the routed experts differ in format, dtype or device (cannot be stacked)"
        if _grouped_kernels_available():
            N = stack.w_up.shape[2]
            align = {None: 8, "fp8": 16, "fp4": 32}[stack.fmt]
            if self.dim % align or N % align:
                return (f"moe_up / moe_down take dim and moe_inter_dim % {align} == 0 for "
                        f"{stack.fmt or 'bf16'} experts, not {self.dim} and {N}")
            if stack.fmt is None and stack.w_up.dtype != torch.bfloat16:
                return f"moe_up / moe_down take bfloat16 experts, not {stack.w_up.dtype}"
            return None
        if stack.fmt is not None:
            return (f"native {stack.fmt} experts need the moe_up / moe_down kernels (not in this "
                    "build, or not yet verified on a GPU: see dsv4.allow_unverified_kernels)")
        if stack.w_up.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
            return "the expert GEMM fallback needs bfloat16 experts and torch._grouped_mm"
        if self.dim % 8 or stack.w_up.shape[2] % 8:
            return "the torch._grouped_mm fallback needs dim and moe_inter_dim % 8 == 0"
        return None

    def _act_quant(self, lin: Linear) -> bool:
        return bool(lin.act_quant and lin.config is not None and lin.config.quant_sim)

    def expert_pairs(self, x: torch.Tensor, row_ids: torch.Tensor, offsets: torch.Tensor,
                     route_weight: torch.Tensor,
                     kernel_stack: Optional[ExpertStack]) -> torch.Tensor:
        """This layer's routed experts on dispatched pairs: ``y_pair`` [P, dim] in x's dtype.

        ``x`` [T, dim]; ``row_ids`` int32 [P], ``offsets`` int32 [len(experts) + 1] and
        ``route_weight`` fp32 [P] in the expert-major order of ``moe_dispatch`` (experts
        indexed 0 .. len(experts) - 1). ``kernel_stack`` from :meth:`kernel_path_stack`: the
        compiled ``moe_up`` / ``moe_down`` (or the ``torch._grouped_mm`` fallback); None: the
        references (or, with gradients or unstackable experts, each expert's Linear layers).
        Rows ``p >= offsets[-1]`` are 0 (reference) or unspecified (kernels). The one place
        the expert formula is applied, shared by :class:`MoE` and the expert-parallel MoE
        (:mod:`dsv4.distributed`).
        """
        if kernel_stack is not None:
            up_q = self._act_quant(self.experts[0].w1)
            down_q = self._act_quant(self.experts[0].w2)
            if _grouped_kernels_available() and not _prefer_grouped_mm(kernel_stack,
                                                                         row_ids.shape[0]):
                h = _dsv4.moe_up(x, row_ids, offsets, kernel_stack.w_up, kernel_stack.w_up_scale,
                                 route_weight, float(self.swiglu_limit), up_q)
                return _dsv4.moe_down(h, offsets, kernel_stack.w_down, kernel_stack.w_down_scale,
                                      down_q)
            return experts_grouped_mm(x, row_ids, offsets, route_weight, kernel_stack,
                                      float(self.swiglu_limit), up_q, down_q)
        E = len(self.experts)
        # With gradients, go through the experts' Linear layers (autograd reaches their
        # Parameters; the stack is plain storage that those Parameters view).
        grad = _needs_grad(x, *(getattr(self.experts[0], n)._parameters.get("weight")
                                for n in ("w1", "w2", "w3")))
        stack = None if grad else self.stacked_weights()
        if stack is not None:  # the expert formula of docs/contracts.md §B (one definition)
            h = moe_up_reference(x, row_ids, offsets, stack.w_up, stack.w_up_scale, route_weight,
                                 float(self.swiglu_limit), self._act_quant(self.experts[0].w1))
            return moe_down_reference(h, offsets, stack.w_down, stack.w_down_scale,
                                      self._act_quant(self.experts[0].w2))
        # gradients, or experts of mixed formats: each through its own Linear layers
        bounds = offsets.tolist()
        y_pair = x.new_zeros(row_ids.shape[0], self.dim)
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                rows = row_ids[lo:hi].long()
                y_pair[lo:hi] = self.experts[e](x[rows], route_weight[lo:hi, None])
        return y_pair


def experts_grouped_mm(x: torch.Tensor, row_ids: torch.Tensor, offsets: torch.Tensor,
                       route_weight: torch.Tensor, stack: "ExpertStack", swiglu_limit: float,
                       up_q: bool = False, down_q: bool = False) -> torch.Tensor:
    """The expert formula of ``Expert.forward`` over dispatched pairs (the arguments of
    :meth:`MoE.expert_pairs`; bf16 ``stack``) with two ``torch._grouped_mm`` calls (bf16 in,
    bf16 out, as ``F.linear`` rounds the w1 / w3 / w2 outputs) and the clamped SwiGLU between
    them (``moe_swiglu``'s kernel when it may run, else :func:`swiglu_clamped`: the same bits).
    The MoE runs it when moe_up / moe_down are not compiled, and for bf16 experts at prefill
    size (:func:`_prefer_grouped_mm`)."""
    E, _, N, K = stack.w_up.shape
    xin = fp8_e4m3_sim(x, FP8_BLOCK) if up_q else x
    offs = offsets[1:]
    gu = torch._grouped_mm(xin[row_ids.long()], stack.w_up.view(E, 2 * N, K).transpose(1, 2),
                           offs=offs)
    if x.dtype == torch.bfloat16 and _swiglu_kernel_available():
        h = _dsv4.moe_swiglu(gu, route_weight.float(), swiglu_limit)
    else:
        h = swiglu_clamped(gu[:, :N], gu[:, N:], swiglu_limit, route_weight[:, None], x.dtype)
    if down_q:
        h = fp8_e4m3_sim(h, FP8_BLOCK)
    return torch._grouped_mm(h, stack.w_down.transpose(1, 2), offs=offs)


#: Average dispatched pairs per expert from which bf16 experts run as torch._grouped_mm calls
#: around moe_swiglu instead of moe_up / moe_down. H100, 2026-12-06 (bench/README.md): at 24
#: and 96 pairs per expert (256 experts, 1024 / 4096 tokens) moe_up + moe_down were 3% faster;
#: at 3072 (64 experts, 32768 tokens) the grouped_mm path took 17.0 ms against 22.1, and a
#: 2048-token prefill with 64 experts (192 per expert) gained 3.7% end to end.
GROUPED_MM_MIN_PAIRS_PER_EXPERT = 128


def _prefer_grouped_mm(stack: "ExpertStack", pairs: int) -> bool:
    """Whether bf16 experts with ``pairs`` dispatched (token, slot) pairs (the worst-case row
    count, known on the host) run through torch._grouped_mm + moe_swiglu rather than the
    compiled moe_up / moe_down: at least GROUPED_MM_MIN_PAIRS_PER_EXPERT pairs per expert on
    average, torch._grouped_mm present and the moe_swiglu kernel callable. ``DSV4_MOE_GEMM``
    (read at each call): ``kernel`` = never, ``grouped_mm`` = always (bf16), unset = the rule
    (another value: a warning, then the rule)."""
    mode = env_choice("DSV4_MOE_GEMM", ("", "kernel", "grouped_mm"))
    if mode == "kernel" or stack.fmt is not None or stack.w_up.dtype != torch.bfloat16:
        return False
    if not hasattr(torch, "_grouped_mm") or not _swiglu_kernel_available():
        return False
    E = stack.w_up.shape[0]
    return mode == "grouped_mm" or pairs >= GROUPED_MM_MIN_PAIRS_PER_EXPERT * E


#: Where a decode-size MoE may fork its shared expert onto the side stream
#: (``DSV4_MOE_SHARED_FORK``), in the order of the layer's work.
SHARED_FORKS = ("before-gate", "after-gate", "after-dispatch")


def _shared_expert_fork() -> str:
    """``DSV4_MOE_SHARED_FORK`` (read per call): where a decode-size MoE forks its shared
    expert onto the side stream (:data:`SHARED_FORKS`). ``before-gate`` (the default): beside
    the gate, the dispatch and the routed experts. ``after-gate``: the gate runs alone; on an
    H100 it did not pay (batch 1 equal, batch 8 +21 us: the gate took ~12.5 us instead of
    ~31, but the dispatch and ``moe_up`` beside the shared expert's GEMMs lost as much;
    bench/README.md, "Session of 2026-12-06, sixth"). ``after-dispatch``: the gate and the
    dispatch run alone and the shared expert beside the routed GEMMs (H100: batch 1 -10 us,
    batch 8 -7 us, batch 64 +176 us; "Session of 2026-12-06, seventh"). Scheduling only: the
    same kernels on the same inputs."""
    return env_choice("DSV4_MOE_SHARED_FORK", ("",) + SHARED_FORKS) or "before-gate"


def _swiglu_kernel_available() -> bool:
    """Whether ``moe_swiglu`` has a compiled CUDA kernel the model may call."""
    if not may_call(("moe_swiglu",)):
        return False
    from ..ops._ext import has_compiled_kernel
    return has_compiled_kernel("moe_swiglu")


def _grouped_kernels_available() -> bool:
    """Whether ``moe_up`` / ``moe_down`` (docs/contracts.md §B) have compiled CUDA kernels that the
    model may call (hardware-verified, or unverified kernels allowed: ``dsv4.ops.backend``)."""
    ops = ("moe_up", "moe_down")
    if not may_call(ops):
        return False
    from ..ops._ext import has_compiled_kernel
    return all(has_compiled_kernel(op) for op in ops)
