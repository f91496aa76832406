"""``dsv4 bench``: end-to-end prefill and decode of the runtime engine beside their floors
(and beside transformers' ``DeepseekV4ForCausalLM`` with ``--compare hf``).

    dsv4 bench                                   # 2 layers at V4-Flash width, 64 experts, bf16
    dsv4 bench --batch 1,8,64,256 --context 4096,65536 --compare hf --json r.json --plot r.png
    dsv4 bench --mode 1m --layers 2              # a 1M-token prompt prefilled in chunks, decode
    dsv4 bench --mode 1m --layers auto --experts 0 --weights fp8 --kv-cache fp8 \
        --indexer-cache fp8                      # as many V4-Flash layers as the GPU holds

Random weights (seeded): ``--weights bf16``, or ``fp8`` for the release's native storage (FP8
linears, FP4 routed experts, dequantised at use until FP8/FP4 GEMMs land). Rows:

* prefill ``B x P``: B prompts of P tokens through the engine (chunked under the token
  budget), logits for each last position; tok/s = B·P / wall time (synchronised), the median
  of ``--repeats`` runs after one warm-up run.
* decode ``B @ C``: B sequences whose first C tokens are taken as already cached (the pool
  holds random entries: attention reads real-sized scopes without a real prefill), then
  ``--steps`` engine steps (CUDA graphs where capturable) after 3 warm-up steps; ms/step is
  the median interval between the returns of back-to-back ``step()`` calls, sampling and the
  host included (the JSON adds the mean and the slowest step, and ``overlap``: whether the
  engine ran its overlapped loop, the default on CUDA; ``--no-overlap`` for the synchronous
  one). transformers' rows take the same medians (its prefill after one 16-token
  warm-up forward).

Each row has its floor (:mod:`dsv4.runtime.floors`: bytes / 4.22 TB/s, FLOPs / 767 TFLOP/s)
and the peak GPU memory. The head is held once, in bf16, by default (``--head bf16``: the
random head rounded to bf16, as the release ships it, then ``Model.compact_head``; read with
fp32 accumulation; the issue's 0.54 ms floor assumes it); ``--head fp32`` holds and runs the
official fp32 head and counts its 2x bytes in the floor.
Each layer's same-input projections run as one GEMM (``Model.fuse_projections``: the same
weights and maths, fewer launches); ``--no-fuse-projections`` runs them separately.
``--indexer-cache fp8`` / ``--kv-cache fp8`` store the indexer keys (132 B) / the attention KV
(window rings and compressed entries, 584 B MODEL1; head_dim 512, sm_90) in the release's FP8
layouts; the decode floors then count those bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

from ..argtypes import int_at_least, seed_arg, token_count
from ..generate import SEED_LIMIT

__all__ = ["add_bench_command", "main", "build_config", "build_model", "non_layer_bytes"]


# ------------------------------------------------------------------ argument parsing
def _int_list(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") \
            from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out




def _sizes(s: str) -> list[int]:
    try:
        out = [token_count(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 4096,64K,1M, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {s!r}")
    return out


#: kernels.md §2: the KV-reading floor of V4-Flash's attention side at 1M tokens (FP8 indexer
#: keys), the anchor of issue 8's 1M target (1.5x of it).
FLASH_ATTN_1M_FLOOR_S = 195e-6


def _cases(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        try:
            b, p = part.lower().split("x")
            out.append((int(b), token_count(p)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected cases like 1x2048,64x512, got {s!r}") \
                from None
    if any(b < 1 or p < 1 for b, p in out):
        raise argparse.ArgumentTypeError(f"batch and prompt must be >= 1, got {s!r}")
    return out


def _layers_arg(s: str):
    """N (>= 1), "auto", or "auto:N" (auto, at most N layers)."""
    v = str(s).strip().lower()
    if v == "auto":
        return "auto"
    if v.startswith("auto:"):
        return f"auto:{int_at_least(1)(v[5:])}"
    return int_at_least(1)(s)


def max_layers(model: str) -> int:
    """Main layers of the preset or checkpoint config (the ceiling of ``--layers auto``)."""
    from ..config import ModelConfig
    if model in ("flash", "pro", "tiny"):
        return getattr(ModelConfig, model)().n_layers
    return ModelConfig.from_json(model).n_layers


def add_bench_command(sub: Any) -> None:
    """Register ``dsv4 bench`` on the CLI's subparsers."""
    b = sub.add_parser(
        "bench", help="end-to-end prefill / decode throughput of the runtime vs floors",
        description=__doc__.split("\n\n")[0] + " Random weights; JSON and a PNG plot.")
    _add_arguments(b)
    b.set_defaults(func=_cmd_bench, subparser=b)


# The e2e table's cases (--mode 1m has its own: one 1M prompt, decode at 1M).
E2E_DEFAULTS = {"prefill": ((1, 2048), (8, 2048), (64, 512)), "batch": (1, 8, 64),
                "context": (4096,)}


def _check_outputs_and_mode(args) -> None:
    """Refuse, before anything is built, outputs the end of the run could not write (a
    directory, a plot that is not a .png) and e2e options that --mode 1m would ignore."""
    for opt in ("json", "plot"):
        path = getattr(args, opt, None)
        if not path:
            continue
        if os.path.isdir(path):
            raise ValueError(f"argument --{opt}: {path!r} is a directory; name a file")
        if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise ValueError(f"argument --{opt}: cannot write {path!r} (its directory does not "
                             "exist or is not writable)")
    if getattr(args, "plot", None) and not str(args.plot).lower().endswith(".png"):
        raise ValueError(f"argument --plot: name a .png file, got {args.plot!r}")
    if args.mode == "1m":
        given = [f"--{k}" for k, d in E2E_DEFAULTS.items() if tuple(getattr(args, k)) != d]
        given += [f"--{k}" for k in ("compare", "plot") if getattr(args, k, None)]
        if given:
            raise ValueError(f"{', '.join(given)}: e2e options; --mode 1m runs one 1M-token "
                             "prompt and decodes at 1M (its rows go to --json)")


