"""Memory planning for long contexts (``dsv4 bench --mode 1m``): what one prefill chunk
allocates on top of the weights and the pool, and how many layers fit on a GPU.

* :func:`step_transient` runs one engine step (``Model.forward_step`` on a paged cache, the
  kernel path: the ``torch.ops.dsv4`` ops' shape functions) on the **meta** device and
  records every tensor the step creates and when it dies: the peak of the live bytes is the
  step's transient, and the largest tensors live at that peak say what makes it. No memory
  is allocated and nothing is computed, so a 16K-token chunk at 1M context takes seconds on
  the CPU. It is the same Python code as the GPU step (one definition of every layer); what
  it cannot see is memory a CUDA op takes inside its launch (workspaces from the caching
  allocator): at prefill only ``moe_gate`` (T x experts fp32 partials, 17 MB at 16K tokens)
  and ``mhc_pre`` (< 1 MB) take one (``indexer_topk`` and ``sparse_attn`` split over keys only
  for a few queries, i.e. in decode: < 1 MB at 1M); :data:`WORKSPACE_ALLOWANCE` covers them.
* :class:`LayerFit`: the arithmetic of ``--layers auto``.
* :func:`time_attention_decode`: the decode time of the attention stack alone (every layer's
  ``Attention`` module, and its KV-reading core ops) replayed as CUDA graphs.
* :func:`attention_decode_ops`: every op one decode token runs in each layer's ``Attention``
  module at a given context, with its tensor shapes (meta device): what a decode step of the
  attention side launches, and whether anything in it grows with the context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import weakref
from typing import Optional
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["StepMemory", "step_transient", "LayerFit", "time_attention_decode",
           "WORKSPACE_ALLOWANCE", "OpRecord", "attention_decode_ops"]

#: Bytes set aside for op workspaces taken inside launches (see the module docstring).
WORKSPACE_ALLOWANCE = 256 << 20

#: Held while a function here (or ``bench``'s expert factory) has a library global patched:
#: two threads interleaving such patches would each restore what the other one patched in,
#: leaving the patch in place for good. It does not hide the patch from other threads' models
#: meanwhile (these are benchmark tools: run them where no other model runs).
PATCH_LOCK = threading.RLock()


@dataclasses.dataclass
class StepMemory:
    """What one step allocates beyond what exists before it (bytes).

    peak: the most bytes alive at once among the tensors the step created (its output
        included); top: the largest tensors alive at that moment, ``(bytes, op, shape,
        dtype)``, largest first; tokens / context: the step's chunk and where it ends.
    """

    peak: int
    top: list
    tokens: int
    context: int


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created under it (each output's storage, once) while
    any tensor of it is alive; records the peak and what was alive then."""

    def __init__(self, keep_top: int = 12):
        super().__init__()
        self.live: dict[int, list] = {}      # storage key -> [bytes, tensor refs, op, shape, dtype]
        self.now = 0
        self.peak = 0
        self.top: list = []
        self.keep_top = keep_top

    def _gone(self, key: int) -> None:
        rec = self.live.get(key)
        if rec is None:
            return
        rec[1] -= 1
        if rec[1] == 0:
            self.now -= rec[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in
                  torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in self.live:                # a view / in-place result of a step tensor
                self.live[key][1] += 1
            elif key in inputs:                 # a view of a weight, the cache, ...
                continue
            else:                               # a new allocation
                self.live[key] = [t.untyped_storage().nbytes(), 1,
                                  str(func.overloadpacket.__name__), tuple(t.shape), t.dtype]
                self.now += self.live[key][0]
            weakref.finalize(t, self._gone, key)
        if self.now > self.peak:
            self.peak = self.now
            self.top = sorted(((r[0], r[2], r[3], r[4]) for r in self.live.values()),
                              key=lambda r: -r[0])[:self.keep_top]
        return out


@contextlib.contextmanager
def _kernel_path_everywhere():
    """Every layer takes its CUDA kernel path although the tensors are on the meta device
    (the ops then run their registered shape functions)."""
    from ..layers import attention, linear, mhc, moe, norm
    with PATCH_LOCK:
        saved = [(attention, "use_kernels", lambda *a, **k: True),
                 (mhc, "_use_kernels", lambda *a, **k: True),
                 (moe, "_grouped_kernels_available", lambda: True),
                 (linear.Linear, "_fp8_kernel", lambda self, x: True),
                 (norm.RMSNorm, "kernel_serves", lambda self, x: True)]
        old = [(mod, name, getattr(mod, name)) for mod, name, _ in saved]
        # MoE / Gate check x.is_cuda themselves; a meta tensor answers False: route on kernels
        orig_stack, orig_gate = moe.MoE.kernel_path_stack, moe.Gate.forward

        def stack(self, x):
            return self.stacked_weights()

        def gate(self, x, input_ids):
            return torch.ops.dsv4.moe_gate(x, self.weight, self.bias,
                                           self.tid2eid if self.hash else None,
                                           input_ids if self.hash else None, self.topk,
                                           self.route_scale)
        try:
            for mod, name, new in saved:
                setattr(mod, name, new)
            moe.MoE.kernel_path_stack, moe.Gate.forward = stack, gate
            yield
        finally:
            moe.MoE.kernel_path_stack, moe.Gate.forward = orig_stack, orig_gate
            for mod, name, f in old:
                setattr(mod, name, f)


def step_transient(config, tokens: int, context: int, kv_cache: str = "bf16",
                   indexer_cache: str = "bf16", weights: str = "bf16",
                   head_dtype: Optional[torch.dtype] = torch.bfloat16,
                   block_tokens: Optional[int] = None) -> StepMemory:
    """The transient of one prefill step of ``tokens`` tokens of one sequence ending at
    ``context`` (its chunk ``[context - tokens, context)``, the earlier tokens cached), on the
    runtime's paged cache and the kernel path, measured on the meta device (see the module
    docstring). ``weights="fp8"`` stores the release's FP8/FP4 linears natively, as the bench
    does; ``head_dtype=torch.bfloat16`` holds the head compact (``Model.compact_head``), as the
    bench's ``--head bf16`` does. Returns a :class:`StepMemory`; op workspaces are not in it
    (:data:`WORKSPACE_ALLOWANCE`). Raises ValueError for tokens outside [1, context]."""
    if not 1 <= tokens <= context:
        raise ValueError(f"tokens must be in [1, context={context}], got {tokens}")
    model, cache, batch = _meta_step(config, tokens, context, kv_cache, indexer_cache, weights,
                                     block_tokens)
    ids = torch.zeros(tokens, dtype=torch.long, device="meta")
    if head_dtype == torch.bfloat16:
        model.compact_head()                    # held in bf16: the step makes no copy
    elif head_dtype not in (None, torch.float32):
        model._low_precision_head(head_dtype)   # kept by the model after the first step
    mode = _LiveBytes()
    with torch.no_grad(), _kernel_path_everywhere(), mode:
        out = model.forward_step(ids, cache.layers, batch, head_dtype)
        del out
    return StepMemory(peak=mode.peak, top=mode.top, tokens=tokens, context=context)


def _meta_step(config, tokens: int, context: int, kv_cache: str, indexer_cache: str,
               weights: str, block_tokens: Optional[int]):
    """(model, paged cache, step batch) on the meta device: one sequence whose chunk of
    ``tokens`` tokens ends at ``context`` (the runtime's pool and block tables; weights in bf16
    or, ``weights="fp8"``, the release's native FP8 / FP4 formats)."""
    from ..layers.varlen import StepBatch
    from ..model_info import meta_model
    from .engine import default_block_tokens
    from .pool import PagedCache, blocks_needed
    model = meta_model(config).to(torch.bfloat16)
    if weights == "fp8":
        from ..checkpoint import linear_formats
        fmts = linear_formats(config, "fp8")
        for name, mod in model.named_modules():
            if fmts.get(name) in ("fp8", "fp4"):
                _quantize_meta(mod, name, fmts[name], config)
        for mod in model.modules():
            if hasattr(mod, "restack"):
                mod.restack()
    bt = block_tokens or default_block_tokens(config)
    nb = blocks_needed(config, context, bt)
    cache = PagedCache(config, 1, nb, bt, torch.bfloat16, "meta", indexer_cache, kv_cache)
    start = context - tokens
    batch = StepBatch.build([start], [tokens], [0], [list(range(nb))], [tokens - 1], "meta",
                            max_blocks=nb)
    return model, cache, batch


@dataclasses.dataclass(frozen=True)
class OpRecord:
    """One op a step ran: its name (``aten.mm``, ``dsv4.indexer_topk``, ...) and the shapes
    and dtypes of its tensor inputs and outputs, ``((shape, dtype name), ...)``."""

    op: str
    inputs: tuple
    outputs: tuple


class _OpLog(TorchDispatchMode):
    """Records every op dispatched under it (views included) as an :class:`OpRecord`."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def shapes(tree):
            return tuple((tuple(t.shape), str(t.dtype).removeprefix("torch."))
                         for t in torch.utils._pytree.tree_leaves(tree)
                         if isinstance(t, torch.Tensor))
        name = func.overloadpacket
        self.ops.append(OpRecord(f"{name._qualified_op_name.replace('::', '.')}",
                                 shapes((args, kwargs)), shapes(out)))
        return out


def attention_decode_ops(config, context: int, kv_cache: str = "bf16",
                         indexer_cache: str = "bf16", weights: str = "bf16",
                         block_tokens: Optional[int] = None) -> list[list[OpRecord]]:
    """Every op that one decode token at position ``context - 1`` runs in each layer's
    ``Attention`` module (the runtime's paged cache, the kernel path: the ``torch.ops.dsv4``
    ops' shape functions), on the meta device: nothing is allocated or computed, so 1M
    contexts take a second on the CPU. Returns one list of :class:`OpRecord` per layer.

    What it is for: a decode step's attention side must cost the same at any context except in
    the ops that read the KV cache through the block table (``indexer_topk``, ``sparse_attn``,
    ``hca_attn``); comparing two contexts shows every tensor that grows with it.
    Raises ValueError for a context < 1."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    model, cache, batch = _meta_step(config, 1, context, kv_cache, indexer_cache, weights,
                                     block_tokens)
    x = torch.zeros(1, config.dim, dtype=torch.bfloat16, device="meta")
    out = []
    with torch.no_grad(), _kernel_path_everywhere():
        for i, blk in enumerate(model.layers):
            log = _OpLog()
            with log:
                blk.attn(x, cache.layers[i], batch)
            out.append(log.ops)
    return out


def _quantize_meta(mod, name, fmt, config) -> None:
    """``bench._quantize_linear`` on a meta Linear: the stored tensors' shapes and dtypes
    (those of ``quant.fp8_block_quantize`` / ``quant.fp4_pack``; ``Linear.set_quantized``
    checks them) without values (the quantisers read values: they reject inf / NaN)."""
    from ..checkpoint import act_quant_of
    from ..quant import FP8_BLOCK
    n, k = mod.out_features, mod.in_features
    if fmt == "fp8":
        q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="meta")
        s = torch.empty(-(-n // FP8_BLOCK), -(-k // FP8_BLOCK), dtype=torch.float8_e8m0fnu,
                        device="meta")
    else:
        q = torch.empty(n, k // 2, dtype=torch.int8, device="meta")
        s = torch.empty(n, k // 32, dtype=torch.float8_e8m0fnu, device="meta")
    mod.set_quantized(q, s, fmt, torch.bfloat16)
    mod.stored_format = fmt
    mod.act_quant = act_quant_of(name)
    mod.config = config


@dataclasses.dataclass
class LayerFit:
    """How many layers fit: ``budget`` bytes (free device memory when the build starts) must
    hold the layers' weights, what is not a layer (embedding, head), the pool at the target
    context, one step's transient and a safety margin.

    Attributes (bytes): budget; fixed: the non-layer weights as held while serving (embedding;
    the head, compact in bf16 or fp32: ``bench.non_layer_bytes``); transient: one prefill
    chunk's (:func:`step_transient`) plus op workspaces; margin: fragmentation, CUDA graphs'
    pools, library workspaces.
    """

    budget: int
    fixed: int
    transient: int
    margin: int

    def fits(self, used: int, next_layer: int, pool: int) -> bool:
        """Whether one more layer of ``next_layer`` bytes fits when the layers built so far
        take ``used`` bytes and the pool of all of them plus the new one takes ``pool``."""
        return used + next_layer + pool + self.fixed + self.transient + self.margin \
            <= self.budget

    def count(self, layer_bytes, pool_bytes, limit: int) -> int:
        """Layers that fit, at most ``limit`` (at least 1): ``layer_bytes(i)`` the weights of
        layer i, ``pool_bytes(n)`` the pool of n layers (both callables)."""
        n, used = 1, layer_bytes(0)
        while n < limit and self.fits(used, layer_bytes(n), pool_bytes(n + 1)):
            used += layer_bytes(n)
            n += 1
        return n


class _Recorder:
    """Stands for the ``torch.ops.dsv4`` namespace of a layer module and records the calls of
    ``names`` (op, arguments) while passing every call through."""

    def __init__(self, ns, names, calls: list):
        self._ns, self._names, self._calls = ns, names, calls

    def __getattr__(self, name):
        f = getattr(self._ns, name)
        if name not in self._names:
            return f

        def call(*args, **kwargs):
            self._calls.append((name, f, args, kwargs))
            return f(*args, **kwargs)
        return call


#: The ops of an attention layer that read the KV cache in decode (kernels.md §2's bytes).
CORE_OPS = ("indexer_topk", "sparse_attn", "hca_attn")


def time_attention_decode(model, cache_layers, batch, reps: int = 50) -> dict:
    """Decode time of the attention stack: every layer's ``Attention`` module on one decode
    step (``batch``: one new token per row at the cached context) and, separately, its
    KV-reading core (:data:`CORE_OPS`, called with the arguments the modules passed them).

    On CUDA each part is captured once as a CUDA graph over all layers and replayed ``reps``
    times between two events (the input of each module is a fixed random [B, dim] tensor in
    the model dtype: the attention's cost does not depend on its values); elsewhere the parts
    run eagerly, timed on the host. The modules write their new key into the cache (the same
    slot every replay).

    Returns seconds per step: ``attention`` (all modules), ``core`` (the core ops),
    ``per_layer`` and ``core_per_layer`` (lists, one per layer), ``per_op`` (each core op's
    calls over all layers, one graph per op: ``{"indexer_topk": s, ...}``),
    ``indexer_tree`` (the ``indexer_topk`` calls again with the candidate-list tree merge,
    ``DSV4_INDEXER_TOPK_MERGE=tree``, the baseline of the default histogram select; None
    without CSA layers), ``kinds`` (the layers' kinds, "csa" / "hca" / "swa") and
    ``core_calls`` (each layer's core op names).
    """
    import time

    from ..layers import attention as attn_mod
    from ..layers import indexer as idx_mod
    c = model.config
    dev = model.device
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch.num_tokens, c.dim, generator=g, device=dev).to(model.dtype)
    cuda = dev.type == "cuda"
    calls_per_layer = []
    with PATCH_LOCK:
        saved = attn_mod._dsv4, idx_mod._dsv4
        try:
            for i, blk in enumerate(model.layers):
                calls: list = []
                attn_mod._dsv4 = _Recorder(saved[0], CORE_OPS, calls)
                idx_mod._dsv4 = _Recorder(saved[1], CORE_OPS, calls)
                with torch.no_grad():
                    blk.attn(x, cache_layers[i], batch)
                calls_per_layer.append(calls)
        finally:
            attn_mod._dsv4, idx_mod._dsv4 = saved

    def layer_fn(i):
        return lambda: model.layers[i].attn(x, cache_layers[i], batch)

    def core_fn(i):
        def run():
            for _, f, a, k in calls_per_layer[i]:
                f(*a, **k)
        return run

    def seconds(fns) -> float:
        def body():
            for f in fns:
                f()
        if not cuda:
            body()
            t = time.perf_counter()
            for _ in range(reps):
                body()
            return (time.perf_counter() - t) / reps
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    def op_fn(name):
        def run():
            for cl in calls_per_layer:
                for n, f, a, k in cl:
                    if n == name:
                        f(*a, **k)
        return run

    L = len(model.layers)
    names = [n for n in CORE_OPS if any(c[0] == n for cl in calls_per_layer for c in cl)]
    with torch.no_grad():
        per_layer = [seconds([layer_fn(i)]) for i in range(L)]
        core_per_layer = [seconds([core_fn(i)]) if calls_per_layer[i] else 0.0
                          for i in range(L)]
        total = seconds([layer_fn(i) for i in range(L)])
        core = seconds([core_fn(i) for i in range(L)])
        per_op = {n: seconds([op_fn(n)]) for n in names}
        tree = None
        if "indexer_topk" in names:
            with mock.patch.dict(os.environ, {"DSV4_INDEXER_TOPK_MERGE": "tree"}):
                tree = seconds([op_fn("indexer_topk")])
    return {"attention": total, "core": core, "per_layer": per_layer,
            "core_per_layer": core_per_layer, "per_op": per_op, "indexer_tree": tree,
            "kinds": [c.layer_kind(i) for i in range(L)],
            "core_calls": [[name for name, *_ in cl] for cl in calls_per_layer]}
