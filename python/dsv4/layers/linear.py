"""Bias-free linear layer holding the official ``.weight`` name (architecture.md §12).

A Linear holds its weight either as an ordinary parameter (random init, bf16/fp32 checkpoints,
or FP8/FP4 checkpoints loaded with ``weights="dequant"``) or, after
``Model.from_pretrained(..., weights="native")``, in its stored FP8/FP4 form (``qweight`` +
``scale`` buffers), dequantised at every use. ``.weight`` returns the float weight either way.

Same-input projections (``Model.fuse_projections``, a serving option): a layer that calls
several Linears on one input (attention ``wq_a`` / ``wkv`` / indexer ``weights_proj``; the
compressors' ``wkv`` / ``wgate``; the shared expert's ``w1`` / ``w3``) can hold their weights
as row slices of one buffer (:class:`LinearGroup`) and run them as one GEMM (:func:`project`);
the layer declares its groups through :class:`ProjectionGroups`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from ..ops.backend import use_kernels
from ..ops.gemm import fp8_linear
from ..ops.quant import fp8_e4m3_sim
from ..ops.split_gemm import bf16_copy, bf16_valued, linear_bf16, linear_bf16x3, use_split
from ..quant import FP8_BLOCK, fp4_unpack, fp8_block_dequantize

__all__ = ["Linear", "LinearGroup", "ProjectionGroups", "dense_linear", "fp32_input", "project"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, act_quant: bool = False,
                 also: tuple = ()) -> torch.Tensor:
    """``x @ weight.T`` for a weight held as a float tensor [out, in]: the input FP8-simulated
    first when ``act_quant`` (1x128 blocks, :func:`dsv4.ops.quant.fp8_e4m3_sim`), then cast to
    the weight's dtype, then ``F.linear`` (output in the weight's dtype). The one definition
    of a parameter-held :class:`Linear`'s forward, which :class:`LinearGroup` runs on the
    concatenated weight of its members. A bf16 x with an fp32 weight (the compressors'
    ``keep_fp32`` projections) on the ``cuda`` backend runs on bf16 tensor cores with fp32
    output (:mod:`dsv4.ops.split_gemm`: the same products, fp32 accumulation): as one GEMM on a
    bf16 copy of the weight when its values are all bf16 (the release's compressor weights),
    else at prefill size as three GEMMs on an exact split of the weight. ``also``: the
    Parameters viewing ``weight`` (a fused group's members), whose writes the bf16 copy must
    follow."""
    if act_quant:
        x = fp8_e4m3_sim(x, FP8_BLOCK)
    hi = _bf16_weight(x, weight, also)
    if hi is not None:
        return linear_bf16(x, hi)
    if _split_serves(x, weight):
        # the same products on bf16 tensor cores (exact 3-way split of the fp32 weight)
        return linear_bf16x3(x, weight)
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    return F.linear(x, weight)


def _split_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`dense_linear` runs ``x @ weight.T`` as split bf16 GEMMs: bf16 x, fp32
    weight, prefill size (:func:`dsv4.ops.split_gemm.use_split`), and the compressors' kernel
    path on (the ``cuda`` backend with ``compress_kv`` callable: where the model runs the
    reference, its projections stay PyTorch's fp32 GEMM)."""
    return use_split(x, weight) and use_kernels(x, ("compress_kv",))


def _bf16_weight(x: torch.Tensor, weight: torch.Tensor,
                 also: tuple = ()) -> Optional[torch.Tensor]:
    """The bf16 copy :func:`dense_linear` multiplies ``x`` with (one GEMM), when the weight's
    values are all bf16 (:func:`dsv4.ops.split_gemm.bf16_copy`) and the compressors' kernel path
    is on (as :func:`_split_serves`); else None."""
    if not (x.is_cuda and weight.dtype == torch.float32 and x.dtype == torch.bfloat16
            and use_kernels(x, ("compress_kv",))):
        return None
    return bf16_copy(x, weight, also)


def fp32_input(x: torch.Tensor, linears) -> torch.Tensor:
    """``x`` as the fp32 linears ``linears`` of one input want it, for a caller that casts once
    for all of them (the compressors' ``wkv`` / ``wgate``): ``x`` itself when every one is a
    plain dsv4 :class:`Linear` (no hook, no replaced forward) holding an fp32 parameter for
    which :func:`dense_linear` takes a bf16 path (its bf16 copy or the split GEMMs), else
    ``x.float()``. The same values either way: both paths compute the products of the
    fp32-promoted x. (The members are checked without keeping a bf16 copy: with fused
    projections the group's GEMM keeps the one copy, of its buffer.)"""
    kernels = x.is_cuda and use_kernels(x, ("compress_kv",))
    for lin in linears:
        w = lin._parameters.get("weight") if type(lin) is Linear else None
        if w is None or not _called_plainly(lin) or not (
                (kernels and bf16_valued(x, w)) or _split_serves(x, w)):
            return x.float()
    return x


class Linear(nn.Module):
    """``y = x @ weight.T`` with ``weight`` [out_features, in_features].

    ``keep_fp32=True`` pins the weight to fp32 whatever the model dtype (compressor ``wkv`` /
    ``wgate`` and the head, §12.3); the input is then promoted to fp32 and so is the output.
    Otherwise the weight follows the model dtype and the input is cast to the weight's dtype.

    Attributes set by the checkpoint loader (:func:`dsv4.checkpoint.load_checkpoint`):

    * ``stored_format``: None (stored as bf16/fp32 or randomly initialised), ``"fp8"`` or
      ``"fp4"``: how the checkpoint stored this weight, whichever ``weights=`` mode was used.
    * ``act_quant``: True for FP8/FP4-stored weights except ``wo_a``. With ``config.quant_sim``
      on, the input then gets the official FP8 activation quantisation before the GEMM: an e4m3
      round trip in 1x128 blocks along in_features with ue8m0 scales (architecture.md §12.3,
      :func:`dsv4.ops.quant.fp8_e4m3_sim`). The official code dequantises ``wo_a`` to bf16 at
      load and multiplies it without activation quantisation, hence the exception.
    * ``config``: the model's :class:`~dsv4.config.ModelConfig`, read at every call for
      ``quant_sim``.
    * ``weight_format``: None (a ``weight`` parameter) or ``"fp8"``/``"fp4"`` after
      :meth:`set_quantized` (``weights="native"``).
    """

    def __init__(self, in_features: int, out_features: int, keep_fp32: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.keep_fp32 = keep_fp32
        self.stored_format: Optional[str] = None
        self.act_quant = False
        self.config = None
        self.weight_format: Optional[str] = None
        self.dequant_dtype: Optional[torch.dtype] = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float32))
        if keep_fp32:
            self.weight._dsv4_keep_fp32 = True
        # A meta tensor (the checkpoint loader builds on "meta", then loads every weight) holds
        # no values: drawing them would only cost time (~0.7 ms a call, a minute for Flash).
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=in_features ** -0.5)

    # ------------------------------------------------------------------ weight storage
    @property
    def weight(self) -> torch.Tensor:
        """The float weight [out_features, in_features]: the parameter, or (native FP8/FP4
        storage) a freshly dequantised tensor in ``dequant_dtype`` (exact: every stored value
        times a power of two is representable in bf16/fp32)."""
        p = self._parameters.get("weight")
        if p is not None:
            return p
        if self.weight_format is not None:
            return self.dequantized_weight(self.dequant_dtype)
        raise AttributeError("weight")

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out_features, in_features] in ``dtype`` (dequantised if stored FP8/FP4)."""
        if self.weight_format == "fp8":
            return fp8_block_dequantize(self.qweight, self.scale, dtype)
        if self.weight_format == "fp4":
            return fp4_unpack(self.qweight, self.scale, dtype)
        return self._parameters["weight"].to(dtype)

    def set_quantized(self, qweight: torch.Tensor, scale: torch.Tensor, fmt: str,
                      dtype: torch.dtype) -> None:
        """Hold the weight in its stored form instead of a float parameter.

        fmt ``"fp8"``: qweight float8_e4m3fn [out, in], scale [ceil(out/128), ceil(in/128)];
        fmt ``"fp4"``: qweight int8 [out, in/2] (two e2m1 codes per byte, low nibble first),
        scale [out, in/32]; scales float8_e8m0fnu (or float32). ``dtype`` is the float dtype
        ``.weight`` returns. The ``state_dict`` keys stay the official ``weight`` / ``scale``.
        Raises ValueError for a format or shape that does not fit this layer.
        """
        n, k = self.out_features, self.in_features
        if fmt == "fp8":
            ok = (qweight.dtype == torch.float8_e4m3fn and tuple(qweight.shape) == (n, k)
                  and tuple(scale.shape) == (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)))
        elif fmt == "fp4":
            ok = (qweight.dtype == torch.int8 and tuple(qweight.shape) == (n, k // 2)
                  and k % 32 == 0 and tuple(scale.shape) == (n, k // 32))
        else:
            raise ValueError(f"fmt must be 'fp8' or 'fp4', got {fmt!r}")
        if not ok:
            raise ValueError(f"set_quantized: {fmt} weight {qweight.dtype} "
                             f"{tuple(qweight.shape)} / scale {tuple(scale.shape)} do not fit a "
                             f"[{n}, {k}] Linear")
        self._parameters.pop("weight", None)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.weight_format = fmt
        self.dequant_dtype = dtype

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_format is not None:        # official name of the stored weight
            destination[prefix + "weight"] = destination.pop(prefix + "qweight")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.weight_format is not None and prefix + "weight" in state_dict:
            state_dict[prefix + "qweight"] = state_dict.pop(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features].

        Native FP8 storage with CUDA bf16 activations (and the ``cuda`` backend) runs
        ``torch.ops.dsv4.fp8_linear``, which streams the FP8 bytes (the weight is never
        dequantised in memory); otherwise the weight is dequantised and ``F.linear`` runs.
        Both compute the same values (the kernel within the bf16 tolerance of the reference).

        Raises ValueError (from the simulation) when the FP8 activation quantisation applies
        and in_features is not a multiple of 128.
        """
        act_quant = self.input_quantized()
        if self.weight_format == "fp8" and not self.keep_fp32 and self._fp8_kernel(x):
            return fp8_linear(x, self.qweight, self.scale, act_quant)
        if self.weight_format is None:
            return dense_linear(x, self._parameters["weight"], act_quant)
        if act_quant:
            x = fp8_e4m3_sim(x, FP8_BLOCK)
        # Native storage: dequantise to the activation dtype (exact in bf16/fp32), so that the
        # layer follows Model.to(dtype) like a parameter would; keep_fp32 layers compute in fp32.
        if self.keep_fp32:
            dtype = torch.float32
        else:
            dtype = x.dtype if x.dtype in _FLOATS else self.dequant_dtype
        return F.linear(x.to(dtype), self.dequantized_weight(dtype))

    def input_quantized(self) -> bool:
        """Whether the input gets the FP8 activation simulation before the GEMM (``act_quant``
        with ``config.quant_sim`` on; see the class doc)."""
        return bool(self.act_quant and self.config is not None and self.config.quant_sim)

    def _fp8_kernel(self, x: torch.Tensor) -> bool:
        """Whether this FP8-stored layer runs the CUDA fp8_linear kernel on ``x``."""
        if not x.is_cuda:
            return False
        unsupported = None
        if self.in_features % 16 or self.out_features % 8:
            unsupported = (f"fp8_linear takes in_features % 16 == 0 and out_features % 8 == 0, "
                           f"not {self.in_features} -> {self.out_features}")
        return use_kernels(x, ("fp8_linear",), unsupported)

    def extra_repr(self) -> str:
        s = f"{self.in_features} -> {self.out_features}"
        if self.weight_format is not None:
            s += f", {self.weight_format} storage"
        elif self.stored_format is not None:
            s += f", stored {self.stored_format}"
        return s


