"""The DeepSeek-V4 transformer in pure PyTorch: the reference every kernel is checked against.

Data flow (architecture.md §2): embed → hc_mult identical residual streams → n_layers blocks
(each: mHC collapse → attn_norm → attention → mHC expand; mHC collapse → ffn_norm → MoE → mHC
expand) → hc_head collapse → norm → head (fp32 logits). MTP blocks (§10.3) draft the token after
next from the last residual streams and the next token's embedding.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .argtypes import int_sequence
from .cache import Cache, LayerCache, check_count
from .config import ModelConfig
from .layers.attention import Attention
from .layers.head import check_bf16_exact, fp32_logits, mm_fp32_out, same_bits
from .layers.linear import Linear, ProjectionGroups
from .layers.mhc import hc_head, hc_post, hc_pre
from .layers.moe import MoE
from .layers.norm import RMSNorm
from .layers.varlen import StepBatch

__all__ = ["Block", "MTPBlock", "Model"]


def _seq_lens_arg(seq_lens, batch: int, seq: int) -> list[int]:
    """Validate ``seq_lens`` (None, a sequence of ints or a 1-D integer tensor, ``batch``
    values in [0, seq]) and return it as python ints; ValueError naming what is accepted."""
    what = (f"seq_lens must be None or {batch} integers in [0, {seq}] (a list, tuple or 1-D "
            "integer tensor)")
    if seq_lens is None:
        return [seq] * batch
    lens = int_sequence(seq_lens, what)
    if len(lens) != batch or any(not 0 <= v <= seq for v in lens):
        raise ValueError(f"{what}; got {lens}")
    return lens


def _check_ids(input_ids, name: str = "input_ids") -> None:
    """``input_ids`` is an int64/int32 tensor [batch >= 1, seq]; TypeError / ValueError naming
    it (as ``name``, the caller's argument) otherwise."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids (int64/int32) "
                        f"[batch, seq], got {type(input_ids).__name__}; e.g. "
                        "torch.tensor([ids])")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an int64/int32 tensor [batch, seq], got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sequence ([batch >= 1, seq]), got "
                         f"shape {tuple(input_ids.shape)}")


def _fp32_param(*shape: int, std: float = 0.0) -> nn.Parameter:
    p = nn.Parameter(torch.randn(*shape) * std if std else torch.zeros(*shape))
    p._dsv4_keep_fp32 = True
    return p


def cast_compute_weights(module: nn.Module, dtype: torch.dtype, keep_fp32,
                         prefix: str = "", skip=()) -> None:
    """Store every floating-point parameter of ``module`` in ``dtype``, except those named in
    ``keep_fp32`` (full names: ``prefix`` + the name in ``module``), which stay float32 as the
    official code keeps them (``Model._fp32_names``), and those named in ``skip``, which keep
    their dtype (a compact head, :meth:`Model.compact_head`). In place, on the parameters'
    data."""
    for name, p in module.named_parameters():
        if prefix + name in skip:
            continue
        want = torch.float32 if prefix + name in keep_fp32 else dtype
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)


class Block(nn.Module):
    """One transformer block: two mHC sites (attention, MoE) with official parameter names."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config
        self.config = c
        self.layer_id = layer_id
        self.attn = Attention(c, layer_id)
        self.ffn = MoE(c, layer_id)
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        mix = (2 + c.hc_mult) * c.hc_mult
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", _fp32_param(mix, c.hc_mult * c.dim, std=0.02))
            setattr(self, f"hc_{site}_base", _fp32_param(mix, std=0.1))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.ones(3)))
            getattr(self, f"hc_{site}_scale")._dsv4_keep_fp32 = True

    def _hc_pre(self, x: torch.Tensor, site: str):
        c = self.config
        return hc_pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                      getattr(self, f"hc_{site}_base"), c.norm_eps, c.hc_sinkhorn_iters, c.hc_eps)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, cache: LayerCache,
                batch: StepBatch) -> torch.Tensor:
        """x [T, hc_mult, dim] residual streams of the step's tokens (``batch``), input_ids
        [T] → the same shape; advances ``cache``."""
        u, post, comb = self._hc_pre(x, "attn")
        u = self.attn_norm(u, kernel=self.attn_norm.kernel_serves(u))
        x = hc_post(self.attn(u, cache, batch), x, post, comb)
        u, post, comb = self._hc_pre(x, "ffn")
        u = self.ffn_norm(u, kernel=self.ffn_norm.kernel_serves(u))
        return hc_post(self.ffn(u, input_ids), x, post, comb)


class MTPBlock(Block):
    """Multi-token-prediction block (§10.3): ``e_proj(enorm(embed(next_ids))) + h_proj(hnorm(X))``
    through a full (SWA, learned-routing) block, then its own hc_head collapse and ``norm``; the
    embedding and head are the main model's."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        c = config
        self.e_proj = Linear(c.dim, c.dim)
        self.h_proj = Linear(c.dim, c.dim)
        self.enorm = RMSNorm(c.dim, c.norm_eps)
        self.hnorm = RMSNorm(c.dim, c.norm_eps)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.hc_head_fn = _fp32_param(c.hc_mult, c.hc_mult * c.dim, std=0.02)
        self.hc_head_base = _fp32_param(c.hc_mult, std=0.1)
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.hc_head_scale._dsv4_keep_fp32 = True