def _add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--model", default="flash", metavar="flash|pro|tiny|DIR",
                   help="config preset or a checkpoint directory's config.json (default: flash)")
    b.add_argument("--layers", type=_layers_arg, default=2, metavar="N|auto",
                   help="main layers (default 2: one CSA and one HCA layer); auto (--mode 1m): "
                   "as many as fit in the GPU's free memory with the pool at 1M, one prefill "
                   "chunk's transient and a margin (dsv4.runtime.long_context.LayerFit); "
                   "auto:N: the same, at most N")
    b.add_argument("--experts", type=int_at_least(0), default=64, metavar="E",
                   help="routed experts per layer (default 64, as the issue's case; 0 = the "
                   "config's)")
    b.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                   help="random weights in bf16, or the release's native FP8/FP4 storage")
    b.add_argument("--head", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: the random head rounded to bf16 (as the release ships it) "
                   "and held once in bf16 (Model.compact_head), read with fp32 accumulation; "
                   "fp32: the official fp32 head parameter (default bf16)")
    b.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="run each layer's same-input projections (wq_a + wkv + the indexer's "
                   "weights_proj; the compressors' wkv + wgate; the shared expert's w1 + w3) "
                   "as one GEMM (Model.fuse_projections; default on)")
    b.add_argument("--indexer-cache", choices=("bf16", "fp8"), default="bf16",
                   help="indexer keys in bf16 or the release's FP8 132-byte layout")
    b.add_argument("--kv-cache", choices=("bf16", "fp8"), default="bf16",
                   help="attention KV (window rings, CSA / HCA entries) in bf16 or the "
                   "release's FP8 584-byte MODEL1 layout (head_dim 512, sm_90)")
    b.add_argument("--prefill", type=_cases, default=list(E2E_DEFAULTS["prefill"]),
                   metavar="BxP,...", help="prefill cases (default 1x2048,8x2048,64x512)")
    b.add_argument("--batch", type=_int_list, default=list(E2E_DEFAULTS["batch"]),
                   metavar="B,...", help="decode batch sizes (default 1,8,64)")
    b.add_argument("--context", type=_sizes, default=list(E2E_DEFAULTS["context"]),
                   metavar="C,...",
                   help="decode contexts in tokens, e.g. 4096,64K,1M (default 4096)")
    b.add_argument("--steps", type=int_at_least(1), default=32,
                   help="timed decode steps (default 32); the row is their median")
    b.add_argument("--repeats", type=int_at_least(1), default=3,
                   help="timed prefill runs (default 3); the row is their median")
    b.add_argument("--chunk", type=int_at_least(1), default=16384,
                   help="max tokens per engine step (prefill chunks; default 16384)")
    b.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    b.add_argument("--no-overlap", action="store_true",
                   help="the synchronous engine loop (default: the overlapped loop on CUDA, "
                   "the host preparing step n+1 while the GPU runs step n; --mode 1m is "
                   "always synchronous)")
    b.add_argument("--compare", choices=("hf",), default=None,
                   help="also run transformers' DeepseekV4ForCausalLM on the same config")
    b.add_argument("--mode", choices=("e2e", "1m"), default="e2e",
                   help="e2e: the table above; 1m: one 1M-token prompt prefilled in chunks, "
                   "decode at 1M, KV bytes per token vs dsv4 info")
    b.add_argument("--prefill-1m", choices=("full", "last"), default="full",
                   help="--mode 1m: prefill the whole prompt (minutes at many layers), or "
                   "only its last --chunk tokens over a cache taken as holding the rest "
                   "(random pool contents): the same memory, decode and attention rows")
    b.add_argument("--quick", action="store_true",
                   help="fewer cases (1x2048 prefill; decode batch 1 and 8; 8 steps)")
    b.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    b.add_argument("--plot", default=None, metavar="PATH", help="write a PNG plot")
    b.add_argument("--seed", type=seed_arg(SEED_LIMIT), default=0, metavar="S",
                   help="seed of the random weights and inputs (default 0)")


# ------------------------------------------------------------------ model
def build_config(model: str, layers: int, experts: int):
    """The bench config: ``layers`` main layers of the preset (CSA/HCA alternating, as the
    release's schedule after its two SWA layers), no MTP, no hash layers, exact arithmetic."""
    from ..config import ModelConfig
    if model in ("flash", "pro", "tiny"):
        base = getattr(ModelConfig, model)()
    else:
        base = ModelConfig.from_json(model)
    ratios = tuple(4 if i % 2 == 0 else (128 if model != "tiny" else 16)
                   for i in range(layers))
    over = dict(n_layers=layers, n_mtp_layers=0, n_hash_layers=0, compress_ratios=ratios,
                quant_sim=False)
    if experts:
        over["n_routed_experts"] = experts
        over["n_activated_experts"] = min(base.n_activated_experts, experts)
    import dataclasses
    return dataclasses.replace(base, **over)


def build_model(config, weights: str, device, seed: int = 0, fits=None, head: str = "bf16",
                fuse: bool = True):
    """A random-weight model on ``device`` in bf16; ``weights="fp8"`` stores the linears of the
    release's FP8/FP4 layout natively (``Linear.set_quantized``). ``head="bf16"`` (default, as
    ``dsv4 bench --head bf16`` serves): the random head is rounded to bf16 (the release ships
    it in bf16) and held once in bf16 (``Model.compact_head``); ``head="fp32"``: the official
    fp32 head parameter, as drawn. ``fuse`` (default, as ``dsv4 bench`` serves): each layer's
    same-input projections run as one GEMM (``Model.fuse_projections``, after the release
    formats are applied: natively stored linears do not take part; the same weight bytes).

    Built one block at a time (:func:`_build_block`), each block cast and quantised before the
    next one is drawn, so that the device holds the finished blocks plus one block in
    construction: a block is drawn in fp32 (a V4-Flash block's 256 routed experts: 26 GB), and
    drawing every block first, as ``Model(config)`` does, cannot build more than a few V4-Flash
    layers on one GPU. Routed experts are quantised one by one as the MoE constructs them
    (:func:`_expert_factory`), so a block's build transient is its fp32 attention weights plus
    one expert. Every MoE's stacked storage is rebuilt from the stored (FP8/FP4) experts
    (``MoE.restack``): no stale float stack stays behind.

    ``fits(i, blocks)`` (optional): called before block ``i`` is built with the blocks built so
    far; returning False stops the build there. The model then has ``len(blocks)`` layers
    (``config`` truncated to them; at least one layer is always built). Used by ``--layers
    auto``: see :func:`layer_plan`. The non-layer weights are drawn after the blocks, in fp32
    (embedding and head: 8 bytes a vocabulary entry x dim) before they take their held size
    (:func:`non_layer_bytes`); the pool and the step transient that ``--layers auto`` sets
    aside do not exist yet then, so that transient stays inside its budget.

    Raises ValueError for a ``head`` other than "bf16" / "fp32".
    """
    import dataclasses

    import torch

    from ..model import Model
    if head not in ("bf16", "fp32"):
        raise ValueError(f"head must be 'bf16' or 'fp32', got {head!r}")
    dev = torch.device(device)
    fmts = {}
    if weights == "fp8":
        from ..checkpoint import linear_formats
        fmts = linear_formats(config, "fp8")
    torch.manual_seed(seed)
    with torch.device("meta"):                  # names and the fp32-kept set, no storage
        keep = Model(config)._fp32_names
    blocks = []
    for i in range(config.n_layers):
        if blocks and fits is not None and not fits(i, blocks):
            break
        blocks.append(_build_block(config, i, dev, fmts, keep))
    n = len(blocks)
    cfg = config if n == config.n_layers else dataclasses.replace(
        config, n_layers=n, compress_ratios=config.compress_ratios[:n])
    # Everything outside the blocks (embedding, head, final norm, hc_head) from a one-layer,
    # one-expert model of the same width: the same constructors draw them.
    small = dataclasses.replace(cfg, n_layers=1, compress_ratios=cfg.compress_ratios[:1],
                                n_mtp_layers=0, n_hash_layers=0, n_routed_experts=1,
                                n_activated_experts=1)
    with torch.device(dev):
        rest = Model(small)
    with torch.device("meta"):
        m = Model(cfg)
    for name, child in rest.named_children():
        if name not in ("layers", "mtp"):
            setattr(m, name, child)
    for name, p in rest.named_parameters(recurse=False):
        setattr(m, name, p)
    del rest
    m.layers = torch.nn.ModuleList(blocks)
    for mod in m.modules():                     # one config object for the whole model
        if getattr(mod, "config", None) is config:
            mod.config = cfg
    left = [k for k, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"build_model left tensors without storage: {left[:5]}")
    m = m.to(torch.bfloat16).eval()
    if head == "bf16":
        w = m.head.weight
        with torch.no_grad():
            w.copy_(w.to(torch.bfloat16))       # the release's head is bf16
        m.compact_head()
    if fmts:
        for name, mod in m.named_modules():
            if fmts.get(name) in ("fp8", "fp4") and mod.weight_format is None:
                _quantize_linear(mod, name, fmts[name], cfg)
    if fuse:
        m.fuse_projections()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return m


