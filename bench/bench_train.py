"""Training-step throughput and MFU of a ~100M-parameter DeepSeek-V4 (``dsv4.train.Trainer``).

Usage: python bench/bench_train.py [--device cuda|cpu] [--dtype bfloat16|float32]
       [--batch 8] [--seq-len 1024] [--steps 4] [--quick] [--json PATH]

Model (``bench_config()``): dim 256, 8 layers (2 SWA + CSA/HCA alternating, hash MoE in the
first 2) + 1 MTP block, 16 routed experts (top-2) + 1 shared, mHC, the real 129,280-token
vocabulary: ≈106M parameters, ≈40M without embedding and head. One step = the full recipe:
forward of the main model and the MTP block, fused vocabulary cross-entropy, balance loss,
backward, gradient clipping, Muon (hybrid Newton-Schulz in bf16) + AdamW, loss-free bias update.
Training runs the layers' pure-PyTorch reference path (the CUDA ops have no autograd formulas;
docs/training.md), so this measures that path.

Printed: step time, tokens/s, achieved TFLOP/s and MFU against the measured H200 bf16 dense
ceiling (767 TFLOP/s), and the split into forward+backward and optimizer time; the baseline in
the same process is the same step with ``--optimizer adamw`` (AdamW everywhere), which isolates
the cost of Muon. Model FLOPs per step = 3 × forward FLOPs: 2 × (matmul parameters used per
token: attention, compressor and indexer projections, the shared expert and the top-k routed
experts, mHC, the vocabulary head for the main and the MTP block) + 4 × heads × head_dim × keys
attended per query (QK and PV; window plus selected / all complete compressed entries).
JSON to ``--json`` or ``$OUT/bench_train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import dsv4  # noqa: E402
from dsv4.train import Corpus, TrainConfig, Trainer  # noqa: E402

PEAK_TFLOPS = 767.0


def bench_config(**kw) -> dsv4.ModelConfig:
    base = dict(dim=256, moe_inter_dim=256, n_layers=8, n_hash_layers=2, n_mtp_layers=1,
                n_heads=8, n_routed_experts=16, n_activated_experts=2, q_lora_rank=256,
                head_dim=128, rope_head_dim=64, o_groups=4, o_lora_rank=256, window_size=128,
                compress_ratios=(0, 0, 4, 128, 4, 128, 4, 128, 0), index_n_heads=8,
                index_head_dim=64, index_topk=64)
    base.update(kw)
    return dsv4.ModelConfig.tiny(**base)


def step_flops(model: dsv4.Model, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    c = model.config
    per_token = 0.0
    for name, p in model.named_parameters():
        if p.dim() != 2 or name == "embed.weight" or name.endswith((".ape",)):
            continue
        n = p.numel()
        if ".experts." in name:
            n *= c.n_activated_experts / c.n_routed_experts
        if name == "head.weight":
            n *= 1 + c.n_mtp_layers            # the MTP block reuses the head
        per_token += 2 * n
    attn = 0.0
    for i, r in enumerate(c.compress_ratios):
        keys = min(c.window_size, seq) / (2 if seq <= c.window_size else 1)
        if r == 4:
            keys += min(c.index_topk, seq // 4)
        elif r:
            keys += seq / r / 2                # all complete entries, causal: half on average
        attn += 4 * c.n_heads * c.head_dim * keys
    return 3.0 * batch * seq * (per_token + attn)


def run(device: str, dtype: torch.dtype, batch: int, seq: int, steps: int, optimizer: str,
        cfg: dsv4.ModelConfig) -> dict:
    torch.manual_seed(0)
    model = dsv4.Model(cfg).to(device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    toks = rng.integers(2, 30000, 4 * batch * (seq + 2) + 10_000).astype(np.int32)
    corpus = Corpus(toks, toks[:2 * (seq + 2)].copy(), 1, 1)
    tr = Trainer(model, corpus, TrainConfig(steps=steps + 2, batch=batch, seq_len=seq,
                                            lr=1e-3, optimizer=optimizer, warmup=1))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    opt_time = [0.0]
    orig = tr.optimizer.step

    def timed_step(*a, **k):
        sync()
        t = time.perf_counter()
        out = orig(*a, **k)
        sync()
        opt_time[0] += time.perf_counter() - t
        return out

    tr.optimizer.step = timed_step
    for _ in range(2):                          # warm-up
        tr.train_step()
    opt_time[0] = 0.0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    losses = [tr.train_step()["loss"] for _ in range(steps)]
    sync()
    dt = (time.perf_counter() - t0) / steps
    flops = step_flops(model, batch, seq)
    n_all = sum(p.numel() for p in model.parameters())
    res = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "optimizer": optimizer, "batch": batch,
           "seq_len": seq, "parameters": n_all, "step_ms": 1e3 * dt,
           "optimizer_ms": 1e3 * opt_time[0] / steps, "tokens_per_s": batch * seq / dt,
           "model_tflop_per_step": flops / 1e12, "tflops": flops / dt / 1e12,
           "mfu_percent": 100 * flops / dt / 1e12 / PEAK_TFLOPS, "losses": losses,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
           if device.startswith("cuda") else None}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true",
                    help="batch 2, seq 256, 2 steps (on CPU: a dim-64 model)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cfg = bench_config()
    if a.quick:
        a.batch, a.seq_len, a.steps = 2, 256, 2
        if a.device == "cpu":
            cfg = bench_config(dim=64, q_lora_rank=64, o_lora_rank=64, moe_inter_dim=64,
                               n_layers=4, compress_ratios=(0, 4, 128, 4, 0), n_hash_layers=1)
    dtype = getattr(torch, a.dtype)
    print(f"bench_train: {a.device} {a.dtype}, batch {a.batch} x seq {a.seq_len}, "
          f"{a.steps} timed steps, reference layers + fused CE + Muon", flush=True)
    rows = [run(a.device, dtype, a.batch, a.seq_len, a.steps, opt, cfg)
            for opt in ("muon", "adamw")]
    hdr = (f"{'optimizer':>9} {'params':>8} {'step ms':>9} {'opt ms':>8} {'tok/s':>9} "
           f"{'TFLOP/s':>8} {'MFU %':>6} {'vs adamw':>8}")
    print(hdr)
    base = rows[1]["step_ms"]
    for r in rows:
        print(f"{r['optimizer']:>9} {r['parameters'] / 1e6:>7.1f}M {r['step_ms']:>9.1f} "
              f"{r['optimizer_ms']:>8.1f} {r['tokens_per_s']:>9.0f} {r['tflops']:>8.2f} "
              f"{r['mfu_percent']:>6.2f} {r['step_ms'] / base:>8.2f}")
    print(f"model FLOPs per step {rows[0]['model_tflop_per_step']:.2f} TFLOP; ceiling "
          f"{PEAK_TFLOPS:.0f} TFLOP/s bf16 dense (measured H200)")
    out = a.json or os.path.join(os.environ.get("OUT", "."), "bench_train.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
