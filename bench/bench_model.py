"""End-to-end throughput of the tiny model (prefill and decode), per backend.

Usage: python bench/bench_model.py [--device cuda|cpu] [--dtype bfloat16|float32]
       [--prompt-len 512] [--decode 32] [--batch 1] [--backend cuda,reference] [--json out.json]

Prints prefill tokens/s and decode tokens/s of ``ModelConfig.tiny()`` with random weights, once
per backend (``dsv4.set_backend``): the attention layers on the CUDA kernels and on the
pure-PyTorch reference, in the same process.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dsv4


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backend", default="cuda,reference",
                    help="comma-separated backends to time (dsv4.set_backend)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = dsv4.ModelConfig.tiny()
    m = dsv4.Model(cfg).eval().to(a.device, getattr(torch, a.dtype))
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt_len + a.decode), device=a.device)
    results = []
    print(f"{'device':>10} {'backend':>9} {'dtype':>9} {'batch':>5} {'prompt':>6} "
          f"{'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8}")
    for backend in a.backend.split(","):
        dsv4.set_backend(backend)
        results.append(_run(m, ids, a, backend))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


def _run(m, ids, a, backend: str) -> dict:
    with torch.no_grad():
        m(ids[:, :8])  # warm-up
        cache = m.make_cache(a.batch)
        _sync(a.device)
        t0 = time.perf_counter()
        m(ids[:, :a.prompt_len], cache=cache)
        _sync(a.device)
        t1 = time.perf_counter()
        for p in range(a.prompt_len, a.prompt_len + a.decode):
            m(ids[:, p:p + 1], cache=cache)
        _sync(a.device)
        t2 = time.perf_counter()
    res = {
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "backend": backend, "dtype": a.dtype, "batch": a.batch, "prompt_len": a.prompt_len, "decode": a.decode,
        "prefill_tok_s": a.batch * a.prompt_len / (t1 - t0),
        "decode_tok_s": a.batch * a.decode / (t2 - t1),
        "decode_ms_per_step": 1e3 * (t2 - t1) / max(1, a.decode),
    }
    print(f"{res['device'][:10]:>10} {backend:>9} {a.dtype:>9} {a.batch:>5} {a.prompt_len:>6} "
          f"{res['prefill_tok_s']:>14.1f} {res['decode_tok_s']:>13.1f} "
          f"{res['decode_ms_per_step']:>8.2f}")
    return res


if __name__ == "__main__":
    main()