def _quantize_linear(mod, name: str, fmt: str, config) -> None:
    """Store a Linear's weight in ``fmt`` ("fp8" 128x128 blocks / "fp4" 1x32) as the release
    does, with the release's activation-quantisation flag (all but ``wo_a``)."""
    import torch

    from ..checkpoint import act_quant_of
    from ..quant import fp4_pack, fp8_block_quantize
    w = mod.weight.detach()
    q, s = fp8_block_quantize(w.float()) if fmt == "fp8" else fp4_pack(w.float())
    mod.set_quantized(q, s, fmt, torch.bfloat16)
    mod.stored_format = fmt
    mod.act_quant = act_quant_of(name)
    mod.config = config


def _build_block(config, i: int, dev, fmts: dict, keep):
    """Block ``i`` on ``dev``: drawn by its constructor, cast to bf16 (fp32 where the release
    keeps it), its FP8/FP4 linears quantised (``fmts``: ``checkpoint.linear_formats``), every
    MoE restacked from the stored experts."""
    import torch

    from ..layers import moe as moe_mod
    from ..model import Block, cast_compute_weights
    prefix = f"layers.{i}."
    with torch.device(dev), _expert_factory(config, prefix, fmts, keep):
        blk = Block(config, i)
    cast_compute_weights(blk, torch.bfloat16, keep, prefix)
    for name, mod in blk.named_modules():
        fmt = fmts.get(prefix + name)
        if fmt in ("fp8", "fp4") and mod.weight_format is None:
            _quantize_linear(mod, prefix + name, fmt, config)
    for mod in blk.modules():
        if isinstance(mod, moe_mod.MoE):
            mod.restack()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return blk


class _expert_factory:
    """While active, ``dsv4.layers.moe.Expert(...)`` (what ``MoE.__init__`` calls for each
    routed expert, then once for the shared expert) returns the expert already cast and
    quantised, so that a V4-Flash MoE never holds its 256 experts in fp32 at once. The n-th
    call of a block is routed expert n (n < n_routed_experts), then the shared expert; the
    count is checked on exit (a changed MoE constructor fails loudly, not silently)."""

    def __init__(self, config, prefix: str, fmts: dict, keep):
        self.config, self.prefix, self.fmts, self.keep = config, prefix, fmts, keep
        self.calls = 0

    def __enter__(self):
        import torch

        from ..layers import moe as moe_mod
        from ..model import cast_compute_weights
        from .long_context import PATCH_LOCK
        PATCH_LOCK.acquire()        # released in __exit__ (see PATCH_LOCK)
        self._orig = cls = moe_mod.Expert

        def make(*args, **kwargs):
            k = self.calls
            self.calls += 1
            name = (f"ffn.experts.{k}" if k < self.config.n_routed_experts
                    else "ffn.shared_experts")
            ex = cls(*args, **kwargs)
            cast_compute_weights(ex, torch.bfloat16, self.keep, f"{self.prefix}{name}.")
            for w in ("w1", "w2", "w3"):
                full = f"{self.prefix}{name}.{w}"
                if self.fmts.get(full) in ("fp8", "fp4"):
                    _quantize_linear(getattr(ex, w), full, self.fmts[full], self.config)
            return ex

        moe_mod.Expert = make
        return self

    def __exit__(self, *exc):
        from ..layers import moe as moe_mod
        from .long_context import PATCH_LOCK
        moe_mod.Expert = self._orig
        PATCH_LOCK.release()
        want = self.config.n_routed_experts + self.config.n_shared_experts
        if exc[0] is None and self.calls != want:
            raise RuntimeError(f"build_model: the MoE of {self.prefix[:-1]} constructed "
                               f"{self.calls} experts, expected {want} (routed then shared); "
                               "the expert factory no longer matches MoE.__init__")
        return False


def non_layer_bytes(config, head: str) -> int:
    """Bytes of the weights :func:`build_model` holds outside the layers at their held size:
    the bf16 embedding and the head (``head="bf16"``: compact, 2 bytes a value; ``"fp32"``:
    4 bytes), [vocab, dim] each. The final norm and hc_head (a few dim-sized vectors) are
    left to the margin."""
    return config.vocab_size * config.dim * (2 + (2 if head == "bf16" else 4))


