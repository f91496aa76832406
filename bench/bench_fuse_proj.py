"""Same-input projections as one GEMM (``Model.fuse_projections``) against the separate GEMMs,
at V4-Flash shapes, on the code path the layers run (``dsv4.layers.linear.project`` with and
without the :class:`~dsv4.layers.linear.LinearGroup`; the members are views of the same buffer
either way, so only the GEMM calls differ).

Groups (per layer of ``dsv4 bench``'s model: one CSA and one HCA layer, each with a MoE):
``csa_input`` wq_a + wkv + indexer weights_proj (bf16, [1024 + 512 + 64, 4096]);
``hca_input`` wq_a + wkv; ``csa_comp`` compressor wkv + wgate + indexer compressor wkv + wgate
(fp32, [2·512 + 2·512 + 2·128 + 2·128, 4096]); ``hca_comp`` wkv + wgate (fp32, [512 + 512,
4096]); ``shared`` the shared expert's w1 + w3 (bf16, [2048 + 2048, 4096]). T tokens of input.

Times: GPU µs per call from a CUDA graph of 20 calls (what the engine's captured decode step
pays), each call on another copy of the weights (> 256 MB in all: read from HBM, as in a
step where the other layers' weights evict them). Floor: max(weights + input + output bytes /
4.22 TB/s, FLOPs / 767 TFLOP/s bf16 or 67 TFLOP/s fp32 (cuBLAS SGEMM, TF32 off)). Baseline:
the separate GEMMs in the same process. ``step`` rows: the sum over the groups of the bench
model's decode step (csa_input + hca_input + csa_comp + hca_comp + 2 x shared). Prediction
(bench/README.md "Fused same-input projections"): at T = 1, 9 fewer GEMMs save ~20-35 µs per
step on the H200.

Usage: python bench/bench_fuse_proj.py [--quick] [--json F] [--markdown F]
"""

from __future__ import annotations

import os
import sys

import torch

PEAK_TBPS = 4.22
PEAK_TFLOPS = {torch.bfloat16: 767.0, torch.float32: 67.0}
CALLS = 20
DIM = 4096
DEVICE = "cuda"
COLUMNS = ("group", "T", "gemms", "time_us", "floor_us", "pct_floor", "base_us", "saved_us",
           "speedup", "note")

# name -> (dtype, in_features, out_features of each member); V4-Flash (dim 4096, q_lora_rank
# 1024, head_dim 512, index_n_heads 64, index_head_dim 128, moe_inter_dim 2048)
GROUPS = {
    "csa_input": (torch.bfloat16, DIM, (1024, 512, 64)),
    "hca_input": (torch.bfloat16, DIM, (1024, 512)),
    "csa_comp": (torch.float32, DIM, (1024, 1024, 256, 256)),
    "hca_comp": (torch.float32, DIM, (512, 512)),
    "shared": (torch.bfloat16, DIM, (2048, 2048)),
}
STEP = {"csa_input": 1, "hca_input": 1, "csa_comp": 1, "hca_comp": 1, "shared": 2}


def _copies(dtype, K, sizes):
    """Copies of one group (Linear modules + their LinearGroup), > 256 MB in all."""
    from dsv4.layers.linear import Linear, LinearGroup
    nbytes = sum(sizes) * K * torch.tensor([], dtype=dtype).element_size()
    n = max(1, min(CALLS, -(-(256 << 20) // nbytes)))
    out = []
    for _ in range(n):
        with torch.device(DEVICE):
            lins = tuple(Linear(K, s, keep_fp32=dtype == torch.float32) for s in sizes)
        for lin in lins:
            lin.weight.data = lin.weight.data.to(dtype)
            lin.requires_grad_(False)
        group = LinearGroup.fuse(lins)
        assert group is not None and group.index == tuple(range(len(sizes)))
        out.append((lins, group))
    return out


def _graph_us(fn) -> float:
    from _driver import graph_time_us
    return graph_time_us(fn, CALLS)


def run(quick: bool = False) -> list[dict]:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return []
    from dsv4.layers.linear import project
    torch.manual_seed(0)
    rows, step = [], {}
    for T in ((1, 8) if quick else (1, 8, 64, 2048)):
        for name, (dtype, K, sizes) in GROUPS.items():
            copies = _copies(dtype, K, sizes)
            x = torch.randn(T, K, device=DEVICE, dtype=dtype)
            with torch.no_grad():
                lins, group = copies[0]
                got = project(x, lins, group)
                want = project(x, lins, None)
                for a, b in zip(got, want):        # another kernel: bf16 rounding at most
                    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
                    assert a.shape == b.shape and torch.allclose(
                        a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())

                def fused(k):
                    lins, group = copies[k % len(copies)]
                    project(x, lins, group)

                def separate(k):
                    lins, _ = copies[k % len(copies)]
                    project(x, lins, None)
                t, tb = _graph_us(fused), _graph_us(separate)
            N, es = sum(sizes), x.element_size()
            floor = max((N * K + T * K + T * N) * es / (PEAK_TBPS * 1e6),
                        2 * T * N * K / (PEAK_TFLOPS[dtype] * 1e6))
            rows.append(dict(group=name, T=T, gemms=f"1 vs {len(sizes)}", time_us=t,
                             floor_us=floor, pct_floor=100 * floor / t, base_us=tb,
                             saved_us=tb - t, speedup=tb / t,
                             note=f"{str(dtype)[6:]} [{'+'.join(map(str, sizes))}, {K}]"))
            s = step.setdefault(T, [0.0, 0.0, 0.0, 0, 0])
            s[0] += STEP[name] * t
            s[1] += STEP[name] * tb
            s[2] += STEP[name] * floor
            s[3] += STEP[name]
            s[4] += STEP[name] * len(sizes)
            del copies
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        t, tb, floor, n_fused, n_sep = step[T]
        rows.append(dict(group="step", T=T, gemms=f"{n_fused} vs {n_sep}", time_us=t,
                         floor_us=floor, pct_floor=100 * floor / t, base_us=tb,
                         saved_us=tb - t, speedup=tb / t,
                         note="dsv4 bench's 2-layer step: the sum of its groups"))
    return rows


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _driver import run_bench  # one command line and table format for all benches

    return run_bench("bench_fuse_proj", __doc__, {"fuse_proj": run}, COLUMNS,
                     "T = 1 and 8 only", argv)


if __name__ == "__main__":
    sys.exit(main())