class Model(nn.Module):
    """DeepSeek-V4 (Flash, Pro or any :class:`ModelConfig`) with official tensor names (§12).

    ``Model(config)`` draws weights from the current torch RNG (seed it for reproducibility);
    the module is created in fp32 on the CPU; ``.to(device, dtype)`` casts the compute weights
    while parameters the official code keeps in fp32 (norm weights, mHC, ``attn_sink``,
    compressor ``wkv``/``wgate``/``ape``, gate bias, head) stay fp32.
    :meth:`compact_head` holds the head weight in bf16 instead (serving: half its bytes, the
    same fp32 logits for the release's bf16 head). :meth:`fuse_projections` runs each layer's
    same-input projections as one GEMM (serving: fewer, larger GEMMs; the same weights).

    Call ``model(input_ids, cache=None, seq_lens=None)``: input_ids int64 [batch, seq];
    ``seq_lens`` int [batch] (each row's valid tokens, right padding; default all ``seq``);
    ``cache`` from :meth:`make_cache` is advanced in place (None = a fresh one, discarded).
    Returns logits float32 [batch, seq, vocab_size] (rows beyond ``seq_lens`` are unspecified).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a dsv4.ModelConfig (e.g. ModelConfig.tiny(), "
                            f"ModelConfig.flash(), ModelConfig.from_json(path)), got "
                            f"{type(config).__name__}")
        c = config
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = Linear(c.dim, c.vocab_size, keep_fp32=True)
        self.hc_head_fn = _fp32_param(c.hc_mult, c.hc_mult * c.dim, std=0.02)
        self.hc_head_base = _fp32_param(c.hc_mult, std=0.1)
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.hc_head_scale._dsv4_keep_fp32 = True
        self.mtp = nn.ModuleList(MTPBlock(c, c.n_layers + k) for k in range(c.n_mtp_layers))
        # Names of the parameters the official code keeps in fp32 (survives to_empty/load).
        self._fp32_names = frozenset(n for n, p in self.named_parameters()
                                     if getattr(p, "_dsv4_keep_fp32", False))

    # ------------------------------------------------------------------ dtype / device
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def storage_version(self) -> int:
        """A counter that grows whenever the model moved a parameter or buffer to other
        storage (another address, device, dtype, shape or stride) through its own methods:
        ``.to`` / ``.cuda`` / ``.double`` and other ``nn.Module._apply`` conversions,
        :meth:`fuse_projections` / :meth:`unfuse_projections`, :meth:`compact_head` /
        :meth:`expand_head`; and at every ``load_state_dict`` (also in place: the bf16 head
        copy a ``head_dtype=torch.bfloat16`` step caches is derived from the values). A call
        that leaves every tensor where it was (``.to`` the model's own device or dtype, a
        second fuse) does not count. A CUDA graph reads the storage it was captured on: the
        runtime engine captures its decode graphs again when this changed since their
        capture. Not counted: storage replaced behind the model's back (``p.data = ...``,
        ``torch.nn.utils.vector_to_parameters``) and calls on a submodule
        (``model.layers[0].to(...)``, ``model.head.load_state_dict(...)``): call them on the
        model itself."""
        return self.__dict__.get("_storage_version", 0)

    def _storage_key(self) -> tuple:
        """Where every parameter and buffer lives: (device, dtype, address, shape, stride)."""
        return tuple((t.device, t.dtype, t.data_ptr(), t.shape, t.stride())
                     for t in (*self.parameters(), *self.buffers()))

    def _storage_moved(self) -> None:
        """Advance :attr:`storage_version` (unconditionally)."""
        self.__dict__["_storage_version"] = self.storage_version + 1

    @contextlib.contextmanager
    def _tracking_storage(self):
        """Advance :attr:`storage_version` when a parameter or buffer moved during the block
        (also when the block raised after moving some)."""
        before = self._storage_key()
        try:
            yield
        finally:
            if before != self._storage_key():
                self._storage_moved()

    def _apply(self, fn, recurse=True):
        with self._tracking_storage():
            return super()._apply(fn, recurse)

    def to(self, *args, **kwargs) -> "Model":
        """Like ``nn.Module.to``, but a dtype applies to compute weights only (see class doc)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        # Checked before anything moves: a refused dtype leaves the model where it was.
        # float16: the caches (compress_kv's entries, the KV rings) take bfloat16 / float32
        # only, so an fp16 model could not run a forward; refused here rather than there.
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Model dtype must be float32 or bfloat16 (float64: .double(), "
                             f"for gradient checks), got {dtype}")
        if device is not None:
            super().to(device=device, non_blocking=non_blocking)
        if dtype is not None:
            with self._tracking_storage():
                for mod in self._projection_owners():     # free each old group buffer early
                    mod.forget_groups_changing_dtype(dtype)
                cast_compute_weights(self, dtype, self._fp32_names,
                                     skip=("head.weight",) if self.head_compact else ())
                # The experts' new tensors no longer view their MoE's stacked storage: rebuild
                # it now, so that the stack in the old dtype (a V4-Flash layer's 256 experts:
                # 26 GB in fp32) is freed here rather than at the first forward.
                for mod in self.modules():
                    if isinstance(mod, MoE):
                        mod.stacked_weights()
                self._refuse_projections()     # the cast members no longer view their buffers
        return self

    def bfloat16(self) -> "Model":
        return self.to(dtype=torch.bfloat16)

    def half(self) -> "Model":
        """Refused (ValueError, model unchanged): the model runs in float32 or bfloat16 (its
        caches take no float16); use :meth:`bfloat16`."""
        return self.to(dtype=torch.float16)

    def float(self) -> "Model":
        return self.to(dtype=torch.float32)

    def double(self) -> "Model":
        """``nn.Module.double``: every floating parameter and buffer in float64, those kept in
        fp32 included (the float64 mode of the gradient checks, tests/train). Refused
        (ValueError, model unchanged) on a compact head, which stays bf16: the model then
        runs in float32 or bfloat16 (:meth:`expand_head` first)."""
        if self.head_compact:
            raise ValueError("Model.double(): a compact head stays bf16, so the model runs in "
                             "float32 or bfloat16; call expand_head() first")
        return super().double()

    def type(self, dst_type) -> "Model":
        """``.to(dtype=dst_type)`` for float32 or bfloat16 (the compute weights only, see the
        class doc), :meth:`double` for float64; anything else (float16, a tensor type name)
        raises ValueError, model unchanged (``nn.Module.type`` would cast every parameter,
        those kept in fp32 and a compact head included)."""
        if not isinstance(dst_type, torch.dtype):
            raise ValueError(f"Model.type takes a torch dtype (float32 or bfloat16; float64 "
                             f"for .double()), got {dst_type!r}; use .to(dtype)")
        return self.double() if dst_type == torch.float64 else self.to(dtype=dst_type)

    # ------------------------------------------------------------------ head storage
    def _head_param(self) -> Optional[nn.Parameter]:
        """The head's weight parameter when the head is a dsv4 Linear holding one, else None
        (native FP8 storage, a module swapped in)."""
        head = self.head
        return head._parameters.get("weight") if isinstance(head, Linear) else None

    def _compact_weight(self) -> Optional[nn.Parameter]:
        """The head's bf16 weight parameter when the head is compact, else None."""
        p = self._head_param()
        return p if p is not None and p.dtype == torch.bfloat16 else None

    @property
    def head_compact(self) -> bool:
        """Whether the head weight is held in bf16 (:meth:`compact_head`)."""
        return self._compact_weight() is not None

    def compact_head(self) -> "Model":
        """Hold the head weight once, in bf16, for serving; returns the model.

        The release ships ``head.weight`` [vocab, dim] in bf16 and the official code holds it
        in fp32 (architecture.md §"Globals"); so does this model by default. After this call
        the parameter holds the same values in bf16 (V4-Flash: 1.06 GB instead of 2.12 GB; the
        fp32 storage is freed, as is a bf16 copy a ``head_dtype=torch.bfloat16`` step made):

        * logits are unchanged: ``head_dtype`` None / float32 still computes the official fp32
          head (:func:`dsv4.layers.head.fp32_logits`: fp32 products of the bf16-exact values,
          fp32 sums; on CUDA one ``mm(..., out_dtype=float32)`` reading 2 bytes a value), and
          ``head_dtype=torch.bfloat16`` uses the weight itself, no copy.
        * ``.to(device)`` moves it, ``.to(dtype)`` / ``.float()`` leave it in bf16.
        * ``state_dict()`` holds the bf16 weight (``save_pretrained`` writes the release's
          bf16 head; ``from_pretrained`` and ``load_state_dict`` of an fp32 model read it
          back exactly). ``load_state_dict`` into a compact model takes a head whose values
          are bf16-exact (stored bf16 then, also with ``assign=True``) and raises ValueError,
          before anything is loaded, for one that is not.
        * training: the compact weight is frozen (``requires_grad=False``: it gets no
          gradient, and a gradient it held is dropped; activations still get theirs).
          :meth:`expand_head` restores the fp32 parameter. Unfreezing it yourself (e.g.
          ``model.requires_grad_(True)``) trains the head in bf16 (bf16 gradient and
          optimizer update, no longer the official fp32 head; the first forward with grad
          enabled warns, once per model and compaction, a deep copy included): expand_head
          first.

        Idempotent. Raises ValueError, changing nothing, when a value of the weight is not a
        bf16 value (a randomly initialised or fp32-trained head: the bf16 head would change
        the logits), or when the head is not an fp32 :class:`~dsv4.layers.linear.Linear`
        parameter (native FP8 storage, or a module swapped in). A meta-device model has no
        values to check: its head becomes a bf16 meta tensor.
        """
        head = self.head
        p = self._head_param()
        if p is None or head.weight_format is not None:
            raise ValueError("compact_head: the head must hold its weight as a parameter "
                             f"(a dsv4 Linear without native FP8/FP4 storage); got "
                             f"{type(head).__name__} with weight_format "
                             f"{getattr(head, 'weight_format', None)!r}")
        if p.dtype == torch.bfloat16:
            return self
        if p.dtype != torch.float32:
            raise ValueError(f"compact_head: the head weight is {p.dtype}; compact_head takes "
                             "the float32 head the model holds")
        check_bf16_exact(p, "compact_head: head.weight")
        copy = self._cached_head_copy(torch.bfloat16)
        self.__dict__.pop("_head_copy", None)
        if copy is not None and not same_bits(copy, p):
            copy = None      # stale: the weight was written through .data since the copy
        new = copy if copy is not None else p.detach().to(torch.bfloat16)
        # For expand_head; on the model, not the parameter: a Parameter's own attributes are
        # lost by copy.deepcopy and by load_state_dict(assign=True).
        self._head_requires_grad = p.requires_grad
        self.__dict__.pop("_warned_bf16_head_training", None)   # a new compaction: warn again
        p.grad = None
        p.data = new
        p.requires_grad_(False)
        self._storage_moved()
        return self

    def expand_head(self) -> "Model":
        """Undo :meth:`compact_head`: the head weight back in fp32 (the same values, exactly),
        with the ``requires_grad`` it had before. Returns the model; a no-op on an fp32
        head."""
        p = self._compact_weight()
        if p is None:
            return self
        p.data = p.detach().float()
        p.requires_grad_(self.__dict__.get("_head_requires_grad", True))
        self.__dict__.pop("_head_copy", None)
        self._storage_moved()
        return self

    # ------------------------------------------------------------------ same-input projections
    def _projection_owners(self) -> list:
        return [m for m in self.modules() if isinstance(m, ProjectionGroups)]

    @property
    def projections_fused(self) -> bool:
        """Whether :meth:`fuse_projections` is in effect (until :meth:`unfuse_projections`)."""
        return any(m._fused is not None for m in self._projection_owners())

    def fused_projection_groups(self) -> dict[str, tuple[str, ...]]:
        """The groups that run as one GEMM now (intact): {"<layer>.<group>": member names},
        e.g. ``{"layers.0.attn.input": ("wq_a", "wkv", "indexer.weights_proj"), ...}``."""
        out = {}
        for name, mod in self.named_modules():
            if not isinstance(mod, ProjectionGroups) or mod._fused is None:
                continue
            names = {id(m): n for n, m in mod.named_modules()}
            for g, linears in mod.projection_groups().items():
                grp = mod._fused.get(g)
                if grp is not None and grp.intact(linears):
                    out[f"{name}.{g}"] = tuple(names[id(linears[i])] for i in grp.index)
        return out

    def fuse_projections(self) -> "Model":
        """Run each layer's same-input projections as ONE GEMM (serving); returns the model.

        The groups (one input, one dtype, plain weight parameters; architecture.md §3, §4,
        §5, §9 define each projection): per attention layer ``wq_a`` + ``wkv`` (+ the
        indexer's ``weights_proj`` on CSA layers) on the layer input, and the compressor's
        ``wkv`` + ``wgate`` (+ the indexer compressor's ``wkv`` + ``wgate`` on CSA layers, all
        fp32) on its fp32 copy; per MoE the shared expert's ``w1`` + ``w3``. At batch 1 each
        projection is a small GEMV of mostly fixed cost; ``dsv4 bench``'s 2-layer V4-Flash
        step (one CSA, one HCA layer) launches 9 fewer GEMMs (23 → 14).

        Each group's weights are copied into one buffer [Σ out_features, in_features] and
        every member's weight Parameter becomes a row-slice view of it
        (:class:`~dsv4.layers.linear.LinearGroup`): the same Parameter objects and values, no
        weight held twice, ``state_dict`` keys and values unchanged, in-place
        ``load_state_dict``, optimizers and training work as before. The layers then compute
        ``F.linear(x, buffer)`` once and split its columns (views) on every path (reference
        and kernels, prefill, chunked / mixed steps and decode, CPU and CUDA). The maths is
        the members' own; the values equal the separate GEMMs' up to the GEMM's summation
        order (another cuBLAS / CPU kernel for the wider output).

        Members that do not take part: a Linear with native FP8/FP4 storage
        (``weights="native"``), or in another dtype, or whose ``act_quant`` differs; a group
        of fewer than two is not fused. A member whose weight is later re-homed or replaced
        (``p.data = ...``, ``load_state_dict(assign=True)`` on a submodule, a module swapped
        in) makes its group fall back to the separate GEMMs (never stale weights); so does a
        forward / backward hook on a member (or a global module hook: the hooks then run, and
        a fuse leaves a hooked linear out), and grad mode with a member weight requiring grad
        (autograd then reaches each Parameter). The model keeps its groups current itself:
        ``.to(device / dtype)``, ``.double()``, ``.cuda()``, ``load_state_dict`` and
        ``copy.deepcopy`` rebuild them in the new storage. A CUDA graph captured on the fused
        model reads the storage it captured: the runtime engine captures its decode graphs
        again after a fuse or unfuse (:attr:`storage_version`); fusing before building the
        Engine saves that second capture.

        Idempotent. On CUDA the blocks the old storage leaves are returned to the driver
        (``torch.cuda.empty_cache``, unless a graph is being captured).
        """
        with self._tracking_storage():
            for mod in self._projection_owners():
                mod.fuse_projections()
        self._release_cached_blocks()
        return self

    def unfuse_projections(self) -> "Model":
        """Undo :meth:`fuse_projections`: each member weight back in its own storage (the
        same values), the separate GEMMs. Returns the model; a no-op when not fused."""
        with self._tracking_storage():
            for mod in self._projection_owners():
                mod.unfuse_projections()
        self._release_cached_blocks()
        return self

    def _refuse_projections(self) -> None:
        """Rebuild the broken groups of the fused layers (after storage changed)."""
        for mod in self._projection_owners():
            mod.refresh_projections()

    def _release_cached_blocks(self) -> None:
        dev = self.embed.weight.device
        if dev.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            torch.cuda.empty_cache()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; with ``assign=True`` on a fused model
        (:meth:`fuse_projections`) the assigned weights of each group are then copied into a
        new group buffer (the model stays fused)."""
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._refuse_projections()
        self._storage_moved()
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Runs before any submodule loads: a compact head takes only bf16-exact values, stored
        # in bf16 (so that assign=True keeps it compact); anything else is refused here, before
        # a single tensor of the model has changed.
        key = prefix + "head.weight"
        t = state_dict.get(key)
        if self.head_compact and isinstance(t, torch.Tensor) and t.dtype != torch.bfloat16:
            if not t.is_floating_point():
                raise ValueError(f"load_state_dict: {key} is {t.dtype}; the compact head "
                                 "takes a floating-point weight")
            check_bf16_exact(t, f"load_state_dict into a compact head: {key}")
            state_dict[key] = t.to(torch.bfloat16)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def make_cache(self, batch_size: int) -> Cache:
        """An empty :class:`Cache` for ``batch_size`` sequences on the model's device/dtype.

        Raises ValueError unless ``batch_size`` is an integer >= 1 (not a float, bool or
        string).
        """
        return Cache(self.config, check_count(batch_size, "batch_size"), self.dtype,
                     self.device)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, input_ids: torch.Tensor, cache: Cache,
                      seq_lens: Optional[Sequence[int] | torch.Tensor],
                      name: str = "input_ids") -> tuple[list[int], torch.Tensor]:
        """Validate a call; return (valid tokens per row, int64 ids [T] of the valid tokens,
        row by row). Changes nothing. ``name``: the caller's name of ``input_ids``."""
        _check_ids(input_ids, name)
        B, S = input_ids.shape
        if not isinstance(cache, Cache) or cache.config != self.config:
            raise ValueError("cache was not made by this model's make_cache (config differs)")
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences but {name} has batch {B}")
        if cache.dtype != self.dtype or cache.device != self.device:
            raise ValueError(f"cache holds {cache.dtype} on {cache.device} but the model runs "
                             f"{self.dtype} on {self.device}: make the cache after .to(...)")
        if input_ids.device != self.device:
            raise ValueError(f"{name} are on {input_ids.device}, the model on {self.device}")
        lens = _seq_lens_arg(seq_lens, B, S)
        cache.check_usable([b for b in range(B) if lens[b]])
        valid = torch.arange(S)[None, :] < torch.tensor(lens)[:, None]
        ids = input_ids[valid.to(input_ids.device)]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return lens, ids.long()

    def _step_batch(self, starts: list[int], lens: list[int], logits: str) -> StepBatch:
        """The step description of a padded call on a dense :class:`Cache` (row b = slot b,
        one block per row). ``logits``: "all" (every valid token) or "last" (the last valid
        token of each row that has one)."""
        if logits == "all":
            index = list(range(sum(lens)))
        else:
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            index = [cu[b + 1] - 1 for b in range(len(lens)) if lens[b]]
        B = len(lens)
        return StepBatch.build(starts, lens, list(range(B)), [[b] for b in range(B)], index,
                               self.device, max_blocks=1)

    def _head(self, x: torch.Tensor, fn, scale, base, norm: RMSNorm,
              head_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """hc_head collapse → norm → head: float32 logits [..., vocab] (§10.2).

        ``head_dtype`` None / float32: the official fp32 head (the input upcast to fp32; a
        compact head, :meth:`compact_head`, computes the same products from its bf16 weight).
        ``torch.bfloat16``: an opt-in low-precision head for serving: the head weight in bf16
        (a compact head's own weight, else a bf16 copy cached on the model; half the bytes a
        decode step reads), the normed activations in bf16, fp32 accumulation and fp32 logits
        (``torch.mm(..., out_dtype=float32)`` on CUDA; elsewhere the bf16 product is upcast).
        """
        c = self.config
        y = hc_head(x, fn, scale, base, c.norm_eps, c.hc_eps)
        y = norm(y, kernel=norm.kernel_serves(y))
        if head_dtype in (None, torch.float32):
            return self._fp32_head(y)
        w = self._low_precision_head(head_dtype)
        y = y.to(head_dtype)
        out = mm_fp32_out(y, w) if y.is_cuda else None
        return out if out is not None else F.linear(y, w).float()

    def _fp32_head(self, y: torch.Tensor) -> torch.Tensor:
        """The official fp32 head on the normed ``y`` [..., dim]: fp32 logits [..., vocab].
        An fp32 head: ``head(y.float())``; a compact one (:meth:`compact_head`): the same
        products from its bf16 weight (:func:`dsv4.layers.head.fp32_logits`)."""
        w = self._compact_weight()
        if w is None:
            return self.head(y.float())
        # once per model and compaction: the mark is this object's id (a deep copy, which
        # copies the mark, warns again) and compact_head clears it
        if w.requires_grad and torch.is_grad_enabled() and self.__dict__.get(
                "_warned_bf16_head_training") != id(self):
            self._warned_bf16_head_training = id(self)
            warnings.warn("the compact head (Model.compact_head) was unfrozen: its gradient and "
                          "optimizer update are bf16, not the official fp32 head's; call "
                          "model.expand_head() before training the head", RuntimeWarning,
                          stacklevel=3)
        return fp32_logits(y, w)

    def _low_precision_head(self, dtype: torch.dtype) -> torch.Tensor:
        """The head weight in ``dtype``: the weight itself when it is held so (a compact head
        for bfloat16), else a copy cached on the model (rebuilt when the weight changes; the
        memory of a second head: :meth:`compact_head` avoids it). "Changes" is seen through
        the weight's version counter (``copy_`` / optimizer steps / ``load_state_dict``
        advance it); a write through ``head.weight.data`` does not, so after one the cached
        copy is stale: write through the parameter under ``torch.no_grad()`` instead."""
        w = self.head.weight
        if w.dtype == dtype:
            return w.detach()
        cached = self._cached_head_copy(dtype)
        if cached is None:
            cached = w.detach().to(dtype)
            self._head_copy = (self._head_copy_key(dtype), cached)
        return cached

    def _head_copy_key(self, dtype: torch.dtype) -> tuple:
        w = self.head.weight
        return (dtype, w.data_ptr(), w._version, w.device)

    def _cached_head_copy(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The cached ``dtype`` copy of the current head weight, or None."""
        cached = self.__dict__.get("_head_copy")
        if cached is None or cached[0] != self._head_copy_key(dtype):
            return None
        return cached[1]

    def forward_step(self, input_ids: torch.Tensor, layers: Sequence[LayerCache],
                     batch: StepBatch, head_dtype: Optional[torch.dtype] = None,
                     return_hidden: bool = False):
        """The model on one step: the entry point of ``dsv4.runtime`` and of :meth:`forward`.

        Args:
            input_ids: int64 [T], the step's tokens (row by row, as ``batch`` describes them).
            layers: one :class:`~dsv4.cache.LayerCache` per main layer (dense or paged),
                advanced in place for the rows' slots.
            batch: the :class:`~dsv4.layers.varlen.StepBatch` every layer receives.
            head_dtype: see :meth:`_head` (None = the official fp32 head).
            return_hidden: also return the last residual streams [T, hc_mult, dim].

        Returns:
            float32 logits [batch.num_logits, vocab] of the tokens ``batch.logits_index``
            (and the streams). No host synchronisation beyond what the layers' ops do, so a
            decode step on the kernels can be captured in a CUDA graph.
        """
        # One scope per step: the metadata the layers derive from the batch is computed once
        # and shared, inside this call (a captured CUDA graph recomputes it at each replay).
        with batch.step_scope():
            x = self.embed(input_ids).unsqueeze(1).repeat(1, self.config.hc_mult, 1)
            for i, layer in enumerate(self.layers):
                x = layer(x, input_ids, layers[i], batch)
            logits = self._head(x.index_select(0, batch.logits_index), self.hc_head_fn,
                                self.hc_head_scale, self.hc_head_base, self.norm, head_dtype)
        return (logits, x) if return_hidden else logits

    def forward(self, input_ids: torch.Tensor, cache: Optional[Cache] = None,
                seq_lens: Optional[Sequence[int] | torch.Tensor] = None,
                return_hidden: bool = False, logits: str = "all"):
        """Logits float32 of the fed tokens; with ``return_hidden`` also the last residual
        streams [batch, seq, hc_mult, dim] (the MTP input; zeros at padding).

        ``logits="all"``: [batch, seq, vocab] (zeros at padding positions); ``logits="last"``:
        [batch, 1, vocab], the last valid position of each row only (zeros for a row with
        ``seq_lens`` 0), so a prompt does not materialise fp32 logits for every position.

        Internally the valid tokens of all rows are processed back to back (a
        :class:`~dsv4.layers.varlen.StepBatch`, the calling convention of every layer).

        Raises:
            TypeError: input_ids is not a tensor (e.g. a Python list).
            ValueError: input_ids not int64/int32 [batch, seq] on the model's device, token
                ids outside [0, vocab_size), seq_lens that are not ``batch`` integers in
                [0, seq] (None, NaN, inf, floats, bools, a 2-D tensor ...), an unknown
                ``logits`` mode, or a cache of another batch size, config, dtype or device.
            CacheRowError: a row with tokens to feed was left unusable by a failed call.
            Nothing is changed when an error is raised before the layers run; an exception
            inside the layers marks the rows being fed unusable (``cache.reset`` them).
        """
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        if cache is None:
            _check_ids(input_ids)       # the errors name input_ids, not make_cache's argument
            cache = self.make_cache(input_ids.shape[0])
        lens, ids = self._check_inputs(input_ids, cache, seq_lens)
        B, S = input_ids.shape
        c = self.config
        if not any(lens):   # nothing to feed: no state changes
            out = torch.zeros(B, S if logits == "all" else 1, c.vocab_size, device=self.device)
            hidden = torch.zeros(B, S, c.hc_mult, c.dim, dtype=self.dtype, device=self.device)
            return (out, hidden) if return_hidden else out
        batch = self._step_batch(list(cache.lengths), lens, logits)
        fed = [b for b in range(B) if lens[b]]
        try:
            out, x = self.forward_step(ids, cache.layers, batch, return_hidden=True)
        except BaseException as e:
            cache.mark_broken(fed, e)
            raise
        for b in fed:
            cache.lengths[b] += lens[b]
        out = self._unflatten(out, lens, S if logits == "all" else 1, logits == "last")
        if not return_hidden:
            return out
        return out, self._unflatten(x, lens, S, False)

    @staticmethod
    def _unflatten(y: torch.Tensor, lens: list[int], S: int, last: bool) -> torch.Tensor:
        """[n, *rest] rows of the fed tokens (or of the rows' last tokens) → [batch, S, *rest],
        zeros where nothing was computed."""
        B = len(lens)
        if last:
            if all(lens):
                return y.view(B, 1, *y.shape[1:])
            keep = torch.tensor([b for b in range(B) if lens[b]], device=y.device)
        elif sum(lens) == B * S:
            return y.view(B, S, *y.shape[1:])
        else:
            keep = torch.tensor([b * S + t for b in range(B) for t in range(lens[b])],
                                dtype=torch.long, device=y.device)
        out = y.new_zeros(B * S, *y.shape[1:])
        out.index_copy_(0, keep, y)
        return out.view(B, S, *y.shape[1:])

    def forward_mtp(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: Cache,
                    seq_lens: Optional[Sequence[int] | torch.Tensor] = None,
                    depth: int = 0) -> torch.Tensor:
        """MTP draft logits float32 [batch, seq, vocab] (§10.3; zeros at padding).

        hidden: [batch, seq, hc_mult, dim] last residual streams of the main model at positions
        p … (from ``forward(..., return_hidden=True)``); next_ids: int64 [batch, seq], the token
        at p+1 for each. Uses and advances the MTP layer's state in ``cache``
        (``cache.mtp_lengths``); positions are those of ``hidden``.

        Raises ValueError for a ``depth`` outside [0, n_mtp_layers), a ``hidden`` whose shape is
        not [batch, seq, hc_mult, dim] of ``next_ids`` or that is not a floating-point tensor
        on the model's device (nothing changed then), and the input errors of :meth:`forward`
        (an exception inside the MTP block marks the fed rows unusable likewise).
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth < len(self.mtp):
            raise ValueError(f"depth must be an integer in [0, {len(self.mtp)}) (n_mtp_layers), "
                             f"got {depth!r}")
        lens, ids = self._check_inputs(next_ids, cache, seq_lens, "next_ids")
        c = self.config
        B, S = next_ids.shape
        want = (B, S, c.hc_mult, c.dim)
        if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape) != want:
            raise ValueError(f"hidden must be [batch, seq, hc_mult, dim] = {want}, got "
                             f"{tuple(getattr(hidden, 'shape', ()))}")
        if not hidden.dtype.is_floating_point or hidden.device != self.device:
            raise ValueError(f"hidden must be a floating-point tensor on {self.device} (the "
                             f"model's device), got {hidden.dtype} on {hidden.device}")
        if not any(lens):
            return torch.zeros(B, S, c.vocab_size, device=self.device)
        batch = self._step_batch(list(cache.mtp_lengths), lens, "all")
        fed = [b for b in range(B) if lens[b]]
        valid = torch.arange(S)[None, :] < torch.tensor(lens)[:, None]
        try:
            h = hidden[valid.to(hidden.device)].to(self.dtype)
            blk = self.mtp[depth]
            e = blk.enorm(self.embed(ids))
            x = blk.e_proj(e).unsqueeze(1) + blk.h_proj(blk.hnorm(h))
            x = blk(x, ids, cache.layers[self.config.n_layers + depth], batch)
            out = self._head(x, blk.hc_head_fn, blk.hc_head_scale, blk.hc_head_base, blk.norm)
        except BaseException as e:
            cache.mark_broken(fed, e)
            raise
        for b in fed:
            cache.mtp_lengths[b] += lens[b]
        return self._unflatten(out, lens, S, False)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike,
                        device: Optional[str | torch.device] = None,
                        dtype: torch.dtype = torch.bfloat16, weights: str = "dequant",
                        num_layers: Optional[int] = None, progress: bool = True,
                        **config_overrides) -> "Model":
        """Load ``config.json`` and the safetensors weights (official names and formats, §12)
        of the checkpoint directory ``path``: the FP8/FP4 release (shards + index) or bf16/fp32.

        ``device`` (None: ``torch.get_default_device()``); ``dtype`` the compute dtype;
        ``weights="dequant"`` dequantises FP8/FP4 linears to ``dtype`` at load,
        ``weights="native"`` keeps them FP8/FP4 (1/2 or 1/4 of the bf16 bytes) and dequantises
        at use; ``num_layers=N`` loads only the first N layers (no MTP unless
        ``n_mtp_layers=k``); ``progress`` shows a tqdm bar; ``config_overrides`` replace config
        fields (e.g. ``quant_sim=False``). See :func:`dsv4.checkpoint.load_checkpoint` for the
        details and the errors raised (ConfigError, CheckpointError, ValueError).
        """
        from .checkpoint import load_checkpoint
        return load_checkpoint(cls, path, device=device, dtype=dtype, weights=weights,
                               num_layers=num_layers, progress=progress, **config_overrides)

    def save_pretrained(self, path: str | os.PathLike, changed: str = "refuse") -> None:
        """Write ``config.json`` and ``model.safetensors`` with the official tensor names;
        linears loaded from FP8 / FP4 storage are written back in that format (with the
        release's ``quantization_config``), so a reload computes the same logits. Raises
        ValueError before writing anything when that cannot hold (see
        :func:`dsv4.checkpoint.save_checkpoint`; ``changed="plain"`` writes weights changed
        since an FP8 / FP4 load as plain weights instead, with a warning); a previous
        checkpoint in ``path`` is replaced."""
        from .checkpoint import save_checkpoint
        save_checkpoint(self, path, changed)