def layer_plan(model: str, args, context: int, free: Optional[int] = None, allocated=None):
    """``--layers auto`` on CUDA: the :class:`~dsv4.runtime.long_context.LayerFit` of this GPU
    (its free memory now; the non-layer weights; one ``--chunk`` prefill step's transient
    measured on the meta device at ``context``, plus op workspaces; a margin of 3% of the free
    memory, at least 2 GiB) and the ``fits(i, blocks)`` callback of :func:`build_model`, which
    measures each built layer (allocated bytes before / after it) and adds the next layer
    while ``LayerFit.fits`` holds (the next layer taken as large as the last one of its kind).
    The fixed part is :func:`non_layer_bytes` (the head as ``--head`` holds it).
    ``free`` (bytes) and ``allocated(blocks)`` (bytes allocated now) stand for the CUDA
    allocator's numbers (``torch.cuda.mem_get_info`` / ``memory_allocated``) in CPU tests.
    Returns (plan, fits, a dict the bench reports)."""
    import torch

    from .engine import default_block_tokens
    from .long_context import WORKSPACE_ALLOWANCE, LayerFit, StepMemory, step_transient
    from .pool import PagedCache, blocks_needed
    c = build_config(model, 2, args.experts)
    chunk = min(args.chunk, context)
    try:
        mem = step_transient(c, chunk, context, args.kv_cache, args.indexer_cache,
                             args.weights, torch.bfloat16 if args.head == "bf16" else None)
    except Exception as e:      # the plan must not stop the bench: say so, bound it by hand
        per_token = 3 * c.n_heads * c.head_dim * 2 + 2 * c.hc_mult * c.dim * 2
        mem = StepMemory(peak=int(1.5 * per_token * chunk), top=[], tokens=chunk,
                         context=context)
        print(f"dsv4 bench: the meta-device transient measure failed ({type(e).__name__}: "
              f"{str(e)[:200]}); taking 1.5 x [q, q normed, o, 2 residual streams] per token: "
              f"{mem.peak / 1e9:.2f} GB", file=sys.stderr, flush=True)
    if free is None:
        free = torch.cuda.mem_get_info()[0]
    if allocated is None:
        def allocated(blocks):
            return torch.cuda.memory_allocated()
    fixed = non_layer_bytes(c, args.head)
    plan = LayerFit(budget=free, fixed=fixed, transient=mem.peak + WORKSPACE_ALLOWANCE,
                    margin=max(2 << 30, int(0.03 * free)))
    start = allocated([])
    marks = [start]
    sizes: list[int] = []

    def pool(n: int) -> int:
        cn = build_config(model, n, args.experts)
        bt = default_block_tokens(cn)
        nb = blocks_needed(cn, _max_len_1m(context, args.steps), bt)
        return PagedCache.estimate_bytes(cn, 1, nb, bt, torch.bfloat16, args.indexer_cache,
                                         args.kv_cache)

    def fits(i: int, blocks) -> bool:
        now = allocated(blocks)
        sizes.append(now - marks[-1])          # the block built since the last call
        marks.append(now)
        nxt = sizes[-2] if len(sizes) >= 2 else sizes[-1]    # CSA / HCA alternate
        return plan.fits(now - start, nxt, pool(i + 1))

    info = dict(budget_gb=free / 1e9, fixed_gb=fixed / 1e9, transient_gb=plan.transient / 1e9,
                margin_gb=plan.margin / 1e9, layer_bytes=sizes, pool_bytes=pool,
                transient_top=mem.top)
    return plan, fits, info


# ------------------------------------------------------------------ measurements
def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    import torch
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


def _allocated_gb() -> float:
    import torch
    return torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


def _reset_peak():
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _fill_pool(engine, seed: int) -> None:
    """Random cache contents (the decode rows read real-sized scopes of finite values). An FP8
    store (uint8) gets random bytes below 64: finite e4m3 codes, bf16 RoPE halves and scales
    (UE8M0 bytes or fp32 high bytes < 64 are small positive powers / values)."""
    import torch
    g = torch.Generator(device=engine.model.device).manual_seed(seed)
    for lc in engine.cache.layers:
        for t in [lc.window] + [st.entries for st in (lc.compressor, lc.indexer)
                                if st is not None]:
            if t.dtype == torch.uint8:
                t.random_(0, 64, generator=g)
            else:
                t.normal_(generator=g)


def _engine(model, args, batch: int, max_len: int, budget: Optional[int] = None):
    import torch

    from .engine import Engine
    head = torch.bfloat16 if args.head == "bf16" else None
    # --mode 1m times its steps as the synchronous loop runs them (its loops read each
    # step's token at once); the e2e rows run the overlapped loop unless --no-overlap
    overlap = None if getattr(args, "mode", "e2e") == "e2e" else False
    if getattr(args, "no_overlap", False):
        overlap = False
    return Engine(model, max_batch=batch, max_model_len=max_len,
                  max_num_batched_tokens=budget or args.chunk,
                  cuda_graphs=not args.no_graphs, head_dtype=head,
                  indexer_cache=getattr(args, "indexer_cache", "bf16"),
                  kv_cache=getattr(args, "kv_cache", "bf16"), overlap=overlap)


def _key_bytes(model, args) -> float:
    """Bytes per indexer key the decode floor counts (bf16, or FP8 + its fp32 scale)."""
    d = model.config.index_head_dim
    return d + 4 if getattr(args, "indexer_cache", "bf16") == "fp8" else \
        d * model.embed.weight.element_size()


def _entry_bytes(model, args) -> float:
    """Bytes per attention KV entry the decode floor counts (bf16, or the 584-byte MODEL1)."""
    from ..model_info import kv_entry_bytes
    if getattr(args, "kv_cache", "bf16") == "fp8":
        return kv_entry_bytes(model.config, "fp8")
    return model.config.head_dim * model.embed.weight.element_size()


