"""Full-size DeepSeek-V4-Flash with expert parallelism over the GPUs of one host (issue 12).

    torchrun --nproc-per-node 2 bench/bench_ep.py [--quick] [--checkpoint DIR] [--json F]
    python bench/bench_ep.py            # one process: prints the floors (predictions) only

The 43 layers at their real shapes (no MTP), random weights in the release's native storage
(FP8 e4m3 linears with e8m0 128x128 scales, FP4 e2m1 routed experts with e8m0 1x32 scales,
kept native: ``weights="native"``), bf16 activations, the CUDA kernels. Each rank holds half of
the 256 experts of every layer (``dsv4.distributed``), runs its own sequences and serves the
other rank's expert exchanges.

Weights: by default a synthetic release-format checkpoint generated on each GPU and read
through the ordinary loader (:class:`SyntheticRelease`; each rank draws only the tensors it
holds) -- no disk: the release format of V4-Flash is ~160 GB, more than the 2-GPU machine's
128 GiB disk, and ``dsv4 make-checkpoint --config flash`` quantises 33K expert matrices on the
CPU. ``--checkpoint DIR`` loads a real directory instead (``dsv4 make-checkpoint --config flash
--out DIR`` on a disk that holds it, the release itself, or ``dsv4 convert`` rank files).

Rows (global batch split over the ranks; rank r runs sequences r, r + W, ...):

* decode at batch 1 and 64, context 8K and 128K: the context is written into the cache directly
  (random entries, ``_fill_context``: a decode step reads the same bytes whatever they hold),
  then timed decode steps; tokens/s = batch / step time;
* prefill at batch 1 (8K, 128K: 8K-token chunks) and batch 64 at 8K (one 8K sequence per
  call); batch 64 at 128K (8.4M tokens) is not run: its floor is printed.

Each row: time, tokens/s, the floor (the larger of the byte floor at 4.22 TB/s and the FLOP
floor at 767 TFLOP/s of the busiest rank, :func:`floors`), % of floor, the all-to-all bytes
per step and peak memory per GPU. JSON to ``--json`` or ``$OUT/bench_ep.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import time
import zlib

import torch

from dsv4.runtime.floors import BF16_FLOPS as BF16, HBM_BYTES_PER_S as HBM
from dsv4.runtime.floors import attention_flops, kv_read_bytes  # (bf16 dense cache: default)

DECODE_CASES = [(1, 8192), (64, 8192), (1, 131072), (64, 131072)]
PREFILL_CASES = [(1, 8192), (64, 8192), (1, 131072), (64, 131072)]
NOT_RUN = {("prefill", 64, 131072): "8.4M prompt tokens: floor only"}
QUICK_CASES = {"decode": [(1, 8192), (64, 8192)], "prefill": [(1, 8192)]}
CHUNK = 8192


# ----------------------------------------------------------------------------- floors
def _spec_bytes(config):
    """Bytes the model holds, by how a step reads them, from the release layout
    (:func:`dsv4.checkpoint.tensor_specs`) with the in-memory dtypes of ``weights="native"``
    (FP8/FP4 bytes and their scales kept; tensors the model keeps in fp32 counted at 4 bytes).
    Returns (dense bytes, bytes of one routed expert, embed row bytes, head bytes, dense params,
    expert params)."""
    from dsv4.checkpoint import tensor_specs
    from dsv4.model import Model
    from dsv4.config import ModelConfig

    torch.manual_seed(0)
    with torch.device("meta"):
        tiny = Model(ModelConfig.tiny())
    fp32 = {n.split(".", 2)[-1] if n.startswith("layers.") else n for n in tiny._fp32_names}
    dense = expert = dense_params = expert_params = 0
    c = config
    for name, (shape, dtype) in tensor_specs(c, "fp8").items():
        if name.startswith("mtp.") or name in ("embed.weight", "head.weight"):
            continue
        n = math.prod(shape)
        size = n * dtype.itemsize
        key = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if key in fp32 and dtype != torch.float32:
            size = n * 4
        logical = n * (2 if dtype == torch.int8 and ".experts." in name else 1)
        if ".ffn.experts." in name:
            if ".experts.0." in name:
                expert += size
                expert_params += 0 if name.endswith(".scale") else logical
        else:
            dense += size
            dense_params += 0 if name.endswith(".scale") else logical
    n_layers = c.n_layers
    return (dense, expert / n_layers, c.dim * 2, c.vocab_size * c.dim * 4, dense_params,
            expert_params / n_layers)


def floors(c, kind: str, batch: int, context: int, world: int, full_logits: bool) -> dict:
    """Floor of one row (decode: one step; prefill: the whole prompt), busiest rank.

    Per rank r with b_r = its sequences: decode reads the dense weights and the fp32 head once
    if b_r > 0, the embedding rows, its distinct routed experts (uniform routing, in
    expectation: L (1 - (1 - k/E)^tokens) of its L = E/W), and b_r sequences' KV; FLOPs are
    2 x params per token (dense + head per own token, experts per received pair: tokens x k/W)
    plus attention. Prefill: the FLOPs of its own b_r prompts (head for every position when the
    model returns every position's logits) plus its share of all experts' pairs; bytes: the
    weights once per call. All-to-all: pairs leaving the rank, x (dim bf16 + 4 B weight) out
    and dim bf16 back, per layer.
    """
    dense, expert, embed_row, head, dense_p, expert_p = _spec_bytes(c)
    E, k, L = c.n_routed_experts, c.n_activated_experts, c.n_routed_experts // world
    out = {"bytes": 0.0, "flops": 0.0, "seconds": 0.0, "a2a_bytes": 0.0}
    for r in range(world):
        b = len(range(r, batch, world))
        if kind == "decode":
            tokens, own = batch, b
            calls = 1
            kv = b * kv_read_bytes(c, context)
            attn = b * attention_flops(c, context, 1)
        else:
            tokens, own = batch * context, b * context
            calls = b * -(-context // CHUNK)
            kv = 0.0
            attn = b * attention_flops(c, 0, context)
        distinct = L * (1 - (1 - k / E) ** (tokens if kind == "decode" else min(tokens, CHUNK)))
        weights = ((dense + head) if b else 0) + c.n_layers * distinct * expert
        logit_rows = own if (kind == "decode" or full_logits) else b * -(-context // CHUNK)
        flops = (2 * dense_p * own + 2 * c.vocab_size * c.dim * logit_rows + attn
                 + 2 * expert_p * c.n_layers * tokens * k / world)
        byts = weights * max(calls, 1) + kv + own * embed_row
        sec = max(byts / HBM, flops / BF16)
        if sec >= out["seconds"]:
            out.update(bytes=byts, flops=flops, seconds=sec)
        pairs_out = own * k * (world - 1) / world
        out["a2a_bytes"] = max(out["a2a_bytes"],
                               c.n_layers * pairs_out * (c.dim * 2 * 2 + 4) / max(calls, 1))
    return out


# ----------------------------------------------------------------------------- weights
class SyntheticRelease:
    """A release-format V4 checkpoint drawn on the GPU, with the ``SafetensorsFile`` interface
    the loader reads (``path``, ``tensors``, ``read``). FP8 linears: N(0, 1) in e4m3 with the
    power-of-two scale nearest 1/sqrt(in_features); FP4 experts: uniform random e2m1 codes
    (rms 2.93) with the scale nearest 1/(2.93 sqrt(in)); every other tensor from
    :func:`dsv4.synthetic.synthetic_tensor` (the model's own initialisation). Only the tensors
    read are drawn (a rank never draws the other rank's experts)."""

    def __init__(self, config, device, seed: int = 0):
        from dsv4.checkpoint import tensor_specs
        from dsv4.convert import DTYPE_NAMES
        self.path = "<synthetic V4 release>"
        self.config, self.device, self.seed = config, torch.device(device), seed
        self.specs = tensor_specs(config, "fp8")
        self.tensors = {n: (DTYPE_NAMES[dt], tuple(sh), None) for n, (sh, dt) in
                        self.specs.items()}

    def _gen(self, name: str) -> torch.Generator:
        """A generator seeded by the tensor's name: every rank draws the same replicated
        tensors whatever it reads before."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
        return g

    def _scale(self, shape, value: float) -> torch.Tensor:
        code = 127 + round(math.log2(value))
        return torch.full(shape, code, dtype=torch.uint8, device=self.device).view(
            torch.float8_e8m0fnu)

    def read(self, name: str) -> torch.Tensor:
        from dsv4.synthetic import synthetic_tensor
        shape, dtype = self.specs[name]
        mod = name.rsplit(".", 1)[0]
        if dtype == torch.float8_e4m3fn:
            return torch.randn(shape, generator=self._gen(name), device=self.device,
                               dtype=torch.bfloat16).to(dtype)
        if dtype == torch.int8:                                      # packed FP4
            return torch.randint(-128, 128, shape, generator=self._gen(name),
                                 device=self.device, dtype=torch.int8)
        if dtype == torch.float8_e8m0fnu:
            w_shape, w_dtype = self.specs[mod + ".weight"]
            k = w_shape[1] * (2 if w_dtype == torch.int8 else 1)
            return self._scale(shape, k ** -0.5 / (2.93 if w_dtype == torch.int8 else 1.0))
        return synthetic_tensor(self.config, name, shape, self.seed).to(self.device, dtype)

    def keys(self):
        return list(self.tensors)

    def close(self):
        pass


def load(args, group, config, dtype):
    from dsv4.distributed import from_pretrained
    from dsv4.synthetic import checkpoint_config

    if args.checkpoint:
        return from_pretrained(args.checkpoint, group, dtype=dtype, weights="native",
                               n_mtp_layers=0, progress=False)
    cfg, cfg_json = checkpoint_config(config, "fp8", "fp4")
    with tempfile.TemporaryDirectory(prefix="dsv4-ep-config-") as tmp:  # only config.json
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_json, f)
        reader = SyntheticRelease(cfg, group.device, seed=0)
        return from_pretrained(tmp, group, dtype=dtype, weights="native", n_mtp_layers=0,
                               progress=False, readers=[reader])


# ----------------------------------------------------------------------------- runs
def _fill_context(cache, context: int, extra: int) -> None:
    """Make every row of ``cache`` hold ``context`` tokens (random entries; window ring,
    compressed entries and indexer keys as a real prefill leaves them at a multiple of 128),
    with room for ``extra`` more tokens. Needs the dense Cache of dsv4.cache (main branch)."""
    for lc in cache.layers:
        lc.window.normal_()
        for st in (lc.compressor, lc.indexer):
            if st is None:
                continue
            st.reserve((context + extra) // st.ratio + 1)
            st.entries[:, :context // st.ratio].normal_()
            st.kv.zero_()
            st.score.fill_(float("-inf"))
    cache.lengths = [context] * cache.batch_size


def _sync(group) -> None:
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)


def _sync_max(value: float, group) -> float:
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group.process_group)
    return float(t)


def _peaks(group) -> list[float]:
    import torch.distributed as dist
    if group.device.type != "cuda":
        return []
    mine = torch.tensor([torch.cuda.max_memory_allocated(group.device) / 2**30],
                        dtype=torch.float64, device=group.device)
    every = [torch.empty_like(mine) for _ in range(group.world_size)]
    dist.all_gather(every, mine, group=group.process_group)
    return [round(float(v), 1) for v in every]


def run_decode(model, group, batch: int, context: int, steps: int) -> float:
    from dsv4.distributed import serve_step
    W, r = group.world_size, group.rank
    mine = len(range(r, batch, W))
    cache = model.make_cache(mine) if mine else None
    if cache is not None:
        _fill_context(cache, context, steps + 2)
    ids = torch.randint(0, model.config.vocab_size, (max(mine, 1), 1), device=group.device)

    def step():
        if mine:
            model(ids, cache=cache)
        else:
            serve_step(model)

    step()
    step()                                            # warm-up
    _sync(group)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(group)
    elapsed = _sync_max(time.perf_counter() - t0, group)
    del cache
    return elapsed / steps


def run_prefill(model, group, batch: int, context: int, chunk: int = CHUNK) -> float:
    from dsv4.distributed import serve_step
    W, r = group.world_size, group.rank
    mine = list(range(r, batch, W))
    calls_per_seq = -(-context // chunk)
    most = len(range(0, batch, W)) * calls_per_seq    # rank 0 has the most sequences
    kw = {"logits": "last"} if "logits" in inspect.signature(model.forward).parameters else {}
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=group.device)
    with torch.no_grad():                             # warm-up call of one chunk
        if r == 0:
            model(ids[:, :chunk], **kw)
        else:
            serve_step(model)
    _sync(group)
    t0 = time.perf_counter()
    done = 0
    for _ in mine:
        cache = model.make_cache(1)
        for s in range(0, context, chunk):
            model(ids[:, s:s + chunk], cache=cache, **kw)
            done += 1
        del cache
    for _ in range(most - done):
        serve_step(model)
    _sync(group)
    return _sync_max(time.perf_counter() - t0, group)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="decode at 8K, prefill batch 1 at 8K")
    ap.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="load this checkpoint (release / make-checkpoint / convert rank files)")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per row")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke test (gloo, ModelConfig.tiny, tests/distributed)")
    a = ap.parse_args(argv)
    import torch.distributed as dist
    from dsv4.config import ModelConfig
    from dsv4.distributed import torchrun_world_size

    # floors skip the MTP layer; the model is loaded without it
    cfg = ModelConfig.tiny(vocab_size=512) if a.smoke else ModelConfig.flash()
    world = dist.get_world_size() if dist.is_initialized() else torchrun_world_size()
    cases = ([("decode", b, c) for b, c in (QUICK_CASES["decode"] if a.quick else DECODE_CASES)]
             + [("prefill", b, c) for b, c in (QUICK_CASES["prefill"] if a.quick
                                                else PREFILL_CASES)])
    if not a.smoke and (world == 1 or not torch.cuda.is_available()):
        print("bench_ep: expert parallelism needs `torchrun --nproc-per-node 2 bench/bench_ep.py`"
              " on 2 GPUs; printing the floors for EP = 2 only")
        _table(cfg, 2, [dict(kind=k, batch=b, context=c, seconds=None) for k, b, c in cases],
               full_logits=True)
        return 0

    import dsv4
    from dsv4.distributed import ExpertParallelGroup, init, serve
    group = ExpertParallelGroup.current() if a.smoke else init()
    if not a.smoke:
        dsv4.set_backend("cuda")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    t0 = time.perf_counter()
    model = load(a, group, cfg, dtype)
    load_s = _sync_max(time.perf_counter() - t0, group)
    weights_gib = (torch.cuda.memory_allocated(group.device) / 2**30
                   if group.device.type == "cuda" else 0.0)
    full_logits = "logits" not in inspect.signature(model.forward).parameters
    rows = []
    with torch.no_grad():
        for kind, b, c in cases:
            if group.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(group.device)
            row = dict(kind=kind, batch=b, context=c, seconds=None)
            if (kind, b, c) in NOT_RUN:
                row["note"] = NOT_RUN[kind, b, c]
            else:
                if a.smoke:                      # tiny: short contexts, 2 chunks of prefill
                    b, c = min(b, 3), min(c // 512, 96)
                    row.update(batch=b, context=c)
                row["seconds"] = (run_decode(model, group, b, c, a.steps) if kind == "decode"
                                  else run_prefill(model, group, b, c, 64 if a.smoke else CHUNK))
                if group.device.type == "cuda":
                    torch.cuda.empty_cache()
                row["peak_gib"] = _peaks(group)
            rows.append(row)
            if group.rank == 0:
                print(f"  done: {kind} batch {b} context {c}: {row.get('seconds')}",
                      file=sys.stderr, flush=True)
    serve(model)
    if group.rank == 0:
        dev = (torch.cuda.get_device_name(group.device) if group.device.type == "cuda"
               else "CPU")
        name = "tiny (smoke test)" if a.smoke else "V4-Flash (43 layers, native FP8/FP4)"
        print(f"{name}, EP = {group.world_size}, "
              f"{dev}; weights {weights_gib:.1f} GiB per "
              f"GPU (rank 0), loaded in {load_s:.0f} s; "
              f"{'every position' if full_logits else 'last-position'} logits")
        table = _table(cfg, group.world_size, rows, full_logits)
        out = os.environ.get("OUT")
        path = a.json or (os.path.join(out, "bench_ep.json") if out else None)
        if path:
            with open(path, "w") as f:
                json.dump({"world": group.world_size, "weights_gib": weights_gib,
                           "load_s": load_s, "rows": table}, f, indent=1)
    if not a.smoke:
        dist.destroy_process_group()
    return 0


def _table(cfg, world: int, rows: list[dict], full_logits: bool) -> list[dict]:
    print(f"{'row':>8} {'batch':>5} {'context':>7} {'time':>10} {'tok/s':>9} {'floor':>10} "
          f"{'% floor':>7} {'a2a MB':>7} {'peak GiB/GPU':>13}  note")
    out = []
    for row in rows:
        kind, b, c = row["kind"], row["batch"], row["context"]
        f = floors(cfg, kind, b, c, world, full_logits)
        s = row.get("seconds")
        tokens = b if kind == "decode" else b * c
        unit = 1e3 if kind == "decode" else 1.0
        u = "ms" if kind == "decode" else "s"
        cell = (f"{s * unit:.2f} {u}" if s else "-")
        tps = f"{tokens / s:,.0f}" if s else "-"
        pct = f"{100 * f['seconds'] / s:.1f}" if s else "-"
        peaks = "/".join(str(p) for p in row.get("peak_gib", [])) or "-"
        print(f"{kind:>8} {b:>5} {c:>7} {cell:>10} {tps:>9} "
              f"{f['seconds'] * unit:>7.2f} {u:<2} {pct:>7} {f['a2a_bytes'] / 1e6:>7.1f} "
              f"{peaks:>13}  {row.get('note', '')}")
        out.append({**row, "tokens_per_s": tokens / s if s else None,
                    "floor_s": f["seconds"], "floor_bytes": f["bytes"],
                    "floor_flops": f["flops"], "a2a_bytes": f["a2a_bytes"]})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