# ---------------------------------------------------------------------------------------------
# Same-input projections as one GEMM (Model.fuse_projections)
# ---------------------------------------------------------------------------------------------
def _called_plainly(lin) -> bool:
    """Whether calling the module ``lin`` runs exactly ``Linear.forward``: no forward / backward
    hook (its own, or a global one of ``torch.nn.modules.module.register_module_*_hook``) and
    no ``forward`` set on the instance. The test ``nn.Module.__call__`` makes before its fast
    path; a group's GEMM never calls its members, so it would skip what these add."""
    return not (lin._forward_hooks or lin._forward_pre_hooks or lin._backward_hooks
                or lin._backward_pre_hooks or "forward" in lin.__dict__
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _fusable(lin) -> bool:
    """A member candidate: a dsv4 :class:`Linear` (not a subclass, not another module) holding
    its weight as a 2-D floating-point parameter (no native FP8/FP4 storage), called plainly
    (no hooks, no instance ``forward``: :func:`_called_plainly`)."""
    if type(lin) is not Linear or lin.weight_format is not None or not _called_plainly(lin):
        return False
    p = lin._parameters.get("weight")
    return (p is not None and p.is_floating_point() and p.dim() == 2
            and tuple(p.shape) == (lin.out_features, lin.in_features))


class LinearGroup:
    """Bias-free :class:`Linear` layers that read the same input, computed as ONE GEMM.

    A decode step at batch 1 runs each projection as a small GEMV whose time is mostly fixed
    cost (launch, ramp-up, tail); the projections a layer applies to one input can be one
    GEMM over their concatenated weights instead, with the same maths (issue 8).

    :meth:`fuse` takes the linears a layer calls on one input (``linears``, in the layer's
    order) and picks the members: those holding a plain float weight parameter (no native
    FP8/FP4 storage) and no hooks, with the same dtype, device, ``in_features``,
    ``act_quant`` flag and config (so that every member sees the same input after the FP8
    activation simulation and the cast to the weight dtype), the largest such set; fewer
    than two: no group. It copies their weights into one buffer :attr:`weight`
    [Σ out_features, in_features] (in that order) and re-homes each member's weight
    Parameter as a row-slice VIEW of it (``p.data = weight[a:b]``): the same Parameter
    objects, so ``state_dict`` keys and values, in-place ``load_state_dict``, optimizers and
    ``.grad`` are unchanged, and no weight is held twice (the members' old storage is freed).

    :meth:`apply` computes ``dense_linear(x, weight)`` once (the members' own forward
    formula) and returns each member's output as its columns of the result (a view
    [..., out_features] whose rows are Σ out_features apart; only the last dimension is
    split, so a 1-row output slice is contiguous). Values: those of the separate GEMMs up to
    the GEMM's accumulation order (another cuBLAS / CPU kernel may be chosen for the wider
    output).

    The group serves a call only while it is **intact**: every member module passed is still
    a dsv4 Linear whose weight parameter is exactly its view (same data pointer in the
    buffer, dtype, device, shape and strides), so that it computes with the weights the
    members hold, and that a call would run plainly (no forward / backward hook on it or
    global module hook, no ``forward`` set on the instance: the one GEMM never calls the
    members, so it would skip them). Anything that re-homes or replaces a weight
    (``.to(dtype)``, ``.double()``, ``p.data = ...``, ``load_state_dict(assign=True)``,
    ``set_quantized``, a module swapped in) or hooks a member breaks it, and the members then
    run separately (:func:`project`); :meth:`fuse` leaves a hooked linear out; the owning layer
    rebuilds its groups where it changes storage itself (:class:`ProjectionGroups`). Also
    with gradients (grad mode on and a member's weight requiring grad) the members run
    separately, so that autograd reaches each Parameter. The check is a few attribute reads
    per member on the host (a replayed CUDA graph skips it).
    """

    def __init__(self, index: tuple, params: tuple, weight: torch.Tensor, sizes: tuple):
        self.index = index        # positions of the members in the caller's ``linears``
        self.params = params      # the members' weight Parameters (for deepcopy and undo)
        self.weight = weight      # [Σ out_features, in_features]
        self.sizes = sizes        # out_features of each member
        self.rows = tuple(sum(sizes[:k]) for k in range(len(sizes)))   # first row of each

    # ------------------------------------------------------------------ building
    @staticmethod
    def members(linears) -> tuple:
        """Positions in ``linears`` of the members a group over them would hold (see the
        class doc): the largest set of fusable linears with equal dtype, device,
        in_features, act_quant and config (the first such set on a tie); () when fewer
        than two."""
        sets: dict = {}
        for i, lin in enumerate(linears):
            if _fusable(lin):
                p = lin._parameters["weight"]
                key = (p.dtype, p.device, lin.in_features, bool(lin.act_quant), id(lin.config))
                sets.setdefault(key, []).append(i)
        best = max(sets.values(), key=len, default=[])
        return tuple(best) if len(best) >= 2 else ()

    @classmethod
    def fuse(cls, linears) -> Optional["LinearGroup"]:
        """A group over the members of ``linears`` (:meth:`members`), their weights re-homed
        into its buffer; None (nothing changed) when fewer than two are eligible."""
        index = cls.members(linears)
        if not index:
            return None
        return cls._build(index, tuple(linears[i]._parameters["weight"] for i in index))

    @classmethod
    def _build(cls, index: tuple, params: tuple) -> Optional["LinearGroup"]:
        """Copy ``params`` (2-D, one dtype, device and width) into a new buffer and make each
        a view of it; None when they do not fit together."""
        p0 = params[0]
        K = p0.shape[1]
        if any(p.dim() != 2 or p.shape[1] != K or p.dtype != p0.dtype or p.device != p0.device
               for p in params):
            return None
        sizes = tuple(int(p.shape[0]) for p in params)
        with torch.no_grad():
            weight = torch.empty(sum(sizes), K, dtype=p0.dtype, device=p0.device)
            a = 0
            for p, n in zip(params, sizes):
                weight[a:a + n].copy_(p.detach())
                a += n
        a = 0
        for p, n in zip(params, sizes):
            p.data = weight[a:a + n]
            a += n
        return cls(index, params, weight, sizes)

    # ------------------------------------------------------------------ state
    def intact(self, linears) -> bool:
        """Whether every member in ``linears`` (the caller's modules, as passed to
        :meth:`fuse`) still computes with its view of :attr:`weight` (see the class doc)."""
        w = self.weight
        K = w.shape[1]
        base, row_bytes = w.data_ptr(), K * w.element_size()
        for i, a, n in zip(self.index, self.rows, self.sizes):
            lin = linears[i] if i < len(linears) else None
            if type(lin) is not Linear or lin.weight_format is not None or \
                    not _called_plainly(lin):
                return False
            p = lin._parameters.get("weight")
            if (p is None or p.data_ptr() != base + a * row_bytes or p.dtype != w.dtype
                    or p.device != w.device or p.shape != (n, K) or p.stride() != (K, 1)):
                return False
        return True

    def apply(self, x: torch.Tensor, linears) -> Optional[list]:
        """The members' outputs, by position in ``linears`` (None at a non-member), from one
        GEMM on ``x`` [..., in_features]; None when the group cannot serve this call (not
        intact, gradients needed, or the members' ``act_quant`` now differ)."""
        if not self.intact(linears):
            return None
        grad = torch.is_grad_enabled()
        quant = None
        for i in self.index:
            lin = linears[i]
            if grad and lin._parameters["weight"].requires_grad:
                return None
            q = lin.input_quantized()
            if quant is None:
                quant = q
            elif q != quant:
                return None
        y = dense_linear(x, self.weight, quant, also=self.params)
        out = [None] * len(linears)
        for i, a, n in zip(self.index, self.rows, self.sizes):
            out[i] = y[..., a:a + n]        # a view (aten::slice)
        return out

    def release(self, linears) -> None:
        """Give every member still viewing :attr:`weight` its own copy of its rows (the
        layout before :meth:`fuse`; the same values); the buffer is freed with the group."""
        w = self.weight
        for i, p in zip(self.index, self.params):
            lin = linears[i] if i < len(linears) else None
            q = lin._parameters.get("weight") if type(lin) is Linear else None
            for t in {id(p): p, id(q): q}.values():
                if t is not None and t.untyped_storage().data_ptr() == \
                        w.untyped_storage().data_ptr() and t.device == w.device:
                    t.data = t.detach().clone()

    def __deepcopy__(self, memo):
        # ``copy.deepcopy`` of the owning layer copies its submodules first (they come before
        # this attribute in its __dict__): Parameter.__deepcopy__ gives each member weight its
        # own clone, so the copy is re-fused over the copied Parameters; a group whose
        # Parameters were not copied (a copy of the group alone) becomes None.
        params = tuple(memo.get(id(p)) for p in self.params)
        if any(p is None for p in params):
            return None
        return LinearGroup._build(self.index, params)


def project(x: torch.Tensor, linears, group: Optional[LinearGroup] = None) -> list:
    """``[lin(x) for lin in linears]``: the outputs of same-input projections, the members of
    ``group`` (:class:`LinearGroup`, built over the same ``linears``) from its one GEMM when
    it can serve the call, every other linear (and all of them otherwise) through its own
    forward. Same values either way up to the GEMM's accumulation order."""
    ys = group.apply(x, linears) if group is not None else None
    if ys is None:
        return [lin(x) for lin in linears]
    return [lin(x) if y is None else y for y, lin in zip(ys, linears)]


class ProjectionGroups:
    """Mixin for a layer (an ``nn.Module``) whose forward calls several :class:`Linear` layers
    on one input: it names them in :meth:`projection_groups` and computes them with
    ``project(x, linears, self.projection_group(name))``.

    :meth:`fuse_projections` builds a :class:`LinearGroup` for each (where at least two
    members are eligible) and :meth:`unfuse_projections` undoes it; between the two the layer
    keeps its groups current where nn.Module changes storage (``_apply``: ``.to(device)``,
    ``.cuda()``, ``.double()``, ...: the groups are rebuilt in the new storage) and
    ``Model`` does the same after ``.to(dtype)`` and ``load_state_dict``. Groups are held in
    ``self._fused`` (None: not fused), outside the state_dict.
    """

    _fused: Optional[dict] = None

    def projection_groups(self) -> dict:
        """{group name: tuple of the Linear modules the forward calls on one input}."""
        raise NotImplementedError

    def projection_group(self, name: str) -> Optional[LinearGroup]:
        """The group ``name`` when fused (intact or not: :func:`project` checks), else None."""
        fused = self._fused
        return None if fused is None else fused.get(name)

    def fuse_projections(self):
        """Build (or rebuild, where broken or where the eligible members changed) a group
        for each entry of :meth:`projection_groups`; intact groups are kept. Returns self."""
        old = self._fused or {}
        new = {}
        for name, linears in self.projection_groups().items():
            g = old.get(name)
            if g is None or g.index != LinearGroup.members(linears) or not g.intact(linears):
                g = LinearGroup.fuse(linears)
            new[name] = g
        self._fused = new
        return self

    def unfuse_projections(self):
        """Each member weight back in its own storage (same values); no groups. Returns
        self; a no-op when not fused."""
        fused, self._fused = self._fused, None
        if fused:
            groups = self.projection_groups()
            for name, g in fused.items():
                if g is not None and name in groups:
                    g.release(groups[name])
        return self

    def forget_groups_changing_dtype(self, dtype: torch.dtype):
        """Before a cast of the compute weights to ``dtype``: drop the groups whose members
        will change dtype (``keep_fp32`` members stay float32), so that each old buffer is
        freed as soon as its members are cast rather than all of them after the whole cast;
        :meth:`refresh_projections` rebuilds them. Returns self."""
        if self._fused:
            groups = self.projection_groups()
            for name, g in self._fused.items():
                if g is None or name not in groups:
                    continue
                lin = groups[name][g.index[0]]
                want = torch.float32 if getattr(lin, "keep_fp32", False) else dtype
                if g.weight.dtype != want:
                    self._fused[name] = None
        return self

    def refresh_projections(self):
        """When fused: rebuild the groups a storage change broke (:meth:`fuse_projections`
        keeps the intact ones). Returns self; a no-op when not fused."""
        if self._fused is not None:
            self.fuse_projections()
        return self

    def _apply(self, fn, recurse=True):
        # .to(device / dtype), .cuda(), .double(), to_empty(): convert, then rebuild the groups
        # in the converted storage (a converted member no longer views its group's buffer).
        out = super()._apply(fn, recurse)
        self.refresh_projections()
        return out