def _step_times(step, n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``step``, the GPU synchronised around each (an engine
    step ends with the device-to-host copy of its tokens anyway). Rows report the median: on
    the H200 a 16-step mean moved by 2x between runs, as one slow step of ~40 ms would (cause
    not found: a per-step run showed none, and no GC pass)."""
    out = []
    for _ in range(n):
        _sync()
        t = time.perf_counter()
        step()
        _sync()
        out.append(time.perf_counter() - t)
    return out


def _loop_step_times(step, n: int) -> list[float]:
    """Seconds between the returns of ``n`` back-to-back calls of ``step``, the GPU
    synchronised only before the first and after the last: what a serving loop sees per step.
    With the overlapped loop a call returns once the step before it is done and its own is
    queued, so in steady state an interval is one step's time on whichever of host and GPU is
    slower; with the synchronous loop it is host + GPU (each call waits for its own tokens)."""
    out = []
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
        now = time.perf_counter()
        out.append(now - t)
        t = now
    _sync()
    return out


def bench_prefill(model, args, batch: int, prompt: int) -> dict:
    import torch

    from .floors import prefill_floor
    from .request import SamplingParams
    budget = min(batch * prompt, max(args.chunk, prompt))
    eng = _engine(model, args, batch, prompt + 1, budget)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).tolist()
    sp = SamplingParams(max_new_tokens=1, eos_token_id=-1)

    def once():
        for p in prompts:
            eng.add_request(p, sp)
        _sync()
        t = time.perf_counter()
        for _ in eng.stream():
            pass
        _sync()
        return time.perf_counter() - t

    once()                                     # warm-up (allocator, kernels, autotuning)
    _reset_peak()
    runs = [once() for _ in range(args.repeats)]
    sec = statistics.median(runs)
    fl = prefill_floor(model, batch, prompt)
    tok_s = batch * prompt / sec
    floor_tok_s = batch * prompt / fl["seconds"]
    row = dict(impl="dsv4", kind="prefill", batch=batch, tokens=prompt, seconds=sec,
               seconds_runs=runs, tok_s=tok_s, floor_tok_s=floor_tok_s,
               pct_of_floor=100 * tok_s / floor_tok_s, tflops=fl["flops"] / sec / 1e12,
               peak_gb=_peak_gb())
    return row


def bench_decode(model, args, batch: int, context: int) -> dict:
    import torch

    from .floors import decode_floor
    from .request import SamplingParams
    warm = 3
    steps = args.steps
    eng = _engine(model, args, batch, context + warm + steps + 2)
    _fill_pool(eng, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    sp = SamplingParams(max_new_tokens=warm + steps + 1, eos_token_id=-1)
    for _ in range(batch):
        ids = torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist()
        rid = eng.add_request(ids, sp)
        eng.scheduler.admit_prefilled(eng.requests[rid], context - 1)
    for _ in range(warm):                      # graph capture, allocator warm-up
        eng.step()
    _reset_peak()
    waited = eng.wait_seconds
    uploads = eng.runner.stats["uploads"]      # graph steps that copied new metadata
    times = _loop_step_times(eng.step, steps)
    waited = eng.wait_seconds - waited
    sec = statistics.median(times)
    fl = decode_floor(model, batch, context, 2 if args.head == "bf16" else 4,
                      _key_bytes(model, args), _entry_bytes(model, args))
    row = dict(impl="dsv4", kind="decode", batch=batch, tokens=context, ms_step=1e3 * sec,
               ms_step_mean=1e3 * statistics.fmean(times), ms_step_max=1e3 * max(times),
               tok_s=batch / sec, floor_ms=1e3 * fl["seconds"],
               pct_of_floor=100 * fl["seconds"] / sec, gb_s=fl["bytes"] / sec / 1e9,
               graphs=eng.runner.stats["graph_steps"] > 0,
               graph_note=eng.runner.graph_off_reason, peak_gb=_peak_gb(),
               overlap=eng.overlap, timing="loop",
               host_ms_step=1e3 * (sum(times) - waited) / steps,
               uploads_per_step=(eng.runner.stats["uploads"] - uploads) / steps)
    return row


def bench_hf(config, args, model_rows: list[dict]) -> list[dict]:
    """transformers' DeepseekV4ForCausalLM (eager) on the same config, same process."""
    import torch
    try:
        import transformers
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    except Exception as e:     # not installed, or a version without V4
        print(f"dsv4 bench: --compare hf skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    hcfg = DeepseekV4Config(**config.to_hf_dict())
    hcfg._attn_implementation = "eager"
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        h = DeepseekV4ForCausalLM(hcfg)
    h = h.to(torch.bfloat16).eval()
    name = f"hf-{transformers.__version__}-eager"
    rows = []
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    with torch.no_grad():
        for b, p in args.prefill:
            ids = torch.randint(0, config.vocab_size, (b, p), device="cuda", generator=g)
            h(ids[:, :16])
            _reset_peak()
            runs = _step_times(lambda: h(ids, use_cache=True, logits_to_keep=1), args.repeats)
            sec = statistics.median(runs)
            rows.append(dict(impl=name, kind="prefill", batch=b, tokens=p, seconds=sec,
                             seconds_runs=runs, tok_s=b * p / sec, peak_gb=_peak_gb()))
            print(_fmt(rows[-1]), flush=True)
        for b in args.batch:
            ctx = 512 if b > 8 else 2048          # HF's eager prefill cannot take more here
            ids = torch.randint(0, config.vocab_size, (b, ctx + args.steps + 1), device="cuda",
                                generator=g)
            out = h(ids[:, :ctx], use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            _reset_peak()
            pos = iter(range(ctx, ctx + args.steps))

            def hf_step():
                nonlocal pkv
                s = next(pos)
                pkv = h(ids[:, s:s + 1], past_key_values=pkv, use_cache=True).past_key_values

            times = _step_times(hf_step, args.steps)
            sec = statistics.median(times)
            rows.append(dict(impl=name, kind="decode", batch=b, tokens=ctx, ms_step=1e3 * sec,
                             ms_step_mean=1e3 * statistics.fmean(times),
                             ms_step_max=1e3 * max(times), tok_s=b / sec, peak_gb=_peak_gb()))
            print(_fmt(rows[-1]), flush=True)
    del h
    torch.cuda.empty_cache()
    return rows


def _max_len_1m(context: int, steps: int) -> int:
    """The 1M mode's sequence length: the prompt, the timed decode steps, the first decode
    step and the two tokens the attention timing keeps the request alive for, and one spare
    (the pool :func:`layer_plan` plans is the one :func:`bench_1m` builds)."""
    return context + steps + 4


def bench_1m(model, args, context: int = 1 << 20) -> list[dict]:
    """One ``context``-token prompt prefilled in chunks of ``--chunk``, then decode at that
    context; KV bytes per token measured from the pool vs ``dsv4 info``'s arithmetic; the
    attention stack's decode time (:func:`attention_row`).

    ``--prefill-1m last`` (``args.prefill_1m``): the cache is taken as holding the first
    ``context - chunk`` tokens (random pool contents of the real size, as the decode rows
    do) and only the last chunk is prefilled: the same memory (a chunk's transient does not
    depend on how the earlier entries got there), decode and attention rows, in seconds
    instead of minutes; the prefill row (kind ``prefill-1m-last``) then times that chunk."""
    import torch

    from ..model_info import kv_bytes_per_token
    from .floors import decode_floor, prefill_floor
    from .pool import PagedCache
    from .request import SamplingParams
    steps = args.steps
    eng = _engine(model, args, 1, _max_len_1m(context, steps))
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist()
    # (two tokens more than timed: the request still holds its slot for the attention timing)
    rid = eng.add_request(ids, SamplingParams(max_new_tokens=steps + 3, eos_token_id=-1))
    req = eng.requests[rid]
    first = 0
    if getattr(args, "prefill_1m", "full") == "last":
        first = context - min(args.chunk, context)
        _fill_pool(eng, args.seed)
        eng.scheduler.admit_prefilled(req, first)
    if getattr(args, "head", "bf16") == "bf16":
        # resident: the compact head's own weight (build_model), or else the bf16 copy the
        # first step would make and keep
        model._low_precision_head(torch.bfloat16)
    resident = _allocated_gb()          # weights + pool: what stays between steps
    _reset_peak()
    _sync()
    t = time.perf_counter()
    n_steps = 0
    first_peak = 0.0
    while not req.output_ids:
        eng.step()
        n_steps += 1
        if n_steps == 1:
            first_peak = _peak_gb()     # vs the whole prefill's: a transient that grows with
            #                             the context shows as a later, higher peak
        if n_steps % 16 == 0:
            print(f"  prefill: {req.num_computed:,} / {context:,} tokens, "
                  f"{time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    _sync()
    pre = time.perf_counter() - t
    peak_prefill = _peak_gb()
    c = model.config
    kv_fmt = eng.cache.kv_cache
    per_block = PagedCache.block_bytes(c, eng.cache.block_tokens, model.dtype,
                                       eng.cache.indexer_cache, kv_fmt)
    used = len(req.block_table) * per_block + PagedCache.slot_bytes(c, model.dtype, kv_fmt)
    # dsv4 info's arithmetic for the formats this engine keeps (window excluded)
    info = kv_bytes_per_token(c, indexer=eng.cache.indexer_cache, kv_dtype=kv_fmt)
    info_bf16 = kv_bytes_per_token(c, indexer=eng.cache.indexer_cache, kv_dtype="bf16")
    eng.step()
    _sync()
    _reset_peak()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    _sync()
    sec = (time.perf_counter() - t) / steps
    decode_peak = _peak_gb()
    fl_d = decode_floor(model, 1, context, 2 if args.head == "bf16" else 4,
                        _key_bytes(model, args), _entry_bytes(model, args))
    fed = context - first
    fl_p = prefill_floor(model, 1, fed, start=first)
    attn = attention_row(model, eng, req, args, context)
    rows = [dict(impl="dsv4", kind="prefill-1m" if first == 0 else "prefill-1m-last", batch=1,
                 tokens=fed, context=context, seconds=pre,
                 tok_s=fed / pre, floor_tok_s=fed / fl_p["seconds"],
                 pct_of_floor=100 * fl_p["seconds"] / pre, peak_gb=peak_prefill,
                 resident_gb=resident, first_chunk_peak_gb=first_peak),
            dict(impl="dsv4", kind="decode-1m", batch=1, tokens=context, ms_step=1e3 * sec,
                 tok_s=1 / sec, floor_ms=1e3 * fl_d["seconds"],
                 pct_of_floor=100 * fl_d["seconds"] / sec,
                 kv_bytes_per_token=used / context,
                 kv_block_bytes_per_token=per_block / eng.cache.block_tokens,
                 info_kv_bytes_per_token=info, info_kv_bytes_per_token_bf16=info_bf16,
                 info_kv_bytes_per_token_fp8=kv_bytes_per_token(c),
                 graphs=eng.runner.stats["graph_steps"] > 0,
                 graph_note=eng.runner.graph_off_reason, peak_gb=decode_peak, **attn)]
    return rows


def attention_row(model, eng, req, args, context: int) -> dict:
    """The attention stack's decode time at ``context`` (the request's next position), beside
    its floors (:func:`dsv4.runtime.long_context.time_attention_decode`):

    * ``attn_ms``: every layer's Attention module (projections, q / kv paths, compressor,
      indexer, attention) in one CUDA graph; floor ``attn_floor_ms``: its weights + the KV it
      reads at 4.22 TB/s.
    * ``attn_core_ms``: the KV-reading ops alone (indexer_topk, sparse_attn, hca_attn);
      floor ``attn_core_floor_ms``: the KV bytes (kernels.md §2's arithmetic,
      ``floors.kv_read_bytes``).
    * ``attn_core_flash_ms``: the core projected to V4-Flash's 21 CSA + 20 HCA layers (the
      mean measured CSA / HCA layer; its 2 SWA layers, 0.05 µs of floor each, left out),
      against kernels.md's 195 µs floor at 1M (4.3 TB/s); the issue's target is 1.5x that.
    * ``attn_core_op_ms``: each core op's calls over all layers (``{"indexer_topk": ms, ...}``);
      ``attn_indexer_tree_ms``: the ``indexer_topk`` calls with the candidate-list tree merge
      (the previous default, same process), for the histogram select's gain.
    """
    from ..config import ModelConfig
    from ..layers.varlen import StepBatch
    from .floors import HBM_BYTES_PER_S, _tensor_bytes, kv_read_bytes
    from .long_context import time_attention_decode
    c = model.config
    batch = StepBatch.build([req.num_computed], [1], [req.slot], [req.block_table], [0],
                            model.device, max_blocks=eng.runner.max_blocks)
    t = time_attention_decode(model, eng.cache.layers, batch,
                              reps=50 if model.device.type == "cuda" else 2)
    kv = kv_read_bytes(c, context, model.embed.weight.element_size(),
                       _key_bytes(model, args), _entry_bytes(model, args))
    w = sum(_tensor_bytes(blk.attn) for blk in model.layers)
    mean = {}
    for kind in ("csa", "hca"):
        v = [s for s, k in zip(t["core_per_layer"], t["kinds"]) if k == kind]
        mean[kind] = sum(v) / len(v) if v else None
    flash = ModelConfig.flash()
    kinds = [flash.layer_kind(i) for i in range(flash.n_layers)]
    proj = (kinds.count("csa") * mean["csa"] + kinds.count("hca") * mean["hca"]
            if None not in mean.values() else None)
    return dict(attn_ms=1e3 * t["attention"], attn_floor_ms=1e3 * (w + kv) / HBM_BYTES_PER_S,
                attn_core_ms=1e3 * t["core"], attn_core_floor_ms=1e3 * kv / HBM_BYTES_PER_S,
                attn_layer_ms=[1e3 * v for v in t["per_layer"]],
                attn_core_layer_ms=[1e3 * v for v in t["core_per_layer"]],
                attn_core_flash_ms=None if proj is None else 1e3 * proj,
                attn_core_flash_floor_ms=1e3 * FLASH_ATTN_1M_FLOOR_S, attn_kinds=t["kinds"],
                attn_core_op_ms={k: 1e3 * v for k, v in t["per_op"].items()},
                attn_indexer_tree_ms=None if t["indexer_tree"] is None
                else 1e3 * t["indexer_tree"])


# ------------------------------------------------------------------ output
def _fmt(r: dict) -> str:
    if r["kind"].startswith("prefill"):
        s = (f"{r['impl']:<22} {r['kind']:<10} {r['batch']:>4} x {r['tokens']:<8} "
             f"{r['tok_s']:>12,.0f} tok/s")
        if "floor_tok_s" in r:
            s += f"   floor {r['floor_tok_s']:>11,.0f} tok/s ({r['pct_of_floor']:.1f}% of it)"
    else:
        s = (f"{r['impl']:<22} {r['kind']:<10} {r['batch']:>4} @ {r['tokens']:<8} "
             f"{r['ms_step']:>9.3f} ms/step {r['tok_s']:>10,.0f} tok/s")
        if "floor_ms" in r:
            s += f"   floor {r['floor_ms']:.3f} ms ({r['pct_of_floor']:.1f}% of it)"
            if not r.get("graphs", True):
                s += "  [eager]"
            if r.get("overlap") is False:
                s += "  [sync loop]"
            if "host_ms_step" in r:
                s += f"   host {r['host_ms_step']:.3f} ms"
    return s + f"   peak {r['peak_gb']:.1f} GB"


def _commit() -> str:
    c = os.environ.get("DSV4_COMMIT")
    if c:
        return c
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__), timeout=10
                              ).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def kernel_state() -> dict:
    """What the rows time: the CUDA kernels compiled into dsv4._C, those the model calls (see
    dsv4.ops.backend.may_call), the kernel-source digest of the build, and a one-line note."""
    from ..ops import _ext, backend
    compiled = [op for op in _ext._COMPILED_CUDA_OPS if not op.endswith("_out")]
    called = [op for op in compiled if backend.may_call((op,))]
    digest = getattr(_ext._build_config(), "KERNEL_SOURCE_DIGEST", None)
    if not compiled:
        note = (f"no compiled CUDA kernel ({_ext._IMPORT_ERROR or 'dsv4._C has none'}): every "
                "row times the pure-PyTorch reference")
    else:
        note = (f"{len(called)} of {len(compiled)} compiled kernels called by the model"
                + (f" (build digest {digest[:12]})" if digest else ""))
        if len(called) < len(compiled):
            note += ("; the others run their PyTorch reference: "
                     + (backend.built_source_mismatch() or "not verified on a GPU at this "
                        "version") + f" (set {backend._UNVERIFIED_ENV}=1 to call them)")
    return {"kernels_compiled": len(compiled), "kernels_called": len(called),
            "kernel_digest": digest, "kernel_note": note}


def plot(rows: list[dict], path: str, title: str) -> None:
    """Decode ms/step per batch and prefill tok/s per case, per implementation, with floors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    impls = sorted({r["impl"] for r in rows}, key=lambda s: (s != "dsv4", s))
    dec = [r for r in rows if r["kind"] == "decode"]
    for impl in impls:
        for ctx in sorted({r["tokens"] for r in dec if r["impl"] == impl}):
            rs = sorted([r for r in dec if r["impl"] == impl and r["tokens"] == ctx],
                        key=lambda r: r["batch"])
            if rs:
                ax1.plot([r["batch"] for r in rs], [r["ms_step"] for r in rs], "o-",
                         label=f"{impl} @ {ctx}")
    for ctx in sorted({r["tokens"] for r in dec if "floor_ms" in r}):
        rs = sorted([r for r in dec if "floor_ms" in r and r["tokens"] == ctx],
                    key=lambda r: r["batch"])
        ax1.plot([r["batch"] for r in rs], [r["floor_ms"] for r in rs], "k--",
                 label=f"floor @ {ctx}")
    ax1.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode ms / step",
            title="decode (lower is better)")
    ax1.legend(fontsize=7)
    pre = [r for r in rows if r["kind"] == "prefill"]
    cases = sorted({(r["batch"], r["tokens"]) for r in pre})
    width = 0.8 / max(1, len(impls) + 1)
    for i, impl in enumerate(impls + ["floor"]):
        vals = []
        for b, p in cases:
            if impl == "floor":
                m = [r["floor_tok_s"] for r in pre if (r["batch"], r["tokens"]) == (b, p)
                     and "floor_tok_s" in r]
            else:
                m = [r["tok_s"] for r in pre if r["impl"] == impl
                     and (r["batch"], r["tokens"]) == (b, p)]
            vals.append(m[0] if m else 0)
        ax2.bar([j + i * width for j in range(len(cases))], vals, width, label=impl)
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))],
                   [f"{b}x{p}" for b, p in cases])
    ax2.set(yscale="log", ylabel="prefill tok/s", title="prefill (higher is better)")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ entry points
def run(args) -> list[dict]:
    import torch
    auto = isinstance(args.layers, str)
    if auto and args.mode != "1m":
        raise ValueError("--layers auto is for --mode 1m (it sizes the model for the 1M pool)")
    ceiling = max_layers(args.model)
    if not auto and args.layers > ceiling:
        raise ValueError(f"argument --layers: {args.model} has {ceiling} main layers, got "
                         f"{args.layers}")
    if auto and ":" in args.layers:
        ceiling = min(ceiling, int(args.layers.split(":")[1]))
    cfg = build_config(args.model, ceiling if auto else args.layers,
                       args.experts)                # config errors first, anywhere
    _check_outputs_and_mode(args)
    if not torch.cuda.is_available():
        raise RuntimeError("dsv4 bench needs a CUDA GPU (the floors are the H200's)")
    if args.quick:
        args.prefill, args.batch, args.steps = [(1, 2048)], [1, 8], min(args.steps, 8)
    from .pool import check_kv_cache
    check_kv_cache(cfg, args.kv_cache, "cuda")      # before the model is built
    fits, plan_info = None, None
    if auto:
        _, fits, plan_info = layer_plan(args.model, args, 1 << 20)
    model = build_model(cfg, args.weights, "cuda", args.seed, fits=fits, head=args.head,
                        fuse=args.fuse_projections)
    cfg = model.config
    if plan_info is not None:
        from .floors import _tensor_bytes
        n = cfg.n_layers
        sizes = plan_info["layer_bytes"] or [_tensor_bytes(b) for b in model.layers]
        total = sum(_tensor_bytes(b) for b in model.layers)
        print(f"layers auto: {n} (at most {ceiling}): {plan_info['budget_gb']:.1f} GB "
              f"free at the start >= layers (measured {min(sizes) / 1e9:.2f}-"
              f"{max(sizes) / 1e9:.2f} GB each, {total / 1e9:.1f} GB) + pool at 1M "
              f"{plan_info['pool_bytes'](n) / 1e9:.2f} GB + embedding and head "
              f"{plan_info['fixed_gb']:.1f} GB + one {args.chunk}-token chunk's transient "
              f"{plan_info['transient_gb']:.2f} GB (meta-device measure + workspaces) + margin "
              f"{plan_info['margin_gb']:.1f} GB; allocated now {_allocated_gb():.1f} GB",
              flush=True)
        top = ", ".join(f"{op} {tuple(shape)} {b / 1e9:.2f} GB"
                        for b, op, shape, _ in plan_info["transient_top"][:4])
        print(f"  transient at its peak: {top}", flush=True)
    head = args.head
    hw = model.head.weight
    head_held = dict(head_dtype_held=str(hw.dtype).replace("torch.", ""),
                     head_held_gb=hw.numel() * hw.element_size() / 1e9)
    groups = model.fused_projection_groups()
    fused = dict(fuse_projections=args.fuse_projections, fused_projection_groups=len(groups),
                 fused_gemms_saved=sum(len(m) - 1 for m in groups.values()))
    print(f"dsv4 bench: {args.model} x {cfg.n_layers} layers (ratios {cfg.compress_ratios}), "
          f"{cfg.n_routed_experts} experts, {args.weights} weights, {head} head "
          f"(held in {head_held['head_dtype_held']}: {head_held['head_held_gb']:.2f} GB), "
          f"{args.kv_cache} KV, {args.indexer_cache} indexer keys, "
          f"{torch.cuda.get_device_name()}, commit {_commit()}", flush=True)
    print(f"projections: {fused['fused_projection_groups']} same-input groups run as one GEMM "
          f"each ({fused['fused_gemms_saved']} GEMMs fewer per step; --no-fuse-projections: "
          "separate)", flush=True)
    kernels = kernel_state()
    print(f"kernels: {kernels['kernel_note']}", flush=True)
    if kernels["kernels_called"] == 0:
        print(f"dsv4 bench: warning: {kernels['kernel_note']}", file=sys.stderr, flush=True)
    rows = []
    with torch.no_grad():
        if args.mode == "1m":
            for r in bench_1m(model, args):
                rows.append(r)
                print(_fmt(r), flush=True)
            r = rows[-1]
            print(f"KV bytes per token ({args.kv_cache} KV, {args.indexer_cache} indexer keys): "
                  f"measured {r['kv_bytes_per_token']:.1f} (window and state included), "
                  f"{r['kv_block_bytes_per_token']:.1f} in pool blocks; dsv4 info: "
                  f"{r['info_kv_bytes_per_token']:.1f} for these formats "
                  f"({r['info_kv_bytes_per_token_bf16']:.1f} bf16 KV / "
                  f"{r['info_kv_bytes_per_token_fp8']:.1f} release FP8 layout)", flush=True)
            if r.get("attn_ms") is not None:
                flash = r["attn_core_flash_ms"]
                print(f"attention stack at 1M ({cfg.n_layers} layers, CUDA graph): modules "
                      f"{1e3 * r['attn_ms']:.1f} us (floor {1e3 * r['attn_floor_ms']:.1f} us: "
                      f"weights + KV); KV-reading ops {1e3 * r['attn_core_ms']:.1f} us (floor "
                      f"{1e3 * r['attn_core_floor_ms']:.1f} us)"
                      + ("" if flash is None else
                         f"; projected to V4-Flash's 21 CSA + 20 HCA layers {1e3 * flash:.0f} us "
                         f"vs kernels.md's 195 us "
                         f"({flash / r['attn_core_flash_floor_ms']:.2f}x; target <= 1.5x)"),
                      flush=True)
                n_kind = {k: r["attn_kinds"].count(k) for k in ("csa", "hca")}
                per = {"indexer_topk": n_kind["csa"], "sparse_attn": n_kind["csa"],
                       "hca_attn": n_kind["hca"]}
                parts = [f"{op} {1e3 * ms:.1f} us ({1e3 * ms / max(per.get(op, 1), 1):.1f} per "
                         f"layer)" for op, ms in r.get("attn_core_op_ms", {}).items()]
                if r.get("attn_indexer_tree_ms") is not None:
                    parts.append(f"indexer_topk with the tree merge (previous default) "
                                 f"{1e3 * r['attn_indexer_tree_ms']:.1f} us")
                if parts:
                    print("KV-reading ops alone: " + "; ".join(parts), flush=True)
            p = rows[0]
            print(f"memory: {p['resident_gb']:.1f} GB resident (weights + pool); peak "
                  f"{p['first_chunk_peak_gb']:.1f} GB in the first prefill chunk, "
                  f"{p['peak_gb']:.1f} GB over the prefill, {r['peak_gb']:.1f} GB in decode",
                  flush=True)
        else:
            for b, p in args.prefill:
                rows.append(bench_prefill(model, args, b, p))
                print(_fmt(rows[-1]), flush=True)
                torch.cuda.empty_cache()            # the row's engine (pool) is gone
            for ctx in args.context:
                for b in args.batch:
                    try:
                        rows.append(bench_decode(model, args, b, ctx))
                        print(_fmt(rows[-1]), flush=True)
                        torch.cuda.empty_cache()
                    except (RuntimeError, torch.OutOfMemoryError) as e:
                        print(f"dsv4 decode {b} @ {ctx}: skipped ({type(e).__name__}: "
                              f"{str(e)[:200]})", flush=True)
                        torch.cuda.empty_cache()
    if plan_info is not None:
        plan_info = {k: v for k, v in plan_info.items() if k in (
            "budget_gb", "fixed_gb", "transient_gb", "margin_gb", "layer_bytes")}
        plan_info["ceiling"] = ceiling
    meta = dict(model=args.model, layers=cfg.n_layers, layers_auto=auto, layer_plan=plan_info,
                experts=cfg.n_routed_experts,
                weights=args.weights, head=head, **head_held, **fused,
                indexer_cache=args.indexer_cache,
                kv_cache=args.kv_cache,
                gpu=torch.cuda.get_device_name(),
                commit=_commit(), date=datetime.date.today().isoformat(), **kernels)
    if args.compare == "hf" and args.mode == "e2e":
        del model
        torch.cuda.empty_cache()
        rows += bench_hf(cfg, args, rows)
    for r in rows:
        r.update(meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot and args.mode == "e2e":
        plot(rows, args.plot, f"dsv4 bench: {args.model} x {cfg.n_layers} layers, "
             f"{cfg.n_routed_experts} experts, {args.weights}, {head} head, {meta['gpu']}, "
             f"{meta['commit']}")
    return rows


def _cmd_bench(args, parser) -> int:
    try:
        run(args)
    except (RuntimeError, ValueError) as e:     # ValueError: ConfigError, an unwritable path,
        #                                         --kv-cache fp8 on a model without its shapes
        print(f"dsv4 bench: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """``python -m dsv4.runtime.bench ...`` (same arguments as ``dsv4 bench``)."""
    p = argparse.ArgumentParser(prog="dsv4 bench", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return _cmd_bench(p.parse_args(argv), p)


if __name__ == "__main__":
    raise SystemExit(main())
